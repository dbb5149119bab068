"""fastdpo's model head: where a Hugging Face causal LM and a batch become per-row log-probs.

`install_head(model, options)` wraps `model.forward` so that

    model(**model_inputs, fastdpo_head="policy", fastdpo_scoring=scoring)

runs the backbone and returns a `RowStats` of per-row sums (log-probs, token counts, and for the
policy TRL's logit metrics) over the positions that `scoring` lists (fastdpo.layouts.Scoring:
padded, padding-free and shared-prompt batches alike), instead of logits. `labels=` (unshifted,
-100 off the completions, as a Hugging Face loss takes them) or `shift_labels=` (already aligned)
may stand in for `fastdpo_scoring` on a padded batch. Without `fastdpo_head` the forward is
unchanged. The trainer (policy, reference, the warm-up's NLL) and the TRL integration both go
through here, and nowhere else.

Running inside the forward keeps wrappers that act around it (DDP, FSDP, DeepSpeed, PEFT) in
charge of the parameters: FSDP and ZeRO-3 have gathered `lm_head` when the head reads it. Modes:

- "logits" (default): only the scored positions are projected (`lm_head(hidden[positions])`,
  [M, V]), then fastdpo's from-logits kernel computes the log-probs and logit sums in one pass,
  with the logits gradient written over the logits (nothing else reads them: the matmul's
  backward needs only its inputs).
- "linear": `fastdpo.linear.linear_sequence_stats` on the scored hidden states and
  `lm_head.weight`: the logits are never built beyond one chunk of positions.
- "eager": the pure-PyTorch method (`log_softmax(logits.float()).gather`) on the scored positions:
  the A/B baseline of `fastdpo train --loss-impl reference`.

The logits the model's config asks for are reproduced: scores = softcap * tanh(z * scale / softcap),
with `scale` the config's logit multiplier and `softcap` its `final_logit_softcapping`.

Entropy and top-1 accuracy (TRL's `entropy` and `mean_token_accuracy`, with `token_metrics=True`)
come from the same pass as the log-probs: the from-logits kernel's forward in "logits" mode, the
fused-linear op's forward chunk loop in "linear" mode. No second read of the logits, no extra matmul.
"""

from __future__ import annotations

import contextlib
import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from .layouts import Scoring, scoring_from_labels, scoring_from_shifted
from . import validation as V
from .linear import linear_sequence_stats
from .logps import LogitsOptions, TokenLayout, layout_stats
from .packed import segment_sums
from .validation import value_checks_enabled

MODES = ("logits", "linear", "eager")
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


@dataclass
class RowStats(ModelOutput):
    """Per-row results ([rows] each) over the scored positions."""

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
    def forward(self, *args, fastdpo_head: str | None = None, fastdpo_scoring: Scoring | None = None,
                fastdpo_grad: tuple[str, torch.Tensor] | None = None, fastdpo_shared: torch.Tensor | None = None,
                **kwargs):
        if fastdpo_head is None:
            return inner(*args, **kwargs)
        if fastdpo_head not in CALLS:
            raise ValueError(f"fastdpo_head must be one of {CALLS}, got {fastdpo_head!r}")
        return head_forward(self, args, kwargs, self._fastdpo_head_options, fastdpo_head == "policy",
                            fastdpo_grad, fastdpo_scoring, fastdpo_shared)

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


def _scoring(kwargs: dict, scoring: Scoring | None) -> Scoring:
    labels, shifted = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    given = [name for name, x in (("fastdpo_scoring", scoring), ("labels", labels), ("shift_labels", shifted))
             if x is not None]
    if len(given) != 1:
        raise ValueError("the fastdpo head needs exactly one of fastdpo_scoring=, labels= (next-token ids, -100 "
                         f"where not scored) or shift_labels=; got {given or 'none'}")
    if scoring is not None:
        return scoring
    return scoring_from_labels(labels) if labels is not None else scoring_from_shifted(shifted)


def head_forward(model, args: tuple, kwargs: dict, options: HeadOptions, policy: bool,
                 grad_spec: tuple[str, torch.Tensor] | None = None, scoring: Scoring | None = None,
                 shared: torch.Tensor | None = None) -> RowStats:
    """Backbone, then per-row statistics of the scored positions in the chosen mode.

    `grad_spec` = (loss spec, reference rows), in "linear" mode, lets the fused-linear op build the
    gradients during the forward for that loss (6 N H V FLOPs instead of 8); its backward checks
    the guess against the true row gradient and recomputes exactly when they differ.
    `shared` [rows] (LD-DPO): also return `tail_logps`, the sum over each row's scored tokens after
    its first shared[r] ones.
    """
    scoring = _scoring(kwargs, scoring)
    _check_positions(scoring, args, kwargs)
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device  # a model split over devices ends on the head's device
    hidden = hidden.reshape(-1, hidden.shape[-1])[scoring.positions.to(hidden.device)].to(device)  # [M, H]
    scoring = scoring.to(device)
    if shared is not None:
        return _with_tail(hidden, scoring, lm_head, model.config, options, policy, shared.to(device))
    return row_stats(hidden, scoring, lm_head, model.config, options, policy, grad_spec)


