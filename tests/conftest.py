"""Shared fixtures. Without CUDA the Triton kernels run under the interpreter on CPU tensors."""

import os
import sys
import tempfile

import pytest
import torch

# A fresh inductor cache per test run: a cache kept from another checkout can hold kernels compiled
# for an older schema of fastdpo's custom ops (their output shapes changed once), which then fail.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastdpo-inductor-"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton.jit decorates the kernels (fastdpo imports them lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# GPU-only tests (large shapes) are not collected at all without a GPU, rather than skipped.
collect_ignore = [] if HAS_CUDA else ["test_gpu_large.py", "test_gpu_scaleout.py", "test_gpu_flex.py"]

DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run the test once per backend: the PyTorch twin and the Triton kernels."""
    monkeypatch.setenv("FASTDPO_BACKEND", request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE


SEED_VARIABLE = "FASTDPO_TEST_SEED"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs in every test (or the seed in $FASTDPO_TEST_SEED, to replay a failure);
    a failing test's report names its seed and the command that replays it."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node._fastdpo_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_fastdpo_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("fastdpo seed", f"seed {seed}; replay: {SEED_VARIABLE}={seed} python -m pytest "
                                                f"'{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _trainers_on_cpu(request, monkeypatch):
    """The trainer tests compare implementations at fp32-on-CPU precision (1e-5), so accelerate is
    told to use the CPU even where a GPU is present; the tests of the compiled Triton kernels
    (named for the triton backend) are the exception: on such a machine they need the GPU."""
    if not (HAS_CUDA and "triton" in request.node.name):
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state: a test that asked for the CPU (TRL's use_cpu) must
    not leave a later trainer on the CPU of a machine that has a GPU."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        # GradientState too: a dataloader that a TRL trainer left registered there makes every later
        # micro-batch look like the end of a dataloader, so gradient accumulation would sync each time.
        GradientState._reset_state()
