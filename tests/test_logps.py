"""sequence_logps against float64, forward and backward, on both backends."""

import pytest
import torch

import fastdpo
from fastdpo.kernels import TokenOptions
from fastdpo.kernels.token_logps import MAX_BLOCK_V as TILE  # the kernels' vocabulary tile width
from oracle64 import CONFIDENT_GAPS, assert_close_rel, confident_logits, not_label_mass64, seq_logps64

# Forward error is relative to the float64 result on the same (upcast) inputs. Gradients are
# rounded to the logits' dtype, so their tolerance is that dtype's resolution; in fp32 the
# probabilities exp(s - lse) carry a relative error of about |s - lse| * 2^-24, up to ~2e-6 for
# the scores of up to ~30 these tests draw (scale 6, temperature 0.7).
FWD_REL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6, torch.float64: 1e-12}
GRAD_REL = {torch.float32: 5e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float64: 1e-12}


def make_inputs(B, T, V, dtype, device, scale=4.0, masked_frac=0.3):
    logits = (scale * torch.randn(B, T, V, device=device)).to(dtype)
    labels = torch.randint(0, V, (B, T), device=device)
    mask = torch.rand(B, T, device=device) > masked_frac
    return logits, labels, mask


def check_parity(logits, labels, *, mask=None, ignore_index=-100, inplace=False, g=None, **opts):
    """Forward and backward of fastdpo vs float64 autograd, with a random upstream gradient."""
    dtype = logits.dtype
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1 if inplace else leaf  # in place needs a non-leaf: its storage is reused
    out = fastdpo.sequence_logps(x, labels, mask=mask, ignore_index=ignore_index, inplace_backward=inplace, **opts)
    x64 = logits.detach().double().requires_grad_()
    ref = seq_logps64(x64, labels, mask, ignore_index, **opts)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_rel(out, ref, FWD_REL[dtype], "logps")
    g = torch.randn_like(ref) if g is None else g
    out.backward(g.to(out.dtype))
    ref.backward(g)
    assert leaf.grad.dtype == dtype
    assert_close_rel(leaf.grad, x64.grad, GRAD_REL[dtype], "grad")
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [2, 5, 37, 257])
def test_parity_dtypes_and_vocab(backend, device, dtype, V):
    logits, labels, mask = make_inputs(4, 6, V, dtype, device)
    check_parity(logits, labels, mask=mask)


def test_multi_tile_vocab(backend, device):
    """V above the tile width and not a multiple of it: the tail tile is padded with -inf."""
    logits, labels, mask = make_inputs(2, 2, TILE + 77, torch.bfloat16, device)
    labels[0, 0] = TILE + 76  # label in the tail tile
    check_parity(logits, labels, mask=mask)


def test_single_token_rows(backend, device):
    logits, labels, _ = make_inputs(4, 1, 11, torch.float32, device)
    check_parity(logits, labels)


def test_rows_without_completion_tokens(backend, device):
    logits, labels, mask = make_inputs(4, 5, 13, torch.float32, device)
    mask[1] = False
    labels[2] = -100
    out, grad = check_parity(logits, labels, mask=mask)
    assert out[1].item() == 0.0 and out[2].item() == 0.0
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.equal(grad[2], torch.zeros_like(grad[2]))
    # masked positions of kept rows get exactly zero gradient too
    assert (grad[~mask] == 0).all()


def test_shifted_non_contiguous_logits(backend, device):
    """logits[:, :-1] (row stride T*V) as produced by the usual shift, with no copy."""
    base, labels, mask = make_inputs(4, 8, 19, torch.bfloat16, device)
    logits = base[:, :-1]
    assert not logits.is_contiguous()
    check_parity(logits, labels[:, 1:], mask=mask[:, 1:])


def test_vocab_strided_logits(backend, device):
    """Vocab not the fastest dimension (stride_v != 1)."""
    base = (3 * torch.randn(23, 4, 5, device=device)).to(torch.float32)
    logits = base.permute(1, 2, 0)
    labels = torch.randint(0, 23, (4, 5), device=device)
    check_parity(logits, labels)


def test_mask_and_ignore_index_agree(backend, device):
    logits, labels, mask = make_inputs(4, 7, 29, torch.float32, device)
    by_mask = fastdpo.sequence_logps(logits, labels, mask=mask)
    by_ignore = fastdpo.sequence_logps(logits, torch.where(mask, labels, -100))
    by_custom = fastdpo.sequence_logps(logits, torch.where(mask, labels, 7), ignore_index=7)
    both = torch.where(torch.rand_like(mask, dtype=torch.float) > 0.5, labels, -100)
    assert torch.equal(by_mask, by_ignore)
    assert_close_rel(fastdpo.sequence_logps(logits, both, mask=mask),
                     seq_logps64(logits, both, mask), 2e-6, "mask + ignore_index")
    # label 7 positions that were kept are dropped by ignore_index=7: compare with the formula
    assert_close_rel(by_custom, seq_logps64(logits, torch.where(mask, labels, 7), None, 7), 2e-6, "custom ignore")


