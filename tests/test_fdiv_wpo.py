"""f-divergences, WPO weights and WPO's per-token statistic against float64 references written here.

- log sum_v p_v^2 per token (WPO, TRL's `log_sum_sq_probs`) from the forward pass of the Triton
  kernel (interpreted on CPU) and of its PyTorch twin, through vocabulary slabs too, against
  log_softmax in float64 on the materialized scores.
- fused_dpo_loss / fused_linear_dpo_loss with f_divergence_type and use_weighting against float64
  losses written from the f-DPO paper (Wang et al., 2023, arXiv:2309.16240: f'(u) of each
  divergence, shifted so that f'(1) = 0 as TRL does) and the WPO paper (Zhou et al., 2024,
  arXiv:2406.11827, Eq. 2: w = exp(mean_t log(p(y_t) / sum_v p(v)^2)), pair weight w_c w_r,
  detached), values and gradients.
- The refusals: the loss types an f-divergence is not defined for, WPO with batch-sorting losses.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fastdpo import fused_dpo_loss, fused_linear_dpo_loss
from fastdpo.kernels import TokenOptions
from fastdpo.linear import linear_sequence_stats
from fastdpo.logps import sequence_stats
from fastdpo.losses import LossConfig
from oracle64 import scores64, seq_logps64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def log_sum_sq64(logits, temperature=1.0, softcap=None):
    """log sum_v softmax(s)_v^2 per token, float64, from the log-softmax itself (not the kernels' form)."""
    return torch.logsumexp(2 * scores64(logits, temperature, softcap).log_softmax(-1), -1)


def random_batch(B=4, T=5, V=37, scale=3.0, offset=0.0, dtype=torch.float32):
    logits = (torch.randn(B, T, V, device=DEVICE) * scale + offset).to(dtype)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, :1] = -100  # a masked prompt position per row
    labels[0, 2:] = -100
    return logits, labels


# ---- the per-token statistic ------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1000.0])  # logits far from 0: nothing of their size may cancel
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 4.0)])
def test_log_sum_sq_tokens_match_float64(backend, offset, temperature, softcap):
    from fastdpo.backend import get_backend

    logits, labels = random_batch(V=300, offset=offset)
    flat = labels.flatten().masked_fill(labels.flatten() < 0, -1).to(torch.int32)
    options = TokenOptions(inv_temp=1.0 / temperature, softcap=softcap, log_sum_sq=True)
    # Several tiles per row on the kernels: the online rescaling is exercised.
    launch = dict(block_v=64) if backend == "triton" else {}
    out = get_backend(logits.device).token_logps_forward(logits, flat, options, **launch)
    logp, lss = out.logps, out.log_sum_sq
    expected = log_sum_sq64(logits, temperature, softcap).flatten()
    valid = flat >= 0
    torch.testing.assert_close(lss[valid].double(), expected[valid], rtol=1e-5, atol=2e-6)
    assert (lss[~valid] == 0).all()
    # The flag adds an output and changes nothing else.
    plain = get_backend(logits.device).token_logps_forward(logits, flat, replace(options, log_sum_sq=False), **launch)
    assert plain.log_sum_sq is None
    torch.testing.assert_close(logp, plain.logps, rtol=0, atol=0)


def test_log_sum_sq_row_sums_from_logits(backend):
    logits, labels = random_batch(V=50)
    stats = sequence_stats(logits, labels, log_sum_sq=True)
    valid = labels != -100
    expected = (log_sum_sq64(logits) * valid).sum(-1)
    torch.testing.assert_close(stats.log_sum_sq_sums.double(), expected, rtol=1e-5, atol=1e-5)
    assert sequence_stats(logits, labels).log_sum_sq_sums is None


@pytest.mark.parametrize("vocab_chunk_size", [None, 16])  # 16: four slabs of V = 61, merged per token
def test_log_sum_sq_row_sums_fused_linear(backend, vocab_chunk_size):
    B, T, H, V = 4, 5, 8, 61
    hidden = torch.randn(B, T, H, device=DEVICE)
    weight = torch.randn(V, H, device=DEVICE)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[1, :3] = -100
    stats = linear_sequence_stats(hidden, weight, labels, log_sum_sq=True, chunk_size=7,
                                  vocab_chunk_size=vocab_chunk_size)
    logits64 = hidden.double() @ weight.double().t()
    expected = (log_sum_sq64(logits64) * (labels != -100)).sum(-1)
    torch.testing.assert_close(stats.log_sum_sq_sums.double(), expected, rtol=1e-5, atol=1e-5)


