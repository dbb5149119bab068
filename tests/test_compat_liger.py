"""fastdpo.compat.liger against Liger-Kernel's documented fused-linear DPO contract.

The reference below is written here from Liger-Kernel 0.8's LigerFusedLinearPreferenceBase and
LigerFusedLinearDPOFunction as documented there: logits = input @ W^T + b, float log-softmax,
label log-probs summed over non-ignored targets (or averaged, ``average_log_prob``), the same for
the reference model under no_grad, the chosen NLL as the sum of token NLLs over the number of
chosen targets, the mean logit of each half over every position and vocabulary entry, and the
per-loss formulas of its preference_loss_fn (sigmoid ignores label_smoothing there). It runs in
float64 on materialized logits and shares no code with fastdpo.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fastdpo.compat.liger import LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss, liger_fused_linear_dpo
from oracle64 import assert_close_rel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
LIGER_TYPES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
               "apo_down", "discopop"]


def liger_pair_losses(loss_type, chosen, rejected, ref_chosen, ref_rejected, beta, eps, tau):
    cr, rr = chosen - ref_chosen, rejected - ref_rejected
    z = beta * (cr - rr)
    ls = F.logsigmoid
    if loss_type == "sigmoid":
        return -ls(z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "exo_pair":
        qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
        return qw * (ls(z) - torch.log1p(torch.tensor(-eps, dtype=z.dtype))) + ql * (ls(-z) - torch.log(
            torch.tensor(eps, dtype=z.dtype)))
    if loss_type == "nca_pair":
        return -ls(beta * cr) - 0.5 * ls(-beta * cr) - 0.5 * ls(-beta * rr)
    if loss_type == "robust":
        return (-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -ls(beta * cr) - ls(-beta * rr)
    if loss_type == "sppo_hard":
        return (cr - 0.5 / beta) ** 2 + (rr + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * cr) + torch.sigmoid(beta * rr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * cr) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        mod = torch.sigmoid(z / tau)
        return -ls(z) * (1 - mod) + torch.exp(-z) * mod
    raise KeyError(loss_type)


def liger_reference(_input, weight, target, bias, ref_input, ref_weight, ref_bias, *, ignore_index=-100,
                    beta=0.1, alpha=1.0, compute_nll_loss=False, use_ref_model=True, average_log_prob=False,
                    loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05):
    P, T = target.shape[0] // 2, target.shape[1]
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)

    def forward(h, w, b):
        logits = h @ w.T
        if b is not None:
            logits = logits + b
        logp = torch.log_softmax(logits, -1)
        tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
        rows = tok.sum(-1) / valid.sum(-1) if average_log_prob else tok.sum(-1)
        return rows, logits, tok

    rows, logits, tok = forward(_input, weight, bias)
    if use_ref_model:
        with torch.no_grad():
            ref_rows, _, _ = forward(ref_input, ref_weight, ref_bias)
    else:
        ref_rows = torch.zeros_like(rows)
    nll = -tok[:P].sum() / valid[:P].sum() if compute_nll_loss else torch.zeros((), dtype=rows.dtype)
    losses = liger_pair_losses(loss_type, rows[:P], rows[P:], ref_rows[:P], ref_rows[P:], beta,
                               label_smoothing, discopop_tau)
    loss = losses.sum() / P + alpha * nll
    V = weight.shape[0]
    aux = (rows[:P], rows[P:], logits[:P].sum() / (P * T * V), logits[P:].sum() / (P * T * V), nll,
           beta * (rows[:P] - ref_rows[:P]), beta * (rows[P:] - ref_rows[P:]))
    return loss, aux


def make_inputs(P=3, T=6, H=8, V=29, *, bias=True, ref_bias=True, ignore_index=-100, dtype=F64):
    g = lambda *s, scale=1.0: (scale * torch.randn(*s, device=DEVICE)).to(dtype)  # noqa: E731
    target = torch.randint(0, V, (2 * P, T), device=DEVICE)
    drop = torch.rand(2 * P, T, device=DEVICE) < 0.4
    drop[:, 0] = True  # a prompt position in every row ...
    drop[:, -1] = False  # ... and at least one scored token
    target[drop] = ignore_index
    _input, weight = g(2 * P, T, H), g(V, H, scale=0.5)
    return dict(
        _input=_input, weight=weight, target=target,
        bias=g(V, scale=0.3) if bias else None,
        ref_input=_input + g(2 * P, T, H, scale=0.3), ref_weight=weight + g(V, H, scale=0.05),
        ref_bias=g(V, scale=0.3) if ref_bias else None,
    )


AUX = ["chosen_logps", "rejected_logps", "chosen_logits_mean", "rejected_logits_mean", "nll_loss",
       "chosen_rewards", "rejected_rewards"]

# Every Liger loss type, with the other options rotated so that each is on and off somewhere.
CASES = [
    ("sigmoid", dict(beta=0.3)),
    ("sigmoid", dict(average_log_prob=True, compute_nll_loss=True, alpha=0.7, label_smoothing=0.2)),
    ("hinge", dict(beta=0.5, ignore_index=-1, average_log_prob=True)),
    ("exo_pair", dict(label_smoothing=1e-3, compute_nll_loss=True)),
    ("nca_pair", dict(use_ref_model=False, average_log_prob=True)),
    ("robust", dict(label_smoothing=0.2, ignore_index=7, compute_nll_loss=True, alpha=0.0)),
    ("bco_pair", dict(average_log_prob=True, use_ref_model=False, compute_nll_loss=True)),
    ("sppo_hard", dict(beta=0.5, average_log_prob=True)),
    ("apo_zero", dict(ignore_index=-1)),
    ("apo_down", dict(average_log_prob=True, compute_nll_loss=True, alpha=2.0)),
    ("discopop", dict(beta=0.2, discopop_tau=0.3, average_log_prob=True)),
    ("discopop", dict()),
]
BIASES = [(True, True), (True, False), (False, True), (False, False)]


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_module_matches_liger_formula_float64(case):
    loss_type, options = CASES[case]
    bias, ref_bias = BIASES[case % len(BIASES)]
    ignore_index = options.get("ignore_index", -100)
    x = make_inputs(bias=bias, ref_bias=ref_bias, ignore_index=ignore_index)
    leaves = {k: (v.clone().requires_grad_(True) if k in ("_input", "weight", "bias") and v is not None else v)
              for k, v in x.items()}
    refs = {k: (v.clone().requires_grad_(True) if k in ("_input", "weight", "bias") and v is not None else v)
            for k, v in x.items()}
    module = LigerFusedLinearDPOLoss(loss_type=loss_type, **options)
    loss, aux = module(leaves["weight"], leaves["_input"], leaves["target"], leaves["bias"],
                       leaves["ref_input"], leaves["ref_weight"], leaves["ref_bias"])
    expected, expected_aux = liger_reference(refs["_input"], refs["weight"], refs["target"], refs["bias"],
                                             refs["ref_input"], refs["ref_weight"], refs["ref_bias"],
                                             loss_type=loss_type, **options)
    assert_close_rel(loss, expected, 1e-10, "loss")
    assert len(aux) == 7
    for name, got, want in zip(AUX, aux, expected_aux):
        assert not got.requires_grad, name
        assert got.shape == want.shape, name
        assert_close_rel(got, want, 1e-10, name)
    ours = _grads(loss, leaves["_input"], leaves["weight"], leaves["bias"])
    theirs = _grads(expected, refs["_input"], refs["weight"], refs["bias"])
    for name, got, want in zip(["_input", "weight", "bias"], ours, theirs):
        assert_close_rel(got, want, 1e-9, f"d loss / d {name}")


def test_float32_and_triton_kernels(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    x = make_inputs(P=2, T=5, H=8, V=37, dtype=torch.float32)
    options = dict(loss_type="apo_down", average_log_prob=True, compute_nll_loss=True, beta=0.4)
    w = x["weight"].clone().requires_grad_(True)
    loss, aux = LigerFusedLinearDPOLoss(**options)(w, x["_input"], x["target"], x["bias"], x["ref_input"],
                                                   x["ref_weight"], x["ref_bias"])
    w64 = x["weight"].double().requires_grad_(True)
    x64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
    expected, expected_aux = liger_reference(x64["_input"], w64, x64["target"], x64["bias"], x64["ref_input"],
                                             x64["ref_weight"], x64["ref_bias"], **options)
    assert_close_rel(loss, expected, 1e-5, "loss")
    for name, got, want in zip(AUX, aux, expected_aux):
        assert got.dtype == torch.float32, name
        assert_close_rel(got, want, 1e-5, name)
    loss.backward()
    expected.backward()
    assert_close_rel(w.grad, w64.grad, 1e-5, "d loss / d weight")


@pytest.mark.parametrize("compute_nll_loss", [False, True])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_same_inputs_through_fastdpo_api(compute_nll_loss, average_log_prob):
    """The entry point and fastdpo's own API from materialized logits (a different path: the
    logits kernels, not the fused-linear pass) agree on loss, per-row outputs and gradients."""
    x = make_inputs(ignore_index=-5)
    beta, alpha = 0.25, 0.6
    leaves = [x[k].clone().requires_grad_(True) for k in ("_input", "weight", "bias")]
    loss, aux = liger_fused_linear_dpo(*leaves[:2], x["target"], leaves[2], x["ref_input"], x["ref_weight"],
                                       x["ref_bias"], -5, beta, compute_nll_loss, True, True, average_log_prob,
                                       1, "bco_pair", 0.0, 0.05, alpha)
    h, w, b = [x[k].clone().requires_grad_(True) for k in ("_input", "weight", "bias")]
    ref_logits = x["ref_input"] @ x["ref_weight"].T + x["ref_bias"]
    api_loss, metrics, rows = fastdpo.fused_dpo_loss(
        h @ w.T + b, x["target"], ref_logits=ref_logits, ignore_index=-5, beta=beta,
        loss_type=["bco_pair", "sft"] if compute_nll_loss else "bco_pair",
        loss_weights=[1.0, alpha] if compute_nll_loss else None,
        logps_reduction="mean" if average_log_prob else "sum", return_metrics=True, return_rows=True)
    P = x["target"].shape[0] // 2
    assert_close_rel(loss, api_loss, 1e-10, "loss")
    assert_close_rel(aux[0], rows.logps[:P], 1e-10, "chosen_logps")
    assert_close_rel(aux[1], rows.logps[P:], 1e-10, "rejected_logps")
    assert_close_rel(aux[5], rows.chosen_rewards, 1e-10, "chosen_rewards")
    assert_close_rel(aux[6], rows.rejected_rewards, 1e-10, "rejected_rewards")
    assert_close_rel(aux[4], metrics["nll_loss"] if compute_nll_loss else torch.zeros(()), 1e-10, "nll_loss")
    for name, got, want in zip(["_input", "weight", "bias"], _grads(loss, *leaves), _grads(api_loss, h, w, b)):
        assert_close_rel(got, want, 1e-9, f"d loss / d {name}")
    # The README's row: the same call spelled with fastdpo.fused_linear_dpo_loss.
    linear_loss, linear_rows = fastdpo.fused_linear_dpo_loss(
        x["_input"], x["weight"], x["target"], bias=x["bias"], ref_hidden=x["ref_input"],
        ref_weight=x["ref_weight"], ref_bias=x["ref_bias"], ignore_index=-5, beta=beta,
        loss_type=["bco_pair", "sft"] if compute_nll_loss else "bco_pair",
        loss_weights=[1.0, alpha] if compute_nll_loss else None,
        logps_reduction="mean" if average_log_prob else "sum", return_rows=True)
    assert_close_rel(linear_loss, loss, 1e-12, "fused_linear_dpo_loss loss")
    assert_close_rel(linear_rows.logps[:P], aux[0], 1e-12, "fused_linear_dpo_loss rows")


def test_function_apply_and_module_agree():
    x = make_inputs()
    args = (x["_input"], x["weight"], x["target"], x["bias"], x["ref_input"], x["ref_weight"], x["ref_bias"])
    a = LigerFusedLinearDPOFunction.apply(*args, -100, 0.2, True, True, True, True, 1, "hinge", 0.0, 0.05, 0.5)
    m = LigerFusedLinearDPOLoss(beta=0.2, alpha=0.5, compute_nll_loss=True, average_log_prob=True,
                                loss_type="hinge")(x["weight"], x["_input"], x["target"], x["bias"],
                                                   x["ref_input"], x["ref_weight"], x["ref_bias"])
    assert torch.equal(a[0], m[0])
    assert all(torch.equal(p, q) for p, q in zip(a[1], m[1]))


def test_reference_model_off_reads_no_reference():
    x = make_inputs()
    fn = LigerFusedLinearDPOLoss(use_ref_model=False)
    with_ref = fn(x["weight"], x["_input"], x["target"], x["bias"], x["ref_input"], x["ref_weight"])
    without = fn(x["weight"], x["_input"], x["target"], x["bias"])
    assert torch.equal(with_ref[0], without[0])
    assert torch.equal(without[1][5], 0.1 * without[1][0])  # rewards = beta * policy log-probs


@pytest.mark.parametrize("options,error,match", [
    (dict(loss_type="ipo_typo"), ValueError, "unknown loss_type 'ipo_typo'"),
    (dict(loss_type="simpo"), ValueError, "not a DPO loss"),
    (dict(loss_type="exo_pair"), ValueError, "exo_pair"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "robust"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(compute_nll_loss=1), TypeError, "compute_nll_loss"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index"),
])
def test_bad_options_fail_at_construction(options, error, match):
    with pytest.raises(error, match=match):
        LigerFusedLinearDPOLoss(**options)


def test_reference_model_without_ref_input_fails():
    x = make_inputs()
    with pytest.raises(ValueError, match="use_ref_model=True needs ref_input"):
        LigerFusedLinearDPOLoss()(x["weight"], x["_input"], x["target"])
