"""Compile the kernels to sm_90 cubin without a GPU (Triton ships ptxas).

The interpreter checks the math but not what only the compiler sees: types that differ between
branches, unsupported constructs. This catches those on any machine, and checks that bf16 rows
are read (and gradients written) with 128-bit vector accesses when the strides allow it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_sm90.py")


@pytest.fixture(scope="module")
def compiled() -> dict:
    """All cases compiled in one subprocess (one torch + triton import)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"sm_90 compile script failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def case(compiled: dict, name: str) -> dict:
    got = compiled[name]
    assert "error" not in got, f"{name} does not compile for sm_90: {got.get('error')}"
    return got


FEATURES = pytest.mark.parametrize("features", [False, True, "slab"],
                                   ids=["plain", "softcap+lse+sums+token-metrics", "all-on-a-vocabulary-slab"])


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp64"])
@FEATURES
def test_forward_compiles(compiled, dtype, features):
    got = case(compiled, f"fwd-{dtype}-{features}")
    assert got["vector_loads"], "logits rows are not read with 128-bit loads"
    # fp64 (the precision path, never the fast one) with every feature on keeps ~170 bytes a thread
    # in local memory; the 16- and 32-bit forwards must not spill.
    if dtype != "fp64":
        assert got["local_bytes"] == 0, f"the forward spills {got['local_bytes']} bytes a thread to local memory"


@pytest.mark.parametrize("dtype", ["bf16", "fp64"])
@pytest.mark.parametrize("softcap", [False, True])
def test_backward_compiles(compiled, dtype, softcap):
    got = case(compiled, f"bwd-{dtype}-{softcap}")
    assert got["vector_loads"] and got["vector_stores"], "gradient rows are not streamed with 128-bit accesses"
    assert got["local_bytes"] == 0, f"the backward spills {got['local_bytes']} bytes a thread to local memory"


@FEATURES
def test_forward_several_rows_compiles(compiled, features):
    """Four token rows a program: still 128-bit loads, no spills."""
    got = case(compiled, f"fwd-bf16-{features}-rows4")
    assert got["vector_loads"] and got["local_bytes"] == 0, got


@pytest.mark.parametrize("softcap", [False, True])
def test_backward_several_rows_compiles(compiled, softcap):
    got = case(compiled, f"bwd-bf16-{softcap}-rows4")
    assert got["vector_loads"] and got["vector_stores"] and got["local_bytes"] == 0, got
