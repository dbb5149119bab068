"""A fastdpo head for Hugging Face causal LMs: per-row log-prob statistics from inside the model's forward.

`install_head(model, options)` wraps `model.forward` so that

    model(input_ids=..., attention_mask=..., labels=labels, fastdpo_head="policy")

runs the backbone, shifts, and returns a `RowStats` of per-row sums over the positions whose
next-token label is not -100, instead of logits. Without `fastdpo_head` the forward is unchanged.

Running inside the forward keeps wrappers that act around it (DDP, FSDP, DeepSpeed, PEFT) in
charge of the parameters, as TRL's own fused LM head does. Two modes:

- "logits" (default): only the valid positions are projected (`lm_head(hidden[valid])`, [N, V]),
  then fastdpo's from-logits kernel computes the log-probs and logit sums in one pass, with the
  logits gradient written over the logits (nothing else reads them: the matmul's backward needs
  only its inputs).
- "linear": `fastdpo.linear.linear_sequence_stats(hidden, lm_head.weight, labels, ...)`: the
  logits are never built beyond one chunk of valid positions.

The logits the model's config asks for are reproduced: scores = softcap * tanh(z * scale / softcap),
with `scale` the config's logit multiplier and `softcap` its `final_logit_softcapping`.

Entropy and top-1 accuracy (TRL's `entropy` and `mean_token_accuracy`, with `token_metrics=True`)
come from the same pass as the log-probs in both modes: the from-logits kernel's forward in
"logits" mode, the fused-linear op's forward chunk loop in "linear" mode. No second read of the
logits, no extra matmul.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from ..linear import linear_sequence_stats
from ..logps import sequence_stats
from ..packed import segment_sums

MODES = ("logits", "linear")
CALLS = ("policy", "reference")


@dataclass
class HeadOptions:
    """How the head computes per-row statistics (see the module docstring)."""

    mode: str = "logits"
    token_metrics: bool = True
    inplace_backward: bool = True
    log_sum_sq: bool = False  # policy calls also sum WPO's log sum_v p_v^2 (same pass as the log-probs)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "linear":
            import fastdpo

            if not hasattr(fastdpo, "linear_sequence_logps"):
                raise NotImplementedError(
                    "mode='linear' needs fastdpo.linear_sequence_logps, which this fastdpo build does not have; "
                    "use mode='logits'"
                )


@dataclass
class RowStats(ModelOutput):
    """Per-row results ([B] each) over the positions whose next-token label is not -100."""

    logps: torch.Tensor | None = None  # sum of label log-probs (differentiable for the policy)
    counts: torch.Tensor | None = None  # number of scored positions
    score_sums: torch.Tensor | None = None  # sum over vocabulary and positions of the scores
    entropy_sums: torch.Tensor | None = None  # sum over positions of the next-token entropy
    top1_counts: torch.Tensor | None = None  # positions whose label is the (first) argmax
    vocab: int | None = None
    log_sum_sq_sums: torch.Tensor | None = None  # sum over positions of log sum_v p_v^2 (WPO), when asked
    tail_logps: torch.Tensor | None = None  # LD-DPO: the part of `logps` beyond the row's first `shared` tokens


def install_head(model: torch.nn.Module, options: HeadOptions) -> None:
    """Wrap `model.forward` to accept `fastdpo_head=` ("policy" or "reference"); idempotent.

    `model` is the causal LM itself (under PEFT, `peft_model.get_base_model()`); calls may go
    through any wrapper of it. Re-installing only updates the options.
    """
    if getattr(model, "_fastdpo_head_options", None) is not None:
        model._fastdpo_head_options = options
        return
    inner = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: generate() validates kwargs against it
    def forward(self, *args, fastdpo_head: str | None = None, **kwargs):
        if fastdpo_head is None:
            return inner(*args, **kwargs)
        if fastdpo_head not in CALLS:
            raise ValueError(f"fastdpo_head must be one of {CALLS}, got {fastdpo_head!r}")
        return head_forward(self, args, kwargs, self._fastdpo_head_options, fastdpo_head == "policy",
                            kwargs.pop("fastdpo_grad", None), kwargs.pop("fastdpo_shared", None))

    model.forward = types.MethodType(forward, model)
    model._fastdpo_head_options = options


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) of the model's logits, read from its text config as transformers applies them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None)
        if scale is not None:
            return float(scale), softcap
    scaling = getattr(text, "logits_scaling", None)
    if scaling is not None:  # Granite divides by it; HyperCLOVA X multiplies
        return (float(scaling) if text.model_type == "hyperclovax" else 1.0 / scaling), softcap
    return 1.0, softcap


def head_forward(model, args: tuple, kwargs: dict, options: HeadOptions, policy: bool,
                 grad_spec: tuple[str, torch.Tensor] | None = None, shared: torch.Tensor | None = None) -> RowStats:
    """Backbone, shift, then per-row statistics in the chosen mode.

    `grad_spec` = (loss spec, reference rows), in "linear" mode, lets the fused-linear op build the
    gradients during the forward for that loss (6 N H V FLOPs instead of 8); its backward checks
    the guess against the true row gradient and recomputes exactly when they differ.
    `shared` [B] (LD-DPO): also return `tail_logps`, the sum over each row's scored tokens after
    its first shared[b] ones.
    """
    labels = kwargs.pop("labels", None)
    if labels is None:
        raise ValueError("the fastdpo head needs labels= (next-token ids, -100 where not scored)")
    if kwargs.pop("shift_labels", None) is not None:
        raise NotImplementedError("the fastdpo head does not take pre-shifted shift_labels")
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
    lm_head = model.get_output_embeddings()
    hidden = hidden.to(lm_head.weight.device)  # a model split over devices ends on the head's device
    labels = labels[:, 1:].to(lm_head.weight.device)
    scale, softcap = logit_transform(model.config)
    want = policy  # the reference pass needs the log-probs only
    if shared is not None:
        return _with_tail(hidden, labels, lm_head, scale, softcap, options, want, shared.to(labels.device))
    if options.mode == "linear":
        return _from_linear(hidden, labels, lm_head, scale, softcap, options, want, grad_spec)
    return _from_logits(hidden, labels, lm_head, scale, softcap, options, want)


def _with_tail(hidden, labels, lm_head, scale, softcap, options: HeadOptions, metrics: bool,
               shared: torch.Tensor) -> RowStats:
    """LD-DPO's split, with no per-token tensor beyond [B, T]: each row is cut after its shared[b]-th
    scored token, and the pass sums the 2B pieces (row b's shared part, then its tail) as segments of
    the flat batch; logps = shared + tail, tail_logps = tail."""
    B, T = labels.shape
    rank = (labels != -100).cumsum(-1)  # [B, T]: scored tokens up to and including t
    cut = (rank <= shared[:, None]).sum(-1) + torch.arange(B, device=labels.device) * T
    ends = torch.arange(1, B + 1, device=labels.device) * T
    cu_seqlens = torch.cat([cut.new_zeros(1), torch.stack([cut, ends], 1).flatten()])
    flat_hidden, flat_labels = hidden.reshape(1, B * T, -1), labels.reshape(1, B * T)
    if options.mode == "linear":
        stats = _from_linear(flat_hidden, flat_labels, lm_head, scale, softcap, options, metrics, None, cu_seqlens)
    else:
        stats = _from_logits(flat_hidden, flat_labels, lm_head, scale, softcap, options, metrics, cu_seqlens)
    halves = {}
    for name in ("logps", "counts", "score_sums", "entropy_sums", "top1_counts", "log_sum_sq_sums"):
        value = getattr(stats, name)
        halves[name] = None if value is None else value.view(B, 2).sum(-1)
    return RowStats(**halves, vocab=stats.vocab, tail_logps=stats.logps.view(B, 2)[:, 1])


def _rows(values: torch.Tensor | None, rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Per-position values [N] summed into their rows [B] (differentiable)."""
    if values is None:
        return None
    return values.new_zeros(batch).index_add(0, rows, values)


def _from_logits(hidden, labels, lm_head, scale, softcap, options: HeadOptions, metrics: bool,
                 cu_seqlens: torch.Tensor | None = None) -> RowStats:
    valid = labels != -100
    rows = valid.nonzero(as_tuple=True)[0]
    B, vocab = labels.shape[0], lm_head.weight.shape[0]
    counts = valid.sum(-1)
    if cu_seqlens is not None:  # a packed [1, tokens] batch: rows are its segments
        rows = torch.bucketize(valid.flatten().nonzero(as_tuple=True)[0], cu_seqlens[1:], right=True)
        B = cu_seqlens.numel() - 1
        counts = segment_sums(valid.flatten(), cu_seqlens)
    if rows.numel() == 0:  # a differentiable zero keeps an all-masked micro-batch in the graph
        return RowStats(logps=hidden.sum() * 0.0 + hidden.new_zeros(B, dtype=torch.float32), counts=counts)
    targets = labels[valid]
    logits = lm_head(hidden[valid])  # [N, V]: prompt and padding positions never reach the matmul
    temperature = 1.0
    if scale != 1.0:
        if softcap is None and scale > 0:
            temperature = 1.0 / scale  # z * scale as a temperature: no extra pass over the logits
        else:
            logits = logits * scale
    token_metrics = metrics and options.token_metrics
    # Entropy and top-1 come from the same pass as the log-probs: no second read of the logits.
    stats = sequence_stats(
        logits.unsqueeze(1), targets.unsqueeze(1), temperature=temperature, softcap=softcap,
        sum_scores=metrics, token_metrics=token_metrics,
        inplace_backward=options.inplace_backward and torch.is_grad_enabled(),
        log_sum_sq=metrics and options.log_sum_sq,
    )
    return RowStats(logps=_rows(stats.logps, rows, B), counts=counts, vocab=vocab,
                    score_sums=_rows(stats.score_sums, rows, B),
                    entropy_sums=_rows(stats.entropy_sums, rows, B), top1_counts=_rows(stats.top1_counts, rows, B),
                    log_sum_sq_sums=_rows(stats.log_sum_sq_sums, rows, B))


def _from_linear(hidden, labels, lm_head, scale, softcap, options: HeadOptions, metrics: bool,
                 grad_spec=None, cu_seqlens: torch.Tensor | None = None) -> RowStats:
    weight, bias = _full(lm_head.weight), _full(lm_head.bias)
    if torch.is_autocast_enabled(hidden.device.type):  # as lm_head(hidden) would run under autocast
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if scale != 1.0:  # (h s) W^T + b s = s (h W^T + b), before the soft-cap
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    token_metrics = metrics and options.token_metrics
    # Entropy and top-1 come from the chunks of logits that give the log-probs: no second matmul.
    stats = linear_sequence_stats(hidden, weight, labels, bias=bias, ignore_index=-100, softcap=softcap,
                                  sum_scores=metrics, token_metrics=token_metrics, grad_spec=grad_spec,
                                  log_sum_sq=metrics and options.log_sum_sq, cu_seqlens=cu_seqlens)
    return RowStats(logps=stats.logps, counts=stats.counts, score_sums=stats.score_sums,
                    entropy_sums=stats.entropy_sums, top1_counts=stats.top1_counts, vocab=weight.shape[0],
                    log_sum_sq_sums=stats.log_sum_sq_sums)


def _full(p: torch.Tensor | None) -> torch.Tensor | None:
    """FSDP2 shards parameters as DTensors: the kernel needs the whole head."""
    return p.full_tensor() if p is not None and hasattr(p, "full_tensor") else p

