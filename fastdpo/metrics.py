"""TRL's preference metrics (same names and meaning), from per-row results that the forward pass made.

Which trainer's definitions apply depends on the loss types:
- any loss that compares with a reference (DPOTrainer): rewards/* = beta * (policy - reference)
  log-probs (with no reference the reference is 0, so beta * policy log-probs); logps/* are the
  policy's. Both follow ``logps_reduction``: sums by default, per-token means with "mean" (what
  Liger returns with ``average_log_prob=True``).
- only reference-free losses with a TRL trainer of their own (CPOTrainer for cpo / simpo,
  ORPOTrainer for orpo): rewards/* = beta * policy log-probs, as ``logps_reduction`` says for cpo
  and length-normalized (per-token mean) for simpo and orpo; logps/* are those same log-probs, so that
  rewards/chosen = beta * logps/chosen as in those trainers. A reference passed anyway is not used.
logits/* are always DPOTrainer's: the mean logit over vocabulary and completion tokens (CPO/ORPO
trainers average over every position, prompt and padding included; fastdpo never sees those).
nll_loss is the token-mean NLL of the chosen completions whenever sft, cpo or orpo is active
(reported even with cpo_alpha = 0, where TRL's CPOTrainer logs 0). For orpo, log_odds_ratio is the
batch mean of log sigmoid(log odds) and log_odds_chosen the batch mean of the log odds, as in ORPOTrainer.

`preference_rows` gives the same quantities per row and per pair (``return_rows=True``).
"""

from __future__ import annotations

import torch

from typing import NamedTuple

from .losses import POLICY_REWARDS, LossConfig, PairLogps, chosen_nll


def policy_reward_kind(cfg: LossConfig) -> str | None:
    """How rewards/* are defined: None as in DPOTrainer, or "sum" / "mean" as in CPO / ORPO trainers."""
    kinds = [POLICY_REWARDS[name] for name in cfg.types if name in POLICY_REWARDS]
    if cfg.needs_reference or not kinds:
        return None
    return kinds[0]  # a list mixing sum- and mean-rewarded losses follows the first one


def reward_scores(pairs: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair (chosen, rejected) scores that rewards/* multiply by beta."""
    kind = policy_reward_kind(cfg)
    if kind is None:
        return pairs.chosen_logratios, pairs.rejected_logratios
    if kind == "mean":
        return pairs.chosen_avg, pairs.rejected_avg
    return pairs.chosen_logp, pairs.rejected_logp


def reported_logps(pairs: PairLogps, cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-pair (chosen, rejected) policy log-probs that logps/* report."""
    if policy_reward_kind(cfg) == "mean":
        return pairs.chosen_avg, pairs.rejected_avg
    return pairs.chosen_logp, pairs.rejected_logp


@torch.no_grad()
def preference_metrics(
    pairs: PairLogps,
    cfg: LossConfig,
    score_sums: torch.Tensor | None,
    vocab: int,
) -> dict[str, torch.Tensor]:
    """Detached batch means: rewards/*, logps/*, logits/*, and nll_loss / ORPO's log-odds when active."""
    chosen_score, rejected_score = reward_scores(pairs, cfg)
    chosen_rewards = cfg.beta * chosen_score.detach()
    rejected_rewards = cfg.beta * rejected_score.detach()
    chosen_logps, rejected_logps = reported_logps(pairs, cfg)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }
    if score_sums is not None:
        P = pairs.chosen.shape[0]
        # clamp: a half with no completion token reports 0, as TRL does, instead of 0/0.
        metrics["logits/chosen"] = score_sums[:P].sum() / (pairs.chosen_counts.sum() * vocab).clamp(min=1)
        metrics["logits/rejected"] = score_sums[P:].sum() / (pairs.rejected_counts.sum() * vocab).clamp(min=1)
    if cfg.has_nll:
        metrics["nll_loss"] = chosen_nll(pairs).detach()
    if "orpo" in cfg.types:
        log_odds = pairs.log_odds.detach()
        metrics["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds).mean()
        metrics["log_odds_chosen"] = log_odds.mean()
    return metrics


class PreferenceRows(NamedTuple):
    """Per-row and per-pair results of one loss call (``return_rows=True``), all detached.

    Rows are laid out as the inputs, [chosen; rejected]; pairs are [P]. Log-probs follow
    ``logps_reduction`` (sums, or per-token means) as the metrics do, and so do the rewards.
    """

    logps: torch.Tensor  # [2P] the policy's row log-probs, as logps/* report them
    ref_logps: torch.Tensor  # [2P] the reference's, reduced the same way (zeros when reference-free)
    counts: torch.Tensor  # [2P] completion tokens scored in each row
    chosen_rewards: torch.Tensor  # [P] what rewards/chosen averages
    rejected_rewards: torch.Tensor  # [P] what rewards/rejected averages


@torch.no_grad()
def preference_rows(pairs: PairLogps, cfg: LossConfig, counts: torch.Tensor) -> PreferenceRows:
    """The detached per-row log-probs, token counts and per-pair rewards behind the metrics
    (`counts` [2P]: the rows' token counts as the caller has them, integers)."""
    chosen_score, rejected_score = reward_scores(pairs, cfg)
    chosen_logps, rejected_logps = reported_logps(pairs, cfg)
    if policy_reward_kind(cfg) == "mean":
        ref_chosen = pairs.ref_chosen / pairs.chosen_counts.clamp(min=1)
        ref_rejected = pairs.ref_rejected / pairs.rejected_counts.clamp(min=1)
    else:
        ref_chosen, ref_rejected = pairs.ref_chosen_logp, pairs.ref_rejected_logp
    return PreferenceRows(
        logps=torch.cat([chosen_logps, rejected_logps]).detach(),
        ref_logps=torch.cat([ref_chosen, ref_rejected]).detach(),
        counts=counts.detach(),
        chosen_rewards=(cfg.beta * chosen_score).detach(),
        rejected_rewards=(cfg.beta * rejected_score).detach(),
    )
