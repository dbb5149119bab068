"""Autograd ops of the fused linear path, registered as torch custom ops.

Two forward ops, both from hidden states [N, H] (flattened), lm_head weight [V, H], optional bias,
flat labels [N] (-1 = masked) and row offsets [B + 1] to per-row log-prob sums [B]:

- ``fastdpo::linear_logps``: forward only keeps two fp32 per token (logsumexp, 1 - p_label); its backward
  (``fastdpo::linear_logps_backward``) recomputes the logits chunk by chunk. Any loss. 8 Nv H V.
- ``fastdpo::linear_logps_grad_in_forward``: also builds the gradients of hidden / weight / bias
  during the forward, with the loss gradient of each group of pairs as soon as that group is done
  (the loss configuration travels as `LossConfig.encode`'s string). Its backward (``..._finish_``)
  checks that the true row gradient is that guess times a scalar (the upstream gradient of the loss) and scales the
  buffers in place; if not (a loss that couples pairs, a loss changed after the call), it
  recomputes them exactly as the first op would. 6 Nv H V.

Custom ops keep torch.compile(fullgraph=True) graphs whole: the chunk loops, host syncs and kernel
launches run inside opaque calls whose output shapes the fake implementations give.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import NamedTuple, Optional

import torch

from . import linear_chunks as C
from .logps import first_order_only, non_differentiable, op_outputs
from .objective import loss_gradient

Tensor = torch.Tensor
LinearOptions, RowResults = C.LinearOptions, C.RowResults


class GuessedGrads(NamedTuple):
    """What the grad-in-forward op returns after its RowResults: the gradients built for a guess."""

    guess: Tensor  # [B] the row gradients the buffers were built with
    used: Tensor  # int32 [1]: 1 once a backward has taken the buffers
    d_hidden: Tensor  # [N, H], empty when not wanted
    d_weight: Tensor  # [V, H], empty when not wanted
    d_bias: Tensor  # [V] in the bias dtype, empty when not wanted


# The forward ops' outputs: one tensor per field, RowResults' then (grad in forward) GuessedGrads'.
RowOutputs = tuple[(Tensor,) * len(RowResults._fields)]
GuessOutputs = tuple[(Tensor,) * (len(RowResults._fields) + len(GuessedGrads._fields))]


def row_results(outputs: tuple[Tensor, ...]) -> RowResults:
    """The RowResults at the head of a forward op's outputs (`op_outputs` wrote them in field order)."""
    return RowResults._make(outputs[: len(RowResults._fields)])


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _grad_outputs(grads: C.Grads, hidden: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient buffers as op outputs: unwanted ones are empty tensors; db in the bias dtype."""
    dh = grads.hidden if grads.hidden is not None else _empty(hidden)
    dw = grads.weight if grads.weight is not None else _empty(hidden)
    db = grads.bias.to(bias.dtype) if grads.bias is not None else _empty(hidden)
    return dh, dw, db


def _fake_grads(hidden, weight, want_h, want_w, want_b, has_bias):
    return (hidden.new_empty(hidden.shape if want_h else (0,)),
            weight.new_empty(weight.shape if want_w else (0,)),
            weight.new_empty((weight.shape[0],) if want_b and has_bias else (0,)))


def _fake_forward(hidden, offsets, options: LinearOptions) -> tuple[Tensor, ...]:
    acc = C.acc_dtype(hidden.dtype)
    B = offsets.shape[0] - 1

    def rows(wanted: bool) -> Tensor:
        return hidden.new_empty(B if wanted else 0, dtype=acc)

    return tuple(RowResults(logps=rows(True), state=hidden.new_empty((hidden.shape[0], 2), dtype=acc),
                            score_sums=rows(options.sum_scores), entropy=rows(options.token_metrics),
                            top1=rows(options.token_metrics), log_sum_sq=rows(options.log_sum_sq)))


def _without_autocast(impl):
    """An op's implementation run with autocast off. Its inputs come in one dtype (`check_linear`
    casts them as F.linear would under autocast), and its matmuls must keep that dtype: they fill
    buffers of it, in a backward that may run under another autocast than the forward did."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return impl(*args, **kwargs)

    return run


# ---- recompute: forward keeps the backward state, backward recomputes the logits ----
# Every op takes the pass's LinearOptions flattened (`LinearOptions.flatten`) as its last
# parameters, in field order (tests/test_options.py checks each schema), and reads them back by
# name (`LinearOptions.from_params`).

