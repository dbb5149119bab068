"""Bad input: a clear TypeError / ValueError before any kernel launch, never a silent number."""

import pytest
import torch

import fastdpo
import fastdpo.eager
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
    "temperature": (lambda: call(*batch(), temperature=0.0), ValueError, "temperature must be finite and > 0"),
    "softcap": (lambda: call(*batch(), softcap=-1.0), ValueError, "softcap must be finite and > 0"),
    "temperature infinite": (lambda: call(*batch(), temperature=float("inf")), ValueError, "temperature must be finite"),
    "softcap infinite": (lambda: call(*batch(), softcap=float("inf")), ValueError, "softcap must be finite"),
    "temperature a string": (lambda: call(*batch(), temperature="1"), TypeError, "temperature must be a number"),
    "beta infinite": (lambda: call(*batch(), beta=float("inf")), ValueError, "beta must be finite"),
    "beta a string": (lambda: call(*batch(), beta="0.1"), TypeError, "beta must be a number"),
    "beta a bool": (lambda: call(*batch(), beta=True), TypeError, "beta must be a number"),
    "option nan": (lambda: call(*batch(), loss_type="discopop", discopop_tau=float("nan")), ValueError,
                   "discopop_tau must be finite"),
    "return_metrics not a bool": (lambda: call(*batch(), return_metrics="no"), TypeError, "return_metrics must be True"),
    "return_rows not a bool": (lambda: call(*batch(), return_rows=1), TypeError, "return_rows must be True"),
    "use_weighting not a bool": (lambda: call(*batch(), use_weighting="yes"), TypeError, "use_weighting must be True"),
    "ignore_index a float": (lambda: call(*batch(), ignore_index=-100.5), TypeError, "ignore_index must be an int"),
    "integer mask values": (lambda: call(*batch(), mask=torch.full((4, 3), 2)), ValueError, r"only 0 and 1, got .*\[2\]"),
    "negative mask values": (lambda: call(*batch(), mask=torch.full((4, 3), -1)), ValueError, "only 0 and 1"),
    "no rows": (lambda: call(*batch(B=0)), ValueError, "policy_logits has no rows"),
    "expanded logits, in place": (lambda: call(torch.randn(1, 3, 7, requires_grad=True).expand(4, 3, 7),
                                               *batch()[1:], inplace_backward=True), ValueError, "share memory"),
    "label smoothing": (lambda: call(*batch(), label_smoothing=1.5), ValueError, "label_smoothing"),
    "sequence_logps labels": (lambda: fastdpo.sequence_logps(torch.randn(2, 3, 5), torch.full((2, 3), 9)),
                              ValueError, r"\[0, 5\)"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_raises(name):
    fn, error, message = CASES[name]
    with pytest.raises(error, match=message):
        fn()


@pytest.mark.parametrize("module,options,error,message", [
    (fastdpo.FusedDPOLoss, dict(loss_type="nope"), ValueError, "unknown loss_type"),
    (fastdpo.FusedDPOLoss, dict(temperature=0), ValueError, "temperature must be finite and > 0"),
    (fastdpo.FusedDPOLoss, dict(return_metrics="yes"), TypeError, "return_metrics must be True"),
    (fastdpo.FusedDPOLoss, dict(beta=float("nan")), ValueError, "beta must be finite"),
    (fastdpo.FusedLinearDPOLoss, dict(chunk_size=0), ValueError, "chunk_size must be a positive number"),
    (fastdpo.FusedLinearDPOLoss, dict(grad_in_forward="no"), TypeError, "grad_in_forward must be True"),
])
def test_module_rejects_bad_options_at_construction(module, options, error, message):
    with pytest.raises(error, match=message):
        module(**options)


def test_eager_reference_checks_ref_logits_like_the_fused_path():
    logits, labels, _ = batch()
    with pytest.raises(ValueError, match="ref_logits must match policy_logits"):
        fastdpo.eager.eager_dpo_loss(logits, labels, ref_logits=torch.randn(4, 3, 8))


def test_unknown_backend(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="FASTDPO_BACKEND must be one of"):
        fastdpo.sequence_logps(*batch()[:2])


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastdpo.sequence_logps(*batch()[:2])
