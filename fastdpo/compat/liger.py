"""Liger-Kernel's fused-linear DPO loss, computed by fastdpo: switching is an import change.

    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss        # before
    from fastdpo.compat.liger import LigerFusedLinearDPOLoss             # after

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True, average_log_prob=True)
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = loss_fn(lin_weight, _input, target, bias,
                                                       ref_input, ref_weight, ref_bias)

The constructor options, call signature and return value are those of Liger-Kernel 0.8's
``LigerFusedLinearDPOLoss`` (and ``liger_fused_linear_dpo`` for its functional form): ``_input``
[2P, T, H] rows as [chosen; rejected], ``target`` [2P, T] aligned with ``_input`` (shifted by the
caller), ``lin_weight`` [V, H]. What each option becomes in :func:`fastdpo.fused_linear_dpo_loss`:

    average_log_prob=True        logps_reduction="mean" (policy and reference rows alike)
    compute_nll_loss, alpha      loss_type=[loss_type, "sft"], loss_weights=[1.0, alpha]
    use_ref_model=False          reference_free=True (ref_input and its weights are not read)
    loss_type, beta, discopop_tau, ignore_index                    the same names
    label_smoothing              the same, except with loss_type="sigmoid", where Liger ignores
                                 it (plain DPO; fastdpo's own sigmoid would apply cDPO)
    compiled, chunk_size         accepted and checked, not used: fastdpo's pass needs no
                                 torch.compile and sizes its own chunks (in tokens, not pairs)

Returned as Liger does: the loss, and per pair [P] the policy log-probs and the rewards
beta * (policy - reference) log-probs (summed or per-token means as ``average_log_prob`` says),
the chosen NLL (token mean over the batch; 0 without ``compute_nll_loss``), and the mean logit of
the chosen and rejected halves. Liger's mean logit covers every position of ``_input``, prompt and
padding included (TRL's ``logits/*`` metric covers completion tokens only); it is computed here
without the logits from sum_{t,v} (h_t . w_v + b_v) = (sum_t h_t) . (sum_v w_v) + T sum_v b_v.

Differences: the aux tensors are detached (Liger's carry a graph that gives them no gradient);
a row with no scored token has log-prob 0 (Liger's ``average_log_prob=True`` gives 0/0 = NaN);
``loss_type`` takes any fastdpo loss that compares with a reference (Liger's ten, plus ipo,
sigmoid_norm and the aot family), and ``use_ref_model=True`` without ``ref_weight`` uses
``lin_weight`` and ``bias`` for the reference (Liger needs it given).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..linear import fused_linear_dpo_loss
from ..losses import REFERENCE_FREE, LossConfig

__all__ = ["LigerFusedLinearDPOLoss", "LigerFusedLinearDPOFunction", "liger_fused_linear_dpo"]

LigerAux = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check_options(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                   chunk_size, loss_type, label_smoothing, discopop_tau) -> LossConfig:
    """Liger's options checked once, as the fastdpo LossConfig they map to."""
    for name, value in (("compute_nll_loss", compute_nll_loss), ("compiled", compiled),
                        ("use_ref_model", use_ref_model), ("average_log_prob", average_log_prob)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (pairs per chunk), got {chunk_size!r}")
    if not isinstance(loss_type, str):
        raise TypeError(f"loss_type must be a str, got {loss_type!r}")
    if loss_type in REFERENCE_FREE:
        raise ValueError(f"loss_type {loss_type!r} is not a DPO loss (it never reads a reference); "
                         "use fastdpo.fused_linear_dpo_loss for it")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number (weight of the NLL term), got {alpha!r}")
    return LossConfig(**_loss_options(beta, alpha, compute_nll_loss, average_log_prob, loss_type,
                                      label_smoothing, discopop_tau))


def _loss_options(beta, alpha, compute_nll_loss, average_log_prob, loss_type, label_smoothing,
                  discopop_tau) -> dict:
    """fastdpo's loss keywords for Liger's options."""
    return dict(
        loss_type=[loss_type, "sft"] if compute_nll_loss else loss_type,
        loss_weights=[1.0, float(alpha)] if compute_nll_loss else None,
        beta=beta,
        # Liger reads label_smoothing in robust and exo_pair only: its sigmoid is plain DPO.
        label_smoothing=0.0 if loss_type == "sigmoid" else label_smoothing,
        discopop_tau=discopop_tau,
        logps_reduction="mean" if average_log_prob else "sum",
    )


@torch.no_grad()
def _logits_means(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[2] mean logit over every position and vocabulary entry of the chosen and rejected halves,
    without the logits: sum_{t,v} z_tv = (sum_t h_t) . (sum_v w_v) + T * sum_v b_v."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    P, T = hidden.shape[0] // 2, hidden.shape[1]
    V = weight.shape[0]
    halves = hidden.reshape(2, P * T, hidden.shape[-1]).sum(1, dtype=acc)  # [2, H]
    sums = halves @ weight.sum(0, dtype=acc)
    if bias is not None:
        sums = sums + P * T * bias.sum(dtype=acc)
    return sums / max(P * T * V, 1)


def liger_fused_linear_dpo(
    _input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_input: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    beta: float = 0.1,
    compute_nll_loss: bool = False,
    compiled: bool = True,
    use_ref_model: bool = True,
    average_log_prob: bool = False,
    chunk_size: int = 1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    alpha: float = 1.0,
) -> tuple[torch.Tensor, LigerAux]:
    """Liger's ``liger_fused_linear_dpo`` (``LigerFusedLinearDPOFunction.apply``): same positional
    order and defaults; see the module docstring for the mapping and the return value."""
    _check_options(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                   chunk_size, loss_type, label_smoothing, discopop_tau)
    if use_ref_model and ref_input is None:
        raise ValueError("use_ref_model=True needs ref_input (the reference model's hidden states)")
    reference = dict(ref_hidden=ref_input, ref_weight=ref_weight, ref_bias=ref_bias) if use_ref_model else {}
    loss, rows = fused_linear_dpo_loss(
        _input, weight, target, bias=bias, ignore_index=ignore_index, reference_free=not use_ref_model,
        return_rows=True, **reference,
        **_loss_options(beta, alpha, compute_nll_loss, average_log_prob, loss_type, label_smoothing, discopop_tau),
    )
    P = rows.counts.shape[0] // 2
    chosen_logits_mean, rejected_logits_mean = _logits_means(_input, weight, bias).unbind()
    if compute_nll_loss:
        sums = rows.logps[:P] * rows.counts[:P] if average_log_prob else rows.logps[:P]
        nll = -sums.sum() / rows.counts[:P].sum().clamp(min=1)
    else:
        nll = torch.zeros((), dtype=rows.logps.dtype, device=rows.logps.device)
    aux = (rows.logps[:P], rows.logps[P:], chosen_logits_mean, rejected_logits_mean, nll,
           rows.chosen_rewards, rows.rejected_rewards)
    return loss, aux


class LigerFusedLinearDPOFunction:
    """Stand-in for Liger's autograd Function: ``LigerFusedLinearDPOFunction.apply(...)`` works."""

    apply = staticmethod(liger_fused_linear_dpo)


class LigerFusedLinearDPOLoss(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearDPOLoss`` (same options, call and return), computed by
    :func:`fastdpo.fused_linear_dpo_loss`.

    Args:
        ignore_index: target value of positions that are not scored.
        beta: inverse temperature of the implicit reward.
        alpha: weight of the NLL term (with ``compute_nll_loss``).
        compute_nll_loss: add ``alpha`` times the chosen rows' token-mean NLL to the loss.
        compiled: accepted for Liger compatibility; fastdpo does not compile anything.
        use_ref_model: compare with a reference (``ref_input``, ``ref_weight``, ``ref_bias``);
            False compares with a zero reference.
        average_log_prob: per-token mean log-probs instead of sums (policy and reference).
        chunk_size: accepted for Liger compatibility (pairs per chunk there); fastdpo chunks by tokens.
        loss_type: a fastdpo loss that compares with a reference (Liger's names are fastdpo's).
        label_smoothing: eps of cDPO / robust / exo_pair.
        discopop_tau: DiscoPOP's temperature.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
    ) -> None:
        super().__init__()
        _check_options(ignore_index, beta, alpha, compute_nll_loss, compiled, use_ref_model, average_log_prob,
                       chunk_size, loss_type, label_smoothing, discopop_tau)
        self.ignore_index = ignore_index
        self.beta = beta
        self.alpha = alpha
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.average_log_prob = average_log_prob
        self.chunk_size = chunk_size
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.discopop_tau = discopop_tau

    def forward(
        self,
        lin_weight: torch.Tensor,
        _input: torch.Tensor,
        target: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LigerAux]:
        return liger_fused_linear_dpo(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, self.ignore_index, self.beta,
            self.compute_nll_loss, self.compiled, self.use_ref_model, self.average_log_prob, self.chunk_size,
            self.loss_type, self.label_smoothing, self.discopop_tau, self.alpha,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, use_ref_model={self.use_ref_model}, "
                f"average_log_prob={self.average_log_prob}, compute_nll_loss={self.compute_nll_loss}")
