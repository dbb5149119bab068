"""Other projects' conventions through fastdpo's API, and losses that stay finite.

- logps_reduction="mean" for every loss type that allows it, against the losses' paper formulas
  (tests/test_losses.py's float64 references) evaluated on per-token mean log-probs, as Liger's
  ``average_log_prob=True`` documents it; the NLL term stays a token mean over the batch.
- return_rows: the per-row log-probs, counts and per-pair rewards behind the metrics, detached.
- minimind's ``dpo_loss`` (masked sum, and the older masked mean), written here from its source.
- every loss finite, with finite gradients, for |beta * d| up to 1e4 in fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdpo
from fastdpo import FusedDPOLoss, FusedLinearDPOLoss, fused_dpo_loss, fused_linear_dpo_loss, sequence_logps
from fastdpo.objective import loss_from_rows
from fastdpo.losses import LOSSES, SELF_NORMALIZED, LossConfig
from oracle64 import assert_close_rel
from test_losses import CASES, IDS, F64, case_config, close, random_rows, oracle_loss, oracle_metrics, split_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SELF_NORM = {"ipo", "sigmoid_norm", "simpo", "orpo"}


def _types(loss_type):
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


MEAN_CASES = [(t, o) for t, o in CASES if not set(_types(t)) & SELF_NORM]
MEAN_IDS = [i for (t, _), i in zip(CASES, IDS) if not set(_types(t)) & SELF_NORM]


def per_token_means(x):
    """Liger's / minimind's row log-prob: the masked sum over the token count, policy and reference."""
    return type(x)(c=x.c / x.nc, r=x.r / x.nr, c0=x.c0 / x.nc, r0=x.r0 / x.nr, nc=x.nc, nr=x.nr)


def mean_reference(types, weights, x, hp):
    """The loss on per-token means; its NLL part (sft, cpo's alpha term) is the token mean of the
    chosen NLL over the batch, -sum(c) / sum(|c|), as Liger's compute_nll_loss and TRL define it."""
    nll = -x.c.sum() / x.nc.sum()
    m = per_token_means(x)
    total = 0.0
    for name, w in zip(types, weights):
        if name == "sft":
            term = nll
        elif name == "cpo":
            term = oracle_loss(["cpo"], [1.0], m, {**hp, "cpo_alpha": 0.0}) + hp["cpo_alpha"] * nll
        else:
            term = oracle_loss([name], [1.0], m, hp)
        total = total + w * term
    return total


def test_self_normalized_registry():
    assert SELF_NORMALIZED == SELF_NORM


@pytest.mark.parametrize("loss_type,options", MEAN_CASES, ids=MEAN_IDS)
def test_mean_reduction_every_loss_float64(loss_type, options):
    types, weights, hp = case_config(loss_type, options)
    cfg = LossConfig(loss_type=loss_type, logps_reduction="mean", **options)
    logps, ref, counts = random_rows(P=7)
    ours_in = logps.clone().requires_grad_(True)
    ref_in = logps.clone().requires_grad_(True)
    loss, metrics = loss_from_rows(ours_in, ref, counts, cfg, return_metrics=True)
    expected = mean_reference(types, weights, split_rows(ref_in, ref, counts), hp)
    close(loss, expected, 1e-10, 1e-12, "loss")
    (grad,) = torch.autograd.grad(loss, ours_in)
    (expected_grad,) = torch.autograd.grad(expected, ref_in)
    close(grad, expected_grad, 1e-9, 1e-12, "d loss / d logps")
    # Metrics as Liger reports them: logps and rewards from the per-token means; nll_loss from sums.
    x = split_rows(logps, ref, counts)
    want = oracle_metrics(types, per_token_means(x), hp)
    if "nll_loss" in want:
        want["nll_loss"] = -x.c.sum() / x.nc.sum()
    assert set(metrics) == set(want)
    for key, value in want.items():  # (the accuracy is a float32 mean, as in TRL)
        close(metrics[key], value, 1e-6 if key == "rewards/accuracies" else 1e-10, 1e-12, key)


def test_mean_sigmoid_is_sigmoid_norm():
    """Two routes to Tülu 3's length-normalized DPO: the named loss, and DPO on per-token means."""
    logps, ref, counts = random_rows(P=6)
    norm = loss_from_rows(logps, ref, counts, LossConfig(loss_type="sigmoid_norm", beta=2.0))
    mean = loss_from_rows(logps, ref, counts, LossConfig(loss_type="sigmoid", beta=2.0, logps_reduction="mean"))
    close(mean, norm, 1e-12, 1e-14, "loss")


@pytest.mark.parametrize("loss_type", sorted(SELF_NORM) + [["sigmoid", "ipo"]])
def test_self_normalized_losses_refuse_mean(loss_type):
    weights = {"loss_weights": [1.0, 1.0]} if isinstance(loss_type, list) else {}
    with pytest.raises(ValueError, match="divides by the completion-token count in its own definition"):
        LossConfig(loss_type=loss_type, logps_reduction="mean", **weights)
    LossConfig(loss_type=loss_type, logps_reduction="sum", **weights)  # the default is fine


def test_bad_reduction_fails_before_any_kernel(monkeypatch):
    monkeypatch.setattr(fastdpo.dpo, "layout_stats", lambda *a, **k: pytest.fail("a kernel ran"))
    logits = torch.randn(2, 3, 5, device=DEVICE)
    labels = torch.randint(0, 5, (2, 3), device=DEVICE)
    with pytest.raises(ValueError, match="logps_reduction must be 'sum' or 'mean', got 'avg'"):
        fused_dpo_loss(logits, labels, torch.zeros(2, device=DEVICE), logps_reduction="avg")
    with pytest.raises(ValueError, match="'ipo' divides by the completion-token count"):
        fused_dpo_loss(logits, labels, torch.zeros(2, device=DEVICE), loss_type="ipo", logps_reduction="mean")
    with pytest.raises(ValueError, match="'simpo' divides"):
        FusedDPOLoss(loss_type="simpo", logps_reduction="mean")


# ---------------------------------------------------------------- the kernel paths, from logits and hidden states

def _batch(P, T, V, H=None, ignore_index=-100):
    labels = torch.randint(0, V, (2 * P, T), device=DEVICE)
    drop = torch.rand(2 * P, T, device=DEVICE) < 0.35
    drop[:, -1] = False  # every row scores at least one token
    labels[drop] = ignore_index
    if H is None:
        return 2.0 * torch.randn(2 * P, T, V, device=DEVICE), labels
    return torch.randn(2 * P, T, H, device=DEVICE), 0.5 * torch.randn(V, H, device=DEVICE), labels


def _rows64(logits, labels, ignore_index=-100):
    """float64 per-row sums and counts from materialized logits: log_softmax, gather, masked sum."""
    valid = labels != ignore_index
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(-1), valid.sum(-1).double()


@pytest.mark.parametrize("loss_type,options", [("sigmoid", {"beta": 0.5}), ("apo_down", {}),
                                               ("aot", {"label_smoothing": 0.1}),
                                               (["sigmoid", "sft"], {"loss_weights": [1.0, 0.3]})])
def test_mean_reduction_from_logits(loss_type, options, backend):
    types, weights, hp = case_config(loss_type, options)
    logits, labels = _batch(3, 6, 19)
    ref_logits = logits + 0.5 * torch.randn_like(logits)
    leaf = logits.clone().requires_grad_(True)
    loss, metrics, rows = fused_dpo_loss(leaf, labels, ref_logits=ref_logits, loss_type=loss_type,
                                         logps_reduction="mean", return_metrics=True, return_rows=True, **options)
    leaf64 = logits.double().requires_grad_(True)
    logps64, counts = _rows64(leaf64, labels)
    ref64, _ = _rows64(ref_logits, labels)
    expected = mean_reference(types, weights, split_rows(logps64, ref64, counts), hp)
    assert_close_rel(loss, expected, 1e-5, "loss")
    loss.backward()
    expected.backward()
    assert_close_rel(leaf.grad, leaf64.grad, 1e-5, "d loss / d logits")
    assert_close_rel(rows.logps, logps64.detach() / counts, 1e-5, "rows.logps (per-token means)")
    assert_close_rel(rows.ref_logps, ref64 / counts, 1e-5, "rows.ref_logps")
    assert torch.equal(rows.counts.cpu(), counts.long().cpu())
    P = labels.shape[0] // 2
    mean64 = (logps64.detach() - ref64) / counts
    assert_close_rel(rows.chosen_rewards, hp["beta"] * mean64[:P], 1e-5, "rows.chosen_rewards")
    assert_close_rel(rows.rejected_rewards, hp["beta"] * mean64[P:], 1e-5, "rows.rejected_rewards")
    assert_close_rel(metrics["logps/chosen"], (logps64.detach() / counts)[:P].mean(), 1e-5, "logps/chosen")


@pytest.mark.parametrize("loss_type,options,grad_in_forward", [
    ("sigmoid", {}, None), ("bco_pair", {"bco_delta": 0.2}, True), ("sppo_hard", {}, False),
    ("aot_pair", {}, None), (["nca_pair", "sft"], {"loss_weights": [1.0, 0.5]}, True)])
def test_mean_reduction_fused_linear(loss_type, options, grad_in_forward):
    """The fused-linear path (grad-in-forward rebuilds the loss from its options: the reduction must
    travel with them) against float64 materialized logits."""
    types, weights, hp = case_config(loss_type, options)
    hidden, weight, labels = _batch(3, 5, 23, H=8)
    ref_hidden = hidden + 0.3 * torch.randn_like(hidden)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, rows = fused_linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden, loss_type=loss_type,
                                       logps_reduction="mean", grad_in_forward=grad_in_forward,
                                       return_rows=True, **options)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logps64, counts = _rows64(h64 @ w64.T, labels)
    ref64, _ = _rows64(ref_hidden.double() @ weight.double().T, labels)
    expected = mean_reference(types, weights, split_rows(logps64, ref64, counts), hp)
    assert_close_rel(loss, expected, 1e-5, "loss")
    loss.backward()
    expected.backward()
    assert_close_rel(h.grad, h64.grad, 1e-5, "d loss / d hidden")
    assert_close_rel(w.grad, w64.grad, 1e-5, "d loss / d weight")
    assert_close_rel(rows.logps, logps64.detach() / counts, 1e-5, "rows.logps")


