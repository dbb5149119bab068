"""Per-sequence log-probs of the labels from logits: the autograd op over the fused kernels.

Data flow: validate -> flat labels (-1 = masked) -> backend forward (per-token log-probs, one
(logsumexp, 1 - p_label) per token saved) -> per-row sum in PyTorch over [B, T] floats (or segment sums
over a packed [1, total_tokens] batch, fastdpo.packed). Autograd turns the per-row gradient into
a per-token one (an expand), and the backend backward writes the logits gradient in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import validation as V
from .backend import get_backend
from .packed import check_cu_seqlens, row_offsets, segment_sums


# ---- the autograd op, registered as torch custom ops ----
# Custom ops (rather than a torch.autograd.Function) so that torch.compile(fullgraph=True) sees
# one opaque call per pass: the kernels, their launch-time checks and the backend choice stay
# outside the traced graph, and there is no graph break.

@torch.library.custom_op("fastdpo::token_logps", mutates_args=())
def token_logps_op(
    logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, softcap: Optional[float],
    sum_scores: bool, save_lse: bool, inplace_backward: bool, token_metrics: bool = False,
    log_sum_sq: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, T, V], flat labels [B*T] (-1 = masked) -> log-probs, backward state [B*T, 2]
    (logsumexp, 1 - p_label), score sums, entropy, is-top-1, log sum_v p_v^2 [B*T].

    Optional results are empty unless asked for (`save_lse`, `sum_scores`, `token_metrics`,
    `log_sum_sq`). `inplace_backward` is only read by the backward.
    """
    backend = get_backend(logits.device)
    results = backend.token_logps_forward(
        logits, labels, inv_temp=inv_temp, softcap=softcap, save_lse=save_lse, sum_scores=sum_scores,
        token_metrics=token_metrics, log_sum_sq=log_sum_sq,
    )
    # Each absent result is its own empty tensor: custom op outputs may not alias one another.
    return tuple(x if x is not None else results[0].new_empty(0) for x in results)


@token_logps_op.register_fake
def _(logits, labels, inv_temp, softcap, sum_scores, save_lse, inplace_backward, token_metrics=False,
      log_sum_sq=False):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = labels.shape[0]
    sizes = (n, (n, 2) if save_lse else 0, n if sum_scores else 0, n if token_metrics else 0,
             n if token_metrics else 0, n if log_sum_sq else 0)
    return tuple(logits.new_empty(k, dtype=acc) for k in sizes)


@torch.library.custom_op("fastdpo::token_logps_backward", mutates_args=())
def token_logps_backward_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
    inv_temp: float, softcap: Optional[float],
) -> torch.Tensor:
    """Gradient w.r.t. the logits of sum_n grad_logp[n] * logp[n], as a new [B, T, V] tensor."""
    return get_backend(logits.device).token_logps_backward(
        logits, labels, lse, grad_logp, inv_temp=inv_temp, softcap=softcap
    )


@token_logps_backward_op.register_fake
def _(logits, labels, lse, grad_logp, inv_temp, softcap):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("fastdpo::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_logp: torch.Tensor,
    inv_temp: float, softcap: Optional[float],
) -> None:
    """The same gradient written over the logits (no second [B, T, V] tensor)."""
    get_backend(logits.device).token_logps_backward(
        logits, labels, lse, grad_logp, inv_temp=inv_temp, softcap=softcap, out=logits
    )


@token_logps_backward_inplace_op.register_fake
def _(logits, labels, lse, grad_logp, inv_temp, softcap):
    return None


def _setup_token_logps(ctx, inputs, output):
    logits, labels, inv_temp, softcap, _sum_scores, _save_lse, inplace = inputs[:7]
    _logp, lse, *metrics = output
    ctx.save_for_backward(logits, labels, lse)
    ctx.inv_temp, ctx.softcap, ctx.inplace = inv_temp, softcap, inplace
    ctx.mark_non_differentiable(lse, *metrics)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody differentiates


def _backward_token_logps(ctx, grad_logp, *_grads_of_metrics):
    logits, labels, lse = ctx.saved_tensors
    no_grads = (None,) * (len(ctx.needs_input_grad) - 1)  # labels and the options
    if grad_logp is None:
        return (None, *no_grads)
    grad_logp = grad_logp.contiguous()
    if ctx.inplace:
        # Reuses the logits' storage for their gradient. The op declares the mutation, so autograd
        # bumps the version counter and any other node that saved the logits fails loudly.
        token_logps_backward_inplace_op(logits, labels, lse, grad_logp, ctx.inv_temp, ctx.softcap)
        grad = logits
    else:
        grad = token_logps_backward_op(logits, labels, lse, grad_logp, ctx.inv_temp, ctx.softcap)
    return (grad, *no_grads)


token_logps_op.register_autograd(_backward_token_logps, setup_context=_setup_token_logps)


@dataclass
class SequenceStats:
    """Per-row results of one pass over the logits (all [B])."""

    logps: torch.Tensor  # sum of label log-probs over completion tokens (differentiable)
    counts: torch.Tensor  # number of completion tokens
    score_sums: torch.Tensor | None  # sum of logits over vocabulary and completion tokens (detached)
    entropy_sums: torch.Tensor | None = None  # sum over completion tokens of the next-token entropy
    top1_counts: torch.Tensor | None = None  # completion tokens whose label is the (first) argmax
    log_sum_sq_sums: torch.Tensor | None = None  # sum over completion tokens of log sum_v p_v^2 (WPO)


