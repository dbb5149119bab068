"""The one place that chooses how per-token log-probs are computed: Triton kernels or PyTorch.

Both backends expose the same functions, `token_logps_forward`, `token_slab_forward` and
`token_logps_backward` (see kernels/token_logps.py for their math), with one contract: they take a
`TokenOptions` and return named results (kernels/contract.py), so everything above them is
backend-agnostic.

FASTDPO_BACKEND=auto (default) uses Triton for CUDA tensors and the chunked PyTorch path
elsewhere; =triton forces the kernels (CPU tensors need TRITON_INTERPRET=1, which is how CI
proves the kernels right); =torch forces PyTorch.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

_CHOICES = ("auto", "triton", "torch")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_name(device: torch.device) -> str:
    """Name of the backend that serves tensors on `device` under the current environment."""
    choice = os.environ.get("FASTDPO_BACKEND", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"FASTDPO_BACKEND must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda" and _triton_available() and not _interpreting():
            return "triton"
        return "torch"
    if choice == "triton":
        if not _triton_available():
            raise RuntimeError("FASTDPO_BACKEND=triton but triton is not installed")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"FASTDPO_BACKEND=triton needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU tensors"
            )
    return choice


def get_backend(device: torch.device) -> ModuleType:
    """Module with token_logps_forward / token_slab_forward / token_logps_backward for tensors on `device`."""
    if backend_name(device) == "triton":
        from . import kernels

        return kernels
    from . import torch_backend

    return torch_backend
