"""Where one fastdpo step's time and memory go, on the GPU: host syncs, kernels, buffers.

    python benchmarks/profile_step.py                 # from-logits and fused-linear steps at shape A
    python benchmarks/profile_step.py --shapes A,C --rows 15
    python benchmarks/profile_step.py --shapes B --no-linear  # shape B from logits only

For each step: the median time (CUDA events), the host time to launch it, the synchronizing
calls it makes (torch's sync debug mode), the kernels that take the most device time, and for the
fused-linear steps the logits buffers allocated and whether the backward recomputed.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastdpo  # noqa: E402
from fastdpo import linear_chunks  # noqa: E402

DEVICE = torch.device("cuda")


def sync_points(fn) -> list[str]:
    """The distinct places (file:line of fastdpo code) where fn() synchronizes with the host."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})


def report(name: str, fn, rows: int) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    launch = time.perf_counter() - t0
    torch.cuda.synchronize()
    ms = common.time_ms(fn, DEVICE, 2, 10)
    print(f"\n== {name}: {ms:.3f} ms per step; host returns after {launch * 1e3:.2f} ms")
    print("   syncs:", ", ".join(sync_points(fn)) or "none")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=50))


def watch_linear() -> dict:
    """Count recomputing backwards and record the logits buffers the fused-linear passes allocate."""
    seen = {"backward": 0, "buffers": []}
    backward, init = linear_chunks.backward, linear_chunks._Pass.__init__

    def counted_backward(*a, **k):
        seen["backward"] += 1
        return backward(*a, **k)

    def noted_init(self, *a, **k):
        init(self, *a, **k)
        seen["buffers"].append(tuple(self.buf.shape))

    linear_chunks.backward, linear_chunks._Pass.__init__ = counted_backward, noted_init
    return seen


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="A")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--no-linear", action="store_true", help="from-logits steps only")
    args = p.parse_args(argv)
    seen = watch_linear()
    for key in args.shapes.split(","):
        H, V, P, T = common.SHAPES[key]
        mask = common.anchor_masks(P, T, DEVICE)
        labels = torch.randint(0, V, (2 * P, T), device=DEVICE)
        ref = -200 * torch.rand(2 * P, device=DEVICE)
        logits = (4 * torch.randn(2 * P, T, V, device=DEVICE)).to(torch.bfloat16).requires_grad_()

        def logits_step():
            return torch.autograd.grad(fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask), logits)

        def logits_ref():
            with torch.no_grad():
                return fastdpo.sequence_logps(logits, labels, mask=mask)

        report(f"{key} from logits, fwd+bwd", logits_step, args.rows)
        report(f"{key} from logits, fwd", logits_ref, args.rows)
        logits = None  # free it before the fused-linear inputs
        if args.no_linear:
            continue
        hidden = torch.randn(2 * P, T, H, device=DEVICE).to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(V, H, device=DEVICE) / H**0.5 * 4).to(torch.bfloat16).requires_grad_()
        for gif in (True, False):
            def linear_step():
                loss = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, ref, mask=mask, grad_in_forward=gif)
                return torch.autograd.grad(loss, (hidden, weight))

            seen["backward"], seen["buffers"] = 0, []
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            linear_step()
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9
            print(f"\n{key} linear grad_in_forward={gif}: peak extra {peak:.2f} GB, recomputing backwards "
                  f"{seen['backward']}, logits buffers {seen['buffers']}")
            report(f"{key} fused linear, grad_in_forward={gif}", linear_step, args.rows)
        hidden = weight = None


if __name__ == "__main__":
    main()
