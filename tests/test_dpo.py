"""fused_dpo_loss end to end: loss, metrics and gradients against float64, both backends."""

import math

import pytest
import torch

import fastdpo
from fastdpo.objective import loss_from_rows
from fastdpo.losses import LossConfig
from fastdpo.eager import eager_dpo_loss
from oracle64 import assert_close_rel, dpo_sigmoid64, scores64, seq_logps64, valid_mask


def make_batch(P, T, V, dtype, device, scale=3.0):
    logits = (scale * torch.randn(2 * P, T, V, device=device)).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=device)
    mask[:, : T // 3] = False  # prompt
    mask[torch.arange(2 * P), torch.randint(T // 3, T, (2 * P,))] = False  # a padding hole
    return logits, labels, mask


def metrics64(logits, labels, mask, ref, beta):
    P = logits.shape[0] // 2
    logps = seq_logps64(logits, labels, mask)
    rew = beta * (logps - ref.double())
    valid = valid_mask(labels, mask)
    zsum = (scores64(logits) * valid.unsqueeze(-1)).sum((1, 2))
    V = logits.shape[-1]
    return {
        "rewards/chosen": rew[:P].mean(),
        "rewards/rejected": rew[P:].mean(),
        "rewards/accuracies": (rew[:P] > rew[P:]).double().mean(),
        "rewards/margins": (rew[:P] - rew[P:]).mean(),
        "logps/chosen": logps[:P].mean(),
        "logps/rejected": logps[P:].mean(),
        "logits/chosen": zsum[:P].sum() / (valid[:P].sum() * V),
        "logits/rejected": zsum[P:].sum() / (valid[P:].sum() * V),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_loss_metrics_and_grad(backend, device, dtype, eps):
    beta = 0.3
    logits, labels, mask = make_batch(3, 7, 53, dtype, device)
    ref = -20 * torch.rand(6, device=device)
    x = logits.clone().requires_grad_()
    loss, metrics = fastdpo.fused_dpo_loss(x, labels, ref, mask=mask, beta=beta, label_smoothing=eps,
                                           return_metrics=True)
    x64 = logits.double().requires_grad_()
    loss64 = dpo_sigmoid64(seq_logps64(x64, labels, mask), ref, beta, eps)
    assert_close_rel(loss, loss64, 2e-6, "loss")
    expected = metrics64(logits, labels, mask, ref, beta)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert not metrics[name].requires_grad
        assert_close_rel(metrics[name], value, 2e-6, name)
    loss.backward()
    loss64.backward()
    assert_close_rel(x.grad, x64.grad, 1e-6 if dtype == torch.float32 else 8e-3, "grad")


def test_worked_example():
    """Reference -2.0 / -1.5, policy -0.5 / -3.0, beta 0.1: margin 3.0, loss -log sigmoid(0.3)."""
    cfg = LossConfig(beta=0.1)
    logps = torch.tensor([-0.5, -3.0])
    ref = torch.tensor([-2.0, -1.5])
    loss = loss_from_rows(logps, ref, torch.ones(2), cfg)
    assert round(loss.item(), 4) == 0.5544
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.3)), rel=1e-6)


def test_worked_example_through_kernels(backend, device):
    """The same numbers through the full kernel path: one-token rows over a 2-token vocabulary,
    logits [a, 0] with label 0 give log p = -log(1 + e^-a), so a = -log(e^-lp - 1)."""
    a = [-math.log(math.exp(-lp) - 1) for lp in (-0.5, -3.0)]
    logits = torch.tensor([[[a[0], 0.0]], [[a[1], 0.0]]], device=device)
    labels = torch.zeros(2, 1, dtype=torch.long, device=device)
    loss = fastdpo.fused_dpo_loss(logits, labels, torch.tensor([-2.0, -1.5], device=device), beta=0.1)
    assert round(loss.item(), 4) == 0.5544


def test_ref_logits_equals_ref_logps(backend, device):
    logits, labels, mask = make_batch(2, 6, 31, torch.float32, device)
    ref_logits = logits + torch.randn_like(logits)
    ref_logps = seq_logps64(ref_logits, labels, mask).float()
    a = fastdpo.fused_dpo_loss(logits, labels, ref_logits=ref_logits, mask=mask)
    b = fastdpo.fused_dpo_loss(logits, labels, ref_logps, mask=mask)
    assert_close_rel(a, b, 2e-6, "ref_logits vs ref_logps")


def test_ref_logits_get_no_gradient(backend, device):
    logits, labels, mask = make_batch(2, 4, 17, torch.float32, device)
    ref_logits = logits.clone().requires_grad_()
    x = logits.clone().requires_grad_()
    fastdpo.fused_dpo_loss(x, labels, ref_logits=ref_logits, mask=mask).backward()
    assert ref_logits.grad is None and x.grad is not None


def test_reference_free(backend, device):
    logits, labels, mask = make_batch(2, 5, 23, torch.float32, device)
    loss = fastdpo.fused_dpo_loss(logits, labels, mask=mask, reference_free=True, beta=0.5)
    expected = dpo_sigmoid64(seq_logps64(logits, labels, mask), torch.zeros(4, device=device), 0.5)
    assert_close_rel(loss, expected, 2e-6, "reference-free loss")


def test_inplace_backward_same_gradient(backend, device):
    logits, labels, mask = make_batch(2, 5, 29, torch.bfloat16, device)
    ref = -10 * torch.rand(4, device=device)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        fastdpo.fused_dpo_loss(leaf * 1, labels, ref, mask=mask, inplace_backward=inplace).backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_module_matches_function(backend, device):
    logits, labels, mask = make_batch(2, 5, 19, torch.float32, device)
    ref = -5 * torch.rand(4, device=device)
    module = fastdpo.FusedDPOLoss(beta=0.2, label_smoothing=0.1, return_metrics=True)
    loss_m, metrics_m = module(logits, labels, ref, mask=mask)
    loss_f, metrics_f = fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask, beta=0.2, label_smoothing=0.1,
                                               return_metrics=True)
    assert torch.equal(loss_m, loss_f)
    assert all(torch.equal(metrics_m[k], metrics_f[k]) for k in metrics_f)
    assert "beta=0.2" in repr(module)


def test_eager_reference_matches(backend, device):
    """The package's eager reference (used by benchmarks and the trainer) agrees with the fused path."""
    logits, labels, mask = make_batch(2, 6, 41, torch.float32, device)
    ref = -5 * torch.rand(4, device=device)
    a, ma = fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask, return_metrics=True)
    b, mb = eager_dpo_loss(logits, labels, ref, mask=mask, return_metrics=True)
    assert_close_rel(a, b, 2e-6, "loss")
    for k in ma:
        assert_close_rel(ma[k], mb[k], 2e-6, k)


def test_nan_logits_give_nan_loss(backend, device):
    logits, labels, mask = make_batch(2, 4, 13, torch.float32, device)
    logits[3, -1, 0] = float("nan")
    mask[3, -1] = True
    assert torch.isnan(fastdpo.fused_dpo_loss(logits, labels, torch.zeros(4, device=device), mask=mask))


def test_labels_prepared_once_for_both_passes(backend, device, monkeypatch):
    """With ref_logits the label check (a host sync) runs once, not once per pass."""
    import fastdpo.validation as validation

    calls = []
    original = validation.token_labels
    monkeypatch.setattr(validation, "token_labels", lambda *a, **k: calls.append(1) or original(*a, **k))
    logits, labels, mask = make_batch(2, 4, 11, torch.float32, device)
    fastdpo.fused_dpo_loss(logits, labels, ref_logits=logits + 1, mask=mask)
    assert len(calls) == 1
