"""Benchmark fused linear DPO (hidden states + lm_head in): fastdpo vs eager, torch.compile, Liger, CCE,
PyTorch's chunked linear_cross_entropy and TRL's chunked log-probs.

    python benchmarks/bench_linear.py                   # shapes A, B, C of common.SHAPES on the GPU
    python benchmarks/bench_linear.py --no-mask         # every token is a completion token
    python benchmarks/bench_linear.py --shape 4,2048,3584,151936 --impls fastdpo,compile
    python benchmarks/bench_linear.py --device cpu      # smoke test on a tiny shape
    python benchmarks/bench_linear.py --impls compile,cce-exact --lean 256:0,1024:4096   # lean settings
    python benchmarks/bench_linear.py --device cpu --dtype float32 --shapes CPU --modes fwd+bwd --isolate \
        --threads 1 --iters 3 --warmup 1 --lean 64:0 \
        --impls torch-lce,torch-lce-lean,trl-chunked,fastdpo,fastdpo-recompute,fastdpo-lean   # the CPU comparison

Every row computes the same per-row log-prob sums (masked) and the same sigmoid DPO loss on top:
`torch-lce` is torch.nn.functional.linear_cross_entropy (torch 2.13+) with reduction="none" and
default LinearCrossEntropyOptions, `torch-lce-lean` the options that hold its least memory;
`trl-chunked` is the function TRL's DPOTrainer computes log-probs with (its fused LM head,
trl.kernels.ChunkedLogProbFunction), called as TRL's head calls it. A row whose peer is missing
from this install says so and is skipped.

`--isolate` runs each implementation and mode in its own process (the parent only collects), so
that on CPU the peak resident memory of a step is that implementation's alone; it adds a table of
time and memory as ratios to `--baseline` (torch-lce).

For each shape: the policy step (DPO loss forward + gradients of hidden and weight) and the
reference pass (per-row log-probs, no grad). Reports median time, extra peak memory (gradients
included, inputs not), the FLOP floor 6·N·H·V over all tokens at the bf16 matmul rate measured in
this run (as the anchor measurements do), the FLOPs each implementation actually does (6 or 8 per valid or per
token, see `FLOPS`) as a fraction of that rate, the per-row log-prob error against float64 and the
gradient error against fp32. Writes JSON, a Markdown table and a PNG plot to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo.eager import chunked_logps64, eager_sequence_logps  # noqa: E402

BETA = 0.1

# FLOPs per (token, H, V) of each implementation, and over which tokens: "all" or "valid".
FLOPS = {
    "eager": (6, 2, "all"), "compile": (6, 2, "all"), "liger": (6, None, "all"),
    "cce-exact": (8, 2, "valid"), "cce-filtered": (8, 2, "valid"),
    "fastdpo": (6, 2, "valid"), "fastdpo-recompute": (8, 2, "valid"), "fastdpo-lean": (8, 2, "valid"),
    # Both recompute the logits in the backward; TRL scores only valid tokens where Triton runs
    # (every token on CPU), torch's linear_cross_entropy every token.
    "torch-lce": (8, 2, "all"), "torch-lce-lean": (8, 2, "all"), "trl-chunked": (8, 2, "valid"),
}  # (fwd+bwd, fwd, tokens counted)

# torch.nn.LinearCrossEntropyOptions with its least memory: "compact" keeps no fp32 weight-gradient
# scratch, and aspect_ratio:16 makes each chunk of logits 1/16 of the input's size (16x more
# chunks than the aspect-ratio default). Measured on the 2-core CPU, 2026-12-02 (N = 4096, H = 1024,
# V = 32000, fp32): extra memory 0.317 GB against 0.325 GB for the defaults, at 3x the time.
LCE_LEAN_OPTIONS = dict(acc_policy="compact", chunking_method="aspect_ratio:16")


def dpo_from_logps(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    P = logps.shape[0] // 2
    d = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    return -torch.nn.functional.logsigmoid(BETA * d).mean()


def eager_logps(h, w, y, m):
    """The method fastdpo replaces: the full logits, then fp32 log_softmax, gather, masked sum."""
    return eager_sequence_logps(h @ w.t(), y, mask=m)


def liger_impl() -> dict | None:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)  # one pair per chunk

    def loss(h, w, y, m, r):
        out = loss_fn(w, h, torch.where(m, y, -100))
        return out[0] if isinstance(out, tuple) else out

    return {"step": loss}


def cce_impls() -> dict:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return {}

    def logps_fn(filter_eps):
        def logps(h, w, y, m):
            per_token = linear_cross_entropy(h, w, torch.where(m, y, -100), reduction="none", filter_eps=filter_eps)
            return -(per_token.float() * m).sum(-1)  # mask first: CCE's backward needs a contiguous gradient

        return logps

    exact, filtered = logps_fn(None), logps_fn("auto")
    return {
        "cce-exact": {"step": lambda h, w, y, m, r: dpo_from_logps(exact(h, w, y, m), r), "ref": exact},
        "cce-filtered": {"step": lambda h, w, y, m, r: dpo_from_logps(filtered(h, w, y, m), r)},
    }


def _carried_lce(src: Path):
    """(per-token NLL function, options class) from torch >= 2.13's two pure-Python modules
    (torch/nn/modules/linear_cross_entropy{,_options}.py) copied into `src`, for an older torch:
    the GPU machine's 2.11 has no linear_cross_entropy, and a torch wheel is too large to carry.
    The function does what F.linear_cross_entropy(reduction="none", options=...) does: resolve the
    options for the shapes, then call the chunked custom op."""
    import importlib.util

    modules = []
    for name in ("linear_cross_entropy_options", "linear_cross_entropy"):
        spec = importlib.util.spec_from_file_location(f"_carried_torch_{name}", src / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        modules.append(module)
    options_module, op_module = modules

    def nll(h2, w, target, options):
        o = options._adjust(num_batches=h2.shape[0], in_features=h2.shape[1], num_classes=w.shape[0],
                            dtype=h2.dtype, device=h2.device)
        return op_module._linear_cross_entropy_batch_chunked_no_reduction(
            h2, w, target, None, None, -100, o.batch_chunk_size, o.acc_policy, o.acc_dtype)

    return nll, options_module.LinearCrossEntropyOptions


def _lce_entry():
    """(per-token NLL function, options class, where from) or (None, None, reason)."""
    F = torch.nn.functional
    src = os.environ.get("TORCH_LCE_SRC")
    if src:  # asked for explicitly (tests use it on a torch that has its own copy too)
        return (*_carried_lce(Path(src)), f"torch 2.13+ sources in {src}")
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        def nll(h2, w, target, options):
            return F.linear_cross_entropy(h2, w, target, reduction="none", options=options)

        return nll, torch.nn.LinearCrossEntropyOptions, f"torch {torch.__version__}"
    return None, None, (f"torch {torch.__version__} has no linear_cross_entropy with LinearCrossEntropyOptions "
                        "(2.13+); set TORCH_LCE_SRC to a folder with its two modules to load them")


def torch_lce_impls() -> dict:
    """PyTorch's chunked linear cross-entropy: reduction="none" per-token NLL, masked row sums."""
    nll, Options, where = _lce_entry()
    if nll is None:
        return {"torch-lce": {"skip": where}, "torch-lce-lean": {"skip": where}}

    def logps_fn(options):
        def logps(h, w, y, m):
            B, T, H = h.shape
            per_token = nll(h.reshape(-1, H), w, torch.where(m, y, -100).reshape(-1), options)
            return -(per_token.view(B, T).float() * m).sum(-1)

        return logps

    default, lean = logps_fn(Options()), logps_fn(Options(**LCE_LEAN_OPTIONS))
    return {
        "torch-lce": {"step": lambda h, w, y, m, r: dpo_from_logps(default(h, w, y, m), r), "ref": default},
        "torch-lce-lean": {"step": lambda h, w, y, m, r: dpo_from_logps(lean(h, w, y, m), r), "ref": lean},
    }