# ---- the losses -------------------------------------------------------------------------------
def f_prime64(u: torch.Tensor, kind: str, a: float) -> torch.Tensor:
    """f'(u) of the f-DPO paper's divergences minus f'(1) (TRL's scores vanish at u = 1), u = pi / pi_ref.

    reverse KL f = u log u; forward KL f = -log u; Jensen-Shannon f = u log u - (u + 1) log((u + 1) / 2);
    alpha divergence f'(u) = (1 - u^-alpha) / alpha, whose alpha is 1 - a for TRL's coefficient a.
    """
    if kind == "reverse_kl":
        f = lambda x: torch.log(x) + 1  # noqa: E731
    elif kind == "forward_kl":
        f = lambda x: -1 / x  # noqa: E731
    elif kind == "js_divergence":
        f = lambda x: torch.log(x) + 1 - torch.log((x + 1) / 2) - 1  # noqa: E731
    else:
        alpha = 1 - a
        f = lambda x: (1 - x ** (-alpha)) / alpha  # noqa: E731
    return f(u) - f(torch.ones_like(u))


def loss64(logps, ref, counts, loss_type, kind, a, beta, weights=None):
    P = logps.shape[0] // 2
    u = torch.exp(logps - ref)  # the density ratio itself, then f'
    score = f_prime64(u, kind, a)
    if loss_type in ("ipo", "sigmoid_norm"):
        margin = score[:P] / counts[:P].clamp(min=1) - score[P:] / counts[P:].clamp(min=1)
    else:
        margin = score[:P] - score[P:]
    per_pair = {
        "sigmoid": lambda m: torch.nn.functional.softplus(-beta * m),  # -log sigmoid
        "hinge": lambda m: torch.clamp(1 - beta * m, min=0),
        "ipo": lambda m: (m - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": lambda m: torch.nn.functional.softplus(-beta * m),
    }[loss_type](margin)
    return (per_pair * (1.0 if weights is None else weights)).mean()


def wpo_weights64(logits, labels):
    """Eq. 2 of WPO with TRL's length normalization, from the float64 log-softmax: detached."""
    logp_all = scores64(logits).log_softmax(-1)
    valid = labels != -100
    logp = logp_all.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    per_token = logp - torch.logsumexp(2 * logp_all, -1)
    w = torch.exp((per_token * valid).sum(-1) / valid.sum(-1).clamp(min=1)).detach()
    P = w.shape[0] // 2
    return w[:P] * w[P:]


F_CASES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3), ("alpha_divergence", 1.6),
           ("reverse_kl", 0.5)]


@pytest.mark.parametrize("kind,a", F_CASES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "sigmoid_norm"])
@pytest.mark.parametrize("use_weighting", [False, True])
def test_fused_dpo_loss_f_divergence_and_wpo_match_float64(loss_type, kind, a, use_weighting):
    logits, labels = random_batch(scale=1.0)
    ref_logps = seq_logps64(logits + 0.3 * torch.randn_like(logits), labels).float()
    x = logits.clone().requires_grad_(True)
    loss = fused_dpo_loss(x, labels, ref_logps, beta=0.5, loss_type=loss_type, f_divergence_type=kind,
                          f_alpha_divergence_coef=a, use_weighting=use_weighting)
    (grad,) = torch.autograd.grad(loss, x)
    x64 = logits.double().requires_grad_(True)
    counts = (labels != -100).sum(-1).double()
    weights = wpo_weights64(x64, labels) if use_weighting else None
    expected = loss64(seq_logps64(x64, labels), ref_logps.double(), counts, loss_type, kind, a, 0.5, weights)
    (grad64,) = torch.autograd.grad(expected, x64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,use_weighting", [("js_divergence", False), ("alpha_divergence", True),
                                                ("reverse_kl", True)])
def test_fused_linear_dpo_loss_f_divergence_and_wpo_match_float64(kind, use_weighting, monkeypatch):
    from fastdpo import linear_chunks

    recomputed = []
    recompute = linear_chunks.backward
    monkeypatch.setattr(linear_chunks, "backward", lambda *a, **k: recomputed.append(1) or recompute(*a, **k))
    B, T, H, V = 4, 5, 8, 29
    hidden = torch.randn(B, T, H, device=DEVICE, requires_grad=True)
    weight = torch.randn(V, H, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, V, (B, T), device=DEVICE)
    labels[:, 0] = -100
    with torch.no_grad():  # a reference near the policy: ratios u of order 1, as in training
        ref_logps = seq_logps64((hidden @ weight.t()) + 0.3 * torch.randn(B, T, V, device=DEVICE), labels).float()
    loss = fused_linear_dpo_loss(hidden, weight, labels, ref_logps, beta=0.3, f_divergence_type=kind,
                                 f_alpha_divergence_coef=0.4, use_weighting=use_weighting)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    logits64 = h64 @ w64.t()
    weights = wpo_weights64(logits64, labels) if use_weighting else None
    expected = loss64(seq_logps64(logits64, labels), ref_logps.double(), None, "sigmoid", kind, 0.4, 0.3, weights)
    grads64 = torch.autograd.grad(expected, (h64, w64))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-6)
    assert not recomputed  # the gradients were built in the forward, WPO's weights included (6 N H V)