# ---------------------------------------------------------------- return_rows

def test_rows_follow_the_metrics_and_are_detached():
    logits, labels = _batch(4, 5, 13)
    ref = torch.randn(8, device=DEVICE)
    leaf = logits.clone().requires_grad_(True)
    loss, metrics, rows = fused_dpo_loss(leaf, labels, ref, beta=0.3, return_metrics=True, return_rows=True)
    assert isinstance(rows, fastdpo.PreferenceRows)
    for name, value in rows._asdict().items():
        assert not value.requires_grad, name
    logps64, counts = _rows64(logits, labels)
    assert_close_rel(rows.logps, logps64, 1e-5, "rows.logps (sums)")
    assert torch.equal(rows.ref_logps, ref)
    assert rows.counts.dtype == torch.int64 and torch.equal(rows.counts.cpu(), counts.long().cpu())
    assert rows.chosen_rewards.shape == rows.rejected_rewards.shape == (4,)
    assert_close_rel(rows.chosen_rewards, 0.3 * (logps64[:4] - ref[:4].double()), 1e-5, "chosen rewards")
    # the metrics are batch means of the rows
    assert_close_rel(metrics["rewards/chosen"], rows.chosen_rewards.mean(), 1e-6, "rewards/chosen")
    assert_close_rel(metrics["rewards/margins"], (rows.chosen_rewards - rows.rejected_rewards).mean(), 1e-6,
                     "rewards/margins")
    assert_close_rel(metrics["logps/rejected"], rows.logps[4:].mean(), 1e-6, "logps/rejected")
    # the forms of the result
    assert isinstance(fused_dpo_loss(logits, labels, ref), torch.Tensor)
    only_rows = fused_dpo_loss(logits, labels, ref, beta=0.3, return_rows=True)
    assert len(only_rows) == 2 and isinstance(only_rows[1], fastdpo.PreferenceRows)
    assert_close_rel(only_rows[0], loss, 1e-6, "loss without metrics")


