"""The pure-PyTorch method fastdpo replaces: log_softmax, gather, masked sum, then the loss.

It materializes the [B, T, V] fp32 log-softmax (and more in its backward). It is here as the
eager baseline of the benchmarks (the trainer's `--loss-impl reference` runs the same math through
fastdpo.head's "eager" mode); the loss formulas themselves are shared with the fused path
(fastdpo.losses), since they act on per-row scalars only.

"eager" names this implementation; "reference" in fastdpo means the reference model (ref_logps,
ref_logits), and the float64 oracle of the tests is tests/oracle64.py. `fastdpo.reference` keeps the
old names importable.
"""

from __future__ import annotations

from typing import Any

import torch

from . import validation as V
from .losses import LossConfig, wpo_weights
from .objective import loss_from_rows, resolve_reference
from .packed import check_cu_seqlens, row_offsets


def _scores(logits: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    scores = logits if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores / temperature


def _valid(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    return valid & mask.bool() if mask is not None else valid


def _row_sums(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """[B, T] per-token values -> [B] row sums; packed [1, total_tokens] rows with cu_seqlens."""
    if cu_seqlens is None:
        return x.sum(-1)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    return x.new_zeros(lengths.numel()).index_add(0, rows, x.reshape(-1))


def eager_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager per-row log-prob sums: ``log_softmax(logits.float()).gather(labels)`` masked and summed."""
    valid = _valid(labels, mask, ignore_index)
    logp = _scores(logits, temperature, softcap).log_softmax(-1)
    logp = logp.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return _row_sums(logp * valid, cu_seqlens)


def eager_dpo_loss(
    policy_logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    ref_logits: torch.Tensor | None = None,
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
    inplace_backward: bool = False,
    return_metrics: bool = False,
    return_rows: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **loss_options: Any,
) -> torch.Tensor | tuple:
    """Same contract as :func:`fastdpo.fused_dpo_loss`, computed the eager way (``inplace_backward`` is ignored)."""
    cfg = LossConfig(loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                     label_smoothing=label_smoothing, logps_reduction=logps_reduction, **loss_options)
    V.check_options(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                    inplace_backward=inplace_backward, return_metrics=return_metrics, return_rows=return_rows,
                    reference_free=reference_free)
    V.check_logits(policy_logits, "policy_logits")
    V.check_labels(labels, policy_logits.shape[:2], mask)
    V.check_ref_logits(ref_logits, policy_logits)
    rows = policy_logits.shape[0]
    if cu_seqlens is not None:
        rows = check_cu_seqlens(cu_seqlens, policy_logits.shape, policy_logits)
        row_offsets(cu_seqlens, 1, policy_logits.shape[1], policy_logits.device)  # same value errors as fused
    V.check_pairs(rows, "cu_seqlens" if cu_seqlens is not None else "policy_logits")
    V.token_labels(labels, mask, ignore_index, policy_logits.shape[-1])  # same range errors as the fused path
    opts = dict(mask=mask, ignore_index=ignore_index, temperature=temperature, softcap=softcap, cu_seqlens=cu_seqlens)
    ref_pass = None if ref_logits is None else (lambda: eager_sequence_logps(ref_logits, labels, **opts))
    ref = resolve_reference(cfg, rows, policy_logits, ref_logps, reference_free, ref_pass)
    logps = eager_sequence_logps(policy_logits, labels, **opts)
    valid = _valid(labels, mask, ignore_index)
    counts = _row_sums(valid.long(), cu_seqlens)
    score_sums = None
    if return_metrics:
        with torch.no_grad():
            scores = _scores(policy_logits, temperature, softcap)
            score_sums = _row_sums((scores * valid.unsqueeze(-1)).sum(-1), cu_seqlens)
    weights = None
    if cfg.use_weighting:  # WPO: log sum_v p_v^2 from a second log_softmax of the whole logits
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * _scores(policy_logits, temperature, softcap).log_softmax(-1), -1)
            weights = wpo_weights(logps, _row_sums(log_sum_sq * valid, cu_seqlens), counts)
    return loss_from_rows(logps, ref, counts, cfg, score_sums=score_sums,
                          vocab=policy_logits.shape[-1], return_metrics=return_metrics,
                          return_rows=return_rows, pair_weights=weights)


@torch.no_grad()
def chunked_logps64(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor | None = None,
    rows: int = 256,
) -> torch.Tensor:
    """Float64 per-row log-prob sums [B] of logits [B, T, V] (or of ``inputs @ weight.T`` for hidden
    states [B, T, H]), `rows` positions at a time so that it fits beside large inputs: the yardstick
    of the large-shape tests and of the benchmarks' error columns. No temperature, softcap or bias."""
    B, T = labels.shape
    w = weight.double() if weight is not None else None
    out = torch.zeros(B, dtype=torch.float64, device=inputs.device)
    for b in range(B):
        for t0 in range(0, T, rows):
            s = inputs[b, t0 : t0 + rows].double()
            if w is not None:
                s = s @ w.t()
            lp = s.gather(1, labels[b, t0 : t0 + rows, None].long()).squeeze(1) - torch.logsumexp(s, 1)
            out[b] += (lp * mask[b, t0 : t0 + rows]).sum()
    return out
