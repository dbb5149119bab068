"""On one GPU: `fastdpo train` under each shipped accelerate config (examples/accelerate/) equals
the plain one-process run. World size 1 still runs each engine's whole code path on the device:
FSDP2's sharded parameters (DTensors), gathers and pinned CPU offload; DeepSpeed's ZeRO-2 / ZeRO-3
engine, its gathered lm_head inside the model's forward and its 16-bit final save.

Collected only where CUDA is (tests/conftest.py). DeepSpeed is not in fastdpo's requirements:
its cases say so and skip where it is not installed.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from test_train_distributed import assert_same_run, free_port, train_flags
from train_helpers import REPO, run_cli

ENGINES = ["fsdp2", "fsdp2-offload", "zero2", "zero3"]
PATHS = {"fused": [], "fused_linear": ["--loss-impl", "fused_linear", "--no-padding-free"]}
# fp32 on both sides (the zero configs ask for bf16 weights), so the comparison can be tight.
GPU_FLAGS = ["--mixed-precision", "no", "--dtype", "float32"]


# ZeRO-3 refuses --loss-impl fused_linear (tests/test_train_distributed.py checks the message)
CASES = [(engine, path) for engine in ENGINES for path in PATHS if (engine, path) != ("zero3", "fused_linear")]


@pytest.mark.parametrize("engine, path", CASES)
def test_one_gpu_under_each_config_equals_the_plain_run(tmp_path, engine, path):
    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed on this machine (carry its wheels: benchmarks/run_gpu.sh)")
    ref = "precompute" if engine == "zero3" else "copy"  # ZeRO-3 refuses --ref copy
    options = PATHS[path] + GPU_FLAGS
    plain = run_cli(train_flags(tmp_path / "one", 8, ref, tmp_path / "cache1") + options, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "examples" / "accelerate" / f"{engine}.yaml"), "--num_processes", "1",
              "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "fastdpo.train"]
    run = run_cli(launch + train_flags(tmp_path / "two", 8, ref, tmp_path / "cache2") + options, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
