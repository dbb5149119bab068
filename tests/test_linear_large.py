"""Fused linear DPO at shapes A and C of benchmarks/common.py (Llama-3-8B and Qwen2.5-7B heads) on a GPU (a small shape on CPU, same checks).

Log-probs against float64 (of the same bf16 inputs), gradients against fp32 ones through the same
rounded logits, and the memory bound of the issue: extra memory (gradients included) stays near
|dW| + |dH| + one chunk of logits, never [N, V]; in the lean setting (vocabulary slabs) near
|dW| + |dH| + chunk x (2 vocab_chunk + 8 H) bytes.
"""

import pytest
import torch

import fastdpo
import fastdpo.linear_chunks
from fastdpo.eager import chunked_logps64
from oracle64 import assert_close_rel
from test_linear import assert_rel_to_max

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# name -> (P, T, H, V)
SHAPES = {"A": (4, 1024, 4096, 128256), "C": (4, 2048, 3584, 151936)} if HAS_CUDA else {"small": (2, 64, 32, 1000)}


def anchor_batch(P, T, H, V, dtype=torch.bfloat16):
    hidden = torch.randn(2 * P, T, H, device=DEVICE).to(dtype)
    weight = (torch.randn(V, H, device=DEVICE) * 4 / H**0.5).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), device=DEVICE)
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=DEVICE)
    mask[:, : T // 4] = False  # prompt
    for row, pad in enumerate(torch.randint(0, T // 4 + 1, (2 * P,)).tolist()):
        mask[row, T - pad :] = False  # right padding
    return hidden, weight, labels, mask


def rounded_logits_grads(hidden, weight, labels, mask, ref, beta, rows=512):
    """fp32 gradients of the DPO loss through the logits as fastdpo's matmul makes them (rounded
    to the input dtype), a few hundred tokens at a time, written out by hand: dz = g (onehot - p).
    Rounding the logits moves p by up to ~3% where |z| ~ 10 in bf16, so an unrounded yardstick
    would measure the input format, not fastdpo."""
    B, T, _ = hidden.shape
    P = B // 2

    def token_slices():
        for b in range(B):
            for t0 in range(0, T, rows):
                sl = slice(t0, t0 + rows)
                yield b, sl, (hidden[b, sl] @ weight.t()).double()

    lp = torch.zeros(B, dtype=torch.float64, device=hidden.device)
    for b, sl, z in token_slices():
        lp[b] += ((z.gather(1, labels[b, sl, None]).squeeze(1) - torch.logsumexp(z, 1)) * mask[b, sl]).sum()
    x = lp.requires_grad_()
    d = (x[:P] - ref[:P]) - (x[P:] - ref[P:])
    (g,) = torch.autograd.grad(-torch.nn.functional.logsigmoid(beta * d).mean(), x)
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=hidden.device)
    for b, sl, z in token_slices():
        dz = -torch.softmax(z, 1)
        dz[torch.arange(dz.shape[0]), labels[b, sl]] += 1
        dz = (dz * (g[b] * mask[b, sl, None])).float()
        dh[b, sl] = dz @ weight.float()
        dw += dz.t() @ hidden[b, sl].float()
    return dh, dw


LEAN = dict(chunk_size=256, vocab_chunk_size=4096) if HAS_CUDA else dict(chunk_size=32, vocab_chunk_size=300)
MODES = {"grad_in_forward": dict(grad_in_forward=True), "recompute": dict(grad_in_forward=False),
         "lean": dict(grad_in_forward=False, **LEAN)}


def workspace_bound(mode, P, H, V, counts):
    """Bytes the pass may hold besides the gradients (bf16), with a margin for [N]-sized vectors."""
    if mode == "lean":  # [chunk, vocab_chunk] logits, the gathered rows, the fp32 dH sum, one product
        return LEAN["chunk_size"] * (2 * LEAN["vocab_chunk_size"] + 8 * H) * 3 // 2 + 16 * 2**20
    largest_pair = int((counts[:P] + counts[P:]).max()) * V * 2  # grad_in_forward keeps whole pairs
    chunk = max(fastdpo.linear_chunks.CHUNK_BYTES, largest_pair if mode == "grad_in_forward" else 0)
    return chunk + 0.1 * 2**30


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_anchor_shape(shape, mode, monkeypatch):
    P, T, H, V = SHAPES[shape]
    grad_in_forward = MODES[mode]["grad_in_forward"]
    hidden, weight, labels, mask = anchor_batch(P, T, H, V)
    with torch.no_grad():
        got = fastdpo.linear_sequence_logps(hidden, weight, labels, mask=mask)
    assert_close_rel(got, chunked_logps64(hidden, labels, mask, weight, rows=512), 1e-3, "logps (bf16 logits)")
    # A reference near the policy keeps beta * margin of order 1: a saturated sigmoid would leave
    # gradients too small (denormal at worst) to compare.
    ref = got.float() + 10 * torch.randn(2 * P, device=DEVICE)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    recomputed = []
    backward = fastdpo.linear_chunks.backward
    monkeypatch.setattr(fastdpo.linear_chunks, "backward", lambda *a, **k: recomputed.append(1) or backward(*a, **k))
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    loss = fastdpo.fused_linear_dpo_loss(h, w, labels, ref, mask=mask, beta=0.1, **MODES[mode])
    dh, dw = torch.autograd.grad(loss, (h, w))
    if HAS_CUDA:
        extra = torch.cuda.max_memory_allocated() - base
        grads = (dh.numel() + dw.numel()) * 2
        bound = workspace_bound(mode, P, H, V, mask.sum(-1))
        assert extra < grads + bound, f"extra memory {extra / 1e9:.3f} GB, bound {(grads + bound) / 1e9:.3f}"
    assert len(recomputed) == (0 if grad_in_forward else 1)  # 6 N H V or 8 N H V, nothing more
    del h, w
    want_h, want_w = rounded_logits_grads(hidden, weight, labels, mask, ref, 0.1)
    assert_rel_to_max(dh, want_h, 3e-2, "grad hidden")
    assert_rel_to_max(dw, want_w, 3e-2, "grad weight")
