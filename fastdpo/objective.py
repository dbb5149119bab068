"""From per-row results to the loss: the layer that every entry point shares.

    per-row log-prob sums, token counts [2P] (+ the reference's [2P], WPO's row sums)
    --> PairLogps [P] --> losses.preference_loss --> scalar (+ TRL metrics, per-row results)

The public functions (fastdpo.dpo, fastdpo.linear, fastdpo.eager), the fused-linear op's
in-forward loss gradient (fastdpo.linear_ops), the trainer and the TRL integration all end here,
so a loss means the same numbers whichever way its rows were computed. Nothing here launches a
kernel: it imports only the loss registry and the metrics, never an op module.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import fields
from typing import Any, Callable, Protocol

import torch
from torch import nn

from . import validation as V
from .losses import COUPLED_LOSSES, LossConfig, PairLogps, preference_loss, wpo_weights
from .metrics import preference_metrics, preference_rows


def resolve_reference(
    cfg: LossConfig,
    rows: int,
    like: torch.Tensor,
    ref_logps: torch.Tensor | None,
    reference_free: bool,
    ref_pass: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The reference model's per-row log-probs [B]: given, computed by `ref_pass()`, or zeros."""
    given = [name for name, x in (("ref_logps", ref_logps), ("the reference inputs", ref_pass)) if x is not None]
    if len(given) > 1:
        raise ValueError("pass either ref_logps or the reference inputs (ref_logits / ref_hidden), not both")
    if reference_free and given:
        raise ValueError(f"reference_free=True but {given[0]} was also given")
    if ref_logps is not None:
        V.check_row_vector(ref_logps, "ref_logps", rows)
        V.check_same_device(like, ref_logps=ref_logps)
        return ref_logps.detach()
    if ref_pass is not None:
        with torch.no_grad():
            return ref_pass()
    if cfg.needs_reference and not reference_free:
        raise ValueError(
            f"loss_type {cfg.loss_type!r} needs a reference: pass ref_logps or ref_logits "
            "(or reference_free=True for an implicit uniform reference)"
        )
    return torch.zeros(rows, dtype=torch.float32, device=like.device)


def loss_from_rows(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    counts: torch.Tensor,
    cfg: LossConfig,
    *,
    score_sums: torch.Tensor | None = None,
    vocab: int = 0,
    return_metrics: bool = False,
    return_rows: bool = False,
    pair_weights: torch.Tensor | None = None,
    nll_tokens: float | None = None,
) -> torch.Tensor | tuple:
    """The loss from per-row log-prob sums laid out as [chosen; rejected], then the metrics dict if
    `return_metrics` and the `PreferenceRows` if `return_rows` (a bare loss when neither).
    `pair_weights` [P] are WPO's (read when cfg.use_weighting). `nll_tokens`: the count the NLL
    terms divide the chosen NLL sum by (default: this batch's chosen tokens; see `chosen_nll`)."""
    pairs = PairLogps.from_rows(logps, ref_logps, counts, cfg.logps_reduction, pair_weights, nll_tokens)
    loss = preference_loss(pairs, cfg)
    if not (return_metrics or return_rows):
        return loss
    out: tuple = (loss,)
    if return_metrics:
        out += (preference_metrics(pairs, cfg, score_sums, vocab),)
    if return_rows:
        out += (preference_rows(pairs, cfg, counts),)
    return out


class PolicyRows(Protocol):
    """What `policy_weights` reads of a policy pass (SequenceStats, the head's RowStats)."""

    logps: torch.Tensor
    counts: torch.Tensor
    log_sum_sq_sums: torch.Tensor | None


def policy_weights(policy: PolicyRows, cfg: LossConfig) -> torch.Tensor | None:
    """WPO's per-pair weights from a policy pass run with `log_sum_sq=cfg.use_weighting`, else None."""
    if not cfg.use_weighting:
        return None
    return wpo_weights(policy.logps, policy.log_sum_sq_sums, policy.counts)


def grad_in_forward_spec(cfg: LossConfig, grad_in_forward: bool | None) -> str | None:
    """The loss encoded for the fused-linear grad-in-forward op (`LossConfig.encode`), or None for
    the recomputing path (8 N H V FLOPs instead of 6).

    `grad_in_forward=None` means on unless a loss couples pairs (aot family). A setting that cannot
    cross the op boundary (a tensor or a non-finite number, see `LossConfig.encode`) takes the
    recomputing path with a warning, since it costs a third more FLOPs.
    """
    if grad_in_forward is None:
        grad_in_forward = not any(name in COUPLED_LOSSES for name in cfg.types)
    if not grad_in_forward:
        return None
    spec = cfg.encode()
    if spec is None:
        warnings.warn(
            f"fastdpo: a loss option of {cfg.op_values()!r} is not None, a bool, an int, a finite float, a str or a "
            "list of them, so it cannot reach the grad-in-forward op; the backward recomputes the logits "
            "(8 N H V FLOPs instead of 6)", RuntimeWarning, stacklevel=3)
    return spec


def loss_gradient(spec: str, ref_rows: torch.Tensor, counts: torch.Tensor):
    """dLoss/dlogps [B] at given row log-probs, as a function of them (and, for WPO, of the rows'
    sums of log sum_v p_v^2, from which its detached weights follow), for the loss `spec` encodes.

    Runs plain autograd on [B] tensors; the caller provides the autograd context (the op runs below
    the autograd dispatch key)."""
    cfg = LossConfig.decode(spec)

    def grad(rows: torch.Tensor, log_sum_sq_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = rows.detach().requires_grad_(True)
        weights = wpo_weights(x, log_sum_sq_rows, counts) if cfg.use_weighting else None
        loss = loss_from_rows(x, ref_rows, counts, cfg, pair_weights=weights)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
        return g if g is not None else torch.zeros_like(rows)

    return grad


class LossModule(nn.Module):
    """A loss function as a torch Module: its keyword options fixed at construction, the tensors (and
    any per-call override of an option) given to forward. Subclasses declare the options in their
    ``__init__`` signature, so that help() and editors show them, and pass ``locals()`` here."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__()
        options = {k: v for k, v in options.items() if k not in ("self", "__class__")}
        options.update(options.pop("loss_options", {}))
        LossConfig(**{k: v for k, v in options.items() if k in _LOSS_FIELDS or k not in _declared(type(self))})
        V.check_options(**{k: v for k, v in options.items() if k in V.CALL_OPTIONS})
        self.options = options  # checked above: a bad option fails here, not at the first call

    def extra_repr(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k not in defaults or defaults[k] != v)


_LOSS_FIELDS = frozenset(f.name for f in fields(LossConfig) if f.init)


def _declared(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)
