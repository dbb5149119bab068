"""TRL's DPO metrics (same names and meaning), from per-row results that the forward pass made."""

from __future__ import annotations

import torch

from .losses import LossConfig, PairLogps, chosen_nll


@torch.no_grad()
def preference_metrics(
    pairs: PairLogps,
    cfg: LossConfig,
    score_sums: torch.Tensor | None,
    vocab: int,
) -> dict[str, torch.Tensor]:
    """Detached batch means: rewards/*, logps/*, logits/* (mean logit over vocab and completion tokens)."""
    chosen_rewards = cfg.beta * pairs.chosen_logratios.detach()
    rejected_rewards = cfg.beta * pairs.rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": pairs.chosen.detach().mean(),
        "logps/rejected": pairs.rejected.detach().mean(),
    }
    if score_sums is not None:
        P = pairs.chosen.shape[0]
        metrics["logits/chosen"] = score_sums[:P].sum() / (pairs.chosen_counts.sum() * vocab)
        metrics["logits/rejected"] = score_sums[P:].sum() / (pairs.rejected_counts.sum() * vocab)
    if cfg.has_nll:
        metrics["nll_loss"] = chosen_nll(pairs).detach()
    return metrics