def test_float_mask(backend, device):
    logits, labels, mask = make_inputs(2, 5, 9, torch.float32, device)
    assert torch.equal(fastdpo.sequence_logps(logits, labels, mask=mask.float()),
                       fastdpo.sequence_logps(logits, labels, mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(backend, device, dtype):
    logits, labels, mask = make_inputs(4, 5, 37, dtype, device)
    g = torch.randn(4, dtype=torch.float64, device=device)
    _, grad_out = check_parity(logits, labels, mask=mask, inplace=False, g=g)
    _, grad_in = check_parity(logits, labels, mask=mask, inplace=True, g=g)
    assert torch.equal(grad_out, grad_in)


def test_inplace_backward_reuses_logits_storage(backend, device):
    logits, labels, mask = make_inputs(2, 3, 17, torch.float32, device)
    x = logits.clone().requires_grad_() * 1
    (grad,) = torch.autograd.grad(fastdpo.sequence_logps(x, labels, mask=mask, inplace_backward=True).sum(), x)
    assert grad.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("temperature,softcap", [(0.7, None), (1.0, 5.0), (1.3, 2.5)])
def test_temperature_and_softcap(backend, device, temperature, softcap):
    logits, labels, mask = make_inputs(4, 5, 41, torch.float32, device, scale=6.0)
    check_parity(logits, labels, mask=mask, temperature=temperature, softcap=softcap)


def test_gradcheck_float64(backend, device):
    logits = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), device=device)
    labels[1, 0] = -100
    assert torch.autograd.gradcheck(lambda z: fastdpo.sequence_logps(z, labels, softcap=3.0), (logits,))


def test_nan_logits_give_nan(backend, device):
    logits, labels, _ = make_inputs(2, 4, 11, torch.float32, device)
    logits[0, 2, 3] = float("nan")
    out = fastdpo.sequence_logps(logits, labels)
    assert torch.isnan(out[0]) and torch.isfinite(out[1])


def test_minus_inf_logits(backend, device):
    """Banned tokens (-inf logits, some whole tiles) are fine as long as the label is not banned."""
    logits, labels, _ = make_inputs(2, 3, TILE + 40, torch.float32, device)
    logits[..., :TILE] = float("-inf")  # the whole first tile
    labels = torch.randint(TILE, TILE + 40, (2, 3), device=device)
    check_parity(logits, labels)


def test_backends_agree(device, monkeypatch):
    logits, labels, mask = make_inputs(4, 6, 131, torch.bfloat16, device)
    outs = []
    for name in ("torch", "triton"):
        monkeypatch.setenv("FASTDPO_BACKEND", name)
        outs.append(fastdpo.sequence_logps(logits, labels, mask=mask))
    assert_close_rel(outs[0], outs[1], 1e-6, "torch vs triton")


def test_int64_offsets(backend, device):
    """Rows more than 2^31 elements apart: offsets must be computed in int64.

    The interpreter does its pointer arithmetic in 64 bits either way; on a GPU (where this suite
    runs on CUDA tensors) an int32 row offset would read the wrong row or fault.
    """
    V = 1024
    storage = torch.empty(2**31 + 4 * V, dtype=torch.bfloat16, device=device)  # untouched pages cost nothing
    stride_t = (2**31 + 2 * V) // 2
    logits = storage.as_strided((1, 3, V), (3 * stride_t, stride_t, 1))
    logits.copy_(torch.randn(1, 3, V, device=device).to(torch.bfloat16))
    labels = torch.randint(0, V, (1, 3), device=device)
    check_parity(logits.detach(), labels)


def token_metrics64(logits, labels, mask):
    """Per-row sums over unmasked tokens of the entropy and of 1[first argmax == label], float64."""
    s = logits.double()
    logp = torch.log_softmax(s, -1)
    ent = -torch.where(logp.exp() > 0, logp.exp() * s, torch.zeros_like(s)).sum(-1) + torch.logsumexp(s, -1)
    top1 = (s.argmax(-1) == labels).double()
    return (ent * mask).sum(-1), (top1 * mask).sum(-1)


