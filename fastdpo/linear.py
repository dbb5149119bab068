"""Fused linear DPO: from the last hidden states and the lm_head weight to the loss, never the logits.

    hidden [B, T, H], weight [V, H] (+ bias [V])
      --valid tokens only, chunk by chunk: cuBLAS matmul -> fused log-prob kernels-->
    per-row log-probs, token counts, logit sums, entropy sums and top-1 counts
      --> the same PairLogps -> loss (+ TRL metrics) as fused_dpo_loss

Masked tokens (prompt, padding) are dropped before any matmul. The only [tokens x vocab] buffer
is one chunk of logits in the input dtype (``chunk_size`` tokens; by default about 512 MiB, or
the largest pair's valid tokens if more, with grad_in_forward; on CPU H / 32 tokens or 1 MiB,
see linear_chunks.CPU_TOKENS_PER_HIDDEN); besides it the pass holds O(N H)
floats and the gradients themselves, never [N, V].

Two ways to the gradients (fastdpo.linear_ops, fastdpo.linear_chunks):
- grad_in_forward (default for every loss whose pair gradients do not depend on other pairs, so
  all but the aot family): the gradient of each group of pairs is applied while its logits are
  still in the buffer, so the backward only scales what the forward built. 6 N H V FLOPs, with
  chunks of whole pairs (0.33 GB of bf16 logits for a pair of 1290 valid tokens at V = 128256);
  by default a chunk grows to hold the largest pair; a pair longer than an explicit
  ``chunk_size`` is forwarded in pieces and recomputed (8 N H V for it).
- recompute (aot, ``grad_in_forward=False``, or ``linear_sequence_logps``): the forward keeps
  two fp32 per token (logsumexp, exact 1 - p_label) and the backward recomputes each chunk's
  logits. 8 N H V FLOPs, with chunks of any size; with ``vocab_chunk_size`` both passes take
  the vocabulary in slabs too, so the logits are never more than [chunk_size, vocab_chunk_size]
  (the lean setting: memory near the gradients themselves).

What the lean setting trades: a chunk of C tokens costs one read and write of dW (2 |W| bytes
of traffic: 2.1 GB at V = 128256, H = 4096) and holds about C (2 vocab_chunk_size + 8 H) bytes
(bf16) besides the gradients, the fp32 [C, H] dH sum the largest part. Fewer bytes held mean more
dW traffic: 10 MB at C = 256 (20 chunks at shape A) against 40 MB at C = 1024 (5 chunks). Fused
Triton tiles (Cut Cross-Entropy) hold nothing but the gradients, at the price of atomic or locked
adds into dH and dW from every tile; measured beside this path (README) they are several times
slower exact, which is why the matmuls here are cuBLAS chunks.

Why no mode that keeps chunk logits from the forward to the backward: it saves the recomputation
only for the chunks it keeps, so 6 N H V needs all valid logits kept (1.3 GB more at shape A of
benchmarks/common.py, 2.4 GB with the gradients), while grad_in_forward reaches 6 N H V holding one chunk.
Keeping logits would only pay for losses that couple pairs (aot), which are rare.
(N counts valid tokens throughout: masked ones never reach a matmul.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from . import validation as V
from .linear_chunks import LinearOptions
from .linear_ops import linear_logps, linear_logps_grad_in_forward, row_results
from .logps import SequenceStats, TokenLayout, build_layout, pass_options
from .losses import LossConfig
from .objective import LossModule, grad_in_forward_spec, loss_from_rows, policy_weights, resolve_reference
from .packed import check_cu_seqlens



def _size_or_default(value: int | None, name: str) -> int:
    """A positive chunk size, or 0 for None: the default, which the chunk layer resolves."""
    V.check_options(**{name: value})
    return 0 if value is None else value


def _wants_grad(*tensors: torch.Tensor | None) -> tuple[bool, bool, bool]:
    on = torch.is_grad_enabled()
    return tuple(bool(on and t is not None and t.requires_grad) for t in tensors)  # type: ignore[return-value]


def linear_sequence_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    sum_scores: bool = False,
    token_metrics: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    grad_spec: tuple[str, torch.Tensor] | None = None,
    log_sum_sq: bool = False,
    layout: TokenLayout | None = None,
) -> SequenceStats:
    """Validate, then run the fused linear pass: per-row log-probs, counts and, on request, score
    sums (`sum_scores`), the entropy sums and top-1 counts of TRL's token metrics
    (`token_metrics`) and the sums of log sum_v p_v^2 that WPO's weights need (`log_sum_sq`), all
    from the same chunks of logits.

    `grad_spec` = (`LossConfig.encode()`, reference rows) selects the grad-in-forward op for that loss.
    `layout` is the labels' TokenLayout when the caller has prepared it (fastdpo.head); then
    `mask`, `ignore_index` and `cu_seqlens` are not read.
    """
    hidden, weight, bias = V.check_linear(hidden, weight, bias)
    V.check_labels(labels, hidden.shape[:2], mask)
    V.check_same_device(hidden, labels=labels, mask=mask)
    options = _linear_options(temperature, softcap, chunk_size, vocab_chunk_size, sum_scores=sum_scores,
                              token_metrics=token_metrics, log_sum_sq=log_sum_sq)
    if layout is None:
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, hidden.shape, hidden)
        layout = build_layout(hidden, labels, weight.shape[0], mask=mask, ignore_index=ignore_index,
                              cu_seqlens=cu_seqlens)
    return _linear_pass(hidden, weight, bias, layout, options, grad_spec=grad_spec)


def _linear_options(temperature: float, softcap: float | None, chunk_size: int | None, vocab_chunk_size: int | None,
                    **statistics: bool) -> LinearOptions:
    """The pass's options from the public arguments, checked: the scores, then the chunk sizes (0 for
    the default)."""
    options = pass_options(LinearOptions, temperature, softcap, **statistics)
    return replace(options, chunk_tokens=_size_or_default(chunk_size, "chunk_size"),
                   vocab_chunk=_size_or_default(vocab_chunk_size, "vocab_chunk_size"))


def _linear_pass(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    layout: TokenLayout,
    options: LinearOptions,
    grad_spec: tuple[str, torch.Tensor] | None = None,
) -> SequenceStats:
    """The fused linear pass on inputs the caller checked, for a prepared layout."""
    B, T, H = hidden.shape
    flat_hidden = hidden.reshape(B * T, H)
    want = _wants_grad(hidden, weight, bias)
    flat, offsets = layout.labels, layout.offsets
    if grad_spec is not None and any(want):
        spec, ref_rows = grad_spec
        outputs = linear_logps_grad_in_forward(flat_hidden, weight, bias, flat, offsets, ref_rows, spec, *want,
                                               *options.flatten())
    else:
        outputs = linear_logps(flat_hidden, weight, bias, flat, offsets, *options.flatten())
    return SequenceStats.of(row_results(outputs), layout.counts, options)


def linear_sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log p(label) over the unmasked positions of each row, from hidden states and lm_head.

    Equal to ``sequence_logps(hidden @ weight.T + bias, labels, ...)`` without the logits.

    Args:
        hidden: [B, T, H] last hidden states (float32 / bfloat16 / float16 / float64), aligned
            with the labels: ``labels[:, t]`` is scored by ``hidden[:, t]`` (the caller shifts).
        weight: [V, H] lm_head weight, the dtype and device of ``hidden``.
        labels: [B, T] integer; ``ignore_index`` marks skipped positions.
        bias: optional [V] lm_head bias.
        mask: optional [B, T] bool or 0/1; positions with 0 are skipped.
        temperature, softcap: scores are ``softcap * tanh(z / softcap) / temperature``.
        chunk_size: valid tokens per chunk of logits (default: about 512 MiB of logits; on CPU H / 32
            tokens, or 1 MiB of logits if more).
        vocab_chunk_size: vocabulary rows per slab (default: all): the pass then holds
            [chunk_size, vocab_chunk_size] logits, and the backward one fp32 [chunk_size, H] sum.
        cu_seqlens: for a packed batch: hidden [1, total_tokens, H], labels / mask
            [1, total_tokens], and int32/int64 [B + 1] cumulative row lengths.

    Returns:
        [B] log-prob sums in fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and
        bias (the backward recomputes the logits chunk by chunk). Rows with no valid token give 0.
    """
    V.check_options(ignore_index=ignore_index)  # (the scores and chunk sizes: _linear_options)
    return linear_sequence_stats(
        hidden, weight, labels, bias=bias, mask=mask, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, cu_seqlens=cu_seqlens,
    ).logps


