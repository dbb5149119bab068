"""The Triton kernels with several token rows a program ([ROWS, BLOCK_V] tiles, the short-vocabulary
launch setting) against float64 references written from the formulas, forward and backward.

Rows of one program mix live, masked and zero-gradient tokens, and the last program runs past the
end of the batch, since those are what a multi-row tile can get wrong while one row a program
cannot. Launch settings only exist for the Triton kernels, so these tests run them only (under
the interpreter on CPU).
"""

import pytest
import torch

from fastdpo.kernels import TokenOptions
from oracle64 import CONFIDENT_GAPS, assert_close_rel, confident_logits, not_label_mass64, scores64

pytestmark = pytest.mark.usefixtures("triton_only")

ROWS = [2, 4, 8]


@pytest.fixture
def triton_only(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")


def kernels():
    from fastdpo.kernels import token_logps

    return token_logps


def per_token64(logits, labels, temperature=1.0, softcap=None):
    """Float64 per-token results of [B, T, V] logits for flat labels (-1 = masked): what the
    forward returns, zeros where masked."""
    s = scores64(logits, temperature, softcap).reshape(labels.numel(), -1)
    live = labels >= 0
    at = labels.clamp(min=0).long()[:, None]
    logp_all = s.log_softmax(-1)
    p = logp_all.exp()
    lse = torch.logsumexp(s, -1)

    def masked(x):
        return torch.where(live, x, torch.zeros_like(x))

    return {
        "logps": masked(logp_all.gather(1, at).squeeze(1)),
        "lse": masked(lse),
        "rest": masked(p.scatter(1, at, 0.0).sum(-1)),
        "score_sums": masked(s.sum(-1)),
        "entropy": masked(-(p * logp_all).sum(-1)),
        "top1": masked((s.argmax(-1) == labels).double()),
        "log_sum_sq": masked(torch.log((p * p).sum(-1))),
    }


def grad64(logits, labels, g, temperature=1.0, softcap=None):
    """d sum_n g_n logp_n / d logits in float64 by autograd, zero rows where masked."""
    x = logits.detach().double().requires_grad_()
    s = scores64(x, temperature, softcap).reshape(labels.numel(), -1)
    live = labels >= 0
    logp = s.log_softmax(-1).gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1)
    (torch.where(live, logp, 0.0) * g.double()).sum().backward()
    return x.grad


def awkward_labels(N, V, device, gen):
    """Labels with masked runs that split programs (live and masked rows side by side), a fully
    masked stretch (whole programs with nothing to read) and live rows in the last, partial program."""
    labels = torch.randint(0, V, (N,), generator=gen).to(device=device, dtype=torch.int32)
    labels[1] = -1
    labels[5:7] = -1
    labels[8:24] = -1  # at least one whole program of masked rows for every ROWS <= 8
    return labels


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_backward(device, rows, dtype):
    """Every forward result and the backward, temperature and soft-cap on, several vocabulary tiles,
    shifted (non-contiguous) logits, N = 3 x 9 rows (not a multiple of ROWS)."""
    K = kernels()
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    B, T, V = 3, 9, 150
    full = 6.0 * torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64)
    logits = full.to(device=device, dtype=dtype)[:, :-1]  # row stride (T + 1) * V
    labels = awkward_labels(B * T, V, device, gen)
    options = TokenOptions(inv_temp=1 / 0.7, softcap=5.0, sum_scores=True, token_metrics=True, log_sum_sq=True)
    got = K.token_logps_forward(logits, labels, options, block_v=32, rows_per_program=rows)
    want = per_token64(logits, labels, 0.7, 5.0)
    rel = 1e-12 if dtype == torch.float64 else 5e-6
    lse, rest = got.state.unbind(1)
    for name, value in {"logps": got.logps, "lse": lse, "rest": rest, "score_sums": got.score_sums,
                        "entropy": got.entropy, "log_sum_sq": got.log_sum_sq}.items():
        assert_close_rel(value, want[name], rel, name)
    assert torch.equal(got.top1.double().cpu(), want["top1"].cpu())

    g = torch.randn(B * T, generator=gen, dtype=torch.float64).to(device=device, dtype=got.logps.dtype)
    g[3] = 0.0  # a live row whose loss ignores it: exactly zero, like a masked row
    dz = K.token_logps_backward(logits, labels, got.state, g, options, block_v=32, rows_per_program=rows)
    want_dz = grad64(logits, labels, g, 0.7, 5.0).view(B, T, V)
    assert_close_rel(dz, want_dz, 1e-12 if dtype == torch.float64 else 5e-6, "gradient")
    zero_rows = (labels < 0) | (g == 0)
    dead = dz.reshape(B * T, V)[zero_rows]
    assert torch.equal(dead, torch.zeros_like(dead)) and not dead.signbit().any(), "masked rows must be +0"