@pytest.mark.parametrize("V", [5, 300, TILE + 77])
def test_token_metrics(backend, device, V):
    """Entropy and top-1 accumulated in the same pass match float64 (TRL's entropy, mean_token_accuracy)."""
    from fastdpo.logps import sequence_stats

    logits, labels, mask = make_inputs(3, 4, V, torch.bfloat16, device)
    labels[:, ::2] = logits.float().argmax(-1)[:, ::2]  # every other label is the top-1 token
    mask[:, 0] = True  # so each row has at least one counted top-1 hit
    stats = sequence_stats(logits, labels, mask=mask, token_metrics=True)
    ent, top1 = token_metrics64(logits, labels, mask)
    assert_close_rel(stats.entropy_sums, ent, 2e-6, "entropy sums")
    assert torch.equal(stats.top1_counts.double().cpu(), top1.cpu())
    assert (stats.top1_counts >= 1).all()  # the hits placed above are counted (not only the float64 oracle's)


def test_top1_takes_the_first_maximum(backend, device):
    """Ties go to the earliest index, within a tile and across tiles, as torch.argmax does."""
    from fastdpo.logps import sequence_stats

    V = TILE + 100
    logits = torch.zeros(1, 4, V, device=device)
    logits[0, :, [10, 20, TILE + 2]] = 9.0  # the same maximum at 10, 20 (one tile) and TILE + 2 (the next)
    logits[0, 3, :TILE] = float("-inf")  # a whole -inf tile before the maximum
    labels = torch.tensor([[10, 20, TILE + 2, TILE + 2]], device=device)
    counts = [sequence_stats(logits[:, t : t + 1], labels[:, t : t + 1], token_metrics=True).top1_counts.item()
              for t in range(4)]
    assert counts == [1.0, 0.0, 0.0, 1.0]
    ent = sequence_stats(logits[:, 3:], labels[:, 3:], token_metrics=True).entropy_sums
    assert torch.isfinite(ent).all()
    assert_close_rel(ent, token_metrics64(logits[:, 3:], labels[:, 3:], torch.ones(1, 1, device=device))[0],
                     1e-6, "entropy with a -inf tile")


def test_value_checks_off(backend, device):
    """With the label checks off nothing is read on the host: a label >= V gives NaN for its row
    (never a read past the row), a negative one counts as masked, and the other rows are exact."""
    logits, labels, mask = make_inputs(3, 5, 37, torch.float32, device)
    mask[:] = True
    labels[0, 2] = 37  # out of range
    labels[2, 1] = 2**32 + 3  # out of range by more than int32 holds: must not wrap into [0, 37)
    labels[1, 4] = -5  # negative, not ignore_index: masked when unchecked
    with fastdpo.value_checks(False):
        out = fastdpo.sequence_logps(logits, labels)
    assert fastdpo.validation.value_checks_enabled()  # restored
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    expected = seq_logps64(logits, labels.clamp(0, 36), labels >= 0)
    assert_close_rel(out[1], expected[1], 1e-6, "unchecked row")
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        fastdpo.sequence_logps(logits, labels)


def test_scalar_split_keeps_fp64_precision():
    """Temperature and soft-cap reach the kernels as two fp32 halves: together ~48 bits."""
    from fastdpo.kernels.token_logps import _split

    for x in (1 / 0.7, 30.3, 1e-3 / 3, 1.0):
        hi, lo = _split(x)
        assert abs((hi + lo) - x) <= 1e-14 * abs(x)


@pytest.mark.parametrize("V,offset", [(5, 0), (5, 4), (37, 11)])
def test_backward_on_a_vocabulary_slab(backend, device, V, offset):
    """The backward of the columns [offset, offset + V) of wider rows, given the whole rows'
    logsumexp (what the fused linear pass hands over, slab by slab): the one-hot term sits at
    column label - offset, and a label outside the slab (below or above it) adds none."""
    from fastdpo.backend import get_backend

    full = 4.0 * torch.randn(2, 3, offset + V + 9, device=device, dtype=torch.float64)
    labels = torch.randint(0, full.shape[-1], (6,), device=device)
    labels[:3] = torch.tensor([offset + V + 3, offset + 2, max(offset - 1, offset + V)])  # above, inside, outside
    labels[3] = -1  # masked: zero
    lse = torch.logsumexp(full, -1).reshape(-1)
    p_label = full.reshape(6, -1).softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    state = torch.stack([lse, 1 - p_label], 1)  # the whole rows' (logsumexp, 1 - p_label)
    g = torch.randn(6, device=device, dtype=torch.float64)
    slab = full[..., offset : offset + V].contiguous()
    dz = get_backend(torch.device(device)).token_logps_backward(slab, labels, state, g, label_offset=offset)
    one_hot = torch.nn.functional.one_hot(labels.clamp(min=0), full.shape[-1])[:, offset : offset + V]
    want = g[:, None] * (one_hot.double() - torch.exp(slab.reshape(6, V) - lse[:, None]))
    want[3] = 0
    assert_close_rel(dz.reshape(6, V), want, 1e-12, "slab gradient")


