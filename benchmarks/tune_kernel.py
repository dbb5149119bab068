"""Sweep the token-log-prob kernels' launch settings (tile width, warps, token rows a program) on the GPU.

    python benchmarks/tune_kernel.py                     # shapes A and C (common.py SHAPES), masked and not
    python benchmarks/tune_kernel.py --shapes A --blocks 2048,4096 --warps 8,16
    python benchmarks/tune_kernel.py --shapes B --rows 1,4 --blocks 1024,4096 --warps 4,16
    python benchmarks/tune_kernel.py --shapes B --configs 4096:4:1,1024:4:4   # BLOCK_V:warps:rows each

Times the bare kernels (no autograd, no per-sequence sums) so that the launch settings are chosen
on what they change: forward (log-probs + logsumexp), forward with the token metrics, backward
into a new tensor and backward in place. Each time is shown beside its HBM floor at the copy
bandwidth measured in this run: one pass over the logits forward, two backward (read + write).
Masked rows are skipped forward, so on masked batches a kernel can beat the floor.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastdpo.kernels import TokenOptions  # noqa: E402
from fastdpo.kernels.token_logps import token_logps_backward, token_logps_forward  # noqa: E402


def sweep(name, P, T, V, masked, configs, device, bandwidth) -> list[str]:
    logits = (4 * torch.randn(2 * P, T, V, device=device)).to(torch.bfloat16)
    mask = common.anchor_masks(P, T, device, masked=masked)
    labels = torch.where(mask, torch.randint(0, V, mask.shape, device=device), -1).view(-1)
    g = torch.randn(2 * P * T, device=device)
    pass_ms = logits.numel() * 2 / bandwidth * 1e3
    out = torch.empty_like(logits)
    rows = []
    for block_v, num_warps, rows_per_program in configs:
        kw = dict(block_v=block_v, num_warps=num_warps, rows_per_program=rows_per_program)
        metrics = TokenOptions(token_metrics=True)
        lse = token_logps_forward(logits, labels, **kw).state
        cases = {
            "fwd": (lambda: token_logps_forward(logits, labels, **kw), pass_ms),
            "fwd+metrics": (lambda: token_logps_forward(logits, labels, metrics, **kw), pass_ms),
            "bwd": (lambda: token_logps_backward(logits, labels, lse, g, out=out, **kw), 2 * pass_ms),
            "bwd in place": (lambda: token_logps_backward(out, labels, lse, g, out=out, **kw), 2 * pass_ms),
        }
        cells = []
        for fn, floor in cases.values():
            try:
                ms = common.time_ms(fn, device, warmup=3, iters=20)
                cells.append(f"{ms:.3f} ({ms / floor:.2f}x)")
            except Exception as exc:  # a setting that does not compile (registers) is a result too
                cells.append(f"failed: {type(exc).__name__}")
        rows.append(f"| {name}{'' if masked else ' unmasked'} | {block_v} | {num_warps} | {rows_per_program} | "
                    + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="A,C")
    p.add_argument("--shape", action="append", default=[], help="custom P,T,V (repeatable; replaces --shapes)")
    p.add_argument("--blocks", default="1024,2048,4096")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--rows", default="1", help="token rows a program ([ROWS, BLOCK_V] tiles)")
    p.add_argument("--configs", default=None,
                   help="BLOCK_V:warps:rows list, in place of the product of --blocks, --warps and --rows")
    p.add_argument("--unmasked-only", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1, never a result")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bandwidth = common.copy_bandwidth(device)
    print(f"{common.device_name(device)}, triton {common.triton_version()}: copy {bandwidth / 1e12:.2f} TB/s")
    print("| shape | BLOCK_V | warps | rows | fwd ms (/ floor) | fwd+metrics | bwd | bwd in place |")
    print("|---|---|---|---|---|---|---|---|")
    shapes = [(f"P,T,V={s}", *map(int, s.split(","))) for s in args.shape] or \
        [(key, *common.SHAPES[key][2:], common.SHAPES[key][1]) for key in args.shapes.split(",")]
    for name, P, T, V in shapes:
        for masked in ((False,) if args.unmasked_only else (True, False)):
            sweep(name, P, T, V, masked, launch_configs(args), device, bandwidth)


def launch_configs(args) -> list[tuple[int, int, int]]:
    """(BLOCK_V, warps, rows) to time: --configs as given, else every combination."""
    if args.configs:
        return [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    ints = [[int(x) for x in v.split(",")] for v in (args.blocks, args.warps, args.rows)]
    return list(itertools.product(*ints))


if __name__ == "__main__":
    main()
