"""Fused linear DPO (hidden states + lm_head in, no [N, V] logits) against the materialized float64 reference."""

import contextlib

import pytest
import torch

import fastdpo
import fastdpo.linear_chunks
from oracle64 import (CONFIDENT_GAPS, assert_close_rel, confident_logits, dpo_sigmoid64, scores64, seq_logps64,
                         valid_mask)

GRAD_MODES = {"grad_in_forward": True, "recompute": False}


def make_batch(P, T, H, V, dtype, device, bias=True, empty_row=None):
    """hidden [2P, T, H], weight [V, H], bias [V], labels, a prompt + padding mask (optionally one empty row)."""
    hidden = torch.randn(2 * P, T, H, device=device).to(dtype)
    weight = (torch.randn(V, H, device=device) / H**0.5 * 3).to(dtype)
    b = torch.randn(V, device=device).to(dtype) if bias else None
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=device)
    mask[:, : T // 3] = False
    mask[torch.arange(2 * P), torch.randint(T // 3, T, (2 * P,))] = False
    if empty_row is not None:
        mask[empty_row] = False
    return hidden, weight, b, labels, mask


def leaves(*tensors, dtype=None):
    return [None if t is None else (t.to(dtype) if dtype else t.clone()).requires_grad_() for t in tensors]


def logits64(hidden, weight, bias):
    z = hidden @ weight.T
    return z + bias if bias is not None else z


def assert_rel_to_max(actual, expected, rel, what):
    """max |a - e| <= rel * max |e|: gradients are often far below 1, so no floor of 1 on the scale."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:.1g} x {scale:.3g}"


def check_grads(got, want, rel, names=("hidden", "weight", "bias")):
    for g, w, name in zip(got, want, names):
        if w is None:
            continue
        assert g.grad is not None, f"no gradient for {name}"
        assert_rel_to_max(g.grad, w.grad, rel, f"grad {name}")


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [5, 12], ids=["pairs-split", "pair-groups"])
def test_loss_logps_metrics_grads(backend, device, mode, bias, dtype, chunk):
    """Sigmoid DPO with metrics, several chunks, one row without completion tokens, V = 131.

    Rows have 4 valid tokens: chunks of 5 split every pair (grad_in_forward recomputes them);
    chunks of 12 hold whole pairs, the first two together (the second has the empty row)."""
    beta, P = 0.2, 3
    hidden, weight, b, labels, mask = make_batch(P, 7, 16, 131, dtype, device, bias=bias, empty_row=4)
    ref = -30 * torch.rand(2 * P, device=device)
    h, w, bb = leaves(hidden, weight, b)
    loss, metrics = fastdpo.fused_linear_dpo_loss(
        h, w, labels, ref, bias=bb, mask=mask, beta=beta, return_metrics=True, chunk_size=chunk,
        grad_in_forward=GRAD_MODES[mode])
    loss.backward()

    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    z64 = logits64(h64, w64, b64)
    logps64 = seq_logps64(z64, labels, mask)
    loss64 = dpo_sigmoid64(logps64, ref, beta)
    loss64.backward()
    rel = 2e-6 if dtype == torch.float32 else 1e-12
    assert_close_rel(loss, loss64, rel, "loss")
    assert_close_rel(metrics["logps/chosen"], logps64[:P].mean(), rel, "logps/chosen")
    assert_close_rel(metrics["logps/rejected"], logps64[P:].mean(), rel, "logps/rejected")
    valid = valid_mask(labels, mask)
    zsum = (scores64(z64.detach()) * valid.unsqueeze(-1)).sum((1, 2))
    V = weight.shape[0]
    assert_close_rel(metrics["logits/chosen"], zsum[:P].sum() / (valid[:P].sum() * V), rel, "logits/chosen")
    assert_close_rel(metrics["logits/rejected"], zsum[P:].sum() / (valid[P:].sum() * V), rel, "logits/rejected")
    rewards = beta * (logps64.detach() - ref.double())
    assert_close_rel(metrics["rewards/margins"], (rewards[:P] - rewards[P:]).mean(), rel, "rewards/margins")
    check_grads((h, w, bb), (h64, w64, b64), 1e-5 if dtype == torch.float32 else 1e-11)
    assert torch.all(h.grad[~valid] == 0), "masked positions must get exactly zero gradient"


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_softcap_temperature(backend, device, mode):
    hidden, weight, b, labels, mask = make_batch(2, 6, 12, 67, torch.float64, device)
    ref = -20 * torch.rand(4, device=device)
    opts = dict(temperature=0.7, softcap=4.0)
    h, w, bb = leaves(hidden, weight, b)
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, bias=bb, mask=mask, chunk_size=4,
                                         grad_in_forward=GRAD_MODES[mode], **opts)
    (3.0 * loss).backward()  # an upstream gradient other than 1
    h64, w64, b64 = leaves(hidden, weight, b)
    loss64 = dpo_sigmoid64(seq_logps64(logits64(h64, w64, b64), labels, mask, **opts), ref, 0.1)
    (3.0 * loss64).backward()
    assert_close_rel(loss, loss64, 1e-12, "loss")
    check_grads((h, w, bb), (h64, w64, b64), 1e-11)


def test_linear_sequence_logps(backend, device):
    """Per-row log-probs and their gradients for an arbitrary upstream gradient (no loss), from a
    non-contiguous slice of the hidden states."""
    hidden, weight, b, labels, mask = make_batch(2, 7, 10, 45, torch.float32, device, empty_row=1)
    labels, mask = labels[:, 1:], mask[:, 1:]  # shifted: hidden[:, :-1] scores labels[:, 1:]
    h, w, bb = leaves(hidden, weight, b)
    logps = fastdpo.linear_sequence_logps(h[:, :-1], w, labels, bias=bb, mask=mask, chunk_size=3, softcap=6.0)
    up = torch.randn(4, device=device)
    (logps * up).sum().backward()
    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    logps64 = seq_logps64(logits64(h64[:, :-1], w64, b64), labels, mask, softcap=6.0)
    (logps64 * up.double()).sum().backward()
    assert logps.dtype == torch.float32
    assert_close_rel(logps, logps64, 1e-6, "logps")
    assert logps[1].item() == 0.0
    check_grads((h, w, bb), (h64, w64, b64), 1e-5)


PASSES = {"grad_in_forward": dict(grad_in_forward=True), "recompute": dict(grad_in_forward=False),
          "vocab-slabs": dict(vocab_chunk_size=6)}  # slabs of 6 of V = 29; they imply the recompute


@pytest.mark.parametrize("loss_type,weights,mode", [
    ("ipo", None, "grad_in_forward"),
    ("ipo", None, "vocab-slabs"),
    (["sigmoid", "sft"], [1.0, 0.5], "grad_in_forward"),  # RPO: the NLL term's gradient uses all counts
    (["sigmoid", "sft"], [1.0, 0.5], "vocab-slabs"),
    ("orpo", None, "grad_in_forward"),
    ("aot", None, "grad_in_forward"),  # couples pairs: the backward must notice and recompute
    ("aot", None, "recompute"),
    ("aot", None, "vocab-slabs"),
])
def test_other_losses_match_from_logits(backend, device, loss_type, weights, mode):
    """Any loss: the same loss and gradients as fused_dpo_loss on the materialized float64 logits."""
    hidden, weight, b, labels, mask = make_batch(4, 5, 8, 29, torch.float64, device, bias=False)
    ref = -15 * torch.rand(8, device=device)
    opts = dict(loss_type=loss_type, loss_weights=weights, mask=mask, beta=0.3)
    needs_ref = loss_type not in ("orpo",)
    ref = ref if needs_ref else None
    h, w = leaves(hidden, weight)
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, chunk_size=4, **PASSES[mode], **opts)
    loss.backward()
    h64, w64 = leaves(hidden, weight)
    loss64 = fastdpo.fused_dpo_loss(h64 @ w64.T, labels, ref, **opts)
    loss64.backward()
    assert_close_rel(loss, loss64, 1e-12, "loss")
    check_grads((h, w), (h64, w64), 1e-11)


def test_grad_in_forward_does_not_recompute(device, monkeypatch):
    """The 6NHV path: for a pairwise loss the backward only scales, it never recomputes logits."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 8, 33, torch.float32, device)
    h, w, bb = leaves(hidden, weight, b)
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, torch.zeros(4, device=device), bias=bb, mask=mask,
                                         chunk_size=4)

    def recompute(*args, **kwargs):
        raise AssertionError("the backward recomputed the logits")

    monkeypatch.setattr(fastdpo.linear_chunks, "backward", recompute)
    (0.5 * loss).backward()
    assert h.grad is not None and w.grad is not None and bb.grad is not None


def test_no_loss_gradient_in_forward_falls_back(device, monkeypatch):
    """If the loss gradient cannot be taken inside the op, the backward recomputes: same numbers."""
    import fastdpo.linear_ops

    def broken():
        raise RuntimeError("no private dispatch APIs here")

    hidden, weight, b, labels, mask = make_batch(2, 6, 8, 29, torch.float64, device)
    ref = -10 * torch.rand(4, device=device)
    grads = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(fastdpo.linear_ops, "_plain_autograd", broken)
        h, w = leaves(hidden, weight)
        with pytest.warns(RuntimeWarning, match="recomputes") if patch else contextlib.nullcontext():
            loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask, chunk_size=4)
        loss.backward()
        grads.append((h.grad, w.grad))
    assert_rel_to_max(grads[1][0], grads[0][0], 1e-12, "grad hidden")
    assert_rel_to_max(grads[1][1], grads[0][1], 1e-12, "grad weight")


def test_unencodable_option_warns_and_recomputes(device, monkeypatch):
    """A loss option that cannot reach the grad-in-forward op (a tensor bco_delta) takes the
    recomputing path with a warning, and the gradients are those of a plain float delta."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 8, 29, torch.float64, device)
    ref = -10 * torch.rand(4, device=device, dtype=torch.float64)
    grads = []
    for delta in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        h, w = leaves(hidden, weight)
        tensor = isinstance(delta, torch.Tensor)
        with pytest.warns(RuntimeWarning, match="cannot reach the grad-in-forward op") if tensor \
                else contextlib.nullcontext():
            loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask, chunk_size=4, loss_type="bco_pair",
                                                 bco_delta=delta)
        loss.backward()
        grads.append((h.grad, w.grad))
    assert_rel_to_max(grads[1][0], grads[0][0], 1e-12, "grad hidden")
    assert_rel_to_max(grads[1][1], grads[0][1], 1e-12, "grad weight")


def test_grad_in_forward_single_backward(device):
    hidden, weight, b, labels, mask = make_batch(1, 4, 8, 17, torch.float32, device)
    h, w = leaves(hidden, weight)
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, torch.zeros(2, device=device), mask=mask)
    loss.backward(retain_graph=True)
    # Said before autograd's version check on the saved 'used' flag could answer in its own words.
    with pytest.raises(RuntimeError, match="supports one backward per call; pass grad_in_forward=False"):
        torch.autograd.grad(loss, w, retain_graph=True)
    with pytest.raises(RuntimeError, match="supports one backward per call"):
        loss.backward()
    h2, w2 = leaves(hidden, weight)
    loss2 = fastdpo.fused_linear_dpo_loss(h2, w2, labels, torch.zeros(2, device=device), mask=mask,
                                          grad_in_forward=False)
    loss2.backward(retain_graph=True)
    loss2.backward()  # the recompute path supports it
    assert_rel_to_max(h2.grad, 2 * h.grad, 1e-6, "twice the gradient")


@pytest.mark.parametrize("path", ["logits", "linear_recompute", "linear_grad_in_forward"])
def test_a_second_derivative_is_refused_not_silently_dropped(backend, device, path):
    """create_graph=True: the first derivative is the usual one (autograd's own wiring), and
    differentiating it again raises, whether through hidden or through the weight, instead of a
    gradient with no graph (which a sum with other terms would silently leave out)."""
    hidden, weight, b, labels, mask = make_batch(1, 4, 8, 17, torch.float32, device)
    ref = torch.zeros(2, device=device)

    def loss_of(h, w):
        if path == "logits":
            return fastdpo.fused_dpo_loss(h @ w.T, labels, ref, mask=mask)
        return fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask,
                                             grad_in_forward=path == "linear_grad_in_forward")

    h, w = leaves(hidden, weight)
    plain = torch.autograd.grad(loss_of(h, w), (h, w))
    h, w = leaves(hidden, weight)
    first = torch.autograd.grad(loss_of(h, w), (h, w), create_graph=True)
    for got, want, name in zip(first, plain, ("hidden", "weight")):
        assert got.requires_grad, name
        assert_rel_to_max(got, want, 1e-6, name)
    for target in (h, w):
        with pytest.raises(RuntimeError, match="have no second derivative: a gradient taken through them with "
                                               "create_graph=True cannot be differentiated again"):
            torch.autograd.grad((first[0] ** 2).sum() + (first[1] ** 2).sum(), target, retain_graph=True)
    # ... and with respect to the incoming gradient (what a jvp differentiates), not a silent 0
    h, w = leaves(hidden, weight)
    v = torch.ones((), device=device, requires_grad=True)
    (dh,) = torch.autograd.grad(loss_of(h, w), h, grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="have no second derivative"):
        torch.autograd.grad(dh.sum(), v)
    # A hook may still change such a gradient in place (it is no view).
    h, w = leaves(hidden, weight)
    h.register_hook(lambda g: g.mul_(2))
    (hooked,) = torch.autograd.grad(loss_of(h, w), h, create_graph=True)
    assert_rel_to_max(hooked, 2 * plain[0], 1e-6, "hooked hidden")


def test_grad_in_forward_guard_is_fastdpo_own(device):
    """The op's own guard: a second finish of the same gradients (what a second backward through a
    compiled graph reaches, past autograd's version check) raises fastdpo's error, not a wrong gradient."""
    import fastdpo.linear_ops as ops
    from fastdpo.logps import build_layout

    hidden, weight, b, labels, mask = make_batch(1, 4, 8, 17, torch.float32, device)
    layout = build_layout(hidden, labels, 17, mask=mask, ignore_index=-100, cu_seqlens=None)
    flat = hidden.reshape(-1, 8)
    spec = fastdpo.LossConfig().encode()
    options = ops.LinearOptions().flatten()
    out = ops.linear_logps_grad_in_forward(flat, weight, None, layout.labels, layout.offsets, torch.zeros(2), spec,
                                           True, True, False, *options)
    state = ops.row_results(out).state
    guessed = ops.GuessedGrads._make(out[len(ops.RowResults._fields):])
    finish = (*guessed, flat, weight, None, layout.labels, layout.offsets, state, *options)
    ops.linear_logps_finish_(torch.ones_like(guessed.guess), *finish)
    assert guessed.used.item() == 1
    with pytest.raises(RuntimeError, match="supports one backward per call"):
        ops.linear_logps_finish_(torch.ones_like(guessed.guess), *finish)


def test_frozen_lm_head(backend, device):
    """LoRA-style: only hidden requires grad; weight and bias get none."""
    hidden, weight, b, labels, mask = make_batch(2, 5, 8, 23, torch.float32, device)
    h = hidden.clone().requires_grad_()
    for mode in GRAD_MODES.values():
        h.grad = None
        fastdpo.fused_linear_dpo_loss(h, weight, labels, torch.zeros(4, device=device), bias=b, mask=mask,
                                      grad_in_forward=mode).backward()
        h64, w64 = hidden.double().requires_grad_(), weight.double()
        dpo_sigmoid64(seq_logps64(logits64(h64, w64, b.double()), labels, mask), torch.zeros(4, device=device), 0.1).backward()
        assert_rel_to_max(h.grad, h64.grad, 1e-5, "grad hidden")
        assert weight.grad is None and b.grad is None


@pytest.mark.parametrize("options", [{}, {"grad_in_forward": False}, {"vocab_chunk_size": 16}],
                         ids=["grad_in_forward", "recompute", "vocab_slabs"])
def test_autocast_takes_inputs_as_linear_would(options, backend, device):
    """Under bf16 autocast, fp32 hidden / weight / bias run in bf16 as F.linear would run them (the
    float64 reference sees the bf16-rounded inputs); the gradients reach the fp32 leaves."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 32, 50, torch.float32, device)
    ref = -20 * torch.rand(4, device=device)
    h, w, bb = leaves(hidden, weight, b)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, bias=bb, mask=mask, chunk_size=4, **options)
    loss.backward()
    rounded = [t.to(torch.bfloat16) for t in (hidden, weight, b)]
    h64, w64, b64 = leaves(*rounded, dtype=torch.float64)
    loss64 = dpo_sigmoid64(seq_logps64(logits64(h64, w64, b64), labels, mask), ref, 0.1)
    loss64.backward()
    assert_close_rel(loss, loss64, 2e-2, "loss")
    assert h.grad.dtype == w.grad.dtype == bb.grad.dtype == torch.float32
    check_grads((h, w, bb), (h64, w64, b64), 3e-2)


def test_backward_under_autocast_keeps_the_forwards_dtype(backend, device):
    """A forward outside autocast and its backward inside one (the recomputing backward runs matmuls):
    the backward keeps the inputs' fp32, so the gradients equal those of a plain backward."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 32, 50, torch.float32, device)
    grads = []
    for autocast in (False, True):
        h, w = leaves(hidden, weight)
        loss = fastdpo.fused_linear_dpo_loss(h, w, labels, torch.zeros(4, device=device), mask=mask, chunk_size=4,
                                             grad_in_forward=False)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss.backward()
        grads.append((h.grad, w.grad))
    assert_rel_to_max(grads[1][0], grads[0][0], 1e-6, "grad hidden")
    assert_rel_to_max(grads[1][1], grads[0][1], 1e-6, "grad weight")


def test_bfloat16(backend, device):
    """bf16 hidden / weight: logits rounded to bf16 once per chunk, everything else in fp32."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 16, 50, torch.bfloat16, device)
    ref = -20 * torch.rand(4, device=device)
    h, w, bb = leaves(hidden, weight, b)
    loss, metrics = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, bias=bb, mask=mask, chunk_size=4,
                                                  return_metrics=True)
    loss.backward()
    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    logps64 = seq_logps64(logits64(h64, w64, b64), labels, mask)
    loss64 = dpo_sigmoid64(logps64, ref, 0.1)
    loss64.backward()
    assert metrics["logps/chosen"].dtype == torch.float32
    assert_close_rel(metrics["logps/chosen"], logps64[:2].mean(), 2e-2, "logps/chosen")
    assert_close_rel(loss, loss64, 2e-2, "loss")
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    check_grads((h, w, bb), (h64, w64, b64), 3e-2)


