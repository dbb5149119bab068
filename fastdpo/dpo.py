"""fused_dpo_loss and FusedDPOLoss: DPO and its relatives from policy logits, in one fused pass.

    policy logits --fused kernel--> per-row log-probs, token counts, logit sums
    reference (ref_logps, or ref_logits through the forward-only kernel, or zeros)
    --> PairLogps [P] --> losses.preference_loss --> scalar (+ TRL metrics)
"""

from __future__ import annotations

from typing import Any

import torch

from . import validation as V
from .logps import LogitsOptions, layout_stats, pass_options, token_layout
from .losses import LossConfig
from .objective import LossModule, loss_from_rows, policy_weights, resolve_reference
from .packed import check_cu_seqlens


def fused_dpo_loss(
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
    """DPO-family loss from policy logits without materializing any [tokens x vocab] fp32 copy.

    Args:
        policy_logits: [B, T, V] with B = 2P rows: rows 0..P-1 chosen, rows P..2P-1 rejected.
            Any float dtype and strides (``logits[:, :-1]`` is fine).
        labels: [B, T] integer, aligned with the logits (``labels[:, t]`` is scored by
            ``logits[:, t]``; shift before calling). ``ignore_index`` marks skipped positions.
        ref_logps: [B] precomputed reference log-prob sums (detached), or
        ref_logits: [B, T, V] reference logits, evaluated forward-only in the same call.
        mask: optional [B, T] bool or 0/1 completion mask; combined with ``ignore_index``.
        beta: inverse temperature of the implicit reward.
        loss_type: a loss name from ``fastdpo.losses.LOSSES`` or a list of them, combined with
            ``loss_weights`` as sum_k weight_k * mean(loss_k).
        label_smoothing: eps of conservative / robust DPO.
        logps_reduction: what each row contributes to the loss: ``"sum"`` (the sequence log-prob,
            DPO's definition) or ``"mean"`` (per-token mean, policy and reference alike: Liger's
            ``average_log_prob=True``, minimind's masked mean). ``ref_logps`` are always sums.
            Metrics and rows follow it; ipo, sigmoid_norm, simpo and orpo (length-normalized by
            definition) refuse ``"mean"``.
        reference_free: use a zero reference (no ref_logps / ref_logits).
        temperature, softcap: scores are ``softcap * tanh(z / softcap) / temperature``.
        inplace_backward: write the logits gradient over the logits (saves one [B, T, V] tensor;
            only safe when nothing else in the backward graph reads the logits). Eager only:
            under torch.compile the out-of-place backward runs (same numbers).
        return_metrics: also return TRL's metrics (detached batch means).
        return_rows: also return a ``fastdpo.PreferenceRows`` (detached): per-row log-probs, reference
            log-probs and token counts [2P], per-pair rewards [P].
        cu_seqlens: for a packed, padding-free batch: logits [1, total_tokens, V] (ref_logits
            the same), labels and mask [1, total_tokens], and int32/int64 [B + 1] cumulative row
            lengths (flash-attention's varlen convention); rows are [chosen; rejected] as above.
        **loss_options: extra hyper-parameters of specific loss types (see ``LossConfig``), and
            the family-wide ``f_divergence_type`` / ``f_alpha_divergence_coef`` (f-DPO) and
            ``use_weighting`` (WPO: the per-token log sum_v p_v^2 it needs comes from the same
            kernel pass as the log-probs).

    Returns:
        The scalar loss (mean over pairs); ``(loss, metrics)`` with ``return_metrics=True``,
        ``(loss, rows)`` with ``return_rows=True``, ``(loss, metrics, rows)`` with both.
    """
    cfg = LossConfig(loss_type=loss_type, loss_weights=loss_weights, beta=beta,
                     label_smoothing=label_smoothing, logps_reduction=logps_reduction, **loss_options)
    V.check_options(ignore_index=ignore_index, inplace_backward=inplace_backward, return_metrics=return_metrics,
                    return_rows=return_rows, reference_free=reference_free)  # (the scores: pass_options)
    V.check_logits(policy_logits, "policy_logits")
    rows = policy_logits.shape[0]
    if cu_seqlens is not None:
        rows = check_cu_seqlens(cu_seqlens, policy_logits.shape, policy_logits)
    V.check_pairs(rows, "cu_seqlens" if cu_seqlens is not None else "policy_logits")
    options = pass_options(LogitsOptions, temperature, softcap, sum_scores=return_metrics,
                           log_sum_sq=cfg.use_weighting, inplace_backward=inplace_backward)
    V.check_ref_logits(ref_logits, policy_logits)
    # Labels, mask and row layout are checked and prepared once, for both passes.
    layout = token_layout(policy_logits, labels, mask=mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens,
                          name="policy_logits")
    ref_pass = None
    if ref_logits is not None:  # the reference's log-probs only, with the policy's score transform
        ref_options = LogitsOptions(inv_temp=options.inv_temp, softcap=options.softcap)
        ref_pass = lambda: layout_stats(ref_logits, layout, ref_options, name="ref_logits").logps  # noqa: E731
    ref = resolve_reference(cfg, rows, policy_logits, ref_logps, reference_free, ref_pass)
    policy = layout_stats(policy_logits, layout, options, name="policy_logits")
    return loss_from_rows(policy.logps, ref, policy.counts, cfg, score_sums=policy.score_sums,
                          vocab=policy_logits.shape[-1], return_metrics=return_metrics,
                          return_rows=return_rows, pair_weights=policy_weights(policy, cfg))


class FusedDPOLoss(LossModule):
    """Module form of :func:`fused_dpo_loss`: the keyword options are fixed at construction,
    the tensors go to ``forward`` (with any option overridden for that call).

        loss_fn = FusedDPOLoss(beta=0.1, loss_type="sigmoid")
        loss = loss_fn(policy_logits, labels, ref_logps, mask=mask)
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
        inplace_backward: bool = False,
        return_metrics: bool = False,
        return_rows: bool = False,
        **loss_options: Any,
    ) -> None:
        super().__init__(locals())

    def forward(
        self,
        policy_logits: torch.Tensor,
        labels: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        *,
        ref_logits: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **overrides: Any,
    ) -> torch.Tensor | tuple:
        return fused_dpo_loss(policy_logits, labels, ref_logps, ref_logits=ref_logits, mask=mask, cu_seqlens=cu_seqlens,
                              **{**self.options, **overrides})
