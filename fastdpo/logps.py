"""Per-sequence log-probs of the labels from logits: the autograd op over the fused kernels.

Data flow: validate -> flat labels (-1 = masked) -> backend forward (per-token log-probs, one
fp32 logsumexp per token saved) -> per-row sum in PyTorch over [B, T] floats. Autograd turns
the per-row gradient into a per-token one (an expand), and the backend backward writes the
logits gradient in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import validation as V
from .backend import get_backend


class _TokenLogps(torch.autograd.Function):
    """logits [B, T, V], flat labels [B*T] -> per-token log-probs [B*T] and score sums [B*T]."""

    @staticmethod
    def forward(ctx, logits, labels, inv_temp, softcap, sum_scores, inplace_backward):
        backend = get_backend(logits.device)
        logp, lse, zsum = backend.token_logps_forward(
            logits, labels, inv_temp=inv_temp, softcap=softcap, save_lse=True, sum_scores=sum_scores
        )
        ctx.save_for_backward(logits, labels, lse)
        ctx.backend, ctx.inv_temp, ctx.softcap, ctx.inplace = backend, inv_temp, softcap, inplace_backward
        zsum = zsum if zsum is not None else logp.new_empty(0)
        ctx.mark_non_differentiable(zsum)
        return logp, zsum

    @staticmethod
    def backward(ctx, grad_logp, _grad_zsum):
        logits, labels, lse = ctx.saved_tensors
        if grad_logp is None:
            return None, None, None, None, None, None
        # In place reuses the logits' storage for their gradient: no second [B, T, V] tensor.
        grad = ctx.backend.token_logps_backward(
            logits, labels, lse, grad_logp.contiguous(),
            inv_temp=ctx.inv_temp, softcap=ctx.softcap, out=logits if ctx.inplace else None,
        )
        return grad, None, None, None, None, None


@dataclass
class SequenceStats:
    """Per-row results of one pass over the logits (all [B])."""

    logps: torch.Tensor  # sum of label log-probs over completion tokens (differentiable)
    counts: torch.Tensor  # number of completion tokens
    score_sums: torch.Tensor | None  # sum of logits over vocabulary and completion tokens (detached)


def _check_options(temperature: float, softcap: float | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")


def sequence_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    sum_scores: bool = False,
    inplace_backward: bool = False,
    name: str = "logits",
) -> SequenceStats:
    """Validate, then run the fused pass. Differentiable only when `logits` requires grad."""
    V.check_logits(logits, name)
    V.check_labels(labels, logits.shape[:2], mask)
    V.check_same_device(logits, labels=labels, mask=mask)
    _check_options(temperature, softcap)
    B, T, vocab = logits.shape
    flat = V.token_labels(labels, mask, ignore_index, vocab)
    counts = (flat >= 0).view(B, T).sum(-1)
    if logits.requires_grad and torch.is_grad_enabled():
        logp, zsum = _TokenLogps.apply(logits, flat, 1.0 / temperature, softcap, sum_scores, inplace_backward)
    else:  # reference pass: nothing saved for a backward
        backend = get_backend(logits.device)
        logp, _, zsum = backend.token_logps_forward(
            logits.detach(), flat, inv_temp=1.0 / temperature, softcap=softcap, save_lse=False, sum_scores=sum_scores
        )
    logps = logp.view(B, T).sum(-1)
    score_sums = zsum.view(B, T).sum(-1).detach() if sum_scores else None
    return SequenceStats(logps=logps, counts=counts, score_sums=score_sums)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Sum of log p(label) over the unmasked positions of each row, in fp32 (fp64 for fp64 logits).

    Args:
        logits: [B, T, V] float32 / bfloat16 / float16, any strides (``logits[:, :-1]`` is fine).
        labels: [B, T] integer, aligned with the logits: ``labels[:, t]`` is scored by
            ``logits[:, t]`` (the caller shifts).
        mask: optional [B, T] bool or 0/1; positions with 0 are skipped.
        ignore_index: label value that also marks a skipped position.
        temperature: scores are ``logits / temperature``.
        softcap: if set, scores are ``softcap * tanh(logits / softcap) / temperature`` (Gemma 2).
        inplace_backward: write the logits gradient into the logits' storage. Only safe when
            nothing else in the backward graph reads the logits.

    Returns:
        [B] log-prob sums, differentiable w.r.t. ``logits``. Rows with no unmasked position give 0.
    """
    return sequence_stats(
        logits, labels, mask=mask, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, inplace_backward=inplace_backward,
    ).logps