def test_reference_free_cpo_rows_are_policy_rewards():
    """For CPO (reference-free, its trainer's rewards = beta * policy log-probs) the rows say the same."""
    logps, ref, counts = random_rows(P=5)
    loss, rows = loss_from_rows(logps, ref, counts, LossConfig(loss_type="cpo", beta=0.4, logps_reduction="mean"),
                                return_rows=True)
    means = logps / counts
    close(rows.chosen_rewards, 0.4 * means[:5], 1e-12, 1e-14, "chosen rewards")
    close(rows.logps, means, 1e-12, 1e-14, "logps")


def test_modules_take_reduction_and_rows():
    hidden, weight, labels = _batch(2, 4, 11, H=6)
    ref = torch.randn(4, device=DEVICE)
    module = FusedLinearDPOLoss(beta=0.2, logps_reduction="mean", return_rows=True)
    loss, rows = module(hidden, weight, labels, ref)
    direct = fused_linear_dpo_loss(hidden, weight, labels, ref, beta=0.2, logps_reduction="mean")
    assert torch.equal(loss, direct)
    logits = hidden @ weight.T
    loss2, rows2 = FusedDPOLoss(beta=0.2, logps_reduction="mean", return_rows=True)(logits, labels, ref)
    assert_close_rel(loss2, loss, 1e-5, "from logits vs fused linear")
    assert_close_rel(rows2.logps, rows.logps, 1e-5, "rows")


