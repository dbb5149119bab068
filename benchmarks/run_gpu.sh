#!/usr/bin/env bash
# One call on a lent GPU: the whole test suite natively (large shapes included), then every
# benchmark, each writing JSON + Markdown + PNG under $OUT (or bench_results/). Short tables last.
#   bash benchmarks/run_gpu.sh            # on the device: OUT is set by the device tool
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -n 25 | tee "$out/tests.log"
for bench in bench_loss bench_linear bench_trl; do
  [ -f "benchmarks/$bench.py" ] || continue
  timeout 900 python "benchmarks/$bench.py" --out "$out" > "$out/$bench.log" 2>&1 || echo "$bench failed: see $out/$bench.log"
done
for table in "$out"/*.md; do echo; echo "== $table"; cat "$table"; done