@pytest.mark.parametrize("rows", ROWS)
def test_in_place_backward(device, rows):
    """The gradient written over the logits, each tile read before it is overwritten."""
    K = kernels()
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    B, T, V = 2, 11, 77
    logits = (4.0 * torch.randn(B, T, V, generator=gen)).to(device)
    labels = awkward_labels(B * T, V, device, gen)
    state = K.token_logps_forward(logits, labels, block_v=16, rows_per_program=rows).state
    g = torch.randn(B * T, generator=gen).to(device)
    want = grad64(logits, labels, g)
    out = K.token_logps_backward(logits, labels, state, g, out=logits, block_v=16, rows_per_program=rows)
    assert out.data_ptr() == logits.data_ptr()
    assert_close_rel(out, want.view(B, T, V), 5e-6, "in-place gradient")


@pytest.mark.parametrize("rows", ROWS)
def test_vocabulary_slab(device, rows):
    """The slab forward (label score or 0, the slab's logsumexp, mass not the label, max) and the
    slab backward from the whole rows' state, labels inside, below and above the slab."""
    K = kernels()
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    N, offset, V, wide = 21, 13, 40, 70
    full = 4.0 * torch.randn(1, N, wide, generator=gen, dtype=torch.float64).to(device)
    labels = torch.randint(0, wide, (N,), generator=gen).to(device=device, dtype=torch.int32)
    labels[:3] = torch.tensor([offset + 2, offset - 1, offset + V + 5], dtype=torch.int32)
    labels[4:6] = -1
    slab = full[..., offset : offset + V]
    options = TokenOptions(token_metrics=True)
    got = K.token_slab_forward(slab, labels, offset, options, block_v=16, rows_per_program=rows)
    s = slab.reshape(N, V)
    live = labels >= 0
    column = (labels - offset).long()
    inside = live & (column >= 0) & (column < V)
    lse = torch.logsumexp(s, -1)
    p_label = torch.where(inside, (s.gather(1, column.clamp(0, V - 1)[:, None]).squeeze(1) - lse).exp(), 0.0)
    want = {"label_scores": torch.where(inside, s.gather(1, column.clamp(0, V - 1)[:, None]).squeeze(1), 0.0),
            "lse": lse, "rest": 1 - p_label, "max_scores": s.max(-1).values}
    got_values = {"label_scores": got.label_scores, "lse": got.state[:, 0], "rest": got.state[:, 1],
                  "max_scores": got.max_scores}
    for name, value in got_values.items():
        assert_close_rel(value[live], want[name][live], 1e-12, f"slab {name}")
    assert (got.max_scores[~live] == float("-inf")).all() and (got.state[~live] == 0).all()

    whole = torch.stack([torch.logsumexp(full[0], -1), 1 - torch.where(
        live, full[0].softmax(-1).gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1), 0.0)], 1)
    g = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    dz = K.token_logps_backward(slab, labels, whole, g, label_offset=offset, block_v=16, rows_per_program=rows)
    want_dz = grad64(full, labels, g).view(N, wide)[:, offset : offset + V]
    assert_close_rel(dz.view(N, V), want_dz, 1e-12, "slab gradient")


@pytest.mark.parametrize("rows", [4])
def test_confident_tokens(device, rows):
    """1 - p_label down to 1e-7 stays exact to fp32 rounding with several rows a program."""
    K = kernels()
    V, n = 300, 2 * len(CONFIDENT_GAPS)
    gaps = torch.tensor(CONFIDENT_GAPS * 2, dtype=torch.float64)
    labels = torch.randint(0, V, (n,)).to(device)
    logits = confident_logits(labels, V, gaps).float().view(1, n, V)
    state = K.token_logps_forward(logits, labels.to(torch.int32), block_v=64, rows_per_program=rows).state
    want = not_label_mass64(logits.view(n, V), labels)
    rel = ((state[:, 1].double() - want) / want).abs().max().item()
    assert rel < 1e-5, f"saved 1 - p_label: relative error {rel:.2g}"


def test_launch_settings_must_be_powers_of_two(device):
    K = kernels()
    logits = torch.randn(1, 4, 8, device=device)
    labels = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="rows_per_program must be a power of two, got 3"):
        K.token_logps_forward(logits, labels, rows_per_program=3)
    with pytest.raises(ValueError, match="block_v must be a power of two, got 48"):
        K.token_logps_backward(logits, labels, torch.zeros(4, 2, device=device), torch.ones(4, device=device),
                               block_v=48)


def test_default_tile_holds_as_many_elements_for_any_rows():
    """Several rows a program narrow the default tile, so its registers stay those of one row."""
    K = kernels()
    assert K._launch_config(32000, None, None, None, backward=False) == (K.MAX_BLOCK_V, 4, 1)
    assert K._launch_config(32000, None, None, 4, backward=False) == (K.MAX_BLOCK_V // 4, 4, 4)
    assert K._launch_config(32000, None, None, 4, backward=True) == (K.MAX_BLOCK_V // 4, 16, 4)
    assert K._launch_config(40, None, None, 8, backward=False)[:1] == (64,)