def test_reference_impl_takes_reduction_and_rows():
    from fastdpo.eager import eager_dpo_loss

    logits, labels = _batch(3, 4, 9)
    ref = torch.randn(6, device=DEVICE)
    ours, rows = fused_dpo_loss(logits, labels, ref, loss_type="hinge", logps_reduction="mean", return_rows=True)
    eager, eager_rows = eager_dpo_loss(logits, labels, ref, loss_type="hinge", logps_reduction="mean",
                                           return_rows=True)
    assert_close_rel(ours, eager, 1e-5, "loss")
    assert_close_rel(rows.chosen_rewards, eager_rows.chosen_rewards, 1e-5, "rewards")


# ---------------------------------------------------------------- minimind

def minimind_logits_to_log_probs(logits, labels):
    """minimind trainer/train_dpo.py: log_softmax over the vocabulary, gathered at the labels."""
    return torch.gather(F.log_softmax(logits, dim=2), dim=2, index=labels.unsqueeze(2)).squeeze(-1)


def minimind_dpo_loss(ref_log_probs, policy_log_probs, mask, beta, mean):
    """minimind's dpo_loss: masked sum per row (current), or masked sum over the row's mask count
    clamped at 1e-8 (the older, length-normalized version); first half chosen; -log sigmoid(beta d)."""
    if mean:
        lengths = mask.sum(dim=1).clamp_min(1e-8)
        ref, pol = (ref_log_probs * mask).sum(dim=1) / lengths, (policy_log_probs * mask).sum(dim=1) / lengths
    else:
        ref, pol = (ref_log_probs * mask).sum(dim=1), (policy_log_probs * mask).sum(dim=1)
    half = ref.shape[0] // 2
    logits = (pol[:half] - pol[half:]) - (ref[:half] - ref[half:])
    return (-F.logsigmoid(beta * logits)).mean()


