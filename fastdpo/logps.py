"""Per-sequence log-probs of the labels from logits: the autograd op over the fused kernels.

Data flow: validate -> flat labels (-1 = masked) -> backend forward (per-token log-probs, one
(logsumexp, 1 - p_label) per token saved) -> per-row sum in PyTorch over [B, T] floats (or segment sums
over a packed [1, total_tokens] batch, fastdpo.packed). Autograd turns the per-row gradient into
a per-token one (an expand), and the backend backward writes the logits gradient in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, TypeVar

import torch

from . import validation as V
from .backend import get_backend
from .kernels.contract import TokenOptions, TokenResults
from .packed import check_cu_seqlens, row_offsets, segment_sums


# ---- the options of a pass, and how they and the results cross a custom op boundary ----

@dataclass(frozen=True)
class LogitsOptions(TokenOptions):
    """One pass over logits: what the kernels compute (TokenOptions), and how its backward writes."""

    inplace_backward: bool = False  # write the logits gradient over the logits (read by the backward only)


OptionsT = TypeVar("OptionsT", bound=TokenOptions)


def pass_options(cls: type[OptionsT], temperature: float, softcap: float | None, **fields: Any) -> OptionsT:
    """The options of a pass from the public arguments, checked here once: scores z / temperature,
    soft-capped (fastdpo.validation.check_scores)."""
    V.check_scores(temperature, softcap)
    return cls(inv_temp=1.0 / temperature, softcap=softcap, **fields)


def op_outputs(results: tuple, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A NamedTuple of results as a custom op's outputs, in its field order: each absent result its
    own empty tensor, since custom op outputs may not be None nor alias one another. The caller
    reads them back with the NamedTuple's `_make`."""
    return tuple(x if x is not None else like.new_empty(0) for x in results)


def non_differentiable(results: tuple) -> tuple[torch.Tensor, ...]:
    """Every result of a NamedTuple of results but the differentiable `logps`: what an op marks
    non-differentiable."""
    return tuple(x for name, x in zip(results._fields, results) if name != "logps")


NO_SECOND_ORDER = ("fastdpo's log-prob ops compute their gradients in kernels and have no second derivative: "
                   "a gradient taken through them with create_graph=True cannot be differentiated again")


class _NoSecondOrder(torch.autograd.Function):
    """Identity on an op's input gradients, whose own backward raises. Its other inputs are the
    op's differentiable inputs and the incoming gradient, so that a second derivative with respect
    to any of them (a jvp differentiates with respect to the incoming gradient) must pass here."""

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # detach(): the same storage, no copy, and not a view (a hook may change a gradient in place)
        return tuple(g.detach() for g in tensors[:count])

    @staticmethod
    def backward(ctx, *_: Any) -> Any:
        raise RuntimeError(NO_SECOND_ORDER)


def first_order_only(grads: tuple[torch.Tensor | None, ...], inputs: tuple[torch.Tensor | None, ...]
                     ) -> tuple[torch.Tensor | None, ...]:
    """An op backward's input `grads`, made to raise NO_SECOND_ORDER if differentiated again (by a
    backward with create_graph=True) rather than carry no graph, or one through a kernel."""
    if not torch.is_grad_enabled():
        return grads
    live = [i for i, g in enumerate(grads) if g is not None]
    sources = [x for x in inputs if x is not None and x.requires_grad]
    if not live or not sources:
        return grads
    marked = _NoSecondOrder.apply(len(live), *(grads[i].detach() for i in live), *sources)
    out = list(grads)
    for i, g in zip(live, marked):
        out[i] = g
    return tuple(out)


# The op's outputs: one tensor per TokenResults field, in its order.
TokenOutputs = tuple[(torch.Tensor,) * len(TokenResults._fields)]


