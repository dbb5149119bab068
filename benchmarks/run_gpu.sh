#!/usr/bin/env bash
# A lent GPU session: the test suite natively (large shapes included), then the benchmarks, each
# writing JSON + Markdown + PNG under $RESULTS (or bench_results/), short tables last.
#   bash benchmarks/run_gpu.sh            # everything (can exceed one 10-minute device call)
#   bash benchmarks/run_gpu.sh tests      # or one stage per call: tests, tune, loss, linear, lean, trl, peers, train, scaleout
#   (train: whole DPO steps, bench_train.py, real tokens/s of TRL, TRL + Liger and fastdpo's layouts)
#   (lean: the lean fused-linear tiles beside torch.compile and CCE exact, shapes A and C, into $out/lean)
#   (peers: every GPU measurement of issue 15 in under 8 minutes, into $out/peers: large-shape parity,
#    shape B from logits and its kernels' launch settings (several rows a program), and at shapes A and C PyTorch's chunked linear_cross_entropy (default and
#    least-memory options), TRL's chunked log-probs and the lean tiles beside CCE exact, Liger and
#    torch.compile. A torch older than 2.13 has no linear_cross_entropy: carry its two pure-Python
#    modules from a torch >= 2.13 install as .whl/torch_lce/ (see bench_linear.py) or the rows say
#    why they were skipped.)
#   (scaleout: fastdpo train under each examples/accelerate config on one GPU against the plain run,
#    tests/test_gpu_scaleout.py; DeepSpeed needs its wheels in .whl/: deepspeed (py3-none-any, built
#    with DS_BUILD_OPS=0), hjson, pydantic, pydantic-core, annotated-types, typing-inspection)
#   TESTS="tests/test_gpu_large.py" bash benchmarks/run_gpu.sh tests   # a part of the suite
#   BENCH_ARGS="--impls fastdpo-linear,trl" bash benchmarks/run_gpu.sh trl   # flags for the bench_* stages
# Peers (liger-kernel, cut-cross-entropy, trl and its needs) are installed from wheels in .whl/
# when that folder exists, for a machine with no package index: scripts/gpu_wheels.sh fills it.
# Results go to $RESULTS, else bench_results/; with $OUT set (a device call) they are also packed
# into $OUT/results.tgz, one file, since such a call brings back only a few files, and every part
# ends in time for that (DEADLINE_S, below).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${RESULTS:-bench_results}"
py="${PYTHON:-python3}"
stages="${*:-tests loss linear trl train}"
limit="${STAGE_TIMEOUT:-900}"
# A device call is killed at its own limit (600 s at most), and then nothing is packed into
# $OUT: with $OUT set, every part gets at most what is left of DEADLINE_S (570 s by default)
# less 20 s for the packing, so a part cut short still leaves the rest of the results.
deadline="${DEADLINE_S:-$([ -n "${OUT:-}" ] && echo 570)}"
budget() {  # budget SECONDS: that, or less where the deadline is nearer
  local s="$1"
  if [ -n "$deadline" ]; then
    local left=$((deadline - SECONDS - 20))
    [ "$left" -lt "$s" ] && s="$left"
    [ "$s" -lt 1 ] && s=1
  fi
  echo "$s"
}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: fastdpo is installed already (the CPU smoke test)
  "$py" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || "$py" -m pip install -q --no-deps -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