@pytest.mark.parametrize("mean", [False, True], ids=["masked_sum", "masked_mean"])
def test_minimind_dpo_loss(mean):
    """minimind's batch: x = ids[:-1], y = ids[1:], a float loss mask over y (1 on the answer);
    fastdpo takes y as labels, the mask as mask, and the reference as sequence_logps sums."""
    P, T, V = 3, 7, 17
    y = torch.randint(0, V, (2 * P, T), device=DEVICE)
    mask = (torch.rand(2 * P, T, device=DEVICE) < 0.6).float()
    mask[P - 1] = 0.0  # a chosen row without answer tokens: 0 in both conventions
    logits = torch.randn(2 * P, T, V, device=DEVICE)
    ref_logits = logits + 0.4 * torch.randn_like(logits)
    leaf, leaf64 = logits.clone().requires_grad_(True), logits.double().requires_grad_(True)

    reduction = "mean" if mean else "sum"
    ref_logps = sequence_logps(ref_logits, y, mask=mask)
    loss = fused_dpo_loss(leaf, y, ref_logps, mask=mask, beta=0.1, logps_reduction=reduction)
    with torch.no_grad():
        ref_lp = minimind_logits_to_log_probs(ref_logits.double(), y)
    expected = minimind_dpo_loss(ref_lp, minimind_logits_to_log_probs(leaf64, y), mask.double(), 0.1, mean)
    assert_close_rel(loss, expected, 1e-6, "loss")
    loss.backward()
    expected.backward()
    assert_close_rel(leaf.grad, leaf64.grad, 1e-6, "d loss / d logits")


# ---------------------------------------------------------------- finite for finite inputs

MARGINS = [-1e4, -3e3, -200.0, -89.0, -20.0, 0.0, 20.0, 89.0, 200.0, 3e3, 1e4]


def extreme_rows(beta: float, dtype: torch.dtype):
    """Rows whose pairs have beta * d across MARGINS (d = c - r, zero reference), 1 or 5 tokens a
    row, plus one pair of empty rows (log-prob 0, count 0)."""
    m = torch.tensor(MARGINS, dtype=F64)
    chosen = -1.0 - torch.relu(-m) / beta
    rejected = -1.0 - torch.relu(m) / beta
    n = len(MARGINS)
    counts = torch.where(torch.arange(2 * n) % 2 == 0, 1.0, 5.0).to(F64)
    logps = torch.cat([chosen, torch.zeros(1, dtype=F64), rejected, torch.zeros(1, dtype=F64)])
    counts = torch.cat([counts[:n], torch.zeros(1, dtype=F64), counts[n:], torch.zeros(1, dtype=F64)])
    return logps.to(dtype), torch.zeros_like(logps, dtype=dtype), counts


FINITE_CASES = [(t, o) for t, o in CASES] + [("discopop", {"discopop_tau": 1.0}), ("discopop", {"discopop_tau": 3.0}),
                                               ("orpo", {"beta": 1.0})]
FINITE_IDS = IDS + ["discopop-tau=1", "discopop-tau=3", "orpo-beta=1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type,options", FINITE_CASES, ids=FINITE_IDS)
def test_every_loss_is_finite_for_large_margins(loss_type, options, dtype):
    reductions = ["sum"] if set(_types(loss_type)) & SELF_NORM else ["sum", "mean"]
    for reduction in reductions:
        cfg = LossConfig(loss_type=loss_type, logps_reduction=reduction, **options)
        logps, ref, counts = extreme_rows(cfg.beta, dtype)
        x = logps.clone().requires_grad_(True)
        loss = loss_from_rows(x, ref, counts, cfg)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss), f"{reduction}: loss {loss.item()}"
        assert torch.isfinite(grad).all(), f"{reduction}: gradient {grad.tolist()}"


def test_every_loss_type_is_in_the_finite_test():
    assert {t for c, _ in FINITE_CASES for t in _types(c)} == set(LOSSES)


