"""Bad input: a clear TypeError / ValueError before any kernel launch, never a silent number."""

import pytest
import torch

import fastdpo
from fastdpo import kernels, torch_backend


@pytest.fixture(autouse=True)
def no_kernel_launch(monkeypatch, backend):
    """Any launch in these tests is a bug: validation must reject the input first."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for module in (kernels, torch_backend):
        monkeypatch.setattr(module, "token_logps_forward", launched)
        monkeypatch.setattr(module, "token_logps_backward", launched)


def batch(B=4, T=3, V=7):
    return torch.randn(B, T, V), torch.randint(0, V, (B, T)), torch.zeros(B)


def call(logits, labels, ref=None, **kw):
    return fastdpo.fused_dpo_loss(logits, labels, ref, **kw)


CASES = {
    "odd rows": (lambda: call(*batch(B=3)), ValueError, "even number of rows"),
    "labels shape": (lambda: call(batch()[0], torch.zeros(4, 2, dtype=torch.long), torch.zeros(4)),
                     ValueError, "labels must be"),
    "mask shape": (lambda: call(*batch(), mask=torch.ones(4, 2)), ValueError, "mask must be"),
    "mask values": (lambda: call(*batch(), mask=torch.full((4, 3), 0.5)), ValueError, "only 0 and 1"),
    "ref_logps shape": (lambda: call(*batch()[:2], torch.zeros(3)), ValueError, "ref_logps must be"),
    "ref_logps dtype": (lambda: call(*batch()[:2], torch.zeros(4, dtype=torch.long)), TypeError, "ref_logps"),
    "ref_logits shape": (lambda: call(*batch()[:2], ref_logits=torch.randn(4, 3, 8)), ValueError, "ref_logits must"),
    "both references": (lambda: call(*batch(), ref_logits=torch.randn(4, 3, 7)), ValueError, "not both"),
    "reference_free and ref": (lambda: call(*batch(), reference_free=True), ValueError, "reference_free"),
    "no reference": (lambda: call(*batch()[:2]), ValueError, "needs a reference"),
    "label too large": (lambda: call(batch()[0], torch.full((4, 3), 7), torch.zeros(4)), ValueError, r"\[0, 7\)"),
    "negative label": (lambda: call(batch()[0], torch.full((4, 3), -1), torch.zeros(4)), ValueError, "found -1"),
    "integer logits": (lambda: call(torch.zeros(4, 3, 7, dtype=torch.long), *batch()[1:]), TypeError, "policy_logits"),
    "float labels": (lambda: call(batch()[0], torch.zeros(4, 3), torch.zeros(4)), TypeError, "labels must be an integer"),
    "2-d logits": (lambda: call(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), torch.zeros(4)),
                   ValueError, r"\[B, T, V\]"),
    "not a tensor": (lambda: call([[1.0]], *batch()[1:]), TypeError, "torch.Tensor"),
    "labels on another device": (lambda: call(batch()[0], torch.zeros(4, 3, dtype=torch.long, device="meta"),
                                              torch.zeros(4)), ValueError, "labels is on meta"),
    "ref on another device": (lambda: call(*batch()[:2], torch.zeros(4, device="meta")), ValueError, "ref_logps is on"),
    "beta zero": (lambda: call(*batch(), beta=0.0), ValueError, "beta must be > 0"),
    "beta negative": (lambda: call(*batch(), beta=-1.0), ValueError, "beta must be > 0"),
    "unknown loss": (lambda: call(*batch(), loss_type="nope"), ValueError, "unknown loss_type"),
    "weights length": (lambda: call(*batch(), loss_type=["sigmoid"], loss_weights=[1.0, 2.0]), ValueError,
                       "loss_weights has 2"),
    "temperature": (lambda: call(*batch(), temperature=0.0), ValueError, "temperature must be > 0"),
    "softcap": (lambda: call(*batch(), softcap=-1.0), ValueError, "softcap must be > 0"),
    "label smoothing": (lambda: call(*batch(), label_smoothing=1.5), ValueError, "label_smoothing"),
    "sequence_logps labels": (lambda: fastdpo.sequence_logps(torch.randn(2, 3, 5), torch.full((2, 3), 9)),
                              ValueError, r"\[0, 5\)"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises(name):
    fn, error, message = CASES[name]
    with pytest.raises(error, match=message):
        fn()


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="unknown loss_type"):
        fastdpo.FusedDPOLoss(loss_type="nope")


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTDPO_BACKEND must be one of"):
        fastdpo.sequence_logps(*batch()[:2])


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastdpo.sequence_logps(*batch()[:2])
