"""Triton kernels of fastdpo, installed as `fastdpo.kernels` (never as a top-level `kernels`).

The contract (`TokenOptions`, `TokenResults`, `SlabResults`) imports without Triton, so the
PyTorch backend shares it on machines that have none; the launchers need Triton.
"""

from .contract import SlabResults, TokenOptions, TokenResults

try:
    from .token_logps import token_logps_backward, token_logps_forward, token_slab_forward
except ModuleNotFoundError as exc:  # no Triton here: fastdpo.backend serves the PyTorch twin
    if exc.name != "triton":
        raise

__all__ = ["TokenOptions", "TokenResults", "SlabResults", "token_logps_forward", "token_logps_backward",
           "token_slab_forward"]
