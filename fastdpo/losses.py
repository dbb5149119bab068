"""Preference losses on per-sequence log-probs: plain PyTorch on [P]-sized tensors.

Every loss here is a function of a handful of per-row scalars (policy and reference log-prob
sums, completion-token counts), so one kernel pair underneath serves all of them. Each loss
function takes a `PairLogps` and a `LossConfig` and returns per-pair losses [P] (or a scalar for
batch-level terms); `preference_loss` combines the requested ones as sum_k weight_k * mean(loss_k).

Notation: c, r policy log-probs of chosen / rejected; c0, r0 the reference's; dc = c - c0,
dr = r - r0, d = dc - dr; |c|, |r| completion-token counts; eps = label_smoothing. A row's log-prob
is the sum over its completion tokens, or with ``logps_reduction="mean"`` the per-token mean
(Liger's ``average_log_prob=True``, minimind's masked mean), for policy and reference alike.

Every formula is written so that finite inputs give a finite loss and finite gradients, whatever
the size of beta * d: log-sigmoid / softplus forms instead of log(sigmoid(.)) or exp(.) that can
overflow, and a capped exponent only where the loss itself is astronomically large (DiscoPOP
with discopop_tau > 1 and beta * d far below 0; see ``discopop_loss``).

Two options act on every loss that admits them, as in TRL's DPOTrainer:
- f-divergences (f-DPO, Wang et al., 2023, arXiv:2309.16240): the reverse KL of DPO replaced by
  another f-divergence, which turns each log-ratio u = dc (or dr) into the score f'(exp(u)):
  reverse KL u; forward KL 1 - exp(-u); Jensen-Shannon log 2 + log sigmoid(u); alpha divergence
  (TRL's parameterization, a = f_alpha_divergence_coef) (exp((a - 1) u) - 1) / (a - 1), which is
  the paper's alpha-divergence with alpha = 1 - a. The losses built on the chosen-minus-rejected
  margin then use f'(c) - f'(r) (or its length-normalized form) in place of d.
- WPO (Zhou et al., 2024, arXiv:2406.11827, Eq. 2): each pair's loss is multiplied by the
  detached weight w(chosen) w(rejected), w(y) = exp(mean over y's tokens of
  (log p(y_t) - log sum_v p(v)^2)): `wpo_weights`, from the kernels' per-row sums.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F


LOGPS_REDUCTIONS = ("sum", "mean")


@dataclass
class PairLogps:
    """Per-pair inputs of every loss ([P] each). Reference fields are zeros when reference-free.

    The fields are log-prob sums over completion tokens and the token counts; `reduction` says what
    the losses compare: the sums ("sum") or the per-token means ("mean"), read through `chosen_logp`,
    `rejected_logp`, `ref_chosen_logp`, `ref_rejected_logp` and everything built on them. The NLL
    terms (`chosen_nll`) always read the sums: they are a token mean over the batch either way.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor
    reduction: str = "sum"
    weights: torch.Tensor | None = None  # detached per-pair weights (WPO), read when cfg.use_weighting
    nll_tokens: float | None = None  # what the NLL terms divide by; None: this batch's chosen tokens

    @classmethod
    def from_rows(cls, logps: torch.Tensor, ref_logps: torch.Tensor, counts: torch.Tensor,
                  reduction: str = "sum", weights: torch.Tensor | None = None,
                  nll_tokens: float | None = None) -> "PairLogps":
        """Split [2P] rows of log-prob sums laid out as [chosen; rejected]; `weights` [P] are per pair."""
        P = logps.shape[0] // 2
        ref_logps = ref_logps.to(logps.dtype)
        counts = counts.to(logps.dtype)
        if weights is not None:
            weights = weights.detach().to(logps.dtype)
        return cls(logps[:P], logps[P:], ref_logps[:P], ref_logps[P:], counts[:P], counts[P:], reduction, weights,
                   nll_tokens)

    def _reduced(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return sums if self.reduction == "sum" else sums / counts.clamp(min=1)

    @property
    def chosen_logp(self) -> torch.Tensor:
        """c: the chosen rows' log-prob, summed or per-token mean as `reduction` says."""
        return self._reduced(self.chosen, self.chosen_counts)

    @property
    def rejected_logp(self) -> torch.Tensor:
        return self._reduced(self.rejected, self.rejected_counts)

    @property
    def ref_chosen_logp(self) -> torch.Tensor:
        return self._reduced(self.ref_chosen, self.chosen_counts)

    @property
    def ref_rejected_logp(self) -> torch.Tensor:
        return self._reduced(self.ref_rejected, self.rejected_counts)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logp - self.ref_chosen_logp

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logp - self.ref_rejected_logp

    @property
    def margin(self) -> torch.Tensor:
        """d = (c - c0) - (r - r0), the DPO margin before beta (what TRL's DPO loss calls `logits`)."""
        return self.chosen_logratios - self.rejected_logratios

    # Length-normalized quantities divide by the completion-token count, clamped to 1 so that a row
    # with no completion token gives 0 rather than NaN (TRL's DPO trainer clamps the same way).
    @property
    def chosen_avg(self) -> torch.Tensor:
        """c / |c|: mean log-prob per chosen completion token."""
        return self.chosen / self.chosen_counts.clamp(min=1)

    @property
    def rejected_avg(self) -> torch.Tensor:
        """r / |r|: mean log-prob per rejected completion token."""
        return self.rejected / self.rejected_counts.clamp(min=1)

    @property
    def chosen_avg_logratios(self) -> torch.Tensor:
        """(c - c0) / |c| of the sums."""
        return (self.chosen - self.ref_chosen) / self.chosen_counts.clamp(min=1)

    @property
    def rejected_avg_logratios(self) -> torch.Tensor:
        """(r - r0) / |r| of the sums."""
        return (self.rejected - self.ref_rejected) / self.rejected_counts.clamp(min=1)

    @property
    def log_odds(self) -> torch.Tensor:
        """ORPO's log odds ratio log(odds(c̄) / odds(r̄)), odds(p) = p / (1 - p), p = exp(mean log-prob).

        odds(1) is infinite, and a row with no completion token has mean log-prob 0 (p = 1), as can
        rounding push a near-certain row to 0 or just above: the mean log-probs are capped at -eps
        of their dtype (p <= exp(-eps), odds <= 1 / eps), which keeps the log odds finite and
        leaves every row with p < exp(-eps) as the paper defines it.
        """
        cap = -torch.finfo(self.chosen.dtype).eps
        c, r = self.chosen_avg.clamp(max=cap), self.rejected_avg.clamp(max=cap)
        return (c - r) - (log1mexp(c) - log1mexp(r))


def wpo_weights(logps: torch.Tensor, log_sum_sq_sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """WPO's per-pair weights [P] from [chosen; rejected] rows [2P], detached (TRL's `use_weighting`).

    Row weight exp((sum_t log p(y_t) - sum_t log sum_v p_tv^2) / max(|y|, 1)) over the row's scored
    tokens (`log_sum_sq_sums` from the kernels' `log_sum_sq` pass); a pair's weight is the product of
    its chosen and rejected rows' weights.
    """
    with torch.no_grad():
        rows = torch.exp((logps.detach() - log_sum_sq_sums.to(logps.dtype)) / counts.to(logps.dtype).clamp(min=1))
        P = rows.shape[0] // 2
        return rows[:P] * rows[P:]


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# exp() of the alpha divergence's scaled log-ratio is clamped below overflow of the dtype, as TRL does.
_ALPHA_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def f_scores(logratios: torch.Tensor, cfg: "LossConfig") -> torch.Tensor:
    """f'(exp(u)) of log-ratios u under cfg.f_divergence_type (module docstring), TRL's definitions."""
    kind = cfg.f_divergence_type
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (1 + t))
        return math.log(2) + F.logsigmoid(logratios)
    a = cfg.f_alpha_divergence_coef
    if kind == "reverse_kl" or abs(a - 1.0) < 1e-6:  # f'(t) = log t, also the alpha -> 1 limit
        return logratios
    t = torch.clamp((a - 1.0) * logratios, max=_ALPHA_CLAMP.get(logratios.dtype, 80.0))
    return (torch.exp(t) - 1.0) / (a - 1.0)  # f'(t) = (t^(a-1) - 1) / (a - 1)


def score_margin(p: "PairLogps", cfg: "LossConfig") -> torch.Tensor:
    """f'(c) - f'(r): the margin d for the default reverse KL, its f-divergence form otherwise."""
    if cfg.f_divergence_type == "reverse_kl":
        return p.margin
    return f_scores(p.chosen_logratios, cfg) - f_scores(p.rejected_logratios, cfg)


def avg_score_margin(p: "PairLogps", cfg: "LossConfig") -> torch.Tensor:
    """f'(c) / |c| - f'(r) / |r| (dc/|c| - dr/|r| for the reverse KL)."""
    if cfg.f_divergence_type == "reverse_kl":
        return p.chosen_avg_logratios - p.rejected_avg_logratios
    return (f_scores(p.chosen_logratios, cfg) / p.chosen_counts.clamp(min=1)
            - f_scores(p.rejected_logratios, cfg) / p.rejected_counts.clamp(min=1))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (Mächler, 2012: switch at -log 2)."""
    # Both branches are evaluated by torch.where; clamp each to its own domain so that the branch
    # not taken cannot produce an inf / NaN gradient.
    far_from_zero = x < -math.log(2.0)
    near_zero = torch.log(-torch.expm1(torch.clamp(x, min=-math.log(2.0))))
    far = torch.log1p(-torch.exp(torch.clamp(x, max=-math.log(2.0))))
    return torch.where(far_from_zero, far, near_zero)


@dataclass
class LossConfig:
    """Which losses to apply and their hyper-parameters (TRL's names and defaults where TRL has them).

    Attributes:
        loss_type: a name in ``LOSSES`` or a list of them.
        loss_weights: one weight per loss type (default all 1.0); the loss is sum_k w_k * mean(loss_k).
        beta: inverse temperature of the implicit reward (for ``ipo`` the regularization tau, for
            ``orpo`` the weight lambda of the odds-ratio term, as in TRL).
        label_smoothing: eps. Read by sigmoid (cDPO), robust, exo_pair, aot, aot_pair, simpo, cpo;
            ignored by the others, as in TRL.
        discopop_tau: temperature of DiscoPOP's log-ratio modulation (TRL DPOConfig, default 0.05).
        simpo_gamma: SimPO's target reward margin gamma (TRL CPOConfig, default 0.5).
        cpo_alpha: weight of the chosen NLL inside ``cpo`` (TRL CPOConfig, default 1.0).
        bco_delta: the reward shift delta of ``bco_pair`` (fastdpo's name; TRL has no option). Default 0
            is what the installed TRL computes; pass a running mean of the rewards to get BCO's
            running-mean form (see ``bco_pair_loss``).
        logps_reduction: what the losses compare per row: ``"sum"`` (default: the sequence log-prob,
            DPO's definition, TRL) or ``"mean"`` (the per-token mean of policy and reference alike:
            Liger's ``average_log_prob=True``, minimind's masked mean). Metrics follow it. Losses that
            normalize by length in their own definition (``SELF_NORMALIZED``: ipo, sigmoid_norm,
            simpo, orpo) refuse ``"mean"``; the NLL terms are a token mean over the batch either way.
        f_divergence_type: ``reverse_kl`` (DPO), ``forward_kl``, ``js_divergence`` or
            ``alpha_divergence`` (module docstring; TRL DPOConfig). Other than ``reverse_kl`` only
            for the losses TRL allows it with (``F_DIVERGENCE_LOSSES``).
        f_alpha_divergence_coef: a of ``alpha_divergence`` (TRL DPOConfig, default 0.5).
        use_weighting: WPO: multiply each pair's loss by its detached weight (``PairLogps.weights``,
            see ``wpo_weights``) before the mean. Not with losses that sort pairs (aot family).
    """

    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    bco_delta: float = 0.0
    logps_reduction: str = "sum"
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False
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
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"loss_weights must be finite, got {self.loss_weights}")
        self._check_numbers()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        self._check_reduction()
        for name in self.types:
            check = CHECKS.get(name)
            if check is not None:
                check(self)
        _check_f_divergence(self)
        if self.use_weighting and any(name in COUPLED_LOSSES for name in self.types):
            raise ValueError(
                f"use_weighting (WPO) is not defined for {sorted(set(self.types) & COUPLED_LOSSES)}: those losses "
                "sort the pairs of the batch, which would misalign the per-pair weights (TRL refuses it too)"
            )

    def _check_numbers(self) -> None:
        """Every number option a finite number (a tensor is taken as given: reading it would wait for
        its device). Comparisons, not math.isfinite, which torch.compile cannot trace on a traced float."""
        for name in NUMBER_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, torch.Tensor)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not isinstance(value, torch.Tensor) and not -math.inf < value < math.inf:
                raise ValueError(f"{name} must be finite, got {value}")
        if not isinstance(self.use_weighting, bool):
            raise TypeError(f"use_weighting must be True or False, got {self.use_weighting!r}")

    def _check_reduction(self) -> None:
        if self.logps_reduction not in LOGPS_REDUCTIONS:
            raise ValueError(f"logps_reduction must be 'sum' or 'mean', got {self.logps_reduction!r}")
        if self.logps_reduction == "sum":
            return
        for name in self.types:
            if name in SELF_NORMALIZED:
                raise ValueError(
                    f"loss_type {name!r} divides by the completion-token count in its own definition; "
                    "logps_reduction='mean' would divide twice (use logps_reduction='sum')"
                )

    def op_values(self) -> dict:
        """The constructor's arguments (``types`` and ``weights`` follow from them)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def encode(self) -> str | None:
        """This configuration as one JSON object string, a custom op argument that `LossConfig.decode`
        reads back; None when a value is not None, a bool, an int, a finite float, a name (str) or a
        list of them (a tensor, say): such a configuration cannot cross the op boundary.

        Written by hand rather than with json.dumps so that torch.compile traces it (a constant)."""
        parts = []
        values = self.op_values()
        for name in sorted(values):  # by name alone: a traced value may not be comparable
            text = _json_value(values[name])
            if text is None:
                return None
            parts.append(f'"{name}":{text}')
        return "{" + ",".join(parts) + "}"

    @classmethod
    def decode(cls, spec: str) -> "LossConfig":
        """The configuration that `encode` wrote."""
        return cls(**json.loads(spec))

    @property
    def needs_reference(self) -> bool:
        return any(name not in REFERENCE_FREE for name in self.types)

    @property
    def has_nll(self) -> bool:
        return any(name in NLL_TERMS for name in self.types)


def _json_value(value: object) -> str | None:
    """`value` as JSON text if it is None, a bool, an int, a finite float, a str of letters, digits and
    '_', or a list / tuple of those; else None."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        return f'"{value}"' if value.replace("_", "a").isalnum() and value.isascii() else None
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return None if any(t is None for t in items) else "[" + ",".join(items) + "]"
    return None


LossFn = Callable[[PairLogps, LossConfig], torch.Tensor]
LOSSES: dict[str, LossFn] = {}
CHECKS: dict[str, Callable[[LossConfig], None]] = {}
# LossConfig's number options (LossConfig._check_numbers).
NUMBER_OPTIONS = ("beta", "label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "bco_delta",
                  "f_alpha_divergence_coef")
REFERENCE_FREE: set[str] = set()
NLL_TERMS: set[str] = set()  # losses whose value includes the chosen NLL (reported as nll_loss)
# Losses whose gradient for one pair depends on other pairs' log-probs (they sort over the batch):
# the fused-linear path cannot finish their gradients pair by pair, so it recomputes for them.
COUPLED_LOSSES: set[str] = set()
# Losses defined on the chosen-minus-rejected margin (or not on the log-ratios at all: sft), which
# take an f-divergence other than the reverse KL: TRL's list. The others keep a beta log Z(x) term
# that only cancels in that margin, so they have no f-divergence form.
F_DIVERGENCE_LOSSES: set[str] = set()
# Reference-free losses whose trainer in TRL (CPO, ORPO) logs rewards = beta * policy log-probs:
# "sum" for sequence sums, "mean" for length-normalized ones. Read by metrics.preference_metrics.
POLICY_REWARDS: dict[str, str] = {}
# Losses whose definition reads per-token mean log-probs itself: they refuse logps_reduction="mean".
SELF_NORMALIZED: set[str] = set()


def register(name: str, *, reference_free: bool = False, nll: bool = False, check=None, rewards: str | None = None,
             couples_pairs: bool = False, self_normalized: bool = False, f_divergence: bool = False):
    """Add a loss function to the registry under `name`.

    Args:
        reference_free: the loss never reads the reference log-probs.
        nll: the loss includes the chosen NLL (then metrics report ``nll_loss``).
        check: ``check(cfg)`` raising ValueError for invalid hyper-parameters, run by LossConfig.
        rewards: ``"sum"`` or ``"mean"`` for reference-free losses whose TRL trainer logs
            rewards/* as beta times the policy's (summed or length-normalized) log-probs.
        couples_pairs: one pair's loss depends on other pairs of the batch (e.g. through a sort).
        self_normalized: the loss's definition divides by completion-token counts itself.
        f_divergence: the loss reads the log-ratios only through ``score_margin`` /
            ``avg_score_margin`` (or not at all), so it admits every ``f_divergence_type``.
    """
    if rewards not in (None, "sum", "mean"):
        raise ValueError(f"rewards must be None, 'sum' or 'mean', got {rewards!r}")

    def wrap(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        if reference_free:
            REFERENCE_FREE.add(name)
        if nll:
            NLL_TERMS.add(name)
        if check is not None:
            CHECKS[name] = check
        if rewards is not None:
            POLICY_REWARDS[name] = rewards
        if couples_pairs:
            COUPLED_LOSSES.add(name)
        if self_normalized:
            SELF_NORMALIZED.add(name)
        if f_divergence:
            F_DIVERGENCE_LOSSES.add(name)
        return fn

    return wrap


def chosen_nll(p: PairLogps) -> torch.Tensor:
    """Token-mean negative log-likelihood of the chosen completions (a scalar), from the sums
    whatever the reduction: sum of the chosen tokens' NLL over their number, as TRL and Liger.
    With `p.nll_tokens` the sum is divided by that count instead: a trainer that splits a step
    over micro-batches and processes passes its share of the step's chosen tokens, so that the
    whole step is one token mean (as on one process with the whole batch)."""
    if p.nll_tokens is not None:
        return -p.chosen.sum() / p.nll_tokens
    return -p.chosen.sum() / p.chosen_counts.sum().clamp(min=1)


def smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss with label smoothing eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# ---- checks: invalid hyper-parameter combinations, raised when the LossConfig is built ----

def _check_robust(cfg: LossConfig) -> None:
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ValueError(
            f"loss_type 'robust' needs 0 <= label_smoothing < 0.5 (the label flip rate; it divides by "
            f"1 - 2 * label_smoothing), got {cfg.label_smoothing}"
        )


def _check_exo(cfg: LossConfig) -> None:
    if not 0.0 < cfg.label_smoothing < 1.0:
        raise ValueError(
            f"loss_type 'exo_pair' needs 0 < label_smoothing < 1 (it takes log(label_smoothing) and "
            f"log(1 - label_smoothing); the EXO paper suggests 1e-3), got {cfg.label_smoothing}"
        )


def _check_discopop(cfg: LossConfig) -> None:
    if not cfg.discopop_tau > 0:
        raise ValueError(f"loss_type 'discopop' needs discopop_tau > 0, got {cfg.discopop_tau}")


def _check_cpo(cfg: LossConfig) -> None:
    if not (math.isfinite(cfg.cpo_alpha) and cfg.cpo_alpha >= 0):
        raise ValueError(f"loss_type 'cpo' needs a finite cpo_alpha >= 0 (weight of the chosen NLL), got {cfg.cpo_alpha}")


def _check_simpo(cfg: LossConfig) -> None:
    if not math.isfinite(cfg.simpo_gamma):
        raise ValueError(f"loss_type 'simpo' needs a finite simpo_gamma, got {cfg.simpo_gamma}")


def _check_bco(cfg: LossConfig) -> None:
    if not math.isfinite(cfg.bco_delta):
        raise ValueError(f"loss_type 'bco_pair' needs a finite bco_delta, got {cfg.bco_delta}")


def _check_f_divergence(cfg: LossConfig) -> None:
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {cfg.f_divergence_type!r}")
    if not math.isfinite(cfg.f_alpha_divergence_coef):
        raise ValueError(f"f_alpha_divergence_coef must be finite, got {cfg.f_alpha_divergence_coef}")
    other = sorted(set(cfg.types) - F_DIVERGENCE_LOSSES)
    if cfg.f_divergence_type != "reverse_kl" and other:
        raise ValueError(
            f"f_divergence_type={cfg.f_divergence_type!r} is only defined for the loss types "
            f"{sorted(F_DIVERGENCE_LOSSES)} (their beta log Z(x) term cancels in the chosen-rejected margin); "
            f"got {other}. Use f_divergence_type='reverse_kl' with these losses"
        )


# ---- losses that compare the policy with a reference ----

@register("sigmoid", f_divergence=True)
def sigmoid_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290): -log sigmoid(beta d).

    With eps > 0, conservative DPO (cDPO, Mitchell, 2023): -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d).
    """
    return smoothed_logistic(cfg.beta * score_margin(p, cfg), cfg.label_smoothing)


@register("robust", check=_check_robust, f_divergence=True)
def robust_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024, arXiv:2403.00409), unbiased under label flip rate eps < 1/2:

    (-(1-eps) log sigmoid(beta d) + eps log sigmoid(-beta d)) / (1 - 2 eps).
    """
    z, eps = cfg.beta * score_margin(p, cfg), cfg.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("hinge", f_divergence=True)
def hinge_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """SLiC hinge loss (Zhao et al., 2023, arXiv:2305.10425; as in RSO, arXiv:2309.06657 Eq. 12): relu(1 - beta d)."""
    return torch.relu(1 - cfg.beta * score_margin(p, cfg))


@register("ipo", self_normalized=True, f_divergence=True)
def ipo_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """IPO (Azar et al., 2023, arXiv:2310.12036, Eq. 17) with beta as tau, length-normalized as in TRL:

    (dc/|c| - dr/|r| - 1/(2 beta))^2.
    """
    return (avg_score_margin(p, cfg) - 1 / (2 * cfg.beta)) ** 2


@register("sigmoid_norm", self_normalized=True, f_divergence=True)
def sigmoid_norm_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """Length-normalized DPO (Tülu 3, Lambert et al., 2024, arXiv:2411.15124, Eq. 6):

    -log sigmoid(beta (dc/|c| - dr/|r|)).
    """
    return -F.logsigmoid(cfg.beta * avg_score_margin(p, cfg))


@register("exo_pair", check=_check_exo, f_divergence=True)
def exo_pair_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """EXO-pref (Ji et al., 2024, arXiv:2402.00856, Eq. 16 with K = 2): KL(q || p_eps) where
    q = (sigmoid(beta d), sigmoid(-beta d)) and p_eps = (1 - eps, eps):

    q_w (log q_w - log(1-eps)) + q_l (log q_l - log eps).  Needs 0 < eps < 1 (the paper uses 1e-3).
    """
    z, eps = cfg.beta * score_margin(p, cfg), cfg.label_smoothing
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    return log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))


@register("nca_pair")
def nca_pair_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """NCA (Chen et al., 2024, arXiv:2402.05369), pairwise form with rewards u = beta dc, v = beta dr:

    -log sigmoid(u) - 1/2 log sigmoid(-u) - 1/2 log sigmoid(-v).
    """
    u, v = cfg.beta * p.chosen_logratios, cfg.beta * p.rejected_logratios
    return -F.logsigmoid(u) - 0.5 * F.logsigmoid(-u) - 0.5 * F.logsigmoid(-v)


@register("bco_pair", check=_check_bco)
def bco_pair_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """BCO (Jung et al., 2024, arXiv:2404.04656), pairwise form with reward shift delta = bco_delta:

    -log sigmoid(beta dc - delta) - log sigmoid(-(beta dr - delta)).

    Stateless: BCO's delta is a running mean of the rewards beta * [dc; dr] over past batches, which
    older TRL kept inside the trainer; the installed TRL (1.16) uses delta = 0, which is the default
    here. To train with the running mean, keep it outside (for example an exponential mean of the
    ``rewards/chosen`` and ``rewards/rejected`` metrics) and pass it as ``bco_delta`` on each call.
    """
    delta = cfg.bco_delta
    u, v = cfg.beta * p.chosen_logratios, cfg.beta * p.rejected_logratios
    return -F.logsigmoid(u - delta) - F.logsigmoid(-(v - delta))


@register("sppo_hard")
def sppo_hard_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """SPPO (Wu et al., 2024, arXiv:2405.00675, Eq. 4.7) with hard win probabilities P(w) = 1, P(l) = 0
    and eta = 1/beta:  (dc - 1/(2 beta))^2 + (dr + 1/(2 beta))^2.
    """
    half = 0.5 / cfg.beta
    return (p.chosen_logratios - half) ** 2 + (p.rejected_logratios + half) ** 2


@register("apo_zero")
def apo_zero_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7): push chosen up, rejected down:

    1 - sigmoid(beta dc) + sigmoid(beta dr).
    """
    return 1 - torch.sigmoid(cfg.beta * p.chosen_logratios) + torch.sigmoid(cfg.beta * p.rejected_logratios)


@register("apo_down")
def apo_down_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8): push both down, rejected more:

    sigmoid(beta dc) + 1 - sigmoid(beta d).
    """
    return torch.sigmoid(cfg.beta * p.chosen_logratios) + 1 - torch.sigmoid(cfg.beta * p.margin)


@register("discopop", check=_check_discopop, f_divergence=True)
def discopop_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Lu et al., 2024, arXiv:2406.08414, Eq. 5), z = beta d,
    s = sigmoid(z / discopop_tau):  (1 - s) (-log sigmoid(z)) + s exp(-z).
    """
    z = cfg.beta * score_margin(p, cfg)
    # As written, s exp(-z) is 0 * inf = NaN once exp(-z) overflows (z < -88 in fp32), and 1 - s
    # cancels. Here: 1 - s = sigmoid(-z / tau), and s exp(-z) = exp(log sigmoid(z / tau) - z),
    # whose exponent is about z (1 / tau - 1) for very negative z: it tends to 0 for tau < 1
    # (every practical tau; TRL's default is 0.05), stays <= 0 for tau = 1, and only for tau > 1
    # grows past the float range with the true value. There it is capped at half the dtype's
    # largest exponent (e^44 in fp32 / bf16, e^354 in fp64): a per-pair loss far beyond any that
    # trains, yet a batch of them still sums without overflow.
    tau = cfg.discopop_tau
    exponent = F.logsigmoid(z / tau) - z
    exponent = exponent.clamp(max=0.5 * math.log(torch.finfo(z.dtype).max))
    return torch.sigmoid(-z / tau) * -F.logsigmoid(z) + torch.exp(exponent)


@register("aot", couples_pairs=True)
def aot_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): first-order stochastic dominance through
    the batch-sorted margins.  delta_(i) = sort(c - r)_(i) - sort(c0 - r0)_(i), then the smoothed
    logistic loss -(1-eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta). Batch-level: the
    value of one pair depends on the others.
    """
    policy = torch.sort(p.chosen_logp - p.rejected_logp).values
    reference = torch.sort(p.ref_chosen_logp - p.ref_rejected_logp).values
    return smoothed_logistic(cfg.beta * (policy - reference), cfg.label_smoothing)


@register("aot_unpaired", couples_pairs=True)
@register("aot_pair", couples_pairs=True)
def aot_pair_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al., 2024, arXiv:2406.05882): chosen and rejected log-ratios sorted
    separately, delta_(i) = sort(dc)_(i) - sort(dr)_(i), then the smoothed logistic loss of beta delta.

    Named ``aot_pair`` in TRL before 0.29 and ``aot_unpaired`` since; both names are registered.
    """
    delta = torch.sort(p.chosen_logratios).values - torch.sort(p.rejected_logratios).values
    return smoothed_logistic(cfg.beta * delta, cfg.label_smoothing)


# ---- reference-free losses ----

@register("sft", reference_free=True, nll=True, f_divergence=True)
def sft_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """Negative log-likelihood of the chosen tokens (token mean over the batch): -sum(c) / sum(|c|).

    The auxiliary term of RPO (Pang et al., 2024, arXiv:2404.19733) and MPO (Wang et al., 2024,
    arXiv:2411.10442): ``loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha]``.
    """
    return chosen_nll(p)


@register("simpo", reference_free=True, check=_check_simpo, rewards="mean", self_normalized=True)
def simpo_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """SimPO (Meng et al., 2024, arXiv:2405.14734), with z = beta (c/|c| - r/|r|) - simpo_gamma:

    -(1-eps) log sigmoid(z) - eps log sigmoid(-z)   (eps = label_smoothing, as in TRL's CPOTrainer).

    CPO-SimPO (TRL's ``loss_type="simpo"`` with ``cpo_alpha > 0``) is ``["simpo", "sft"]`` with
    ``loss_weights=[1.0, cpo_alpha]``.
    """
    z = cfg.beta * (p.chosen_avg - p.rejected_avg) - cfg.simpo_gamma
    return smoothed_logistic(z, cfg.label_smoothing)


@register("cpo", reference_free=True, nll=True, check=_check_cpo, rewards="sum")
def cpo_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """CPO (Xu et al., 2024, arXiv:2401.08417, Eq. 3 plus the NLL term of Eq. 4):

    -(1-eps) log sigmoid(beta (c - r)) - eps log sigmoid(-beta (c - r)) + cpo_alpha * NLL(chosen),
    NLL the token mean over the batch, as in TRL's CPOTrainer with ``loss_type="sigmoid"``.
    """
    margin = p.chosen_logp - p.rejected_logp
    return smoothed_logistic(cfg.beta * margin, cfg.label_smoothing) + cfg.cpo_alpha * chosen_nll(p)


@register("orpo", reference_free=True, nll=True, rewards="mean", self_normalized=True)
def orpo_loss(p: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """ORPO (Hong et al., 2024, arXiv:2403.07691, Eqs. 4-7), beta as the weight lambda:

    NLL(chosen) - beta log sigmoid(log odds(c̄) - log odds(r̄)),  c̄ = c/|c|, odds(x) = e^x / (1 - e^x).
    NLL is the token mean over the batch, as in TRL's ORPOTrainer.
    """
    return chosen_nll(p) - cfg.beta * F.logsigmoid(p.log_odds)


def preference_loss(pairs: PairLogps, cfg: LossConfig) -> torch.Tensor:
    """sum_k weight_k * mean(loss_k(pairs)) over the configured loss types (each pair's loss times
    its WPO weight first, with cfg.use_weighting)."""
    if cfg.use_weighting and pairs.weights is None:
        raise ValueError("use_weighting=True needs the per-pair WPO weights (PairLogps.weights, see wpo_weights)")
    total = None
    for name, weight in zip(cfg.types, cfg.weights):
        loss = LOSSES[name](pairs, cfg)
        if cfg.use_weighting:  # a batch-level term (sft) becomes its value times each pair's weight
            loss = loss * pairs.weights
        term = weight * loss.mean()
        total = term if total is None else total + term
    return total