# ---- the autograd op, registered as torch custom ops ----
# Custom ops (rather than a torch.autograd.Function) so that torch.compile(fullgraph=True) sees
# one opaque call per pass: the kernels, their launch-time checks and the backend choice stay
# outside the traced graph, and there is no graph break. Each op takes the pass's LogitsOptions
# flattened (`LogitsOptions.flatten`) as its last parameters, in field order (tests/test_options.py
# checks each schema), and reads them back by name (`LogitsOptions.from_params`).

@torch.library.custom_op("fastdpo::token_logps", mutates_args=())
def token_logps_op(
    logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, softcap: Optional[float], sum_scores: bool,
    token_metrics: bool, log_sum_sq: bool, save_lse: bool, inplace_backward: bool,
) -> TokenOutputs:
    """logits [B, T, V], flat labels [B*T] (-1 = masked) -> the TokenResults the options ask for, as
    op outputs (`op_outputs`); `inplace_backward` is only read by the backward."""
    options = LogitsOptions.from_params(locals())
    results = get_backend(logits.device).token_logps_forward(logits, labels, options)
    return op_outputs(results, results.logps)


@token_logps_op.register_fake
def _(logits, labels, *flat_options):
    options = LogitsOptions.unflatten(flat_options)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n = labels.shape[0]

    def vector(wanted: bool, *shape: int) -> torch.Tensor:
        return logits.new_empty((n, *shape) if wanted else (0,), dtype=acc)

    return tuple(TokenResults(
        logps=vector(True), state=vector(options.save_lse, 2), score_sums=vector(options.sum_scores),
        entropy=vector(options.token_metrics), top1=vector(options.token_metrics), log_sum_sq=vector(options.log_sum_sq),
    ))


@torch.library.custom_op("fastdpo::token_logps_backward", mutates_args=())
def token_logps_backward_op(
    logits: torch.Tensor, labels: torch.Tensor, state: torch.Tensor, grad_logp: torch.Tensor, inv_temp: float,
    softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool, save_lse: bool,
    inplace_backward: bool,
) -> torch.Tensor:
    """Gradient w.r.t. the logits of sum_n grad_logp[n] * logp[n], as a new [B, T, V] tensor."""
    options = LogitsOptions.from_params(locals())
    return get_backend(logits.device).token_logps_backward(logits, labels, state, grad_logp, options)


@token_logps_backward_op.register_fake
def _(logits, labels, state, grad_logp, *flat_options):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("fastdpo::token_logps_backward_", mutates_args=("logits",))
def token_logps_backward_inplace_op(
    logits: torch.Tensor, labels: torch.Tensor, state: torch.Tensor, grad_logp: torch.Tensor, inv_temp: float,
    softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool, save_lse: bool,
    inplace_backward: bool,
) -> None:
    """The same gradient written over the logits (no second [B, T, V] tensor)."""
    options = LogitsOptions.from_params(locals())
    get_backend(logits.device).token_logps_backward(logits, labels, state, grad_logp, options, out=logits)


@token_logps_backward_inplace_op.register_fake
def _(logits, labels, state, grad_logp, *flat_options):
    return None


def _setup_token_logps(ctx, inputs, output):
    logits, labels = inputs[:2]
    results = TokenResults._make(output)
    ctx.save_for_backward(logits, labels, results.state)
    ctx.options = LogitsOptions.from_op_inputs(inputs)
    ctx.mark_non_differentiable(*non_differentiable(results))
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody differentiates


def _backward_token_logps(ctx, grad_logp, *_grads_of_metrics):
    logits, labels, state = ctx.saved_tensors
    no_grads = (None,) * (len(ctx.needs_input_grad) - 1)  # labels and the options
    if grad_logp is None:
        return (None, *no_grads)
    grad_logp = grad_logp.contiguous()
    flat_options = ctx.options.flatten()
    if ctx.options.inplace_backward:
        # Reuses the logits' storage for their gradient. The op declares the mutation, so autograd
        # bumps the version counter and any other node that saved the logits fails loudly.
        token_logps_backward_inplace_op(logits, labels, state, grad_logp, *flat_options)
        grad = logits
    else:
        grad = token_logps_backward_op(logits, labels, state, grad_logp, *flat_options)
    return (*first_order_only((grad,), (logits, grad_logp)), *no_grads)


