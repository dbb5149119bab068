#!/usr/bin/env bash
# The test suite on this CPU under the lent GPU machine's Python packages: Python 3.12, torch 2.11,
# Triton 3.6 (its interpreter runs the kernels), transformers 5.17, and the peers from .whl/
# installed the way benchmarks/run_gpu.sh installs them there. A device session has 15 minutes;
# this finds an API that the CPU stack (torch 2.13, the newest Triton and transformers) has and the
# GPU machine's lacks before a device call pays for it. The sm_90 compile tests run here too, with
# Triton 3.6's own ptxas.
#   bash scripts/gpu_stack.sh                        # the whole suite (about 10 minutes)
#   bash scripts/gpu_stack.sh tests/test_layouts.py  # pytest arguments
# The first run downloads about 3 GB (PyPI's torch 2.11 is a CUDA build; it runs on the CPU) into
# $FASTDPO_GPU_STACK (default /tmp/fastdpo-gpu-stack), and fills .whl/ with scripts/gpu_wheels.sh
# if it is empty. Needs a python3.12 ($PYTHON312, on PATH, or under pyenv).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="${FASTDPO_GPU_STACK:-/tmp/fastdpo-gpu-stack}"
say() { echo "gpu_stack: $*" >&2; }

# What the GPU machine has (device tool's notes; torch, Triton and transformers as its results
# files record them). numpy < 2.4: Triton 3.6's interpreter takes int() of one-element arrays,
# which numpy 2.5 refuses; the GPU itself never runs the interpreter.
stack=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate peft "numpy<2.4" pandas pyarrow xxhash
       requests psutil pyyaml einops msgpack ninja py-cpuinfo tqdm matplotlib pytest pytest-benchmark)

if [ ! -x "$venv/bin/python" ]; then
  py312=""
  for candidate in "${PYTHON312:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    # (a pyenv shim is on PATH even where its version is not selected: it must run)
    if [ -n "$candidate" ] && "$candidate" --version >/dev/null 2>&1; then py312="$candidate"; break; fi
  done
  [ -n "$py312" ] || { say "needs a python3.12: set PYTHON312"; exit 2; }
  say "creating $venv with $("$py312" --version) (one time)"
  "$py312" -m venv "$venv"
fi
stamp="$venv/.stack-$(echo "${stack[*]}" | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  say "installing ${stack[*]} (one time; about 3 GB)"
  "$venv/bin/pip" install -q --disable-pip-version-check "${stack[@]}"
  touch "$stamp"
fi
if ! compgen -G ".whl/*.whl" >/dev/null; then
  say ".whl/ is empty: filling it (scripts/gpu_wheels.sh)"
  (source scripts/env.sh && bash scripts/gpu_wheels.sh)
fi
# As benchmarks/run_gpu.sh does on the GPU machine: the wheels beside the stack, not into it.
rm -rf "$venv/site"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
  --target "$venv/site" .whl/*.whl
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . >/dev/null
export PATH="$venv/bin:$PATH" PYTHONPATH="$venv/site"
"$venv/bin/python" -c "import torch, triton, transformers, trl; print(f'gpu_stack: Python {__import__(\"sys\").version.split()[0]}, torch {torch.__version__}, Triton {triton.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}')" 2>/dev/null
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