def _reference_linear(ref_hidden, ref_weight, ref_bias, weight, bias, hidden):
    """(ref_hidden, ref_weight, ref_bias) with the defaults: the policy's lm_head when no ref_weight."""
    if ref_hidden is None:
        if ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_weight / ref_bias were given without ref_hidden")
        return None
    if ref_weight is None:
        ref_weight, ref_bias = weight, (bias if ref_bias is None else ref_bias)
    ref_hidden, ref_weight, ref_bias = V.check_linear(ref_hidden, ref_weight, ref_bias, "ref_")
    if ref_hidden.shape[:2] != hidden.shape[:2]:
        raise ValueError(
            f"ref_hidden must be [B, T, H] with B, T = {tuple(hidden.shape[:2])} as hidden, "
            f"got {tuple(ref_hidden.shape)}"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have V = {weight.shape[0]} rows as weight, got {ref_weight.shape[0]}")
    V.check_same_device(hidden, ref_hidden=ref_hidden)
    return ref_hidden, ref_weight, ref_bias


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    label_smoothing: float = 0.0,
    logps_reduction: str = "sum",
    ignore_index: int = -100,
    reference_free: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_metrics: bool = False,
    return_rows: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    grad_in_forward: bool | None = None,
    **loss_options: Any,
) -> torch.Tensor | tuple:
    """DPO-family loss from the policy's last hidden states and lm_head, without the [N, V] logits.

    Same rows, masks, loss types, metrics and errors as :func:`fastdpo.fused_dpo_loss`, with the
    logits ``hidden @ weight.T + bias`` never materialized beyond one chunk of valid tokens.

    Args:
        hidden: [B, T, H] with B = 2P rows: rows 0..P-1 chosen, rows P..2P-1 rejected; aligned
            with the labels (``labels[:, t]`` is scored by ``hidden[:, t]``; shift before calling).
        weight: [V, H] lm_head weight (same dtype and device as ``hidden``); bias: optional [V].
        labels: [B, T] integer; ``ignore_index`` marks skipped positions.
        ref_logps: [B] precomputed reference log-prob sums (detached), or
        ref_hidden: [B, T, H'] reference hidden states, evaluated forward-only in the same call
            with ``ref_weight`` [V, H'] and ``ref_bias`` [V] (default: the policy's ``weight`` and
            ``bias``, the case of a frozen lm_head).
        mask, beta, loss_type, loss_weights, label_smoothing, logps_reduction, reference_free,
        temperature, softcap, return_metrics, return_rows, **loss_options: as in
        :func:`fastdpo.fused_dpo_loss`.
        chunk_size: valid tokens per chunk of logits (default: about 512 MiB of logits, or the
            largest pair if that is more; on CPU H / 32 tokens or 1 MiB). With grad_in_forward a
            chunk holds whole pairs; a pair longer than the chunk (explicit, or the CPU default)
            costs a recomputation.
        vocab_chunk_size: vocabulary rows per slab (default: all), for the least memory: the
            logits are then made [chunk_size, vocab_chunk_size] at a time, forward and backward
            (which also holds a few [chunk_size, H] tiles besides the gradients), for example
            ``chunk_size=256, vocab_chunk_size=4096``. It implies the recomputing backward
            (``grad_in_forward=True`` with it is an error): 8 N H V FLOPs.
        cu_seqlens: for a packed batch: hidden (and ref_hidden) [1, total_tokens, H], labels / mask
            [1, total_tokens], int32/int64 [B + 1] cumulative row lengths; rows as above.
        grad_in_forward: build the gradients in the forward pass, pair group by pair group
            (6 N H V FLOPs instead of 8; one backward per call). Default: on unless a loss couples
            pairs (aot family). Always exact: the backward checks the row gradients it receives
            and recomputes if they are not the ones the forward assumed. The gradient work is
            done whenever an input requires grad and grad mode is on, so evaluate under
            ``torch.no_grad()`` (then only the 2 N H V forward runs).

    Returns:
        The scalar loss (mean over pairs); ``(loss, metrics)`` with ``return_metrics=True``,
        ``(loss, rows)`` with ``return_rows=True``, ``(loss, metrics, rows)`` with both.
    """
    options = dict(loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
                   logps_reduction=logps_reduction, **loss_options)
    cfg = LossConfig(**options)
    V.check_options(ignore_index=ignore_index, grad_in_forward=grad_in_forward, return_metrics=return_metrics,
                    return_rows=return_rows, reference_free=reference_free)  # (the rest: _linear_options)
    if vocab_chunk_size is not None:
        if grad_in_forward:
            raise ValueError("grad_in_forward=True keeps whole rows of logits; vocab_chunk_size needs the "
                             "recomputing backward (grad_in_forward=False, its default with vocab_chunk_size)")
        grad_in_forward = False
    hidden, weight, bias = V.check_linear(hidden, weight, bias)
    rows = hidden.shape[0] if cu_seqlens is None else check_cu_seqlens(cu_seqlens, hidden.shape, hidden)
    V.check_pairs(rows, "hidden" if cu_seqlens is None else "cu_seqlens")
    V.check_labels(labels, hidden.shape[:2], mask)  # policy inputs first, before the reference pass
    V.check_same_device(hidden, labels=labels, mask=mask)
    options = _linear_options(temperature, softcap, chunk_size, vocab_chunk_size, sum_scores=return_metrics,
                              log_sum_sq=cfg.use_weighting)
    reference = _reference_linear(ref_hidden, ref_weight, ref_bias, weight, bias, hidden)
    # Every input is checked above, once; labels, mask and rows are prepared once, for both passes.
    layout = build_layout(hidden, labels, weight.shape[0], mask=mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    ref_pass = None
    if reference is not None:
        ref_options = replace(options, sum_scores=False, log_sum_sq=False)  # the reference's log-probs only
        ref_pass = lambda: _linear_pass(*reference, layout, ref_options).logps  # noqa: E731
    ref = resolve_reference(cfg, rows, hidden, ref_logps, reference_free, ref_pass)
    spec = grad_in_forward_spec(cfg, grad_in_forward)
    policy = _linear_pass(hidden, weight, bias, layout, options, None if spec is None else (spec, ref))
    return loss_from_rows(policy.logps, ref, policy.counts, cfg, score_sums=policy.score_sums,
                          vocab=weight.shape[0], return_metrics=return_metrics,
                          return_rows=return_rows, pair_weights=policy_weights(policy, cfg))


class FusedLinearDPOLoss(LossModule):
    """Module form of :func:`fused_linear_dpo_loss`: the keyword options are fixed at construction,
    the tensors go to ``forward`` (with any option overridden for that call).

        loss_fn = FusedLinearDPOLoss(beta=0.1)
        loss = loss_fn(hidden, model.lm_head.weight, labels, ref_logps)
    """

    def __init__(
        self,
        *,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        logps_reduction: str = "sum",
        ignore_index: int = -100,
        reference_free: bool = False,
        temperature: float = 1.0,
        softcap: float | None = None,
        return_metrics: bool = False,
        return_rows: bool = False,
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
        grad_in_forward: bool | None = None,
        **loss_options: Any,
    ) -> None:
        super().__init__(locals())

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        *,
        bias: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **overrides: Any,
    ) -> torch.Tensor | tuple:
        return fused_linear_dpo_loss(hidden, weight, labels, ref_logps, bias=bias, ref_hidden=ref_hidden,
                                     ref_weight=ref_weight, ref_bias=ref_bias, mask=mask, cu_seqlens=cu_seqlens,
                                     **{**self.options, **overrides})