def row_stats(hidden: torch.Tensor, scoring: Scoring, lm_head: torch.nn.Module, config: Any, options: HeadOptions,
              policy: bool, grad_spec: tuple[str, torch.Tensor] | None = None) -> RowStats:
    """The LM head and the per-row statistics of the scored hidden states [M, H]."""
    scale, softcap = logit_transform(config)
    vocab = lm_head.weight.shape[0]
    if scoring.positions.numel() == 0:  # a differentiable zero keeps an all-masked micro-batch in the graph
        zeros = hidden.new_zeros(scoring.rows, dtype=torch.float32)
        return RowStats(logps=hidden.sum() * 0.0 + zeros, counts=scoring.counts, vocab=vocab)
    metrics = policy  # the reference pass needs the log-probs only
    layout = token_layout(scoring, vocab)
    wanted = dict(sum_scores=metrics, token_metrics=metrics and options.token_metrics,
                  log_sum_sq=metrics and options.log_sum_sq)
    if options.mode == "linear":
        stats = _from_linear(hidden, layout, lm_head, scale, softcap, wanted, grad_spec)
    elif options.mode == "eager":
        stats = _eager(lm_head(hidden), layout, scale, softcap, wanted)
    else:
        stats = _from_logits(lm_head(hidden), layout, scale, softcap, wanted,
                             options.inplace_backward and torch.is_grad_enabled())
    return RowStats(logps=stats.logps, counts=scoring.counts, score_sums=stats.score_sums,
                    entropy_sums=stats.entropy_sums, top1_counts=stats.top1_counts, vocab=vocab,
                    log_sum_sq_sums=stats.log_sum_sq_sums)


def _with_tail(hidden, scoring: Scoring, lm_head, config, options: HeadOptions, policy: bool,
               shared: torch.Tensor) -> RowStats:
    """LD-DPO's split, with no per-token tensor beyond [tokens]: each row's scored tokens are cut
    after its first shared[r], and one pass sums the 2R pieces (row r's shared part, then its tail)
    as segments of the same scored positions; logps = shared part + tail, tail_logps = tail."""
    starts = scoring.offsets[:-1]
    cut = starts + torch.minimum(shared.to(scoring.counts.dtype), scoring.counts)
    offsets = torch.cat([torch.stack([starts, cut], 1).flatten(), scoring.offsets[-1:]])
    pieces = row_stats(hidden, Scoring(scoring.positions, scoring.targets, offsets, bounds=scoring.bounds), lm_head,
                       config, options, policy)
    halves = {name: None if (v := getattr(pieces, name)) is None else v.view(-1, 2).sum(-1)
              for name in ("logps", "counts", "score_sums", "entropy_sums", "top1_counts", "log_sum_sq_sums")}
    return RowStats(**halves, vocab=pieces.vocab, tail_logps=pieces.logps.view(-1, 2)[:, 1])


def _check_positions(scoring: Scoring, args: tuple, kwargs: dict) -> None:
    """Scored positions inside the batch, checked before the backbone is queued; an index past the
    end would otherwise be a device-side assert. From the Scoring's host bounds when it has them
    (fastdpo's own batches: no wait), else a host read of the device values, which follows
    fastdpo's value checks (`fastdpo.value_checks(False)` skips it, as it skips the label check)."""
    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
    if inputs is None or scoring.positions.numel() == 0:
        return
    if scoring.bounds is not None:
        first, last = scoring.bounds.positions
    elif value_checks_enabled():
        first, last = int(scoring.positions.min()), int(scoring.positions.max())
    else:
        return
    size = inputs.shape[0] * inputs.shape[1]
    if last >= size or first < 0:
        raise ValueError(f"scored positions must lie in [0, {size}) for a batch of {tuple(inputs.shape[:2])}, "
                         f"got up to {last}")


