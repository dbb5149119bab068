"""Input checks that run before any kernel launch, with errors that name the argument at fault."""

from __future__ import annotations

import contextlib
import math
import numbers
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


def check_ref_logits(ref_logits: object | None, policy_logits: torch.Tensor) -> None:
    """ref_logits, when given, shaped and placed like the (checked) policy logits."""
    if ref_logits is None:
        return
    ref_logits = check_logits(ref_logits, "ref_logits")
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(f"ref_logits must match policy_logits {tuple(policy_logits.shape)}, got {tuple(ref_logits.shape)}")
    check_same_device(policy_logits, ref_logits=ref_logits)


def check_scores(temperature: float, softcap: float | None) -> None:
    """The score transform softcap * tanh(z / softcap) / temperature needs both finite and > 0."""
    _check_number(temperature, "temperature")
    if not 0 < temperature < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if softcap is not None:
        _check_number(softcap, "softcap")
        if not 0 < softcap < math.inf:
            raise ValueError(f"softcap must be finite and > 0, or None, got {softcap}")


def _check_number(value: object, name: str) -> None:
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number, got {value!r}")


_FLAGS = frozenset({"return_metrics", "return_rows", "inplace_backward", "reference_free"})
_SIZES = {"chunk_size": "tokens", "vocab_chunk_size": "vocabulary rows"}
CALL_OPTIONS = _FLAGS | set(_SIZES) | {"grad_in_forward", "ignore_index", "temperature", "softcap"}  # check_options'


def check_options(**options: object) -> None:
    """The public keyword options besides the loss's own (LossConfig checks those), by their public
    names: the flags are bools, `grad_in_forward` a bool or None, `ignore_index` an int, the score
    transform and chunk sizes in range. The functions call it, and the loss modules with the
    options they fix, so that a bad option fails at construction."""
    for name, value in options.items():
        if name in _FLAGS and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        if name == "grad_in_forward" and value is not None and not isinstance(value, bool):
            raise TypeError(f"grad_in_forward must be True, False or None, got {value!r}")
        if name == "ignore_index" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"ignore_index must be an int, got {value!r}")
        if name in _SIZES and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive number of {_SIZES[name]} or None, got {value!r}")
    if "temperature" in options or "softcap" in options:
        check_scores(options.get("temperature", 1.0), options.get("softcap"))  # type: ignore[arg-type]


def check_pairs(rows: int, name: str) -> int:
    """Rows are [chosen; rejected]: an odd count cannot be split into pairs, and no row is no pair."""
    if rows == 0:
        raise ValueError(f"{name} has no rows: a DPO batch needs at least one (chosen, rejected) pair")
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

    The checks raise a clear error for a label outside [0, V) or a non-bool mask other than 0/1,
    at the cost of one host-device synchronization per call on GPU tensors: the host waits for
    the queued work (the model's forward) before launching the loss. Off, nothing waits: a label
    >= V gives a NaN log-prob (never an out-of-bounds read), a negative label counts as masked,
    and a non-bool mask counts where it is nonzero. `FASTDPO_CHECK_LABELS=0` starts a process off.
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
    binary = None  # a non-bool mask holds only 0 and 1: read with the labels' check, one host read
    if mask is not None:
        if mask.dtype != torch.bool:
            binary = ((mask == 0) | (mask == 1)).all()
        valid &= mask.bool()
    if not check:  # no host read: the kernels turn a label >= V into NaN (clamped there before the
        # int32 cast, which would wrap a label past 2^31 into range); a negative one is masked
        return torch.where(valid & (labels >= 0), labels.clamp(max=vocab), -1).to(torch.int32).reshape(-1)
    bad = valid & ((labels < 0) | (labels >= vocab))
    any_bad, mask_ok = torch.stack([bad.any(), binary if binary is not None else bad.new_ones(())]).tolist()
    if not mask_ok:
        raise ValueError(f"mask must be bool or hold only 0 and 1, got values {torch.unique(mask)[:8].tolist()}")
    if any_bad:
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
    """hidden [B, T, H], weight [V, H] and bias [V] of one float dtype on one device; under autocast
    they are returned in its dtype (`autocast_linear_inputs`)."""
    h_name, w_name, b_name = f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias"
    hidden = check_tensor(hidden, h_name)
    check_float(hidden, h_name)
    weight, bias = check_tensor(weight, w_name), None if bias is None else check_tensor(bias, b_name)
    hidden, weight, bias = autocast_linear_inputs(hidden, weight, bias)
    if hidden.dim() != 3 or hidden.shape[-1] == 0:
        raise ValueError(f"{h_name} must be [B, T, H] with H >= 1, got shape {tuple(hidden.shape)}")
    check_float(weight, w_name)
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] == 0:
        raise ValueError(f"{w_name} must be [V, H] with H = {H} (from {h_name}) and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{w_name} is {weight.dtype} but {h_name} is {hidden.dtype}; pass one dtype")
    _check_device_of(hidden, h_name, weight, w_name)
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{b_name} must be [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{b_name} is {bias.dtype} but {h_name} is {hidden.dtype}; pass one dtype")
        _check_device_of(hidden, h_name, bias, b_name)
    return hidden, weight, bias


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two of t's elements may share memory (an expand or as_strided view): unless, taking the
    dimensions by increasing stride, each stride passes the furthest offset the smaller ones reach.
    Reads strides only (no device work); a layout that interleaves without overlap counts as
    overlapping, which is safe for what asks (an in-place gradient)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def autocast_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Under autocast for hidden's device, the three cast to its dtype, as `F.linear(hidden, weight,
    bias)` would run (fp64 and non-float tensors are left alone, as autocast leaves them); else as given.
    The fused-linear ops then run with autocast off, on inputs of one dtype."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.dtype not in (torch.float32, torch.float16, torch.bfloat16) else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def _check_device_of(reference: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {reference.device}")