def test_reference_from_hidden(backend, device):
    """ref_hidden / ref_weight / ref_bias give the same loss as precomputed ref_logps, and no gradient."""
    hidden, weight, b, labels, mask = make_batch(2, 5, 8, 31, torch.float64, device)
    ref_hidden = hidden + torch.randn_like(hidden)
    ref_weight = (weight + 0.1 * torch.randn_like(weight)).requires_grad_()
    ref_logps = seq_logps64(logits64(ref_hidden, ref_weight.detach(), None), labels, mask)
    a = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, bias=b, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                      mask=mask, chunk_size=3)
    expected = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, ref_logps, bias=b, mask=mask)
    assert_close_rel(a, expected, 1e-12, "ref_hidden + ref_weight (no ref bias)")
    # Without ref_weight the policy's lm_head (weight and bias) scores the reference.
    shared = seq_logps64(logits64(ref_hidden, weight, b), labels, mask)
    c = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, bias=b, ref_hidden=ref_hidden, mask=mask)
    assert_close_rel(c, fastdpo.fused_linear_dpo_loss(hidden, weight, labels, shared, bias=b, mask=mask),
                     1e-12, "ref_hidden with the policy's lm_head")
    assert ref_weight.grad is None


def test_masked_tokens_never_reach_a_matmul(device, monkeypatch):
    """Every logits chunk holds only valid tokens, at most chunk_size of them (no [N, V] buffer)."""
    hidden, weight, b, labels, mask = make_batch(3, 8, 8, 19, torch.float32, device)
    seen = []
    real = fastdpo.linear_chunks._logits

    def spy(h, w, bias, out):
        seen.append(h.shape[0])
        return real(h, w, bias, out)

    monkeypatch.setattr(fastdpo.linear_chunks, "_logits", spy)
    valid = int(valid_mask(labels, mask).sum())
    h = hidden.clone().requires_grad_()
    fastdpo.linear_sequence_logps(h, weight, labels, mask=mask, chunk_size=5).sum().backward()
    assert sum(seen) == 2 * valid and max(seen) <= 5  # forward + recompute, valid tokens only
    pair = int(valid_mask(labels, mask).view(2, 3, 8).sum((0, 2)).max())  # valid tokens of the longest pair
    for chunk in (pair, 5):
        seen.clear()
        fastdpo.fused_linear_dpo_loss(h, weight, labels, torch.zeros(6, device=device), mask=mask,
                                      chunk_size=chunk).backward()
        assert max(seen) <= chunk
        if chunk == pair:
            assert sum(seen) == valid  # grad_in_forward: the logits are made once
        else:  # pairs longer than a chunk are forwarded in pieces, then recomputed
            assert valid < sum(seen) <= 2 * valid


