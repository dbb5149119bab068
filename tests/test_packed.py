"""Packed, padding-free batches (cu_seqlens, flash-attention varlen layout) give the padded results."""

import pytest
import torch

import fastdpo
from oracle64 import assert_close_rel


def padded_and_packed(P, T, lengths=None, device="cpu"):
    """Row lengths (one row may be empty), a [2P, T] padded layout and the [1, total] packed one.

    Returns (lengths, prompt mask [2P, T] for the padded layout, index [total] of each packed token
    in the flattened padded layout, cu_seqlens int32 [2P + 1]).
    """
    B = 2 * P
    if lengths is None:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[1] = 0  # an empty row: cu_seqlens repeats a value
    positions = torch.arange(T)
    inside = positions[None, :] < lengths[:, None]
    prompt = positions[None, :] < torch.randint(0, 3, (B, 1))
    mask = inside & ~prompt
    index = torch.nonzero(inside.reshape(-1)).squeeze(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    return lengths, mask.to(device), index.to(device), cu.to(device)


def pack(x, index):
    """[B, T, ...] padded -> [1, total, ...] packed."""
    return x.reshape(-1, *x.shape[2:])[index].unsqueeze(0)


def rand_labels(B, T, V, device):
    return torch.randint(0, V, (B, T), device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_logps_packed_equals_padded(backend, device, dtype):
    P, T, V = 2, 7, 37
    _, mask, index, cu = padded_and_packed(P, T, device=device)
    logits = torch.randn(2 * P, T, V, device=device, dtype=dtype)
    labels = rand_labels(2 * P, T, V, device)
    x = logits.clone().requires_grad_()
    padded = fastdpo.sequence_logps(x, labels, mask=mask, softcap=5.0)
    xp = pack(logits, index).requires_grad_()
    packed = fastdpo.sequence_logps(xp, pack(labels, index), mask=pack(mask, index), cu_seqlens=cu, softcap=5.0)
    rel = 1e-6 if dtype == torch.float32 else 1e-13
    assert_close_rel(packed, padded, rel, "logps")
    up = torch.randn(2 * P, device=device, dtype=padded.dtype)
    (padded * up).sum().backward()
    (packed * up).sum().backward()
    assert_close_rel(xp.grad, pack(x.grad, index), rel, "grad")


def test_fused_dpo_loss_packed_equals_padded(backend, device):
    P, T, V = 3, 6, 29
    _, mask, index, cu = padded_and_packed(P, T, device=device)
    logits = torch.randn(2 * P, T, V, device=device, dtype=torch.float64)
    ref_logits = logits + torch.randn_like(logits)
    labels = rand_labels(2 * P, T, V, device)
    x = logits.clone().requires_grad_()
    loss, metrics = fastdpo.fused_dpo_loss(x, labels, ref_logits=ref_logits, mask=mask, return_metrics=True,
                                           loss_type=["sigmoid", "sft"])
    xp = pack(logits, index).requires_grad_()
    loss_p, metrics_p = fastdpo.fused_dpo_loss(xp, pack(labels, index), ref_logits=pack(ref_logits, index),
                                               mask=pack(mask, index), cu_seqlens=cu, return_metrics=True,
                                               loss_type=["sigmoid", "sft"])
    assert_close_rel(loss_p, loss, 1e-13, "loss")
    assert set(metrics_p) == set(metrics)
    for name in metrics:
        assert_close_rel(metrics_p[name], metrics[name], 1e-13, name)
    loss.backward()
    loss_p.backward()
    assert_close_rel(xp.grad, pack(x.grad, index), 1e-13, "grad")


def test_eager_dpo_loss_packed_equals_padded(device):
    """The eager implementation takes cu_seqlens too: packed equals its own padded result (loss,
    metrics with WPO weights, gradients), and the packed result equals the fused one."""
    from fastdpo.eager import eager_dpo_loss

    P, T, V = 3, 6, 29
    _, mask, index, cu = padded_and_packed(P, T, device=device)
    logits = torch.randn(2 * P, T, V, device=device, dtype=torch.float64)
    ref_logits = logits + torch.randn_like(logits)
    labels = rand_labels(2 * P, T, V, device)
    opts = dict(return_metrics=True, loss_type=["sigmoid", "sft"], use_weighting=True, temperature=0.8)
    x = logits.clone().requires_grad_()
    loss, metrics = eager_dpo_loss(x, labels, ref_logits=ref_logits, mask=mask, **opts)
    packed = dict(labels=pack(labels, index), ref_logits=pack(ref_logits, index), mask=pack(mask, index), cu_seqlens=cu)
    xp = pack(logits, index).requires_grad_()
    loss_p, metrics_p = eager_dpo_loss(xp, packed.pop("labels"), **packed, **opts)
    fused, _ = fastdpo.fused_dpo_loss(pack(logits, index), pack(labels, index), ref_logits=pack(ref_logits, index),
                                      mask=pack(mask, index), cu_seqlens=cu, **opts)
    assert_close_rel(loss_p, loss, 1e-13, "loss")
    assert_close_rel(fused, loss_p, 1e-12, "fused")
    for name in metrics:
        assert_close_rel(metrics_p[name], metrics[name], 1e-12, name)
    loss.backward()
    loss_p.backward()
    assert_close_rel(xp.grad, pack(x.grad, index), 1e-13, "grad")


@pytest.mark.parametrize("grad_in_forward,vocab_chunk", [(True, None), (False, None), (False, 9)],
                         ids=["grad_in_forward", "recompute", "recompute-vocab-slabs"])
def test_fused_linear_packed_equals_padded(backend, device, grad_in_forward, vocab_chunk):
    P, T, H, V = 2, 7, 8, 41
    _, mask, index, cu = padded_and_packed(P, T, device=device)
    hidden = torch.randn(2 * P, T, H, device=device, dtype=torch.float64)
    weight = torch.randn(V, H, device=device, dtype=torch.float64)
    bias = torch.randn(V, device=device, dtype=torch.float64)
    labels = rand_labels(2 * P, T, V, device)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    opts = dict(return_metrics=True, chunk_size=4, grad_in_forward=grad_in_forward, temperature=0.8,
                vocab_chunk_size=vocab_chunk)
    grads = []
    results = []
    for layout in ("padded", "packed"):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if layout == "padded":
            out = fastdpo.fused_linear_dpo_loss(h, w, labels, bias=b, ref_hidden=ref_hidden, mask=mask, **opts)
        else:
            out = fastdpo.fused_linear_dpo_loss(pack(h, index), w, pack(labels, index), bias=b,
                                                ref_hidden=pack(ref_hidden, index), mask=pack(mask, index),
                                                cu_seqlens=cu, **opts)
        out[0].backward()
        results.append(out)
        grads.append((pack(h.grad, index), w.grad, b.grad))
    (loss, metrics), (loss_p, metrics_p) = results
    assert_close_rel(loss_p, loss, 1e-13, "loss")
    for name in metrics:
        assert_close_rel(metrics_p[name], metrics[name], 1e-13, name)
    for name, a, b in zip(("hidden", "weight", "bias"), grads[1], grads[0]):
        assert_close_rel(a, b, 1e-12, f"grad {name}")


def test_linear_sequence_logps_packed(backend, device):
    P, T, H, V = 2, 6, 8, 19
    _, mask, index, cu = padded_and_packed(P, T, device=device)
    hidden = torch.randn(2 * P, T, H, device=device)
    weight = torch.randn(V, H, device=device)
    labels = rand_labels(2 * P, T, V, device)
    padded = fastdpo.linear_sequence_logps(hidden, weight, labels, mask=mask)
    packed = fastdpo.linear_sequence_logps(pack(hidden, index), weight, pack(labels, index),
                                           mask=pack(mask, index), cu_seqlens=cu.long(), chunk_size=3)
    assert_close_rel(packed, padded, 1e-6, "logps")
    assert packed[1].item() == 0.0  # the empty row


def _packed_call(cu, total=6, batch=1):
    logits = torch.randn(batch, total, 11)
    labels = torch.randint(0, 11, (batch, total))
    return lambda: fastdpo.fused_dpo_loss(logits, labels, torch.zeros(cu.numel() - 1), cu_seqlens=cu)


CU_ERRORS = {
    "float": (_packed_call(torch.tensor([0.0, 3.0, 6.0])), TypeError, "cu_seqlens must be int32 or int64"),
    "2-d": (_packed_call(torch.tensor([[0, 3, 6]])), ValueError, r"cu_seqlens must be \[B \+ 1\]"),
    "not packed": (_packed_call(torch.tensor([0, 3, 6]), batch=2), ValueError, r"packed as \[1, total_tokens\]"),
    "odd rows": (_packed_call(torch.tensor([0, 2, 4, 6])), ValueError, "even number of rows"),
    "wrong total": (_packed_call(torch.tensor([0, 3, 5])), ValueError, "end at total_tokens = 6"),
    "not from 0": (_packed_call(torch.tensor([1, 3, 6])), ValueError, "must start at 0"),
    "decreasing": (_packed_call(torch.tensor([0, 4, 3, 4, 6])), ValueError, "never decrease"),
}


@pytest.mark.parametrize("name", CU_ERRORS)
def test_bad_cu_seqlens(name):
    fn, error, message = CU_ERRORS[name]
    with pytest.raises(error, match=message):
        fn()


def test_bad_cu_seqlens_linear():
    hidden, weight = torch.randn(1, 6, 8), torch.randn(11, 8)
    labels = torch.randint(0, 11, (1, 6))
    with pytest.raises(ValueError, match="end at total_tokens = 6"):
        fastdpo.fused_linear_dpo_loss(hidden, weight, labels, torch.zeros(2), cu_seqlens=torch.tensor([0, 2, 5]))


def test_segment_sums_keep_non_finite_values_in_their_segment():
    """A NaN or inf in one segment leaves every other segment's sum exact (a prefix-sum difference
    would carry it into all later ones); within its segment it gives what a plain sum gives."""
    from fastdpo.packed import segment_sums

    inf = float("inf")
    values = torch.randn(14, dtype=torch.float64)
    values[[1, 4, 7, 8, 11]] = torch.tensor([float("nan"), inf, inf, -inf, -inf], dtype=torch.float64)
    offsets = torch.tensor([0, 3, 3, 6, 10, 13, 14])  # nan | empty | inf | inf and -inf | -inf | finite
    x = values.clone().requires_grad_()
    got = segment_sums(x, offsets)
    want = torch.stack([values[a:b].sum() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert torch.equal(got[~finite & ~want.isnan()], want[~finite & ~want.isnan()])
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-15, atol=1e-15)
    assert finite.tolist() == [False, True, False, False, False, True]
    got[finite].sum().backward()  # the finite segments stay differentiable
    assert torch.equal(x.grad, torch.tensor([0.0] * 13 + [1.0], dtype=torch.float64))
