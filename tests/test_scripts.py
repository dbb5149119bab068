"""scripts/env.sh says what its one-time set-up is doing, and nothing once the environment is ready.

pip and python are stubs here (no install runs): the test checks the script's messages and steps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_venv(path: Path) -> Path:
    """A 'virtual environment' whose python has no torch until the pip stub installs it."""
    bin_dir = path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\n[ -f "{path}/torch-installed" ]\n')
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{path}/pip.log"\ntouch "{path}/torch-installed"\n')
    for name in ("python", "pip"):
        os.chmod(bin_dir / name, 0o755)
    return path


def source_env(venv: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTDPO_VENV": str(venv), "FASTDPO_EXTRAS": "train"}
    return subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/env.sh"'], capture_output=True, text=True,
                          env=env, timeout=60)


def test_setup_says_what_it_does_once(tmp_path):
    venv = fake_venv(tmp_path / "venv")
    first = source_env(venv)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert lines[0] == "fastdpo set-up: installing torch==2.13.0, CPU build (one time; about a minute)"
    assert lines[1].startswith(f"fastdpo set-up: installing fastdpo with extras [train] into {venv}")
    assert lines[2] == f"fastdpo set-up: done; later runs reuse {venv}"
    assert (venv / "pip.log").read_text().splitlines() == ["install -q torch==2.13.0", f"install -q -e {ROOT}[train]"]
    again = source_env(venv)
    assert again.returncode == 0 and again.stderr == ""


def test_deepspeed_is_built_against_the_environments_torch(tmp_path):
    """The deepspeed extra is installed on its own, without build isolation (an isolated build would
    fetch a CUDA torch to build against), at the version pyproject.toml's extra names."""
    venv = fake_venv(tmp_path / "venv")
    env = {**os.environ, "FASTDPO_VENV": str(venv), "FASTDPO_EXTRAS": "train,deepspeed"}
    result = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/env.sh"'], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    pip = (venv / "pip.log").read_text().splitlines()
    assert pip[1:] == [f"install -q -e {ROOT}[train]", "install -q --no-build-isolation deepspeed>=0.16"]