for stage in $stages; do
  case "$stage" in
    tests) timeout "$(budget "$limit")" "$py" -m pytest ${TESTS:-tests} -q -p no:cacheprovider --durations=5 > "$out/tests.log" 2>&1
      tail -n 30 "$out/tests.log" ;;
    scaleout) timeout "$(budget "$limit")" "$py" -m pytest tests/test_gpu_scaleout.py -q -p no:cacheprovider -rs --durations=8 \
        > "$out/scaleout.log" 2>&1; tail -n 40 "$out/scaleout.log" ;;
    tune) timeout "$(budget "$limit")" "$py" benchmarks/tune_kernel.py 2>&1 | tee "$out/tune_kernel.md" ;;
    lean) mkdir -p "$out/lean"
      timeout "$(budget "$limit")" "$py" benchmarks/bench_linear.py --shapes A,C \
        --impls compile,cce-exact,fastdpo,fastdpo-lean --lean "${LEAN_TILES:-256:0,256:4096,512:4096,1024:4096,1024:8192}" \
        --out "$out/lean" > "$out/lean/bench_linear.log" 2>&1 || echo "lean failed or timed out: see $out/lean" ;;
    peers) mkdir -p "$out/peers"
      # Carried modules only where this torch lacks its own (both would register the same ops).
      if [ -d .whl/torch_lce ] && ! "$py" -c "import torch, sys; sys.exit(not hasattr(torch.nn.functional, 'linear_cross_entropy'))"; then
        export TORCH_LCE_SRC="$PWD/.whl/torch_lce"
      fi
      # Each part has its own limit, together 480 s: one overrun cannot take the others' time.
      timeout "$(budget "${PEERS_TESTS_S:-125}")" "$py" -m pytest ${PEERS_TESTS:-tests/test_gpu_large.py} -q -p no:cacheprovider \
        --durations=5 > "$out/peers/tests.log" 2>&1; tail -n 8 "$out/peers/tests.log"
      timeout "$(budget "${PEERS_LOSS_S:-40}")" "$py" benchmarks/bench_loss.py ${PEERS_LOSS_SHAPES:---shapes B} \
        --impls "${PEERS_LOSS_IMPLS:-fastdpo,fastdpo-nocheck,liger}" --out "$out/peers/loss_B" ${BENCH_ARGS:-} \
        > "$out/peers/bench_loss_B.log" 2>&1 || echo "bench_loss (shape B) failed or timed out: see $out/peers"
      # Shape B's bare kernels under each launch setting (BLOCK_V:warps:rows): one row a program
      # (today's 4096:4 / 4096:16, the 2048:8 of the first H100 run, a whole row in one tile) and
      # several rows a program, to tell how much of B's time is short rows, and what fixes it.
      timeout "$(budget "${PEERS_TUNE_S:-45}")" "$py" benchmarks/tune_kernel.py ${PEERS_TUNE_ARGS:---shapes B --configs \
        4096:4:1,4096:16:1,2048:8:1,32768:16:1,2048:4:2,1024:4:4,512:4:8,256:4:4,1024:16:4,512:16:8} \
        > "$out/peers/tune_B.md" 2>&1 || echo "tune_kernel (shape B) failed or timed out: see $out/peers"
      # Shape B's whole step: host time to launch it against its kernels' device time.
      if "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        timeout "$(budget "${PEERS_PROFILE_S:-25}")" "$py" benchmarks/profile_step.py --shapes B --no-linear \
          > "$out/peers/profile_B.txt" 2>&1 || echo "profile_step (shape B) failed or timed out: see $out/peers"
      fi
      timeout "$(budget "${PEERS_LINEAR_S:-245}")" "$py" benchmarks/bench_linear.py ${PEERS_LINEAR_SHAPES:---shapes A,C} \
        --impls "${PEERS_LINEAR_IMPLS:-torch-lce,torch-lce-lean,trl-chunked,fastdpo,fastdpo-lean,cce-exact,liger,compile}" \
        --lean "${LEAN_TILES:-256:4096,1024:4096}" --out "$out/peers/linear" ${BENCH_ARGS:-} \
        > "$out/peers/bench_linear.log" 2>&1 || echo "bench_linear (peers) failed or timed out: see $out/peers" ;;
    loss|linear|trl|train)
      timeout "$(budget "$limit")" "$py" "benchmarks/bench_$stage.py" --out "$out" ${BENCH_ARGS:-} > "$out/bench_$stage.log" 2>&1 \
        || echo "bench_$stage failed or timed out: see $out/bench_$stage.log" ;;
    *) echo "unknown stage $stage (tests, tune, loss, linear, lean, trl, peers, train, scaleout)"; exit 2 ;;
  esac
done
for table in "$out"/*.md "$out"/*/*.md "$out"/*/*/*.md; do [ -f "$table" ] && { echo; echo "== $table"; cat "$table"; }; done
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(cd "$OUT" && pwd)" != "$(cd "$out" && pwd)" ]; then
  tar czf "$OUT/results.tgz" -C "$out" . && echo "results packed into \$OUT/results.tgz"
fi