@torch.library.custom_op("fastdpo::linear_logps", mutates_args=())
@_without_autocast
def linear_logps(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, offsets: Tensor,
    inv_temp: float, softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool,
    save_lse: bool, chunk_tokens: int, vocab_chunk: int,
) -> RowOutputs:
    """-> the RowResults the options ask for, as op outputs (`logps.op_outputs`): row log-probs [B],
    backward state [N, 2] (logsumexp, 1 - p_label), row score sums, entropy sums, top-1 counts and
    sums of log sum_v p_v^2 [B]."""
    options = LinearOptions.from_params(locals())
    out = C.forward(C.make_plan(labels, offsets), hidden, weight, bias, options)
    return op_outputs(out, out.logps)


@linear_logps.register_fake
def _(hidden, weight, bias, labels, offsets, *flat_options):
    return _fake_forward(hidden, offsets, LinearOptions.unflatten(flat_options))


@torch.library.custom_op("fastdpo::linear_logps_backward", mutates_args=())
@_without_autocast
def linear_logps_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, offsets: Tensor,
    state: Tensor, want_hidden: bool, want_weight: bool, want_bias: bool,
    inv_temp: float, softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool,
    save_lse: bool, chunk_tokens: int, vocab_chunk: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> d hidden [N, H], d weight [V, H], d bias [V]; each empty when not wanted."""
    options = LinearOptions.from_params(locals())
    grads = C.new_grads(hidden, weight, bias, (want_hidden, want_weight, want_bias))
    C.backward(C.make_plan(labels, offsets), hidden, weight, bias, options, state, grad_rows, grads)
    return _grad_outputs(grads, hidden, bias)


@linear_logps_backward.register_fake
def _(grad_rows, hidden, weight, bias, labels, offsets, state, want_hidden, want_weight, want_bias, *flat_options):
    return _fake_grads(hidden, weight, want_hidden, want_weight, want_bias, bias is not None)


def _setup_recompute(ctx, inputs, output):
    hidden, weight, bias, labels, offsets = inputs[:5]
    rows = RowResults._make(output)
    ctx.save_for_backward(hidden, weight, bias, labels, offsets, rows.state)
    ctx.options = LinearOptions.from_op_inputs(inputs)
    ctx.mark_non_differentiable(*non_differentiable(rows))
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody differentiates


def _backward_recompute(ctx, grad_rows, *_grads_of_detached):
    hidden, weight, bias, labels, offsets, state = ctx.saved_tensors
    want = ctx.needs_input_grad[:3]
    if grad_rows is None or not any(want):
        return _input_grads(ctx)
    dh, dw, db = linear_logps_backward(grad_rows, hidden, weight, bias, labels, offsets, state,
                                       want[0], want[1], want[2] and bias is not None, *ctx.options.flatten())
    return _input_grads(ctx, dh, dw, db, sources=(hidden, weight, bias, grad_rows))


def _input_grads(ctx, dh=None, dw=None, db=None, sources: tuple = ()) -> tuple:
    """One gradient per op input, as autograd wants: hidden, weight and bias where asked for, None
    for every other input (their number read from the op's inputs, not counted by hand).
    `sources`: the op's (hidden, weight, bias) and incoming gradient, which a second derivative
    would reach."""
    want = ctx.needs_input_grad
    grads = first_order_only((dh if want[0] else None, dw if want[1] else None, db if want[2] else None), sources)
    return grads + (None,) * (len(want) - len(grads))


linear_logps.register_autograd(_backward_recompute, setup_context=_setup_recompute)


# ---- gradients in the forward, for losses whose pair gradients do not depend on other pairs ----

def loss_grad_fn(spec: str, ref_rows: Tensor, counts: Tensor):
    """`objective.loss_gradient` for the loss `spec` encodes, run with plain autograd inside the op;
    None from a call means no gradient in the forward (the backward then recomputes)."""
    grad = loss_gradient(spec, ref_rows, counts)

    def guarded(rows: Tensor, log_sum_sq_rows: Tensor | None = None) -> Tensor | None:
        try:
            with _plain_autograd():
                return grad(rows, log_sum_sq_rows)
        except Exception as exc:  # a torch without the private APIs below: the backward recomputes
            warnings.warn(f"fastdpo: no loss gradient inside the forward ({exc!r}); the backward recomputes "
                          "the logits (8NHV instead of 6NHV)", RuntimeWarning, stacklevel=2)
            return None

    return guarded


@contextlib.contextmanager
def _plain_autograd():
    """Eager autograd inside a custom op's implementation.

    A custom op runs below the autograd dispatch key (eager), and inside a compiled graph's
    runtime below nearly every key, with torch's own dispatch modes on the stack: there autograd
    records nothing (and functorch transforms fail). The loss gradient needs plain autograd on a
    few [B] tensors, so this clears the thread's dispatch-key sets and modes for that span and
    restores them after. Private torch APIs, used the same way by torch's own eval_frame and
    higher-order ops (torch 2.4+).
    """
    from torch.utils._python_dispatch import _disable_current_modes

    include, exclude = _default_dispatch_keys()
    with _disable_current_modes(), torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


@functools.lru_cache(maxsize=1)
def _default_dispatch_keys():
    """A fresh thread's key sets: BackendSelect and ADInplaceOrView included, autocast excluded."""
    K = torch._C.DispatchKey
    include = torch._C.DispatchKeySet(K.BackendSelect) | torch._C.DispatchKeySet(K.ADInplaceOrView)
    exclude = include - include
    for name in dir(K):
        if name.startswith("Autocast"):
            exclude = exclude | torch._C.DispatchKeySet(getattr(K, name))
    return include, exclude


@torch.library.custom_op("fastdpo::linear_logps_grad_in_forward", mutates_args=())
@_without_autocast
def linear_logps_grad_in_forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, offsets: Tensor, ref_rows: Tensor,
    spec: str, want_hidden: bool, want_weight: bool, want_bias: bool,
    inv_temp: float, softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool,
    save_lse: bool, chunk_tokens: int, vocab_chunk: int,
) -> GuessOutputs:
    """-> the RowResults (as `linear_logps`), then the GuessedGrads: the row gradients guessed [B], a
    'used' flag [1], and the gradients of hidden, weight, bias for that guess."""
    options = LinearOptions.from_params(locals())
    plan = C.make_plan(labels, offsets)
    grads = C.new_grads(hidden, weight, bias, (want_hidden, want_weight, want_bias))
    acc = C.acc_dtype(hidden.dtype)
    loss_grad = loss_grad_fn(spec, ref_rows.detach(), plan.counts.to(acc))
    out, guess = C.forward_with_grads(plan, hidden, weight, bias, options, loss_grad, grads)
    d_hidden, d_weight, d_bias = _grad_outputs(grads, hidden, bias)
    used = torch.zeros(1, dtype=torch.int32, device=hidden.device)
    return (*op_outputs(out, out.logps),
            *GuessedGrads(guess=guess, used=used, d_hidden=d_hidden, d_weight=d_weight, d_bias=d_bias))


