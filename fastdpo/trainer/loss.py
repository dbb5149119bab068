"""From a model and a micro-batch to the loss, through fastdpo's model head (fastdpo.head).

    batch (LayoutBatch) --fastdpo.attention.model_inputs--> model(..., fastdpo_head=...) --> RowStats
    RowStats (policy) + reference log-probs [2P] --fastdpo.losses--> loss, TRL metrics

--loss-impl picks the head's mode: fused = the from-logits kernel on the scored positions,
fused_linear = hidden states and lm_head (the logits are never built), reference = the eager
log_softmax + gather. The policy, the reference model and the warm-up's NLL all go through the
same head, in the same layout, so padded, padding-free and shared-prompt batches give the same
numbers (up to rounding).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from typing import TYPE_CHECKING

from fastdpo.attention import activation_dtype, model_inputs
from fastdpo.layouts import LayoutBatch
from fastdpo.losses import LossConfig
from fastdpo.objective import grad_in_forward_spec, loss_from_rows, policy_weights

from .config import TrainConfig, loss_config  # noqa: F401  (loss_config stays importable from here)

if TYPE_CHECKING:  # fastdpo.head needs transformers, which `fastdpo train` checks for before importing it
    from fastdpo.head import HeadOptions, RowStats

HEAD_MODES = {"fused": "logits", "fused_linear": "linear", "reference": "eager"}


def head_options(cfg: TrainConfig, losses: LossConfig | None = None) -> HeadOptions:
    """The head's mode for --loss-impl; token metrics (TRL's entropy, top-1) are not logged here.
    `losses` is `loss_config(cfg)` when the caller has it."""
    from fastdpo.head import HeadOptions

    losses = losses if losses is not None else loss_config(cfg)
    return HeadOptions(mode=HEAD_MODES[cfg.loss_impl], token_metrics=False, inplace_backward=cfg.inplace_backward,
                       log_sum_sq=losses.use_weighting)


def attach_head(model, options: HeadOptions) -> None:
    """Install the head on the causal LM inside `model` (under PEFT, its base model)."""
    from fastdpo.head import install_head

    install_head(causal_lm(model), options)


def rows(model, batch: LayoutBatch, call: str, autocast: bool, **extra) -> RowStats:
    """Per-row statistics of `batch` from `model` (any wrapper of a causal LM with the head attached)."""
    lm = causal_lm(model)
    context = torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        inputs = model_inputs(batch, lm.config, activation_dtype(lm))
        return model(**inputs, fastdpo_head=call, fastdpo_scoring=batch.scoring, **extra)


class LossFn:
    """Computes DPO-family losses (and TRL metrics) for one configuration and implementation."""

    def __init__(self, cfg: TrainConfig, autocast: bool, losses: LossConfig | None = None) -> None:
        self.loss = losses if losses is not None else loss_config(cfg)
        self.autocast = autocast
        self.linear = cfg.loss_impl == "fused_linear"
        # fused_linear: the loss's gradient is known per pair group, so the op can build the
        # gradients while each chunk of logits is still in memory (6 N H V FLOPs instead of 8).
        self.spec = grad_in_forward_spec(self.loss, None) if self.linear else None

    def __call__(self, model, batch: LayoutBatch, ref_logps: torch.Tensor | None,
                 nll_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
        """Loss and metrics of `batch`; `nll_tokens` as in fastdpo.objective.loss_from_rows."""
        if ref_logps is None:  # reference-free losses: an implicit zero reference
            ref_logps = torch.zeros(2 * batch.pairs, dtype=torch.float32, device=batch.input_ids.device)
        extra = {}
        if self.spec is not None and torch.is_grad_enabled():
            extra["fastdpo_grad"] = (self.spec, ref_logps.detach().float())
        policy = rows(model, batch, "policy", self.autocast, **extra)
        return loss_from_rows(policy.logps, ref_logps.to(policy.logps.device), policy.counts, self.loss,
                              score_sums=policy.score_sums, vocab=policy.vocab, return_metrics=True,
                              pair_weights=policy_weights(policy, self.loss), nll_tokens=nll_tokens)


@torch.no_grad()
def sequence_logps(model, batch: LayoutBatch, autocast: bool) -> torch.Tensor:
    """Per-row summed completion log-probs [2P] (fp32): what a reference contributes."""
    return rows(model, batch, "reference", autocast).logps.float()


def sft_nll(model, batch: LayoutBatch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of a chosen-only batch and its token count: the supervised warm-up."""
    stats = rows(model, batch, "policy", autocast)
    return -stats.logps.sum(), stats.counts.sum()


def causal_lm(model):
    """The causal LM inside DDP / FSDP wrappers (kept as .module) and PEFT (its base model)."""
    model = unwrap(model)
    if hasattr(model, "get_base_model") and hasattr(model, "disable_adapter"):
        model = model.get_base_model()
    return model


def unwrap(model):
    """The module inside DDP / FSDP wrappers (those keep it as .module)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
