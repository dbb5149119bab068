"""The pure-PyTorch method fastdpo replaces: log_softmax, gather, masked sum, then the loss.

It materializes the [B, T, V] fp32 log-softmax (and more in its backward). It is here as the
eager anchor of the benchmarks and as the `--loss-impl reference` of the trainer; the loss
formulas themselves are shared with the fused path (fastdpo.losses), since they act on per-row
scalars only.
"""

from __future__ import annotations

from typing import Any

import torch

from . import validation as V
from .losses import LossConfig, wpo_weights
from .objective import loss_from_rows, resolve_reference


def _scores(logits: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    scores = logits if logits.dtype == torch.float64 else logits.float()
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores / temperature


def _valid(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    return valid & mask.bool() if mask is not None else valid


def reference_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Eager per-row log-prob sums: ``log_softmax(logits.float()).gather(labels)`` masked and summed."""
    valid = _valid(labels, mask, ignore_index)
    logp = _scores(logits, temperature, softcap).log_softmax(-1)
    logp = logp.gather(-1, torch.where(valid, labels, 0).long().unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(-1)


def reference_dpo_loss(
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
    **loss_options: Any,
) -> torch.Tensor | tuple:
    """Same contract as :func:`fastdpo.fused_dpo_loss`, computed the eager way (``inplace_backward`` is ignored)."""
    cfg = LossConfig(loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                     label_smoothing=label_smoothing, logps_reduction=logps_reduction, **loss_options)
    V.check_logits(policy_logits, "policy_logits")
    V.check_labels(labels, policy_logits.shape[:2], mask)
    rows = policy_logits.shape[0]
    V.check_pairs(rows, "policy_logits")
    V.check_scores(temperature, softcap)
    V.token_labels(labels, mask, ignore_index, policy_logits.shape[-1])  # same range errors as the fused path
    opts = dict(mask=mask, ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    ref_pass = None if ref_logits is None else (lambda: reference_sequence_logps(ref_logits, labels, **opts))
    ref = resolve_reference(cfg, rows, policy_logits, ref_logps, reference_free, ref_pass)
    logps = reference_sequence_logps(policy_logits, labels, **opts)
    valid = _valid(labels, mask, ignore_index)
    score_sums = None
    if return_metrics:
        with torch.no_grad():
            score_sums = (_scores(policy_logits, temperature, softcap) * valid.unsqueeze(-1)).sum((1, 2))
    weights = None
    if cfg.use_weighting:  # WPO: log sum_v p_v^2 from a second log_softmax of the whole logits
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * _scores(policy_logits, temperature, softcap).log_softmax(-1), -1)
            weights = wpo_weights(logps, (log_sum_sq * valid).sum(-1), valid.sum(-1))
    return loss_from_rows(logps, ref, valid.sum(-1), cfg, score_sums=score_sums,
                          vocab=policy_logits.shape[-1], return_metrics=return_metrics,
                          return_rows=return_rows, pair_weights=weights)