@dataclass
class TokenLayout:
    """Which tokens count and how per-token results fold into rows: prepared once per batch and
    shared by the policy and reference passes over the same [B, T] layout (logits or hidden)."""

    labels: torch.Tensor  # flat int32 [B*T], -1 where masked
    offsets: torch.Tensor  # int64 [rows + 1]: row b owns flat tokens offsets[b] : offsets[b + 1]
    counts: torch.Tensor  # [rows] completion tokens per row
    row_sums: Callable[[torch.Tensor], torch.Tensor]  # [B*T] per-token values -> [rows] sums


def build_layout(
    like: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
    *,
    mask: torch.Tensor | None,
    ignore_index: int,
    cu_seqlens: torch.Tensor | None,
) -> TokenLayout:
    """The layout of labels (and cu_seqlens, `packed.check_cu_seqlens`) already checked against `like`
    ([B, T, ...], logits or hidden states): the label range check (one host sync) and the row offsets."""
    B, T = like.shape[:2]
    flat = V.token_labels(labels, mask, ignore_index, vocab)
    offsets = row_offsets(cu_seqlens, B, T, like.device)
    if cu_seqlens is None:  # padded rows: a plain row sum is cheaper than a segment sum
        row_sums = lambda x: x.view(B, T).sum(-1)  # noqa: E731
    else:
        row_sums = lambda x: segment_sums(x, offsets)  # noqa: E731
    return TokenLayout(labels=flat, offsets=offsets, counts=row_sums(flat >= 0), row_sums=row_sums)


def token_layout(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    name: str = "logits",
) -> TokenLayout:
    """Validate labels and mask against `logits` (logits and cu_seqlens are checked by the caller) and
    fold them into a TokenLayout."""
    V.check_labels(labels, logits.shape[:2], mask)
    V.check_same_device(logits, labels=labels, mask=mask)
    return build_layout(logits, labels, logits.shape[-1], mask=mask, ignore_index=ignore_index,
                        cu_seqlens=cu_seqlens)


def layout_stats(
    logits: torch.Tensor,
    layout: TokenLayout,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    sum_scores: bool = False,
    token_metrics: bool = False,
    inplace_backward: bool = False,
    name: str = "logits",
    log_sum_sq: bool = False,
) -> SequenceStats:
    """One fused pass over `logits` for a prepared layout; the logits, temperature and softcap are
    checked by the caller (the public entry point). Differentiable only when `logits` requires grad
    (otherwise nothing is saved for a backward). `log_sum_sq` also sums WPO's per-token
    log sum_v p_v^2 (detached) from the same pass."""
    if logits.shape[0] * logits.shape[1] != layout.labels.numel():
        raise ValueError(f"{name} has {logits.shape[0] * logits.shape[1]} positions, the labels {layout.labels.numel()}")
    grad = logits.requires_grad and torch.is_grad_enabled()
    # Under torch.compile the in-place backward would be functionalized into a copy anyway, so
    # the compiled path always takes the out-of-place backward (same numbers, one [B, T, V] more).
    inplace = inplace_backward and not torch.compiler.is_compiling()
    logp, _lse, zsum, ent, top1, lss = token_logps_op(logits, layout.labels, 1.0 / temperature, softcap,
                                                      sum_scores, grad, inplace, token_metrics, log_sum_sq)

    def detached_sums(x: torch.Tensor, wanted: bool) -> torch.Tensor | None:
        return layout.row_sums(x).detach() if wanted else None

    return SequenceStats(logps=layout.row_sums(logp), counts=layout.counts, score_sums=detached_sums(zsum, sum_scores),
                         entropy_sums=detached_sums(ent, token_metrics), top1_counts=detached_sums(top1, token_metrics),
                         log_sum_sq_sums=detached_sums(lss, log_sum_sq))


def sequence_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    sum_scores: bool = False,
    token_metrics: bool = False,
    inplace_backward: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    name: str = "logits",
    log_sum_sq: bool = False,
) -> SequenceStats:
    """Validate, then run the fused pass: per-row log-probs, token counts and, on request, logit sums
    (`sum_scores`), the entropy sums and top-1 counts of TRL's token metrics (`token_metrics`) and
    the sums of log sum_v p_v^2 that WPO's weights need (`log_sum_sq`).

    With `cu_seqlens` the batch is packed ([1, total_tokens, V], see fastdpo.packed) and the
    results are per packed row.
    """
    V.check_logits(logits, name)
    V.check_scores(temperature, softcap)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, logits.shape, logits)
    layout = token_layout(logits, labels, mask=mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens, name=name)
    return layout_stats(logits, layout, temperature=temperature, softcap=softcap, sum_scores=sum_scores,
                        token_metrics=token_metrics, inplace_backward=inplace_backward, name=name,
                        log_sum_sq=log_sum_sq)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    cu_seqlens: torch.Tensor | None = None,
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
            nothing else in the backward graph reads the logits. Eager only: under
            torch.compile the out-of-place backward is used.
        cu_seqlens: for a packed, padding-free batch: logits [1, total_tokens, V], labels and
            mask [1, total_tokens], and int32/int64 [B + 1] cumulative row lengths
            (flash-attention's varlen convention). Results are per packed row.

    Returns:
        [B] log-prob sums, differentiable w.r.t. ``logits``. Rows with no unmasked position give 0.
    """
    return sequence_stats(
        logits, labels, mask=mask, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, inplace_backward=inplace_backward, cu_seqlens=cu_seqlens,
    ).logps