@linear_logps_grad_in_forward.register_fake
def _(hidden, weight, bias, labels, offsets, ref_rows, spec, want_hidden, want_weight, want_bias, *flat_options):
    forward = _fake_forward(hidden, offsets, LinearOptions.unflatten(flat_options))
    d_hidden, d_weight, d_bias = _fake_grads(hidden, weight, want_hidden, want_weight, want_bias, bias is not None)
    return (*forward, *GuessedGrads(guess=torch.empty_like(row_results(forward).logps),
                                    used=hidden.new_empty(1, dtype=torch.int32), d_hidden=d_hidden,
                                    d_weight=d_weight, d_bias=d_bias))


# Relative mismatch allowed between the true row gradient and (scale x guess): the two come from
# the same loss code on the same numbers, so they differ by rounding only.
_GUESS_TOL = {torch.float32: 1e-5, torch.float64: 1e-11}


_ONE_BACKWARD = ("fused_linear_dpo_loss(grad_in_forward=True) supports one backward per call; pass "
                 "grad_in_forward=False to backward through the same graph twice")


def guess_scale(grad_rows: Tensor, guess: Tensor, counts: Tensor, used: Tensor) -> float | None:
    """s with grad_rows = s * guess on every row that has a valid token, or None if there is none.

    Everything, the 'used' flag [1] too, is reduced on the device and read back in one transfer:
    one host sync. Raises if the flag says these gradients were handed out already.
    """
    live = counts > 0
    a = torch.where(live, grad_rows.double(), 0.0)
    g = torch.where(live, guess.double(), 0.0)
    gg = (g * g).sum()
    s = (a * g).sum() / torch.where(gg > 0, gg, 1.0)
    finite = torch.isfinite(a).all() & torch.isfinite(g).all()
    stats = [used[0] != 0, live.any(), finite, a.any(), gg, s, (a - s * g).abs().max(), a.abs().max()]
    was_used, any_live, finite, any_grad, gg, s, resid, scale = torch.stack(stats).tolist()
    if was_used:
        raise RuntimeError(_ONE_BACKWARD)
    if not any_live:
        return 1.0
    if not finite:
        return None
    if gg == 0.0:
        return None if any_grad else 1.0
    tol = _GUESS_TOL.get(guess.dtype, 1e-5)
    if resid > tol * scale:
        return None
    return 1.0 if abs(s - 1.0) <= tol else s