def test_module_matches_function(device):
    hidden, weight, b, labels, mask = make_batch(2, 4, 8, 21, torch.float32, device)
    ref = -5 * torch.rand(4, device=device)
    module = fastdpo.FusedLinearDPOLoss(beta=0.2, label_smoothing=0.1, chunk_size=3)
    a = module(hidden, weight, labels, ref, bias=b, mask=mask)
    f = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, ref, bias=b, mask=mask, beta=0.2,
                                      label_smoothing=0.1, chunk_size=3)
    assert torch.equal(a, f)
    assert "beta=0.2" in repr(module)
    with pytest.raises(ValueError, match="unknown loss_type"):
        fastdpo.FusedLinearDPOLoss(loss_type="nope")


def _bad(**over):
    hidden, weight, labels = torch.randn(4, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (4, 3))
    args = dict(hidden=hidden, weight=weight, labels=labels, ref_logps=torch.zeros(4))
    args.update(over)
    return lambda: fastdpo.fused_linear_dpo_loss(**args)


ERRORS = {
    "hidden 2-d": (_bad(hidden=torch.randn(4, 8)), ValueError, r"hidden must be \[B, T, H\]"),
    "weight H": (_bad(weight=torch.randn(11, 7)), ValueError, r"weight must be \[V, H\] with H = 8"),
    "weight dtype": (_bad(weight=torch.randn(11, 8, dtype=torch.float64)), TypeError, "weight is torch.float64"),
    "bias shape": (_bad(bias=torch.randn(10)), ValueError, r"bias must be \[V\] = \(11,\)"),
    "bias dtype": (_bad(bias=torch.randn(11, dtype=torch.float64)), TypeError, "bias is torch.float64"),
    "weight device": (_bad(weight=torch.randn(11, 8, device="meta")), ValueError, "weight is on meta"),
    "integer hidden": (_bad(hidden=torch.zeros(4, 3, 8, dtype=torch.long)), TypeError, "hidden must be float"),
    "odd rows": (_bad(hidden=torch.randn(3, 3, 8), labels=torch.zeros(3, 3, dtype=torch.long),
                      ref_logps=torch.zeros(3)), ValueError, "even number of rows"),
    "labels shape": (_bad(labels=torch.zeros(4, 2, dtype=torch.long)), ValueError, "labels must be"),
    "label too large": (_bad(labels=torch.full((4, 3), 11)), ValueError, r"\[0, 11\)"),
    "ref_weight alone": (_bad(ref_weight=torch.randn(11, 8)), ValueError, "without ref_hidden"),
    "ref_hidden shape": (_bad(ref_logps=None, ref_hidden=torch.randn(4, 2, 8)), ValueError, "ref_hidden must be"),
    "ref_weight vocab": (_bad(ref_logps=None, ref_hidden=torch.randn(4, 3, 8), ref_weight=torch.randn(12, 8)),
                         ValueError, "ref_weight must have V = 11"),
    "both references": (_bad(ref_hidden=torch.randn(4, 3, 8)), ValueError, "not both"),
    "no reference": (_bad(ref_logps=None), ValueError, "needs a reference"),
    "chunk_size": (_bad(chunk_size=0), ValueError, "chunk_size must be a positive"),
    "vocab_chunk_size": (_bad(vocab_chunk_size=0), ValueError, "vocab_chunk_size must be a positive"),
    "vocab_chunk_size bool": (_bad(vocab_chunk_size=True), ValueError, "vocab_chunk_size must be a positive"),
    "vocab_chunk_size with grad_in_forward": (_bad(vocab_chunk_size=4, grad_in_forward=True), ValueError,
                                              "vocab_chunk_size needs the recomputing backward"),
    "softcap": (_bad(softcap=0.0), ValueError, "softcap must be finite and > 0"),
    "unknown loss": (_bad(loss_type="nope"), ValueError, "unknown loss_type"),
    "grad_in_forward not a bool": (_bad(grad_in_forward="no"), TypeError, "grad_in_forward must be True, False or None"),
    "no rows": (_bad(hidden=torch.randn(0, 3, 8), labels=torch.zeros(0, 3, dtype=torch.long),
                     ref_logps=torch.zeros(0)), ValueError, "hidden has no rows"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_bad_input_raises_before_any_matmul(name, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a matmul ran before the input was rejected")

    monkeypatch.setattr(fastdpo.linear_chunks, "_logits", launched)
    fn, error, message = ERRORS[name]
    with pytest.raises(error, match=message):
        fn()


def tied_batch(B, T, H, V, dtype, device, ties):
    """Logits that are exact whatever the summation order (small integers, plus v / 64 from the bias),
    so a tie in the materialized logits is a tie in the op. Vocabulary rows 3 and 7 are equal; they
    are the (tied) maximum at the positions `ties` (a list of (b, t)) and nowhere else, and no other
    two logits of a token are equal."""
    signs = torch.randint(0, 2, (H,), device=device) * 2 - 1
    hidden = torch.randint(-2, 3, (B, T, H), device=device)
    hidden = torch.where((hidden * signs).sum(-1, keepdim=True) > 0, -hidden, hidden)  # z_3 = z_7 <= -1
    for b, t in ties:
        hidden[b, t] = signs  # z_3 = z_7 = 3 H - 1, every other z_v < 2 H + 3
    weight = torch.randint(-2, 3, (V, H), device=device)
    weight[3] = weight[7] = 3 * signs
    bias = torch.randint(-2, 3, (V,), device=device) + torch.arange(V, device=device) / 64
    bias[3] = bias[7] = -1.0
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype)


def token_metrics64(z, temperature=1.0, softcap=None):
    """Per-token entropy and the indices of the first and the last maximum of the scores, in float64."""
    s = scores64(z, temperature, softcap)
    logp = s.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    index = torch.arange(s.shape[-1], device=s.device).expand_as(s)
    at_max = s == s.max(-1, keepdim=True).values
    first = torch.where(at_max, index, s.shape[-1]).min(-1).values
    last = torch.where(at_max, index, -1).max(-1).values
    return entropy, first, last


def labels_on_ties(first, last, V):
    """Positions t = 0, 1, 2 mod 3 take the first maximum (top-1), the last maximum (not top-1 where
    it is a tie) and a random token."""
    t = torch.arange(first.shape[-1], device=first.device) % 3
    return torch.where(t == 0, first, torch.where(t == 1, last, torch.randint_like(first, 0, V)))


def stats_and_grads(mode, hidden, weight, bias, labels, **opts):
    """linear_sequence_stats with token metrics through the chosen op, then a backward of a weighted row sum."""
    from fastdpo.linear import linear_sequence_stats
    from fastdpo.losses import LossConfig

    h, w, bb = leaves(hidden, weight, bias)
    rows = opts["cu_seqlens"].numel() - 1 if opts.get("cu_seqlens") is not None else hidden.shape[0]
    spec = LossConfig(loss_type="sigmoid", beta=0.1).encode()
    grad_spec = (spec, torch.zeros(rows, device=hidden.device)) if GRAD_MODES[mode] else None
    stats = linear_sequence_stats(h, w, labels, bias=bb, token_metrics=True, grad_spec=grad_spec, **opts)
    up = torch.randn(rows, device=hidden.device, dtype=stats.logps.dtype)
    (stats.logps * up).sum().backward()
    return stats, up, (h, w, bb)


@pytest.mark.parametrize("mode", GRAD_MODES)
@pytest.mark.parametrize("chunk,opts", [(3, dict(temperature=0.7, softcap=20.0)), (10, {})],
                         ids=["chunks-of-3-softcap-temperature", "chunks-of-10"])
def test_token_metrics(backend, device, mode, chunk, opts):
    """Entropy sums and top-1 counts come from the chunks of logits that give the log-probs, and equal
    float64 from the materialized logits; a tie goes to the first maximum, as torch.argmax."""
    check_token_metrics(device, mode, chunk, opts)


@pytest.mark.parametrize("vocab_chunk", [5, 8], ids=["tie-across-slabs", "tie-in-one-slab"])
@pytest.mark.parametrize("chunk,opts", [(3, dict(temperature=0.7, softcap=20.0)), (10, {})],
                         ids=["chunks-of-3-softcap-temperature", "chunks-of-10"])
def test_token_metrics_vocab_slabs(backend, device, vocab_chunk, chunk, opts):
    """The same, with the logits made in vocabulary slabs (of 5: the tied rows 3 and 7 in two
    slabs, the first of which must win; of 8: both in the first) and merged."""
    check_token_metrics(device, "recompute", chunk, dict(opts, vocab_chunk_size=vocab_chunk))


def check_token_metrics(device, mode, chunk, opts):
    P, T, H, V = 2, 6, 8, 40
    # Even rows: a tie labelled with its last maximum (t = 1); odd rows: with its first (t = 0). The
    # row sums then differ whichever way a wrong tie rule goes.
    ties = [(b, 1 - b % 2) for b in range(2 * P)]
    hidden, weight, bias = tied_batch(2 * P, T, H, V, torch.float32, device, ties)
    z64 = logits64(hidden.double(), weight.double(), bias.double())
    score_opts = {k: v for k, v in opts.items() if k in ("temperature", "softcap")}
    entropy, first, last = token_metrics64(z64, **score_opts)
    labels = labels_on_ties(first, last, V)
    mask = torch.rand(2 * P, T, device=device) > 0.25
    mask[:, :2] = True  # the tied positions
    mask[1] = False  # a row without completion tokens (row 3 keeps the odd rows' case)
    stats, up, got = stats_and_grads(mode, hidden, weight, bias, labels, mask=mask, chunk_size=chunk, **opts)

    for b, t in ties:  # the tied positions are labelled as intended, so the test can fail
        assert first[b, t] != last[b, t] and labels[b, t] == (last if t == 1 else first)[b, t]
    assert_close_rel(stats.entropy_sums, (entropy * mask).sum(-1), 2e-6, "entropy sums")
    assert torch.equal(stats.top1_counts.double().cpu(), ((first == labels) & mask).double().sum(-1).cpu())
    assert stats.top1_counts[1].item() == 0.0 and stats.entropy_sums[1].item() == 0.0
    assert not stats.entropy_sums.requires_grad and not stats.top1_counts.requires_grad
    # The log-probs and their gradients are unchanged by the extra results.
    want = leaves(hidden, weight, bias, dtype=torch.float64)
    logps64 = seq_logps64(logits64(*want), labels, mask, **score_opts)
    (logps64 * up.double()).sum().backward()
    assert_close_rel(stats.logps, logps64, 2e-6, "logps")
    check_grads(got, want, 1e-5)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_token_metrics_packed(backend, device, mode):
    """A packed batch (cu_seqlens, one empty row): sums over each row's segment of the packed tokens."""
    lengths = torch.tensor([5, 0, 7, 4])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(device)
    total, H, V = int(lengths.sum()), 8, 37
    ties = [(0, 1), (0, 12)]  # in rows 0 and 3, labelled with the last and the first maximum
    hidden, weight, bias = tied_batch(1, total, H, V, torch.float64, device, ties)
    entropy, first, last = token_metrics64(logits64(hidden, weight, bias), softcap=5.0)
    labels = labels_on_ties(first, last, V)
    mask = torch.rand(1, total, device=device) > 0.2
    mask[0, [1, 12]] = True  # the tied positions
    stats, _, _ = stats_and_grads(mode, hidden, weight, bias, labels, mask=mask, cu_seqlens=cu, chunk_size=4,
                                  softcap=5.0)

    def segments(x):
        flat = (x * mask).double()[0]
        return torch.stack([flat[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])

    assert labels[0, 1] == last[0, 1] != first[0, 1] and labels[0, 12] == first[0, 12] != last[0, 12]
    assert_close_rel(stats.entropy_sums, segments(entropy), 1e-12, "entropy sums")
    assert torch.equal(stats.top1_counts.cpu(), segments(first == labels).cpu())
    assert stats.entropy_sums[1].item() == 0.0


def test_labels_prepared_once_for_both_passes(backend, device, monkeypatch):
    """With ref_hidden / ref_weight the label check (a host sync) runs once, not once per pass."""
    import fastdpo.validation as validation

    calls = []
    original = validation.token_labels
    monkeypatch.setattr(validation, "token_labels", lambda *a, **k: calls.append(1) or original(*a, **k))
    hidden, weight, bias, labels, mask = make_batch(2, 5, 8, 13, torch.float32, device)
    expected = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, bias=bias, mask=mask,
                                             ref_logps=fastdpo.linear_sequence_logps(hidden + 0.1, weight, labels,
                                                                                     bias=bias, mask=mask))
    calls.clear()
    loss = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, bias=bias, mask=mask,
                                         ref_hidden=hidden + 0.1, ref_weight=weight, ref_bias=bias)
    assert len(calls) == 1
    torch.testing.assert_close(loss, expected)


def test_grad_in_forward_allocates_one_weight_gradient(backend, device):
    """The backward of grad_in_forward hands over the dW built in the forward: no second [V, H]
    tensor (autograd would zero-fill one for each gradient-free output unless told not to)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, _, labels, mask = make_batch(2, 6, 8, 61, torch.float32, device, bias=False)
    h, w = leaves(hidden, weight)
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append((str(func), tuple(t.shape)))
            return out

    with Record():
        loss = fastdpo.fused_linear_dpo_loss(h, w, labels, torch.zeros(4, device=device), mask=mask,
                                             grad_in_forward=True)
        torch.autograd.grad(loss, (h, w))
    weight_sized = [f for f, s in shapes if s == tuple(weight.shape) and "view" not in f and "detach" not in f]
    assert len(weight_sized) == 1, weight_sized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("vocab_chunk", [7, 50, 131], ids=["slabs-of-7", "slabs-of-50", "one-slab"])
@pytest.mark.parametrize("opts", [{}, dict(temperature=0.7, softcap=5.0)], ids=["plain", "softcap-temperature"])
def test_vocab_slabs(backend, device, dtype, vocab_chunk, opts):
    """The recomputing backward done in vocabulary slabs (V = 131: slabs of 7 and 50 leave a short
    last one) gives the float64 loss gradients for hidden, weight and bias, an upstream gradient
    other than 1 and a row without completion tokens included."""
    hidden, weight, b, labels, mask = make_batch(3, 7, 16, 131, dtype, device, empty_row=2)
    ref = -30 * torch.rand(6, device=device)
    h, w, bb = leaves(hidden, weight, b)
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, bias=bb, mask=mask, beta=0.3, chunk_size=5,
                                         vocab_chunk_size=vocab_chunk, grad_in_forward=False, **opts)
    (2.5 * loss).backward()
    h64, w64, b64 = leaves(hidden, weight, b, dtype=torch.float64)
    loss64 = dpo_sigmoid64(seq_logps64(logits64(h64, w64, b64), labels, mask, **opts), ref, 0.3)
    (2.5 * loss64).backward()
    rel = 2e-6 if dtype == torch.float32 else 1e-12
    assert_close_rel(loss, loss64, rel, "loss")
    check_grads((h, w, bb), (h64, w64, b64), 1e-5 if dtype == torch.float32 else 1e-11)
    assert torch.all(h.grad[~valid_mask(labels, mask)] == 0), "masked positions must get exactly zero gradient"


def test_vocab_slabs_bfloat16(backend, device):
    """In bf16 each slab's share of dH is rounded once and the slabs summed in fp32, so dH is as
    close to the float64 gradient as with the whole vocabulary at once (dW is unchanged)."""
    hidden, weight, _, labels, mask = make_batch(2, 24, 32, 300, torch.bfloat16, device, bias=False)
    ref = -30 * torch.rand(4, device=device)
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    dpo_sigmoid64(seq_logps64(h64 @ w64.T, labels, mask), ref, 0.1).backward()
    errors = {}
    for vocab_chunk in (None, 16):
        h, w = leaves(hidden, weight)
        fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask, chunk_size=8, vocab_chunk_size=vocab_chunk,
                                      grad_in_forward=False).backward()
        errors[vocab_chunk] = (h.grad.double() - h64.grad).abs().max().item() / h64.grad.abs().max().item()
        check_grads((h, w), (h64, w64), 2e-2, names=("hidden", "weight"))
    assert errors[16] <= 2 * errors[None] + 1e-3, errors


def test_vocab_slabs_never_hold_full_vocabulary_rows(backend, device):
    """With vocab_chunk_size the forward and the recomputing backward each allocate one
    [chunk, vocab_chunk] logits buffer and [chunk, H] tiles, never a vocabulary-wide row.
    (Recorded inside the chunk layer, gradient buffers given: a dispatch mode sees a custom op whole.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdpo import linear_chunks as C
    from fastdpo.logps import build_layout

    V, H = 97, 8
    hidden, weight, b, labels, mask = make_batch(2, 6, H, V, torch.float32, device)
    layout = build_layout(hidden, labels, V, mask=mask, ignore_index=-100, cu_seqlens=None)
    plan = C.make_plan(layout.labels, layout.offsets)
    flat = hidden.reshape(-1, H)
    opts = C.LinearOptions(sum_scores=True, token_metrics=True, chunk_tokens=4, vocab_chunk=10)
    grads = C.new_grads(flat, weight, b, (True, True, True))
    new = []  # shapes of the tensors the backward allocates (not views, not in-place results)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = torch.utils._pytree.tree_leaves((args, kwargs))
            seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    new.append(tuple(t.shape))
            return out

    with Record():
        state = C.forward(plan, flat, weight, b, opts).state
        C.backward(plan, flat, weight, b, opts, state, torch.randn(4, device=device), grads)
    assert new.count((40,)) == 2, "expected one [chunk x vocab_chunk] logits buffer per pass"
    # Nothing larger than a [chunk, H] tile (the slab products and the fp32 dH sum), the logits tile
    # or the slabs' per-token results before their merge ([slabs, chunk, 2] for the backward state).
    slabs = -(-V // 10)
    assert max(int(torch.tensor(s).prod()) for s in new) == max(4 * max(10, H), slabs * 4 * 2), new


def test_vocab_slabs_unchecked_label_gives_nan(backend, device):
    """With the label checks off, a label >= V lies in no slab: its row is NaN, as without slabs
    (never a silent 0 for the missing label score), and the other rows are exact."""
    hidden, weight, b, labels, mask = make_batch(2, 6, 8, 23, torch.float64, device)
    mask[:] = True
    labels[1, 3] = 23
    with fastdpo.value_checks(False):
        got = fastdpo.linear_sequence_logps(hidden, weight, labels, bias=b, mask=mask, chunk_size=4,
                                            vocab_chunk_size=5)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()
    want = seq_logps64(logits64(hidden, weight, b), labels.clamp(max=22), mask)
    assert_close_rel(got[[0, 2, 3]], want[[0, 2, 3]], 1e-12, "unchecked rows")


@pytest.mark.parametrize("opts", [dict(grad_in_forward=True), dict(grad_in_forward=False, chunk_size=5),
                                  dict(grad_in_forward=False, chunk_size=5, vocab_chunk_size=29)],
                         ids=["grad-in-forward", "recompute", "vocab-slabs"])
def test_confident_tokens_exact_gradient(backend, device, opts):
    """Tokens whose label has 1 - p from 1e-1 down to 1e-7, through the fused linear path: the
    hidden gradient matches float64 element by element, each to its own size (1 - exp(logp) in
    fp32 would lose every digit of the label's term at 1e-7). The head is 2 x a permutation, so
    the fp32 logits are exact and any error is the pass's own; slabs of 29 split V = 96 unevenly
    and merge the other tokens' mass across slabs."""
    P, T, V = 2, 6, 96
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=device)
    mask[:, 0] = False
    gaps = torch.tensor(CONFIDENT_GAPS * 4, dtype=torch.float64)
    z = confident_logits(labels.view(-1), V, gaps).view(2 * P, T, V)
    perm = torch.randperm(V, device=device)
    weight = 2 * torch.eye(V, device=device)[perm]  # z = h W^T: z[:, v] = 2 h[:, perm[v]], exact in fp32
    hidden = torch.empty(2 * P, T, V, device=device)
    hidden[..., perm] = (z / 2).float()
    ref = -5 * torch.rand(2 * P, device=device)
    h, w = leaves(hidden, weight)
    fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask, beta=0.5, **opts).backward()
    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    dpo_sigmoid64(seq_logps64(logits64(h64, w64, None), labels, mask), ref, 0.5).backward()
    want = h64.grad
    rel = ((h.grad.double() - want).abs() / want.abs()).nan_to_num(0.0)  # 0 / 0 on masked rows
    assert rel.max() < 1e-4, f"hidden gradient: largest relative error of one element {rel.max():.2g}"
    assert torch.all(h.grad[~mask] == 0)
    check_grads((w,), (w64,), 1e-5, names=("weight",))
