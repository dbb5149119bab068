"""scripts/env.sh says what its one-time set-up is doing, and nothing once the environment is ready.

pip and python are stubs here (no install runs): the test checks the script's messages and steps."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_venv(path: Path, local_cpu_wheel: bool = True) -> Path:
    """A 'virtual environment' whose python has no torch until the pip stub installs it. Without
    `local_cpu_wheel`, pip's sources lack torch 2.13.0+cpu (PyPI's case) and asking for it fails."""
    bin_dir = path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\n[ -f "{path}/torch-installed" ]\n')
    refuse = "" if local_cpu_wheel else 'case "$*" in *+cpu*) echo "no matching distribution" >&2; exit 1;; esac\n'
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$@" >> "{path}/pip.log"\n{refuse}touch "{path}/torch-installed"\n')
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
    assert (venv / "pip.log").read_text().splitlines() == ["install -q torch==2.13.0+cpu",
                                                           f"install -q -e {ROOT}[train]"]
    again = source_env(venv)
    assert again.returncode == 0 and again.stderr == ""


def test_torch_comes_from_pytorchs_cpu_index_where_pip_has_no_cpu_build(tmp_path):
    """A fresh machine on PyPI alone: PyPI has no '+cpu' torch, and its plain Linux torch is the CUDA
    build, so the CPU build comes from PyTorch's CPU index (and the failed first try stays quiet)."""
    venv = fake_venv(tmp_path / "venv", local_cpu_wheel=False)
    result = source_env(venv)
    assert result.returncode == 0, result.stderr
    assert "no matching distribution" not in result.stderr
    assert (venv / "pip.log").read_text().splitlines()[:2] == [
        "install -q torch==2.13.0+cpu", "install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"]


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


def fake_python(path: Path, torch_dir: Path | None) -> Path:
    """A 'python' whose pip downloads and builds empty wheels (logging its arguments) and whose torch
    lives in `torch_dir` (None: no torch)."""
    path.mkdir(parents=True)
    script = path / "python"
    script.write_text(f"""#!/bin/bash
if [ "$1" = -c ]; then
  {'exit 1' if torch_dir is None else f'echo "{torch_dir}"; exit 0'}
fi
echo "${{@:3}}" >> "{path}/pip.log"
for ((i = 1; i <= $#; i++)); do [ "${{!i}}" = -d ] || [ "${{!i}}" = -w ] && j=$((i + 1)) && dest="${{!j}}"; done
for spec in "$@"; do
  case "$spec" in *==*) name="${{spec%%==*}}"; touch "$dest/${{name//-/_}}-${{spec##*==}}-py3-none-any.whl" ;; esac
done
""")
    os.chmod(script, 0o755)
    return script


def gpu_wheels(tmp_path: Path, python: Path) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    (repo / "scripts" / "gpu_wheels.sh").write_text((ROOT / "scripts" / "gpu_wheels.sh").read_text())
    return subprocess.run(["bash", "scripts/gpu_wheels.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(python)})


def test_gpu_wheels_fills_whl_for_the_gpu_machines_python(tmp_path):
    """scripts/gpu_wheels.sh asks pip for CPython 3.12 wheels at the versions pyproject.toml allows,
    builds DeepSpeed's, copies torch's two linear_cross_entropy modules, and replaces .whl/ whole."""
    torch_dir = tmp_path / "torch_modules"
    torch_dir.mkdir()
    for name in ("linear_cross_entropy.py", "linear_cross_entropy_options.py"):
        (torch_dir / name).write_text("# torch's\n")
    python = fake_python(tmp_path / "bin", torch_dir)
    stale = tmp_path / "repo" / ".whl"
    stale.mkdir(parents=True)
    (stale / "trl-1.0.0-py3-none-any.whl").touch()  # two versions of one wheel would stop the install there
    done = gpu_wheels(tmp_path, python)
    assert done.returncode == 0, done.stderr
    download, build = (tmp_path / "bin" / "pip.log").read_text().splitlines()
    assert "--python-version 3.12 --implementation cp" in download and "--only-binary=:all:" in download
    assert build.startswith("wheel -q --no-deps --no-build-isolation")
    wheels = sorted(p.name for p in stale.glob("*.whl"))
    pins = {w.split("-")[0]: w.split("-")[1] for w in wheels}
    assert "trl-1.0.0-py3-none-any.whl" not in wheels
    for name in ("trl", "datasets", "liger_kernel", "cut_cross_entropy", "deepspeed", "pydantic", "hjson"):
        assert name in pins, name
    # The carried versions are ones that pyproject.toml's extras accept.
    from packaging.requirements import Requirement
    extras = (ROOT / "pyproject.toml").read_text()
    for name in ("trl", "deepspeed"):
        line = next(s for s in extras.splitlines() if s.strip().startswith(f"{name} = ["))
        req = Requirement(line.split('"')[1])
        assert req.specifier.contains(pins[name]), (name, pins[name], str(req))
    assert sorted(p.name for p in (stale / "torch_lce").iterdir()) == ["linear_cross_entropy.py",
                                                                       "linear_cross_entropy_options.py"]
    assert not list((tmp_path / "repo").glob(".whl.new.*"))


def test_gpu_wheels_needs_torch_and_leaves_whl_alone_without_it(tmp_path):
    python = fake_python(tmp_path / "bin", None)
    kept = tmp_path / "repo" / ".whl"
    kept.mkdir(parents=True)
    (kept / "mine.whl").touch()
    done = gpu_wheels(tmp_path, python)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_wheels: needs a Python with torch: run 'source scripts/env.sh' first"
    assert [p.name for p in kept.iterdir()] == ["mine.whl"]
