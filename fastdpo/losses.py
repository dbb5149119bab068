"""Preference losses on per-sequence log-probs: plain PyTorch on [P]-sized tensors.

Every loss here is a function of a handful of per-row scalars (policy and reference log-prob
sums, completion-token counts), so one kernel pair underneath serves all of them. Each loss
function takes a `PairLogps` and a `LossConfig` and returns per-pair losses [P] (or a scalar for
batch-level terms); `preference_loss` combines the requested ones as sum_k weight_k * mean(loss_k).

Notation: c, r policy log-prob sums of chosen / rejected; c0, r0 the reference's;
dc = c - c0, dr = r - r0, d = dc - dr; |c|, |r| completion-token counts; eps = label_smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Per-pair inputs of every loss ([P] each). Reference fields are zeros when reference-free."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor

    @classmethod
    def from_rows(cls, logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor) -> "PairLogps":
        """Split [2P] rows laid out as [chosen; rejected]."""
        P = logps.shape[0] // 2
        ref_logps = ref_logps.to(logps.dtype)
        counts = counts.to(logps.dtype)
        return cls(logps[:P], logps[P:], ref_logps[:P], ref_logps[P:], counts[:P], counts[P:])

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def logits(self) -> torch.Tensor:
        """d = (c - c0) - (r - r0), the DPO margin before beta."""
        return self.chosen_logratios - self.rejected_logratios


@dataclass
class LossConfig:
    """Which losses to apply and their hyper-parameters (TRL's names where TRL has them)."""

    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    types: list[str] = field(init=False)
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if not self.types:
            raise ValueError("loss_type must name at least one loss")
        for name in self.types:
            if name not in LOSSES:
                raise ValueError(f"unknown loss_type {name!r}; choose from {sorted(LOSSES)}")
        if self.loss_weights is None:
            self.weights = [1.0] * len(self.types)
        elif len(self.loss_weights) != len(self.types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries for {len(self.types)} loss types"
            )
        else:
            self.weights = [float(w) for w in self.loss_weights]
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        for name in self.types:
            check = CHECKS.get(name)
            if check is not None:
                check(self)

    @property
    def needs_reference(self) -> bool:
        return any(name not in REFERENCE_FREE for name in self.types)

    @property
    def has_nll(self) -> bool:
        return any(name in NLL_TERMS for name in self.types)


LossFn = Callable[[PairLogps, LossConfig], torch.Tensor]
LOSSES: dict[str, LossFn] = {}
CHECKS: dict[str, Callable[[LossConfig], None]] = {}
REFERENCE_FREE: set[str] = set()
NLL_TERMS: set[str] = set()  # losses whose value includes the chosen NLL (reported as nll_loss)


def register(name: str, *, reference_free: bool = False, nll: bool = False, check=None):
    """Add a loss function to the registry under `name`."""

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE.add(name)
        if nll:
            NLL_TERMS.add(name)
        if check is not None:
            CHECKS[name] = check
        return fn

    return wrap


def chosen_nll(p: PairLogps) -> torch.Tensor:
    """Token-mean negative log-likelihood of the chosen completions (a scalar)."""
    return -p.chosen.sum() / p.chosen_counts.sum().clamp(min=1)


@register("sigmoid")
def sigmoid_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290); with eps > 0 conservative DPO (cDPO)."""
    z = cfg.beta * p.logits
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register("sft", reference_free=True, nll=True)
def sft_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """Negative log-likelihood of the chosen tokens (token mean), the RPO / MPO auxiliary term."""
    return chosen_nll(p)


def preference_loss(pairs: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """sum_k weight_k * mean(loss_k(pairs)) over the configured loss types."""
    total = None
    for name, weight in zip(cfg.types, cfg.weights):
        term = weight * LOSSES[name](pairs, cfg).mean()
        total = term if total is None else total + term
    return total
