"""Input checks that run before any kernel launch, with errors that name the argument at fault."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

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


def check_scores(temperature: float, softcap: float | None) -> None:
    """The score transform softcap * tanh(z / softcap) / temperature needs both > 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


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


# ---- label values: checked on the host by default ----

_value_checks = os.environ.get("FASTDPO_CHECK_LABELS", "1") != "0"


def value_checks_enabled() -> bool:
    return _value_checks


def set_value_checks(enabled: bool) -> None:
    """Turn the checks of label and mask values on (the default) or off, for the whole process.

    The checks raise a clear error for a label outside [0, V) or a float mask other than 0/1,
    at the cost of one host-device synchronization per call on GPU tensors: the host waits for
    the queued work (the model's forward) before launching the loss. Off, nothing waits: a label
    >= V gives a NaN log-prob (never an out-of-bounds read), a negative label counts as masked,
    and a float mask counts where it is nonzero. `FASTDPO_CHECK_LABELS=0` starts a process off.
    """
    global _value_checks
    _value_checks = bool(enabled)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """`set_value_checks(enabled)` for the span of a `with` block."""
    before = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(before)


def token_labels(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, vocab: int, *,
                 known_range: tuple[int, int] | None = None) -> torch.Tensor:
    """Flat int32 labels with every masked position set to -1, after a range check (unless
    `set_value_checks(False)`, or unless `known_range`, the labels' (min, max) read on the host
    where they were made, already lies in [0, vocab): then nothing is read back).

    The check is one reduction read on the host. It runs inside a custom op so that
    torch.compile(fullgraph=True) sees one opaque call rather than data-dependent Python.
    """
    proven = mask is None and known_range is not None and 0 <= known_range[0] and known_range[1] < vocab
    return _token_labels(labels, mask, ignore_index, vocab, _value_checks and not proven)


@torch.library.custom_op("fastdpo::token_labels", mutates_args=())
def _token_labels(
    labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int, vocab: int, check: bool
) -> torch.Tensor:
    valid = labels != ignore_index
    if mask is not None:
        if check and mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be bool)")
        valid &= mask.bool()
    if not check:  # no host read: the kernels turn a label >= V into NaN; a negative one is masked
        return torch.where(valid & (labels >= 0), labels, -1).to(torch.int32).reshape(-1)
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; "
            f"found {int(labels[where])} at position {where}"
        )
    return torch.where(valid, labels, -1).to(torch.int32).reshape(-1)


@_token_labels.register_fake
def _(labels, mask, ignore_index, vocab, check):
    return labels.new_empty(labels.numel(), dtype=torch.int32)


# ---- fused linear inputs: hidden states [B, T, H], lm_head weight [V, H], bias [V] ----

def check_linear(
    hidden: object, weight: object, bias: object | None, prefix: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [B, T, H], weight [V, H] and bias [V] of one float dtype on one device."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden = check_tensor(hidden, h_name)
    check_float(hidden, h_name)
    if hidden.dim() != 3 or hidden.shape[-1] == 0:
        raise ValueError(f"{h_name} must be [B, T, H] with H >= 1, got shape {tuple(hidden.shape)}")
    weight = check_tensor(weight, w_name)
    check_float(weight, w_name)
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"{w_name} must be [V, H] with H = {H} (from {h_name}) and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} is {weight.dtype} but {h_name} is {hidden.dtype}; pass one dtype")
    _check_device_of(hidden, h_name, weight, w_name)
    if bias is not None:
        bias = check_tensor(bias, b_name)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} is {bias.dtype} but {h_name} is {hidden.dtype}; pass one dtype")
        _check_device_of(hidden, h_name, bias, b_name)
    return hidden, weight, bias


def _check_device_of(reference: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {reference.device}")
