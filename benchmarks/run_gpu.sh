#!/usr/bin/env bash
# A lent GPU session: the test suite natively (large shapes included), then the benchmarks, each
# writing JSON + Markdown + PNG under $OUT (or bench_results/), short tables last.
#   bash benchmarks/run_gpu.sh            # everything (can exceed one 10-minute device call)
#   bash benchmarks/run_gpu.sh tests      # or one stage per call: tests, loss, linear, trl
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_results}"
stages="${*:-tests loss linear trl}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || pip install -q --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for stage in $stages; do
  case "$stage" in
    tests) python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -n 25 | tee "$out/tests.log" ;;
    loss|linear|trl)
      timeout 900 python "benchmarks/bench_$stage.py" --out "$out" > "$out/bench_$stage.log" 2>&1 \
        || echo "bench_$stage failed: see $out/bench_$stage.log" ;;
    *) echo "unknown stage $stage (tests, loss, linear, trl)"; exit 2 ;;
  esac
done
for table in "$out"/*.md; do [ -f "$table" ] && { echo; echo "== $table"; cat "$table"; }; done