def test_discopop_matches_its_formula_where_that_is_finite_and_saturates_beyond():
    """float64: the rewritten discopop equals the paper's expression wherever that expression does
    not overflow (|z| up to 700); at tau > 1, past the float range, it stays finite and increasing."""
    z = torch.linspace(-700, 700, 2801, dtype=F64)
    for tau in (0.05, 1.0, 1.5):
        cfg = LossConfig(loss_type="discopop", beta=1.0, discopop_tau=tau)
        rows = torch.cat([z, torch.zeros_like(z)])
        ours = loss_from_rows(rows, torch.zeros_like(rows), torch.ones_like(rows), cfg)  # mean over pairs
        s = torch.sigmoid(z / tau)
        naive = (1 - s) * -F.logsigmoid(z) + s * torch.exp(-z)
        finite = torch.isfinite(naive)
        assert finite.all(), f"tau={tau}: the reference overflowed inside the tested range"
        each = torch.stack([loss_from_rows(torch.stack([zi, torch.zeros((), dtype=F64)]),
                                           torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), cfg)
                            for zi in z[::100]])
        close(each, naive[::100], 1e-12, 1e-300, f"tau={tau}")
        close(ours, naive.mean(), 1e-12, 0.0, f"tau={tau} mean")
    far = torch.tensor([-1e4, -2e3], dtype=torch.float32)
    cfg = LossConfig(loss_type="discopop", beta=1.0, discopop_tau=3.0)
    values = [loss_from_rows(torch.stack([v, torch.zeros(())]), torch.zeros(2), torch.ones(2), cfg) for v in far]
    assert all(torch.isfinite(v) for v in values), values
    assert min(v.item() for v in values) > 1e18  # saturated far beyond any real loss, not cut to 0


# ---------------------------------------------------------------- the trainer: --logps-reduction

def test_trainer_flag_reaches_the_loss(tmp_path):
    from train_helpers import tiny_config

    from fastdpo.trainer import ConfigError, DPOTrainer
    from fastdpo.trainer.config import parse_args
    from fastdpo.trainer.loss import LossFn, loss_config

    cfg = parse_args(["--logps-reduction", "mean", "--loss-type", "sigmoid,sft"])
    assert cfg.logps_reduction == "mean"
    assert loss_config(cfg).logps_reduction == "mean"
    assert LossFn(cfg, autocast=False).loss.logps_reduction == "mean"
    assert parse_args([]).logps_reduction == "sum"
    with pytest.raises(ConfigError, match="'ipo' divides by the completion-token count"):
        DPOTrainer(tiny_config(tmp_path / "a", loss_type="ipo", logps_reduction="mean"))
    with pytest.raises(ConfigError, match="give logps_reduction as --logps-reduction"):
        DPOTrainer(tiny_config(tmp_path / "b", loss_options={"logps_reduction": "mean"}))
    with pytest.raises(SystemExit):
        parse_args(["--logps-reduction", "avg"])


def test_trainer_trains_on_per_token_means(tmp_path):
    """Both loss paths train the same numbers with --logps-reduction mean, and its logged logps are
    per-token means (a few nats), not sequence sums."""
    from train_helpers import step_records, tiny_config

    from fastdpo.trainer import DPOTrainer

    for name, options in {"mean": dict(logps_reduction="mean"),
                          "mean-reference": dict(logps_reduction="mean", loss_impl="reference"),
                          "sum": dict()}.items():
        DPOTrainer(tiny_config(tmp_path / name, max_steps=2, **options)).train()
    mean, eager, total = (step_records(tmp_path / n) for n in ("mean", "mean-reference", "sum"))
    for step in (1, 2):
        assert mean[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5)
        assert mean[step]["logps/chosen"] == pytest.approx(eager[step]["logps/chosen"], rel=1e-5)
    assert mean[2]["loss"] != pytest.approx(total[2]["loss"], rel=1e-4)  # the reduction changed the step
    assert 0 > mean[1]["logps/chosen"] > total[1]["logps/chosen"] / 1.5  # sequences here hold >= 2 tokens