def token_layout(scoring: Scoring, vocab: int) -> TokenLayout:
    """The kernels' view of a Scoring: its targets, range-checked once, and its row offsets as they
    are: a Scoring's offsets are checked where it is made (on the host), so the cu_seqlens checks of
    the public functions (host reads that would wait for the backbone) are not repeated here.

    Targets within their host bounds' proof of range need no device read; otherwise the check is
    one host read (skipped under `fastdpo.value_checks(False)`), which also names a bad target."""
    offsets = scoring.offsets
    known = scoring.bounds.targets if scoring.bounds is not None else None
    return TokenLayout(labels=V.token_labels(scoring.targets, None, -100, vocab, known_range=known), offsets=offsets,
                       counts=scoring.counts, row_sums=lambda x: segment_sums(x, offsets))


def _from_logits(logits, layout: TokenLayout, scale, softcap, wanted: dict, inplace: bool):
    temperature = 1.0
    if scale != 1.0:
        if softcap is None and scale > 0:
            temperature = 1.0 / scale  # z * scale as a temperature: no extra pass over the logits
        else:
            logits = logits * scale
    # Entropy and top-1 come from the same pass as the log-probs: no second read of the logits.
    options = LogitsOptions(inv_temp=1.0 / temperature, softcap=softcap, inplace_backward=inplace, **wanted)
    return layout_stats(logits.unsqueeze(0), layout, options)


def _from_linear(hidden, layout: TokenLayout, lm_head, scale, softcap, wanted: dict, grad_spec=None):
    with _gathered(lm_head):
        return _linear_stats(hidden, layout, lm_head, scale, softcap, wanted, grad_spec)


@contextlib.contextmanager
def _gathered(lm_head):
    """lm_head's whole weights while the linear path reads them. FSDP2 gathers a unit's parameters
    in a hook on its forward, which this path never calls: where lm_head is a unit of its own (not
    already gathered with the final norm, as accelerate groups them), gather it through FSDP, whose
    end-of-backward step then reduce-scatters its gradient like any unit's. Without a gradient to
    wait for, it is released again at once."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(lm_head, FSDPModule):
        yield
        return
    lm_head.unshard()
    try:
        yield
    finally:
        if not torch.is_grad_enabled():
            lm_head.reshard()


def _linear_stats(hidden, layout: TokenLayout, lm_head, scale, softcap, wanted: dict, grad_spec=None):
    # as lm_head(hidden) would run under autocast (cast before the scale below)
    hidden, weight, bias = V.autocast_linear_inputs(hidden, _full(lm_head.weight), _full(lm_head.bias))
    if scale != 1.0:  # (h s) W^T + b s = s (h W^T + b), before the soft-cap
        hidden = hidden * scale
        bias = bias * scale if bias is not None else None
    # Entropy and top-1 come from the chunks of logits that give the log-probs: no second matmul.
    return linear_sequence_stats(hidden.unsqueeze(0), weight, layout.labels.unsqueeze(0), bias=bias, layout=layout,
                                 softcap=softcap, grad_spec=grad_spec, **wanted)


@dataclass
class _EagerStats:
    logps: torch.Tensor
    score_sums: torch.Tensor | None
    entropy_sums: torch.Tensor | None
    top1_counts: torch.Tensor | None
    log_sum_sq_sums: torch.Tensor | None = None


def _eager(logits, layout: TokenLayout, scale, softcap, wanted: dict) -> _EagerStats:
    """The usual way: fp32 log-softmax of the [M, V] logits, gather, sum per row."""
    scores = logits.float() * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    logp_all = scores.log_softmax(-1)
    targets = layout.labels.long()
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    rows = layout.row_sums
    out = _EagerStats(rows(logp), None, None, None)
    with torch.no_grad():
        if wanted["sum_scores"]:
            out.score_sums = rows(scores.sum(-1))
        if wanted["token_metrics"]:
            out.entropy_sums = rows(-(logp_all.exp() * logp_all).sum(-1))
            out.top1_counts = rows((scores.argmax(-1) == targets).float())
        if wanted["log_sum_sq"]:  # WPO: log sum_v p_v^2
            out.log_sum_sq_sums = rows(torch.logsumexp(2 * logp_all, -1))
    return out


def _full(p: torch.Tensor | None) -> torch.Tensor | None:
    """The whole of a parameter that is still a sharded DTensor. Only for a frozen one: the gradient
    through `full_tensor` would hold each rank's own contribution alone (silently wrong), so a
    trainable sharded head that no FSDP unit gathers is refused."""
    if p is None or not hasattr(p, "full_tensor"):
        return p
    if p.requires_grad and torch.is_grad_enabled():
        raise ValueError("the fused linear head found lm_head.weight sharded (a DTensor) outside any FSDP2 unit "
                         "that could gather it; shard lm_head with fully_shard, or use the logits mode")
    return p.full_tensor()
