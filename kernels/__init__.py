"""Triton kernels of fastdpo, installed as `fastdpo.kernels` (never as a top-level `kernels`)."""

from .token_logps import token_logps_backward, token_logps_forward, token_slab_forward

__all__ = ["token_logps_forward", "token_logps_backward", "token_slab_forward"]