@torch.library.custom_op(
    "fastdpo::linear_logps_grad_in_forward_finish_", mutates_args=("used", "d_hidden", "d_weight", "d_bias")
)
@_without_autocast
def linear_logps_finish_(
    grad_rows: Tensor, guess: Tensor, used: Tensor, d_hidden: Tensor, d_weight: Tensor, d_bias: Tensor,
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, offsets: Tensor, state: Tensor,
    inv_temp: float, softcap: Optional[float], sum_scores: bool, token_metrics: bool, log_sum_sq: bool,
    save_lse: bool, chunk_tokens: int, vocab_chunk: int,
) -> None:
    """Turn the gradients built for `guess` into the gradients for `grad_rows`, in place."""
    options = LinearOptions.from_params(locals())
    starts = C.valid_starts(labels, offsets)
    s = guess_scale(grad_rows, guess, starts[1:] - starts[:-1], used)
    used.fill_(1)
    bufs = [t for t in (d_hidden, d_weight, d_bias) if t.numel()]
    if s is None:  # the guess does not explain the true gradient: recompute it exactly
        grads = C.Grads(hidden=d_hidden.zero_() if d_hidden.numel() else None,
                        weight=d_weight if d_weight.numel() else None,
                        bias=torch.zeros_like(d_bias, dtype=C.acc_dtype(d_bias.dtype)) if d_bias.numel() else None)
        C.backward(C.make_plan(labels, offsets), hidden, weight, bias, options, state, grad_rows, grads)
        if grads.bias is not None:
            d_bias.copy_(grads.bias)
    elif s != 1.0:
        for t in bufs:
            t.mul_(s)


@linear_logps_finish_.register_fake
def _(*args):
    return None


def _setup_grad_in_forward(ctx, inputs, output):
    hidden, weight, bias, labels, offsets = inputs[:5]
    rows, guessed = row_results(output), GuessedGrads._make(output[len(RowResults._fields):])
    ctx.save_for_backward(hidden, weight, bias, labels, offsets, rows.state, *guessed)
    ctx.options = LinearOptions.from_op_inputs(inputs)
    ctx.mark_non_differentiable(*non_differentiable(rows), *guessed)
    # Outputs without a gradient stay None: materializing them would zero-fill a second dW.
    ctx.set_materialize_grads(False)


def _backward_grad_in_forward(ctx, grad_rows, *_unused):
    # Eager autograd: said here, before reading the saved 'used' flag, which the first backward
    # changed in place (autograd would refuse it with a version-counter error). A compiled graph
    # has no such ctx state; there the flag itself says it (guess_scale).
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(_ONE_BACKWARD)
    ctx.backward_done = True
    hidden, weight, bias, labels, offsets, state, *saved = ctx.saved_tensors
    guessed = GuessedGrads._make(saved)
    if not any(ctx.needs_input_grad[:3]):
        return _input_grads(ctx)
    if grad_rows is None:
        grad_rows = torch.zeros_like(guessed.guess)
    linear_logps_finish_(grad_rows, *guessed, hidden, weight, bias, labels, offsets, state, *ctx.options.flatten())
    return _input_grads(ctx, guessed.d_hidden, guessed.d_weight, guessed.d_bias,
                        sources=(hidden, weight, bias, grad_rows))


linear_logps_grad_in_forward.register_autograd(_backward_grad_in_forward, setup_context=_setup_grad_in_forward)
