"""Benchmark DPO from logits: fastdpo vs eager PyTorch, torch.compile and Liger, in one run.

    python benchmarks/bench_loss.py                   # shapes A, B, C (common.py SHAPES) on the GPU
    python benchmarks/bench_loss.py --shape 4,2048,151936 --impls fastdpo,compile
    python benchmarks/bench_loss.py --device cpu      # smoke test on a tiny shape (not a result)
    python benchmarks/bench_loss.py --linear [...]    # the fused-linear variant: bench_linear.py's flags

For each shape: the policy step (loss forward + logits gradient) and the reference pass
(per-row log-probs, no grad). Reports median time, extra peak memory, the HBM floor (3 passes
over the bf16 logits for the step, 1 for the reference pass, at the copy bandwidth measured in
this run), floor / time, and the per-row log-prob error against float64. Writes JSON, a Markdown
table and a PNG plot to --out.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo.eager import chunked_logps64, eager_sequence_logps  # noqa: E402

BETA = 0.1


def liger_logps() -> Callable | None:
    """Per-row log-probs through Liger's cross-entropy (reduction='none', then a masked sum)."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    ce = LigerCrossEntropyLoss(reduction="none")

    def logps(logits, labels, mask):
        B, T, V = logits.shape
        per_token = ce(logits.reshape(B * T, V), torch.where(mask, labels, -100).reshape(-1))
        return -(per_token.view(B, T).float() * mask).sum(-1)

    return logps


def dpo_from_logps(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    P = logps.shape[0] // 2
    d = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    return -torch.nn.functional.logsigmoid(BETA * d).mean()


def unchecked(fn: Callable) -> Callable:
    def run(*args):
        with fastdpo.value_checks(False):
            return fn(*args)

    return run


def implementations(only: set[str] | None) -> dict[str, dict[str, Callable]]:
    """name -> {"step": f(logits, labels, mask, ref) -> grad, "ref": f(logits, labels, mask) -> logps}."""

    def grad_of(loss_fn):
        return lambda x, y, m, r: torch.autograd.grad(loss_fn(x, y, m, r), x)[0]

    def eager_loss(x, y, m, r):  # the method fastdpo replaces, without input checks (they break graphs)
        return dpo_from_logps(eager_sequence_logps(x, y, mask=m), r)

    def eager_logps(x, y, m):
        return eager_sequence_logps(x, y, mask=m)

    impls = {
        "eager": {"step": grad_of(eager_loss), "ref": eager_logps},
        "compile": {"step": grad_of(torch.compile(eager_loss)), "ref": torch.compile(eager_logps)},
        "fastdpo": {
            "step": grad_of(lambda x, y, m, r: fastdpo.fused_dpo_loss(x, y, r, mask=m, beta=BETA)),
            "ref": lambda x, y, m: fastdpo.sequence_logps(x, y, mask=m),
        },
        # Without the host-side label check (one sync per call): fastdpo.value_checks(False).
        "fastdpo-nocheck": {
            "step": grad_of(unchecked(lambda x, y, m, r: fastdpo.fused_dpo_loss(x, y, r, mask=m, beta=BETA))),
            "ref": unchecked(lambda x, y, m: fastdpo.sequence_logps(x, y, mask=m)),
        },
        # It overwrites the logits with their gradient, so it times on spent inputs.
        "fastdpo-inplace": {
            "step": grad_of(lambda x, y, m, r: fastdpo.fused_dpo_loss(x, y, r, mask=m, beta=BETA,
                                                                      inplace_backward=True)),
        },
    }
    liger = liger_logps()
    if liger is not None:
        impls = {"liger": {
            "step": grad_of(lambda x, y, m, r: dpo_from_logps(liger(x, y, m), r)),
            "ref": liger,
        }} | impls
    return {k: v for k, v in impls.items() if only is None or k in only}


def bench_shape(name, P, T, V, impls, args, device, bandwidth) -> list[common.Result]:
    dtype = getattr(torch, args.dtype)
    logits = (4 * torch.randn(2 * P, T, V, device=device)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = common.anchor_masks(P, T, device, masked=not args.no_mask)
    ref = -200 * torch.rand(2 * P, device=device)
    exact = chunked_logps64(logits.detach(), labels, mask)
    pass_ms = logits.numel() * logits.element_size() / bandwidth * 1e3
    results = []
    for impl, fns in impls.items():
        # A fresh copy per implementation: Liger's cross-entropy and the in-place backward both
        # overwrite their input with its gradient. The error is read on the first, unspent call.
        x = logits.detach().clone().requires_grad_()
        for mode, key, floor in (("fwd", "ref", pass_ms), ("fwd+bwd", "step", 3 * pass_ms)):
            if mode not in args.modes or key not in fns:
                continue
            r = common.Result(name, impl, mode, floor_ms=floor, extra={"P": P, "T": T, "V": V})
            try:
                if key == "step":
                    fn = lambda: fns["step"](x, labels, mask, ref)  # noqa: E731
                else:
                    def fn():
                        with torch.no_grad():
                            return fns["ref"](x, labels, mask)
                    got = fn().double()
                    r.rel_err = ((got - exact).abs() / exact.abs().clamp(min=1)).max().item()
                r.ms = common.time_ms(fn, device, args.warmup, args.iters)
                r.extra_gb = common.extra_memory_gb(fn, device)
            except Exception as exc:  # one failing peer must not sink the whole run
                r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            results.append(r)
            fn = None  # drop the closure's hold on x before the next copy
            print(f"  {name} {mode:7s} {impl:16s} {r.ms or float('nan'):9.3f} ms  "
                  f"extra {r.extra_gb if r.extra_gb is not None else float('nan'):6.2f} GB  {r.error or ''}",
                  flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "P,T,V")
    return p.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--linear" in argv:  # from hidden states: one entry point for both benchmarks
        import bench_linear

        argv.remove("--linear")
        return bench_linear.main(argv)
    args = parse_args(argv)
    args.modes = set(args.modes.split(","))
    device = torch.device(args.device)
    shapes = common.select_shapes(args, device, "P,T,V", tiny=(2, 64, 1000))
    impls = implementations(set(args.impls.split(",")) if args.impls else None)
    bandwidth = common.copy_bandwidth(device)
    meta = {
        "device": common.device_name(device), "torch": torch.__version__,
        "triton": common.triton_version(), "date": datetime.date.today().isoformat(),
        "bandwidth_tbs": bandwidth / 1e12, "dtype": args.dtype, "masked": not args.no_mask,
        "matmul_tflops": 0.0,
    }
    print(f"{meta['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = []
    for name, (P, T, V) in shapes.items():
        results += bench_shape(name, P, T, V, impls, args, device, bandwidth)
    print()
    print(common.write_outputs(results, meta, args.out, "bench_loss"))


if __name__ == "__main__":
    main()