def test_alpha_divergence_at_one_is_dpo():
    logits, labels = random_batch()
    ref = torch.randn(logits.shape[0], device=DEVICE) - 10
    plain = fused_dpo_loss(logits, labels, ref)
    for a in (1.0, 1.0 + 1e-7):
        assert fused_dpo_loss(logits, labels, ref, f_divergence_type="alpha_divergence",
                              f_alpha_divergence_coef=a).item() == plain.item()


@pytest.mark.parametrize("options,match", [
    (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "only defined for"),
    (dict(loss_type=["sigmoid", "apo_zero"], f_divergence_type="js_divergence"), r"\['apo_zero'\]"),
    (dict(loss_type="simpo", f_divergence_type="alpha_divergence"), "only defined for"),
    (dict(f_divergence_type="kl"), "f_divergence_type must be one of"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=math.inf), "f_alpha_divergence_coef"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True), "use_weighting"),
])
def test_refusals(options, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**options)


def test_wpo_needs_weights():
    from fastdpo.objective import loss_from_rows

    with pytest.raises(ValueError, match="use_weighting"):
        loss_from_rows(torch.zeros(4), torch.zeros(4), torch.ones(4), LossConfig(use_weighting=True))


# ---- the trainer: --loss-options reach every loss path ------------------------------------------
def test_trainer_loss_paths_agree_with_f_divergence_and_wpo(tmp_path):
    """fused, fused_linear and the eager reference (which takes WPO's statistic from a second
    log_softmax of the whole logits) give the same loss and gradients through the trainer's LossFn."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from train_helpers import tiny_config

    from fastdpo.layouts import PairTokens, build
    from fastdpo.trainer import ConfigError
    from fastdpo.trainer.loss import LossFn, attach_head, head_options, loss_config

    options = {"f_divergence_type": "js_divergence", "use_weighting": True}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 23, (4, 7)).tolist()
    pairs = [PairTokens(ids[i][:3], ids[i][3:], ids[i + 2][3:]) for i in range(2)]
    ref = -20 - torch.rand(4)
    results = []
    for impl in ("fused", "fused_linear", "reference"):
        for layout in ("padded", "shared"):
            cfg = tiny_config(tmp_path / impl, loss_type="ipo", loss_impl=impl, loss_options=options)
            attach_head(model, head_options(cfg))
            model.zero_grad()
            loss, _ = LossFn(cfg, False)(model, build(layout, pairs, range(2), pad_id=0), ref)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    unweighted = tiny_config(tmp_path / "plain", loss_type="ipo", loss_options={"f_divergence_type": "js_divergence"})
    attach_head(model, head_options(unweighted))
    plain, _ = LossFn(unweighted, False)(model, build("padded", pairs, range(2), pad_id=0), ref)
    assert not torch.allclose(plain.detach(), results[0][0], rtol=1e-3)  # the WPO weights were applied
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="only defined for"):
        loss_config(tiny_config(tmp_path / "bad", loss_type="nca_pair", loss_options={"f_divergence_type": "forward_kl"}))


def test_wpo_weights_a_batch_level_sft_term():
    """RPO with WPO: the sft term (token-mean NLL of the chosen answers, one value for the batch)
    enters each pair's loss, so it is multiplied by the mean pair weight."""
    logits, labels = random_batch(scale=1.0)
    ref = seq_logps64(logits + 0.3 * torch.randn_like(logits), labels).float()
    loss = fused_dpo_loss(logits, labels, ref, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7],
                          use_weighting=True)
    logps = seq_logps64(logits, labels)
    P = logps.shape[0] // 2
    w = wpo_weights64(logits, labels)
    d = (logps[:P] - ref[:P].double()) - (logps[P:] - ref[P:].double())
    nll = -logps[:P].sum() / (labels[:P] != -100).sum()
    expected = (w * torch.nn.functional.softplus(-0.1 * d)).mean() + 0.7 * nll * w.mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
