"""The one place that turns a model and a batch into a loss: fused, fused_linear or reference.

    fused:        logits = model(batch).logits        -> fastdpo.fused_dpo_loss
    fused_linear: hidden = model(batch).hidden[-1]    -> fastdpo.fused_linear_dpo_loss(hidden, lm_head.weight)
    reference:    logits = model(batch).logits        -> fastdpo.reference.reference_dpo_loss (log_softmax + gather)

Batches hold [chosen; rejected] rows with labels aligned to input_ids, so every path shifts once
here: position t's logits score the token at t + 1. The labels move, not the logits: slicing the
logits (`logits[:, :-1]`) would make autograd's slice backward allocate a second [B, T, V]
gradient, while full logits with the last position masked keep the in-place backward in place.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

import fastdpo
from fastdpo.losses import LossConfig

from .config import ConfigError, TrainConfig
from .data import Batch
from .model import final_softcap, output_head


def loss_config(cfg: TrainConfig) -> LossConfig:
    """fastdpo's LossConfig for these options; unknown names and bad values become ConfigErrors."""
    known = {f.name for f in dataclasses.fields(LossConfig) if f.init}
    unknown = sorted(set(cfg.loss_options) - known)
    if unknown:
        raise ConfigError(f"--loss-options: unknown option {unknown[0]!r}; known: {', '.join(sorted(known))}")
    types = cfg.loss_types
    try:
        return LossConfig(loss_type=types[0] if len(types) == 1 else types, beta=cfg.beta,
                          label_smoothing=cfg.label_smoothing, logps_reduction=cfg.logps_reduction,
                          **cfg.loss_options)
    except (ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"--loss-type {cfg.loss_type}: {e}") from None


class LossFn:
    """Computes DPO-family losses (and TRL metrics) for one configuration and implementation."""

    def __init__(self, cfg: TrainConfig, autocast: bool) -> None:
        self.impl = cfg.loss_impl
        losses = loss_config(cfg)
        self.options: dict[str, Any] = dict(beta=cfg.beta, loss_type=losses.loss_type,
                                            label_smoothing=cfg.label_smoothing, return_metrics=True,
                                            logps_reduction=cfg.logps_reduction, **cfg.loss_options)
        if cfg.inplace_backward:
            self.options["inplace_backward"] = True
        self.autocast = autocast

    def __call__(self, model, batch: Batch, ref_logps: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        labels = next_token_labels(batch.labels)
        if self.impl == "fused_linear":
            hidden = forward(model, batch, self.autocast, hidden=True)
            head = output_head(unwrap(model))
            weight = head.weight.to(hidden.dtype)  # fp32 master weights meet bf16 activations
            bias = None if head.bias is None else head.bias.to(hidden.dtype)
            return fastdpo.fused_linear_dpo_loss(hidden, weight, labels, ref_logps, bias=bias,
                                                 softcap=final_softcap(unwrap(model)), **self.options)
        logits = forward(model, batch, self.autocast)
        if self.impl == "reference":
            from fastdpo.reference import reference_dpo_loss

            return reference_dpo_loss(logits, labels, ref_logps, **self.options)
        return fastdpo.fused_dpo_loss(logits, labels, ref_logps, **self.options)


def forward(model, batch: Batch, autocast: bool, *, hidden: bool = False) -> torch.Tensor:
    """Logits [2P, T, V], or with `hidden` the final (normed) hidden states [2P, T, H].

    For hidden states the model still goes through its own forward (so DDP / FSDP / PEFT wrappers
    stay in charge) but projects only the last position (logits_to_keep=1)."""
    device_type = batch.input_ids.device.type
    context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        if hidden:
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                        output_hidden_states=True, logits_to_keep=1)
            return out.hidden_states[-1]
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits


@torch.no_grad()
def sequence_logps(model, batch: Batch, autocast: bool, *, linear: bool = False) -> torch.Tensor:
    """Per-row summed completion log-probs [2P] (fp32): what a reference contributes. With
    `linear`, from the hidden states and lm_head, never building the logits (--loss-impl fused_linear)."""
    labels = next_token_labels(batch.labels)
    if linear:
        hidden = forward(model, batch, autocast, hidden=True)
        head = output_head(unwrap(model))
        bias = None if head.bias is None else head.bias.to(hidden.dtype)
        return fastdpo.linear_sequence_logps(hidden, head.weight.to(hidden.dtype), labels, bias=bias,
                                             softcap=final_softcap(unwrap(model)))
    return fastdpo.sequence_logps(forward(model, batch, autocast), labels)


def sft_nll(model, batch: Batch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the chosen rows (the first half) and their token count: the supervised warm-up."""
    P = batch.pairs
    logits = forward(model, Batch(batch.input_ids[:P], batch.attention_mask[:P], batch.labels[:P], batch.index),
                     autocast)
    labels = next_token_labels(batch.labels[:P])
    return -fastdpo.sequence_logps(logits, labels).sum(), (labels != -100).sum()


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t] = the token at t + 1 (-100 at the last position), aligned with unsliced logits."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def unwrap(model):
    """The module inside DDP / FSDP wrappers (those keep it as .module)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model