def trl_impl() -> dict:
    """TRL's DPOTrainer log-probs: its fused LM head (trl.trainer.utils.add_fused_lm_head) calls
    ChunkedLogProbFunction on the valid positions where Triton runs, on every position elsewhere
    (masked ones zeroed after), with TRL's vocabulary chunk. Only log-probs are asked for, as for
    TRL's reference model; its policy head also asks for entropy, mean logit and top-1 (metrics),
    which the other rows do not compute either."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction
    except ImportError as exc:
        return {"trl-chunked": {"skip": f"no chunked log-prob function in this TRL ({exc})"}}

    def logps(h, w, y, m):
        B, T, H = h.shape
        flat_h, flat_y, flat_m = h.reshape(-1, H), y.reshape(-1), m.reshape(-1)
        compact = _use_triton(h.device)
        hidden = flat_h[flat_m] if compact else flat_h
        targets = flat_y[flat_m] if compact else torch.where(flat_m, flat_y, 0)
        # (hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs)
        per_token = _ChunkedLogProbFunction.apply(hidden, w, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                                  1.0, ("log_probs",))
        lp = per_token[0]
        lp = lp.new_zeros(flat_m.shape).masked_scatter(flat_m, lp) if compact else lp.masked_fill(~flat_m, 0)
        return lp.view(B, T).float().sum(-1)

    return {"trl-chunked": {"step": lambda h, w, y, m, r: dpo_from_logps(logps(h, w, y, m), r), "ref": logps}}


def lean_impl(chunk: int, vocab_chunk: int) -> dict[str, Callable]:
    """The recompute path with `chunk` tokens x `vocab_chunk` vocabulary rows (0: all) per tile."""
    opts = dict(chunk_size=chunk, vocab_chunk_size=vocab_chunk or None)
    return {
        "step": lambda h, w, y, m, r: fastdpo.fused_linear_dpo_loss(h, w, y, r, mask=m, beta=BETA,
                                                                    grad_in_forward=False, **opts),
        "ref": lambda h, w, y, m: fastdpo.linear_sequence_logps(h, w, y, mask=m, **opts),
    }


def lean_name(chunk: int, vocab_chunk: int) -> str:
    return f"fastdpo-lean-{chunk}x{vocab_chunk or 'V'}"


def implementations(only: list[str] | None, lean: list[tuple[int, int]], chunk: int | None
                    ) -> dict[str, dict[str, Callable]]:
    """name -> {"step": loss(h, w, y, m, ref), "ref": logps(h, w, y, m)}; `chunk` tunes fastdpo's
    default, `lean` lists the (tokens, vocabulary rows) tiles of the lean rows."""
    compiled_logps = torch.compile(eager_logps)
    impls = {
        "eager": {"step": lambda h, w, y, m, r: dpo_from_logps(eager_logps(h, w, y, m), r), "ref": eager_logps},
        "compile": {"step": torch.compile(lambda h, w, y, m, r: dpo_from_logps(eager_logps(h, w, y, m), r)),
                    "ref": compiled_logps},
        "fastdpo": {
            "step": lambda h, w, y, m, r: fastdpo.fused_linear_dpo_loss(h, w, y, r, mask=m, beta=BETA,
                                                                        chunk_size=chunk),
            "ref": lambda h, w, y, m: fastdpo.linear_sequence_logps(h, w, y, mask=m, chunk_size=chunk),
        },
        "fastdpo-recompute": {
            "step": lambda h, w, y, m, r: fastdpo.fused_linear_dpo_loss(h, w, y, r, mask=m, beta=BETA,
                                                                        grad_in_forward=False, chunk_size=chunk),
        },
    }
    impls |= {lean_name(*tile): lean_impl(*tile) for tile in lean}
    liger = liger_impl()
    if liger is not None:
        impls["liger"] = liger
    impls |= cce_impls()
    impls |= torch_lce_impls()
    impls |= trl_impl()
    if only is None:
        return impls
    # In the order asked for (a run that hits its time limit has measured the first ones).
    wanted = list(only)
    rank = {name: k for k, name in enumerate(wanted)}
    picked = [k for k in impls if k in rank or (k.startswith("fastdpo-lean") and "fastdpo-lean" in rank)]
    picked.sort(key=lambda k: rank.get(k, rank.get("fastdpo-lean", 0)))
    return {k: impls[k] for k in picked}


def fp32_grads(hidden, weight, labels, mask, ref):
    """Gradients of the eager loss on fp32 copies of the inputs: the yardstick for gradient error."""
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = dpo_from_logps(eager_logps(h, w, labels, mask), ref)
    return torch.autograd.grad(loss, (h, w))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def bench_shape(name, P, T, H, V, impls, args, device, rate, on_result=None) -> list[common.Result]:
    """Every implementation and mode at one shape; `on_result(results so far)` after each row."""
    torch.manual_seed(0)  # the same inputs and masks in every process of an --isolate run
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(2 * P, T, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5 * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = common.anchor_masks(P, T, device, masked=not args.no_mask)
    ref = -200 * torch.rand(2 * P, device=device)
    N, Nv = 2 * P * T, int(mask.sum())
    # The yardsticks are computed when first needed, after the first measurement: in a process of
    # its own (--isolate) the measured step then runs before anything else has touched memory.
    yardsticks = {}

    def yardstick(key: str):
        if key not in yardsticks:
            if key == "exact":
                yardsticks[key] = chunked_logps64(hidden.detach(), labels, mask, weight.detach(), rows=512)
            else:  # Liger takes no precomputed reference log-probs (use_ref_model=False: a zero reference)
                r = torch.zeros_like(ref) if key == "grads_zero_ref" else ref
                yardsticks[key] = fp32_grads(hidden, weight, labels, mask, r)
        return yardsticks[key]

    floor = 6 * N * H * V / rate * 1e3  # the anchor floor: every token, 6NHV
    results = []
    for impl, fns in impls.items():
        for mode, key in (("fwd+bwd", "step"), ("fwd", "ref")):
            if mode not in args.modes or (key not in fns and "skip" not in fns):
                continue
            if "skip" in fns:
                results.append(common.Result(name, impl, mode, skipped=fns["skip"]))
                print(f"  {name} {mode:7s} {impl:18s} skipped: {fns['skip']}", flush=True)
                continue
            kind = "fastdpo-lean" if impl.startswith("fastdpo-lean") else impl
            per, per_fwd, over = FLOPS.get(kind, (6, 2, "all"))
            if kind == "fastdpo" and device.type == "cpu" and args.chunk_size is None:
                per = 8  # the CPU default chunk is usually shorter than a pair: those pairs are recomputed
            flops = (per if mode == "fwd+bwd" else (per_fwd or 2)) * (N if over == "all" else Nv) * H * V
            r = common.Result(name, impl, mode, floor_ms=floor if mode == "fwd+bwd" else floor / 3,
                              extra={"P": P, "T": T, "H": H, "V": V, "N": N, "valid": Nv, "flops": flops})
            try:
                if key == "step":
                    fn = lambda: torch.autograd.grad(fns["step"](hidden, weight, labels, mask, ref),  # noqa: E731
                                                     (hidden, weight))
                else:
                    def fn():
                        with torch.no_grad():
                            return fns["ref"](hidden, weight, labels, mask)
                if device.type == "cpu":
                    # Memory first: freed CPU memory can stay resident (malloc keeps it), so after
                    # the timed steps a step's peak would hide in what is already resident. With
                    # --isolate this is the first step of a fresh process, as in a real run.
                    r.extra_gb = common.extra_memory_gb(fn, device)
                    r.extra["peak_rss_gb"] = common.peak_rss_gb()  # the process's peak during that step
                cpu_ms = []
                r.ms = common.time_ms(fn, device, args.warmup, args.iters, cpu_ms)
                if cpu_ms:
                    r.extra["cpu_ms"] = statistics.median(cpu_ms)
                if device.type != "cpu":
                    r.extra_gb = common.extra_memory_gb(fn, device)
                r.extra["matmul_frac"] = flops / (r.ms / 1e3) / rate
                if key == "step":
                    dh, dw = fn()
                    want = yardstick("grads_zero_ref" if impl == "liger" else "grads")
                    r.extra["grad_err_hidden"] = rel_err(dh, want[0])
                    r.extra["grad_err_weight"] = rel_err(dw, want[1])
                    del dh, dw
                else:
                    exact = yardstick("exact")
                    got = fn().double()
                    r.rel_err = ((got - exact).abs() / exact.abs().clamp(min=1)).max().item()
            except Exception as exc:  # one failing peer must not sink the whole run
                r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            results.append(r)
            if on_result is not None:
                on_result(results)
            print(f"  {name} {mode:7s} {impl:18s} {r.ms or float('nan'):9.3f} ms  "
                  f"extra {r.extra_gb if r.extra_gb is not None else float('nan'):6.2f} GB  "
                  f"matmul {r.extra.get('matmul_frac', float('nan')):5.2f}  {r.error or ''}", flush=True)
    return results


def flop_table(results: list[common.Result]) -> str:
    lines = ["| shape | mode | impl | FLOPs done | of matmul rate | grad err hidden | grad err weight |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.error or r.ms is None:
            continue
        e = r.extra
        lines.append(f"| {r.shape} | {r.mode} | {r.impl} | {e['flops']:.3g} | {e['matmul_frac']:.2f} | "
                     f"{e.get('grad_err_hidden', float('nan')):.1e} | {e.get('grad_err_weight', float('nan')):.1e} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "P,T,H,V")
    p.add_argument("--lean", type=parse_tiles, default=parse_tiles("256:0,1024:4096"),
                   help="lean settings as tokens:vocab_rows tiles (0 = whole vocabulary), comma-separated; "
                        "each is a row fastdpo-lean-TOKENSxVOCAB")
    p.add_argument("--isolate", action="store_true",
                   help="run each implementation and mode in a process of its own (peak memory on CPU)")
    p.add_argument("--baseline", default="torch-lce", help="the implementation the ratio table divides by")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's); 1 makes CPU time comparable on a shared machine")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk of fastdpo and fastdpo-recompute (default: fastdpo's: about 512 MiB of "
                        "logits on a GPU, H / 32 tokens or 1 MiB of logits on the CPU)")
    return p.parse_args(argv)


def parse_tiles(text: str) -> list[tuple[int, int]]:
    tiles = []
    for item in filter(None, text.split(",")):
        chunk, _, vocab = item.partition(":")
        tiles.append((int(chunk), int(vocab or 0)))
    return tiles


def run_isolated(argv: list[str], impls: list[str], modes: set[str], out: Path) -> list[common.Result]:
    """Each implementation and mode in a fresh process of this script; their results, in order."""
    passed = [a for a in argv if a != "--isolate"]
    results = []
    for impl in impls:
        for mode in ("fwd+bwd", "fwd"):
            if mode not in modes:
                continue
            sub = out / "isolated" / f"{impl}_{mode.replace('+', '_')}"
            cmd = [sys.executable, str(Path(__file__).resolve()), *passed, "--impls", impl, "--modes", mode,
                   "--out", str(sub)]
            print(f"-- {impl} {mode} in its own process", flush=True)
            done = subprocess.run(cmd)
            found = sub / "bench_linear.json"
            if done.returncode == 0 and found.exists():
                results += [common.Result(**{k: v for k, v in r.items() if k != "floor_frac"})
                            for r in json.loads(found.read_text())["results"]]
            else:
                results.append(common.Result("?", impl, mode, error=f"its process exited with {done.returncode}"))
    return results


def ratio_table(results: list[common.Result], baseline: str) -> str:
    """Time, extra memory and (CPU) process peak of each row as ratios to the baseline's same shape and mode."""
    base = {(r.shape, r.mode): r for r in results if r.impl == baseline and r.ms}
    lines = [f"| shape | mode | impl | wall ms | CPU ms | extra GB | process peak GB | wall / {baseline} | "
             f"CPU time / {baseline} | extra / {baseline} | peak / {baseline} |", "|---" * 11 + "|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if a is not None and b else ""

    for r in results:
        b = base.get((r.shape, r.mode))
        if r.ms is None or b is None:
            continue
        peak, b_peak = r.extra.get("peak_rss_gb"), b.extra.get("peak_rss_gb")
        cpu, b_cpu = r.extra.get("cpu_ms"), b.extra.get("cpu_ms")
        lines.append(f"| {r.shape} | {r.mode} | {r.impl} | {r.ms:.0f} | {common._fmt(cpu, '.0f')} | "
                     f"{common._fmt(r.extra_gb, '.3f')} | {common._fmt(peak, '.3f')} | {ratio(r.ms, b.ms)} | "
                     f"{ratio(cpu, b_cpu)} | {ratio(r.extra_gb, b.extra_gb)} | {ratio(peak, b_peak)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.modes = set(args.modes.split(","))
    device = torch.device(args.device)
    shapes = common.select_shapes(args, device, "P,T,H,V", tiny=(2, 64, 64, 1000))
    impls = implementations(args.impls.split(",") if args.impls else None, args.lean, args.chunk_size)
    rate = common.matmul_rate(device)
    meta = {
        "device": common.device_name(device), "torch": torch.__version__, "triton": common.triton_version(),
        "date": datetime.date.today().isoformat(), "bandwidth_tbs": common.copy_bandwidth(device) / 1e12,
        "matmul_tflops": rate / 1e12, "dtype": args.dtype, "masked": not args.no_mask,
        "chunk_size": args.chunk_size, "lean_tiles": args.lean,
    }
    print(f"{meta['device']}: matmul {rate / 1e12:.2f} TFLOP/s", flush=True)
    title = "bench_linear" + ("_nomask" if args.no_mask else "")
    if args.isolate:
        tables = write_tables(run_isolated(argv, list(impls), args.modes, args.out), meta, args, title)
    else:
        results = []
        for name, (P, T, H, V) in shapes.items():
            # Written after each row, should a time limit stop the run.
            done = results
            results = done + bench_shape(name, P, T, H, V, impls, args, device, rate,
                                         on_result=lambda rows: write_tables(done + rows, meta, args, title))
        tables = write_tables(results, meta, args, title)
    for t in tables:
        print()
        print(t)


def write_tables(results: list[common.Result], meta: dict, args, title: str) -> list[str]:
    """JSON, Markdown (time and memory, FLOPs, ratios to the baseline) and plot of the results so far."""
    tables = [common.write_outputs(results, meta, args.out, title), flop_table(results)]
    if any(r.impl == args.baseline and r.ms for r in results):
        tables.append(ratio_table(results, args.baseline))
    with open(args.out / f"{title}.md", "a") as f:
        f.write("".join("\n" + t + "\n" for t in tables[1:]))
    return tables


if __name__ == "__main__":
    main()
