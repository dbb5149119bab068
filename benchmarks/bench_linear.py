"""Benchmark fused linear DPO (hidden states + lm_head in): fastdpo vs eager, torch.compile, Liger, CCE.

    python benchmarks/bench_linear.py                   # shapes A, B, C of ANCHORS.md on the GPU
    python benchmarks/bench_linear.py --no-mask         # every token is a completion token
    python benchmarks/bench_linear.py --shape 4,2048,3584,151936 --impls fastdpo,compile
    python benchmarks/bench_linear.py --device cpu      # smoke test on a tiny shape (not a result)
    python benchmarks/bench_linear.py --impls compile,cce-exact --lean 256:0,1024:4096   # lean settings

For each shape: the policy step (DPO loss forward + gradients of hidden and weight) and the
reference pass (per-row log-probs, no grad). Reports median time, extra peak memory (gradients
included, inputs not), the FLOP floor 6·N·H·V over all tokens at the bf16 matmul rate measured in
this run (as ANCHORS.md), the FLOPs each implementation actually does (6 or 8 per valid or per
token, see `FLOPS`) as a fraction of that rate, the per-row log-prob error against float64 and the
gradient error against fp32. Writes JSON, a Markdown table and a PNG plot to --out.
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
from fastdpo.reference import reference_sequence_logps  # noqa: E402

BETA = 0.1

# FLOPs per (token, H, V) of each implementation, and over which tokens: "all" or "valid".
FLOPS = {
    "eager": (6, 2, "all"), "compile": (6, 2, "all"), "liger": (6, None, "all"),
    "cce-exact": (8, 2, "valid"), "cce-filtered": (8, 2, "valid"),
    "fastdpo": (6, 2, "valid"), "fastdpo-recompute": (8, 2, "valid"), "fastdpo-lean": (8, 2, "valid"),
}  # (fwd+bwd, fwd, tokens counted)


def dpo_from_logps(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    P = logps.shape[0] // 2
    d = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    return -torch.nn.functional.logsigmoid(BETA * d).mean()


def eager_logps(h, w, y, m):
    """The method fastdpo replaces: the full logits, then fp32 log_softmax, gather, masked sum."""
    return reference_sequence_logps(h @ w.t(), y, mask=m)


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


def implementations(only: set[str] | None, lean: list[tuple[int, int]], chunk: int | None
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
    return {k: v for k, v in impls.items() if only is None or k in only or (k.startswith("fastdpo-lean") and
                                                                           "fastdpo-lean" in only)}


def exact_logps64(hidden, weight, labels, mask, rows=512):
    """Float64 per-row log-probs of the (already rounded) inputs, a few hundred tokens at a time."""
    B, T, _ = hidden.shape
    w = weight.double()
    out = torch.zeros(B, dtype=torch.float64, device=hidden.device)
    for b in range(B):
        for t0 in range(0, T, rows):
            s = hidden[b, t0 : t0 + rows].double() @ w.t()
            lp = s.gather(1, labels[b, t0 : t0 + rows, None]).squeeze(1) - torch.logsumexp(s, 1)
            out[b] += (lp * mask[b, t0 : t0 + rows]).sum()
    return out


def fp32_grads(hidden, weight, labels, mask, ref):
    """Gradients of the eager loss on fp32 copies of the inputs: the yardstick for gradient error."""
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = dpo_from_logps(eager_logps(h, w, labels, mask), ref)
    return torch.autograd.grad(loss, (h, w))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def bench_shape(name, P, T, H, V, impls, args, device, rate) -> list[common.Result]:
    dtype = getattr(torch, args.dtype)
    hidden = torch.randn(2 * P, T, H, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=device) / H**0.5 * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T), device=device)
    mask = common.anchor_masks(P, T, device, masked=not args.no_mask)
    ref = -200 * torch.rand(2 * P, device=device)
    N, Nv = 2 * P * T, int(mask.sum())
    exact = exact_logps64(hidden.detach(), weight.detach(), labels, mask)
    want_grads = "fwd+bwd" in args.modes
    grads32 = fp32_grads(hidden, weight, labels, mask, ref) if want_grads else None
    # Liger takes no precomputed reference log-probs (use_ref_model=False means a zero reference).
    grads32_zero_ref = fp32_grads(hidden, weight, labels, mask, torch.zeros_like(ref)) if (
        want_grads and "liger" in impls) else None
    floor = 6 * N * H * V / rate * 1e3  # ANCHORS.md's floor: every token, 6NHV
    results = []
    for impl, fns in impls.items():
        for mode, key in (("fwd+bwd", "step"), ("fwd", "ref")):
            if mode not in args.modes or key not in fns:
                continue
            kind = "fastdpo-lean" if impl.startswith("fastdpo-lean") else impl
            per, per_fwd, over = FLOPS.get(kind, (6, 2, "all"))
            flops = (per if mode == "fwd+bwd" else (per_fwd or 2)) * (N if over == "all" else Nv) * H * V
            r = common.Result(name, impl, mode, floor_ms=floor if mode == "fwd+bwd" else floor / 3,
                              extra={"P": P, "T": T, "H": H, "V": V, "N": N, "valid": Nv, "flops": flops})
            try:
                if key == "step":
                    fn = lambda: torch.autograd.grad(fns["step"](hidden, weight, labels, mask, ref),  # noqa: E731
                                                     (hidden, weight))
                    dh, dw = fn()
                    want = grads32_zero_ref if impl == "liger" else grads32
                    r.extra["grad_err_hidden"] = rel_err(dh, want[0])
                    r.extra["grad_err_weight"] = rel_err(dw, want[1])
                    del dh, dw
                else:
                    def fn():
                        with torch.no_grad():
                            return fns["ref"](hidden, weight, labels, mask)
                    got = fn().double()
                    r.rel_err = ((got - exact).abs() / exact.abs().clamp(min=1)).max().item()
                r.ms = common.time_ms(fn, device, args.warmup, args.iters)
                r.extra_gb = common.extra_memory_gb(fn, device)
                r.extra["matmul_frac"] = flops / (r.ms / 1e3) / rate
            except Exception as exc:  # one failing peer must not sink the whole run
                r.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            results.append(r)
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
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk of fastdpo and fastdpo-recompute (default: fastdpo's, ~512 MiB of logits)")
    return p.parse_args(argv)


def parse_tiles(text: str) -> list[tuple[int, int]]:
    tiles = []
    for item in filter(None, text.split(",")):
        chunk, _, vocab = item.partition(":")
        tiles.append((int(chunk), int(vocab or 0)))
    return tiles


def main(argv=None) -> None:
    args = parse_args(argv)
    args.modes = set(args.modes.split(","))
    device = torch.device(args.device)
    shapes = common.select_shapes(args, device, "P,T,H,V", tiny=(2, 64, 64, 1000))
    impls = implementations(set(args.impls.split(",")) if args.impls else None, args.lean, args.chunk_size)
    rate = common.matmul_rate(device)
    meta = {
        "device": common.device_name(device), "torch": torch.__version__, "triton": common.triton_version(),
        "date": datetime.date.today().isoformat(), "bandwidth_tbs": common.copy_bandwidth(device) / 1e12,
        "matmul_tflops": rate / 1e12, "dtype": args.dtype, "masked": not args.no_mask,
        "chunk_size": args.chunk_size, "lean_tiles": args.lean,
    }
    print(f"{meta['device']}: matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    results = []
    for name, (P, T, H, V) in shapes.items():
        results += bench_shape(name, P, T, H, V, impls, args, device, rate)
    title = "bench_linear" + ("_nomask" if args.no_mask else "")
    table = common.write_outputs(results, meta, args.out, title)
    flops = flop_table(results)
    with open(args.out / f"{title}.md", "a") as f:
        f.write("\n" + flops + "\n")
    print()
    print(table)
    print()
    print(flops)


if __name__ == "__main__":
    main()
