"""pytest-benchmark timings of the public ops: tiny CPU sizes in CI (so a slowdown shows in the
log), shape A (benchmarks/common.py SHAPES: H 4096, V 128256, 4 pairs x 1024) when CUDA is present. Each case also checks its result is finite."""

import pytest
import torch

import fastdpo
from conftest import HAS_CUDA

P, T, V = (4, 1024, 128256) if HAS_CUDA else (2, 32, 512)


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.fixture
def inputs(device):
    logits = (4 * torch.randn(2 * P, T, V, device=device)).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    return logits, labels, mask, -50 * torch.rand(2 * P, device=device)


def run(fn):
    out = fn()
    sync()
    return out


@pytest.fixture(params=["auto"])
def native_backend(monkeypatch, request):
    """Time what users get: Triton on CUDA, the PyTorch path on CPU (the interpreter is no timing)."""
    monkeypatch.delenv("FASTDPO_BACKEND", raising=False)


def test_bench_dpo_step(benchmark, inputs, native_backend):
    logits, labels, mask, ref = inputs
    step = lambda: torch.autograd.grad(fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask), logits)[0]  # noqa
    grad = benchmark.pedantic(run, args=(step,), rounds=5, warmup_rounds=1)
    assert torch.isfinite(grad).all()


def test_bench_reference_pass(benchmark, inputs, native_backend):
    logits, labels, mask, _ = inputs

    def ref_pass():
        with torch.no_grad():
            return fastdpo.sequence_logps(logits, labels, mask=mask)

    logps = benchmark.pedantic(run, args=(ref_pass,), rounds=5, warmup_rounds=1)
    assert torch.isfinite(logps).all() and (logps < 0).all()