@pytest.mark.parametrize("V,offset", [(5, 0), (37, 11)])
def test_forward_on_a_vocabulary_slab(backend, device, V, offset):
    """The slab forward: the label's score (0 when the label is outside the slab), the slab's
    logsumexp, score sum, entropy and max, and whether the label is the slab's first maximum."""
    from fastdpo.backend import get_backend

    full = 4.0 * torch.randn(2, 4, offset + V + 9, device=device)
    labels = torch.randint(offset, offset + V, (8,), device=device)
    labels[:3] = torch.tensor([offset + V + 3, max(offset - 1, offset + V), -1])  # above, outside, masked
    slab = full[..., offset : offset + V]  # a strided view: the kernels take any strides
    column = labels[3] - offset
    slab.reshape(8, V)[3, column] = slab.reshape(8, V)[3].max() + 1  # row 3: the label is the maximum
    s = slab.reshape(8, V).double() / 0.7
    options = TokenOptions(inv_temp=1 / 0.7, sum_scores=True, token_metrics=True)
    out = get_backend(torch.device(device)).token_slab_forward(slab, labels, offset, options)
    score, state, zsum, ent, top1, top = (out.label_scores, out.state, out.score_sums, out.entropy, out.top1,
                                          out.max_scores)
    lse, rest = state.unbind(1)
    valid = labels >= 0
    inside = valid & (labels >= offset) & (labels < offset + V)
    want_score = torch.where(inside, s.gather(1, (labels - offset).clamp(0, V - 1)[:, None]).squeeze(1), 0.0)
    logp = s.log_softmax(-1)
    p_label = logp.exp().gather(1, (labels - offset).clamp(0, V - 1)[:, None]).squeeze(1)
    not_label = 1 - torch.where(inside, p_label, 0.0)
    checks = {"label score": (score, want_score), "lse": (lse, torch.logsumexp(s, -1)), "zsum": (zsum, s.sum(-1)),
              "slab mass not the label": (rest, not_label),
              "entropy": (ent, -(logp.exp() * logp).sum(-1)), "max": (top, s.max(-1).values)}
    for name, (got, want) in checks.items():
        assert_close_rel(got[valid], want[valid], 2e-6, name)
    assert torch.equal(top1[valid].cpu(), (s.argmax(-1) == labels - offset)[valid].double().cpu().to(top1.dtype))
    assert top1[3].item() == 1.0 and score[2].item() == 0.0


def test_confident_tokens_exact_gradient(backend, device):
    """1 - p_label from 1e-1 down to 1e-7: the label column's gradient g * (1 - p_label) and the
    saved 1 - p_label stay exact to fp32 rounding (computed as 1 - exp(logp) they would lose every
    digit at 1e-7), labels in the first and in the second vocabulary tile."""
    from fastdpo.backend import get_backend

    V, rows = TILE + 37, 2 * len(CONFIDENT_GAPS)
    gaps = torch.tensor(CONFIDENT_GAPS * 2, dtype=torch.float64)
    labels = torch.cat([torch.randint(0, TILE, (rows // 2,)), torch.randint(TILE, V, (rows // 2,))]).to(device)
    logits = confident_logits(labels, V, gaps).float().view(2, rows // 2, V)  # the fp32 inputs
    flat_labels = labels.view(2, rows // 2)

    state = get_backend(torch.device(device)).token_logps_forward(logits, labels.to(torch.int32)).state
    want_rest = not_label_mass64(logits.view(rows, V), labels)
    assert (want_rest / gaps - 1).abs().max() < 0.5  # the inputs are as confident as meant
    rel = ((state[:, 1].double() - want_rest) / want_rest).abs().max().item()
    assert rel < 1e-5, f"saved 1 - p_label: relative error {rel:.2g}"

    x64 = logits.double().requires_grad_()
    g = torch.randn(2, device=device, dtype=torch.float64)
    (seq_logps64(x64, flat_labels) * g).sum().backward()
    got = torch.autograd.grad((fastdpo.sequence_logps(logits.requires_grad_(), flat_labels) * g.float()).sum(),
                              logits)[0]
    at = labels.view(rows, 1)
    label_got, label_want = got.view(rows, V).gather(1, at).double(), x64.grad.view(rows, V).gather(1, at)
    rel = ((label_got - label_want) / label_want).abs().max().item()
    assert rel < 1e-5, f"label column gradient: relative error {rel:.2g}"
    elementwise = ((got.double() - x64.grad) / x64.grad).abs().max().item()  # every column, each to itself
    assert elementwise < 5e-5, f"gradient: largest relative error of one element {elementwise:.2g}"
