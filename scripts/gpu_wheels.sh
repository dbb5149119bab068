#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what a lent GPU machine lacks and cannot download, for
# benchmarks/run_gpu.sh to install there: run it here, where PyPI is reachable, then name `.whl` in
# the device call's carry. The GPU machine runs Python 3.12 on manylinux x86_64 with torch, Triton,
# transformers, accelerate and peft of its own; it has no TRL, Liger-Kernel, Cut Cross-Entropy,
# DeepSpeed or pydantic, and its torch (2.11) predates torch.nn.functional.linear_cross_entropy.
#   bash scripts/gpu_wheels.sh        # about 8 MB; .whl/ is replaced as a whole
# The versions are the ones the recorded results name. DeepSpeed ships only a source package: its
# wheel is built here, without compiled ops, against this environment's torch (run inside
# `source scripts/env.sh`). torch_lce/ holds the two pure-Python modules of torch >= 2.13's
# linear_cross_entropy, copied from this environment's torch, which the `peers` stage loads where
# the GPU machine's torch has none.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
say() { echo "gpu_wheels: $*" >&2; }
"$py" -c "import torch" 2>/dev/null || { say "needs a Python with torch: run 'source scripts/env.sh' first"; exit 2; }

wheels=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
        cut-cross-entropy==25.1.1 hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0)
deepspeed=deepspeed==0.19.8
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

new="$(mktemp -d .whl.new.XXXX)"
trap 'rm -rf "$new"' EXIT
say "downloading ${#wheels[@]} wheels for CPython 3.12"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$new" "${wheels[@]}"
say "building the $deepspeed wheel (no compiled ops)"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$new" "$deepspeed" >/dev/null

lce="$("$py" -c "import torch.nn.modules.linear_cross_entropy as m, os; print(os.path.dirname(m.__file__))" 2>/dev/null || true)"
if [ -n "$lce" ]; then
  mkdir -p "$new/torch_lce"
  cp "$lce/linear_cross_entropy.py" "$lce/linear_cross_entropy_options.py" "$new/torch_lce/"
else
  say "this torch has no linear_cross_entropy module (2.13+): torch_lce/ left out, the torch-lce rows will be skipped"
fi

# A device call carries at most 64 MiB of working tree, the wheels included.
size_mb=$(du -sm "$new" | cut -f1)
[ "$size_mb" -lt 56 ] || { say "$size_mb MB is too much to carry beside the repository (64 MiB a call)"; exit 1; }
rm -rf .whl && mv "$new" .whl && trap - EXIT
say "done: .whl/ holds $(ls .whl/*.whl | wc -l) wheels$( [ -d .whl/torch_lce ] && echo ' and torch_lce/'), $size_mb MB; carry it: carry=[\".whl\"]"
