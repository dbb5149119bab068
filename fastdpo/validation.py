"""Input checks that run before any kernel launch, with errors that name the argument at fault."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def check_same_device(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name} is on {x.device} but the logits are on {reference.device}")


def check_logits(logits: object, name: str, ndim: int = 3) -> torch.Tensor:
    logits = check_tensor(logits, name)
    check_float(logits, name)
    if logits.dim() != ndim:
        layout = "[B, T, V]" if ndim == 3 else "[B, T, H]"
        raise ValueError(f"{name} must be {layout}, got shape {tuple(logits.shape)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has an empty last dimension")
    return logits


def check_labels(labels: object, shape: torch.Size, mask: object | None) -> None:
    labels = check_tensor(labels, "labels")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must be [B, T] = {tuple(shape)} to match the logits, got {tuple(labels.shape)}")
    if mask is None:
        return
    mask = check_tensor(mask, "mask")
    if mask.shape != shape:
        raise ValueError(f"mask must be [B, T] = {tuple(shape)} to match the labels, got {tuple(mask.shape)}")


def check_pairs(rows: int, name: str) -> int:
    """Rows are [chosen; rejected]: an odd count cannot be split into pairs."""
    if rows % 2:
        raise ValueError(f"{name} must have an even number of rows (chosen then rejected), got {rows}")
    return rows // 2


def check_row_vector(x: object, name: str, rows: int) -> torch.Tensor:
    x = check_tensor(x, name)
    check_float(x, name)
    if x.shape != (rows,):
        raise ValueError(f"{name} must be [B] = ({rows},), got {tuple(x.shape)}")
    return x


def token_labels(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, vocab: int) -> torch.Tensor:
    """Flat int32 labels with every masked position set to -1, after a range check.

    The check is one reduction on the host side: a label >= V that reached the kernel would be
    an out-of-bounds read on the GPU, not an error.
    """
    valid = labels != ignore_index
    if mask is not None:
        if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be bool)")
        valid &= mask.bool()
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {int(labels[where])} at position {where}"
        )
    return torch.where(valid, labels, -1).to(torch.int32).reshape(-1)
