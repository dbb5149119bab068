"""Sweep the token-log-prob kernels' launch settings (tile width, warps) on the GPU.

    python benchmarks/tune_kernel.py                     # shapes A and C (common.py SHAPES), masked and not
    python benchmarks/tune_kernel.py --shapes A --blocks 2048,4096 --warps 8,16

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


def sweep(name, P, T, V, masked, blocks, warps, device, bandwidth) -> list[str]:
    logits = (4 * torch.randn(2 * P, T, V, device=device)).to(torch.bfloat16)
    mask = common.anchor_masks(P, T, device, masked=masked)
    labels = torch.where(mask, torch.randint(0, V, mask.shape, device=device), -1).view(-1)
    g = torch.randn(2 * P * T, device=device)
    pass_ms = logits.numel() * 2 / bandwidth * 1e3
    out = torch.empty_like(logits)
    rows = []
    for block_v, num_warps in itertools.product(blocks, warps):
        kw = dict(block_v=block_v, num_warps=num_warps)
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
        rows.append(f"| {name}{'' if masked else ' unmasked'} | {block_v} | {num_warps} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="A,C")
    p.add_argument("--blocks", default="1024,2048,4096")
    p.add_argument("--warps", default="4,8,16")
    p.add_argument("--unmasked-only", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    bandwidth = common.copy_bandwidth(device)
    blocks = [int(x) for x in args.blocks.split(",")]
    warps = [int(x) for x in args.warps.split(",")]
    print(f"{common.device_name(device)}, triton {common.triton_version()}: copy {bandwidth / 1e12:.2f} TB/s")
    print("| shape | BLOCK_V | warps | fwd ms (/ floor) | fwd+metrics | bwd | bwd in place |")
    print("|---|---|---|---|---|---|---|")
    for key in args.shapes.split(","):
        H, V, P, T = common.SHAPES[key]
        for masked in ((False,) if args.unmasked_only else (True, False)):
            sweep(key, P, T, V, masked, blocks, warps, device, bandwidth)


if __name__ == "__main__":
    main()