token_logps_op.register_autograd(_backward_token_logps, setup_context=_setup_token_logps)


@dataclass
class SequenceStats:
    """Per-row results of one pass over the logits (all [B])."""

    logps: torch.Tensor  # sum of label log-probs over completion tokens (differentiable)
    counts: torch.Tensor  # number of completion tokens
    score_sums: torch.Tensor | None  # sum of logits over vocabulary and completion tokens (detached)
    entropy_sums: torch.Tensor | None = None  # sum over completion tokens of the next-token entropy
    top1_counts: torch.Tensor | None = None  # completion tokens whose label is the (first) argmax
    log_sum_sq_sums: torch.Tensor | None = None  # sum over completion tokens of log sum_v p_v^2 (WPO)

    @classmethod
    def of(cls, results: tuple, counts: torch.Tensor, options: TokenOptions,
           row_sums: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> "SequenceStats":
        """From a pass's results (TokenResults folded by `row_sums`, or RowResults as they are), every
        statistic detached and None unless `options` asked for it."""

        def detached(x: torch.Tensor, wanted: bool) -> torch.Tensor | None:
            return row_sums(x).detach() if wanted else None

        return cls(logps=row_sums(results.logps), counts=counts,
                   score_sums=detached(results.score_sums, options.sum_scores),
                   entropy_sums=detached(results.entropy, options.token_metrics),
                   top1_counts=detached(results.top1, options.token_metrics),
                   log_sum_sq_sums=detached(results.log_sum_sq, options.log_sum_sq))


@dataclass
class TokenLayout:
    """Which tokens count and how per-token results fold into rows: prepared once per batch and
    shared by the policy and reference passes over the same [B, T] layout (logits or hidden)."""

    labels: torch.Tensor  # flat int32 [B*T], -1 where masked
    offsets: torch.Tensor  # int64 [rows + 1]: row b owns flat tokens offsets[b] : offsets[b + 1]
    counts: torch.Tensor  # [rows] completion tokens per row
    row_sums: Callable[[torch.Tensor], torch.Tensor]  # [B*T] per-token values -> [rows] sums


def build_layout(
    like: torch.Tensor,
    labels: torch.Tensor,
    vocab: int,
    *,
    mask: torch.Tensor | None,
    ignore_index: int,
    cu_seqlens: torch.Tensor | None,
) -> TokenLayout:
    """The layout of labels (and cu_seqlens, `packed.check_cu_seqlens`) already checked against `like`
    ([B, T, ...], logits or hidden states): the label range check (one host sync) and the row offsets."""
    B, T = like.shape[:2]
    flat = V.token_labels(labels, mask, ignore_index, vocab)
    offsets = row_offsets(cu_seqlens, B, T, like.device)
    if cu_seqlens is None:  # padded rows: a plain row sum is cheaper than a segment sum
        row_sums = lambda x: x.view(B, T).sum(-1)  # noqa: E731
    else:
        row_sums = lambda x: segment_sums(x, offsets)  # noqa: E731
    return TokenLayout(labels=flat, offsets=offsets, counts=row_sums(flat >= 0), row_sums=row_sums)


def token_layout(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    cu_seqlens: torch.Tensor | None = None,
    name: str = "logits",
) -> TokenLayout:
    """Validate labels and mask against `logits` (logits and cu_seqlens are checked by the caller) and
    fold them into a TokenLayout."""
    V.check_labels(labels, logits.shape[:2], mask)
    V.check_same_device(logits, labels=labels, mask=mask)
    return build_layout(logits, labels, logits.shape[-1], mask=mask, ignore_index=ignore_index,
                        cu_seqlens=cu_seqlens)


def layout_stats(
    logits: torch.Tensor,
    layout: TokenLayout,
    options: LogitsOptions,
    *,
    name: str = "logits",
) -> SequenceStats:
    """One fused pass over `logits` for a prepared layout, with the statistics `options` ask for
    (`pass_options` built and checked them; the caller checked the logits). Differentiable only
    when `logits` requires grad (otherwise nothing is saved for a backward); the statistics are
    detached."""
    if logits.shape[0] * logits.shape[1] != layout.labels.numel():
        raise ValueError(f"{name} has {logits.shape[0] * logits.shape[1]} positions, the labels {layout.labels.numel()}")
    # Under torch.compile the in-place backward would be functionalized into a copy anyway, so
    # the compiled path always takes the out-of-place backward (same numbers, one [B, T, V] more).
    options = replace(options, save_lse=logits.requires_grad and torch.is_grad_enabled(),
                      inplace_backward=options.inplace_backward and not torch.compiler.is_compiling())
    if options.inplace_backward and options.save_lse and V.overlaps_itself(logits):
        raise ValueError(f"inplace_backward=True writes the gradient over {name}, whose elements share memory "
                         f"(strides {logits.stride()} for shape {tuple(logits.shape)}: an expand or as_strided view); "
                         "pass inplace_backward=False, or logits.contiguous()")
    results = TokenResults._make(token_logps_op(logits, layout.labels, *options.flatten()))
    return SequenceStats.of(results, layout.counts, options, layout.row_sums)


def sequence_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    sum_scores: bool = False,
    token_metrics: bool = False,
    inplace_backward: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    name: str = "logits",
    log_sum_sq: bool = False,
) -> SequenceStats:
    """Validate, then run the fused pass: per-row log-probs, token counts and, on request, logit sums
    (`sum_scores`), the entropy sums and top-1 counts of TRL's token metrics (`token_metrics`) and
    the sums of log sum_v p_v^2 that WPO's weights need (`log_sum_sq`).

    With `cu_seqlens` the batch is packed ([1, total_tokens, V], see fastdpo.packed) and the
    results are per packed row.
    """
    V.check_logits(logits, name)
    options = pass_options(LogitsOptions, temperature, softcap, sum_scores=sum_scores, token_metrics=token_metrics,
                           log_sum_sq=log_sum_sq, inplace_backward=inplace_backward)
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, logits.shape, logits)
    layout = token_layout(logits, labels, mask=mask, ignore_index=ignore_index, cu_seqlens=cu_seqlens, name=name)
    return layout_stats(logits, layout, options, name=name)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of log p(label) over the unmasked positions of each row, in fp32 (fp64 for fp64 logits).

    Args:
        logits: [B, T, V] float32 / bfloat16 / float16, any strides (``logits[:, :-1]`` is fine).
        labels: [B, T] integer, aligned with the logits: ``labels[:, t]`` is scored by
            ``logits[:, t]`` (the caller shifts).
        mask: optional [B, T] bool or 0/1; positions with 0 are skipped.
        ignore_index: label value that also marks a skipped position.
        temperature: scores are ``logits / temperature``.
        softcap: if set, scores are ``softcap * tanh(logits / softcap) / temperature`` (Gemma 2).
        inplace_backward: write the logits gradient into the logits' storage. Only safe when
            nothing else in the backward graph reads the logits. Eager only: under
            torch.compile the out-of-place backward is used.
        cu_seqlens: for a packed, padding-free batch: logits [1, total_tokens, V], labels and
            mask [1, total_tokens], and int32/int64 [B + 1] cumulative row lengths
            (flash-attention's varlen convention). Results are per packed row.

    Returns:
        [B] log-prob sums, differentiable w.r.t. ``logits``. Rows with no unmasked position give 0.
    """
    V.check_options(ignore_index=ignore_index, inplace_backward=inplace_backward)  # (the scores: pass_options)
    return sequence_stats(
        logits, labels, mask=mask, ignore_index=ignore_index, temperature=temperature,
        softcap=softcap, inplace_backward=inplace_backward, cu_seqlens=cu_seqlens,
    ).logps
