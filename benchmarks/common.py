"""Shared measuring tools of the benchmarks: timing, peak memory, hardware ceilings, masks, output.

Timing is the median of per-iteration CUDA-event intervals after warm-up, with the iterations
queued back to back as in a training loop, where the host runs ahead of the GPU (a host sync
inside a step drains that queue and shows in its time). perf_counter on CPU. "Extra" memory is
the peak allocated during one step minus what was allocated before it (the inputs), so it
includes the gradient; on CPU it is the process's peak resident memory during the step (Linux
VmHWM, reset before it) minus its resident memory before it, which is meaningful only when each
implementation runs in its own process (bench_linear.py --isolate). CPU numbers are labelled CPU
and compared as ratios within one run, never against GPU results.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

SHAPES = {  # the anchor shapes: name -> (hidden H, vocab V, pairs P, tokens per row T)
    # A: Llama-3-8B's head, B: a 32k vocabulary, C: Qwen2.5-7B's head
    "A": (4096, 128256, 4, 1024),
    "B": (4096, 32000, 8, 1024),
    "C": (3584, 151936, 4, 2048),
    # Not an anchor: the CPU comparison's shape, V >> H as in an LLM head, a few seconds a step on 2 cores.
    "CPU": (512, 16000, 2, 256),
}


@dataclass
class Result:
    shape: str
    impl: str
    mode: str  # "fwd+bwd" or "fwd"
    ms: float | None = None
    extra_gb: float | None = None
    floor_ms: float | None = None
    rel_err: float | None = None
    error: str | None = None
    skipped: str | None = None  # why the implementation was not run (a peer missing from this install)
    extra: dict = field(default_factory=dict)

    @property
    def floor_frac(self) -> float | None:
        return self.floor_ms / self.ms if self.ms and self.floor_ms else None


def liger_unavailable(device: torch.device) -> str | None:
    """Why TRL's use_liger_kernel=True cannot run here, or None."""
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel not installed"
    # Liger-Kernel's layer kernels have no CPU path (its RMSNorm fails under Triton's interpreter)
    return None if device.type == "cuda" else "Liger-Kernel's layer kernels need a GPU"


@contextmanager
def modeling_patches_undone(model_type: str) -> Iterator[None]:
    """Whatever a row changes in transformers' modeling modules is put back when it ends.

    Liger-Kernel's layer kernels (TRL's `use_liger_kernel=True`) replace transformers' RMSNorm and
    MLP classes and rotary-embedding function module-wide, not only in the model they are given:
    without this, every model built later in the process, the other rows' included, would run
    Liger's layers. Module attributes and the attributes of the classes each module defines are
    restored; `model_type`'s own module is imported first so that it is among them.
    """
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    modules = [m for name, m in list(sys.modules.items())
               if name.startswith("transformers.models.") and ".modeling_" in name and m is not None]
    saved = [(m, dict(vars(m)), {k: (c, dict(vars(c))) for k, c in vars(m).items()
                                 if isinstance(c, type) and c.__module__ == m.__name__}) for m in modules]
    try:
        yield
    finally:
        for module, attrs, classes in saved:
            for name in set(vars(module)) - set(attrs):
                delattr(module, name)
            for name, value in attrs.items():
                if vars(module).get(name) is not value:
                    setattr(module, name, value)
            for cls, cls_attrs in classes.values():
                for name in set(vars(cls)) - set(cls_attrs):
                    delattr(cls, name)
                for name, value in cls_attrs.items():
                    if vars(cls).get(name) is not value:
                        setattr(cls, name, value)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10,
            cpu_ms: list[float] | None = None) -> float:
    """Median wall time of fn() in milliseconds; on CPU the process CPU time of each call is
    appended to `cpu_ms` if given (on a shared machine it varies far less than wall time)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync(device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        if cpu_ms is not None:
            cpu_ms.append(1e3 * (time.process_time() - c0))
    return statistics.median(times)


def _proc_status_gb(key: str) -> float:
    """A memory line of /proc/self/status (kB) in GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1e3 / 1e9
    raise KeyError(key)


def peak_rss_gb() -> float | None:
    """The process's peak resident memory so far (Linux), in GB; None where unknown."""
    try:
        return _proc_status_gb("VmHWM")
    except (OSError, KeyError):
        return None


def _cpu_extra_memory_gb(fn: Callable[[], object]) -> float | None:
    """Peak resident memory while fn() runs above the resident memory before it (Linux: VmHWM is
    reset by writing 5 to /proc/self/clear_refs); None where that cannot be measured."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_gb("VmRSS")
    except (OSError, KeyError):
        return None
    out = fn()
    peak = _proc_status_gb("VmHWM")
    del out
    return peak - base


def extra_memory_gb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak bytes allocated while fn() runs (its results freed after), above what was there before."""
    if device.type == "cpu":
        return _cpu_extra_memory_gb(fn)
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 1e9


def copy_bandwidth(device: torch.device, gb: float = 2.0) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written)."""
    n = int(gb * 1e9 / 2) if device.type == "cuda" else 2**22
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def matmul_rate(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matmul rate in FLOP/s on an n^3 product."""
    n = n if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, iters=10)
    return 2 * n**3 / (ms / 1e3)


def anchor_masks(P: int, T: int, device: torch.device, masked: bool = True) -> torch.Tensor:
    """The anchor masks: first T/4 tokens are prompt, plus random right padding up to T/4."""
    mask = torch.ones(2 * P, T, dtype=torch.bool, device=device)
    if not masked:
        return mask
    mask[:, : T // 4] = False
    pad = torch.randint(0, T // 4 + 1, (2 * P,))
    for row, p in enumerate(pad.tolist()):
        if p:
            mask[row, T - p :] = False
    return mask


def add_common_args(p: argparse.ArgumentParser, shape_fields: str) -> None:
    """Flags every benchmark shares; `shape_fields` names the numbers of --shape, e.g. "P,T,V"."""
    p.add_argument("--shapes", default=None, help="comma list of SHAPES names (default A,B,C; tiny on CPU)")
    p.add_argument("--shape", action="append", default=[], help=f"custom {shape_fields} (repeatable)")
    p.add_argument("--impls", default=None, help="comma list (default: all available)")
    p.add_argument("--modes", default="fwd+bwd,fwd")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--no-mask", action="store_true", help="every token is a completion token")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("bench_results"))


def select_shapes(args: argparse.Namespace, device: torch.device, fields: str, tiny: tuple[int, ...]) -> dict:
    """name -> shape tuple in `fields` order ("P,T,V" or "P,T,H,V"): SHAPES by name
    (A, B, C by default on a GPU), custom ones from --shape, or `tiny` on a CPU smoke test."""
    names = fields.split(",")
    shapes = {}
    default = "A,B,C" if device.type == "cuda" else ""
    for key in filter(None, (args.shapes if args.shapes is not None else default).split(",")):
        H, V, P, T = SHAPES[key]
        known = {"H": H, "V": V, "P": P, "T": T}
        shapes[key] = tuple(known[n] for n in names)
    for spec in args.shape:
        values = tuple(int(x) for x in spec.split(","))
        if len(values) != len(names):
            raise SystemExit(f"--shape takes {fields}, got {spec!r}")
        shapes["x".join(f"{n}{v}" for n, v in zip(names, values))] = values
    return shapes or {"tiny": tiny}


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def write_outputs(results: list[Result], meta: dict, out: Path, title: str) -> str:
    """Write JSON, a Markdown table and a PNG plot beside it; return the table."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "results": [asdict(r) | {"floor_frac": r.floor_frac} for r in results]}
    (out / f"{title}.json").write_text(json.dumps(payload, indent=2))
    table = markdown_table(results, meta)
    (out / f"{title}.md").write_text(table + "\n")
    plot(results, out / f"{title}.png", title)
    return table


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown_table(results: list[Result], meta: dict) -> str:
    rate = f", matmul {meta['matmul_tflops']:.3g} TFLOP/s" if meta.get("matmul_tflops") else ""
    lines = [
        f"{meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, {meta.get('date')}; "
        f"copy {meta.get('bandwidth_tbs', 0):.2f} TB/s{rate}",
        "",
        "| shape | mode | impl | ms | extra GB | floor ms | floor / time | rel. err |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.shape} | {r.mode} | {r.impl} | skipped: {r.skipped} | | | | |")
            continue
        if r.error:
            lines.append(f"| {r.shape} | {r.mode} | {r.impl} | failed: {r.error} | | | | |")
            continue
        lines.append(
            f"| {r.shape} | {r.mode} | {r.impl} | {_fmt(r.ms, '.2f')} | {_fmt(r.extra_gb, '.2f')} | "
            f"{_fmt(r.floor_ms, '.2f')} | {_fmt(r.floor_frac, '.2f')} | {_fmt(r.rel_err, '.1e')} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    """Bars of time and extra memory per implementation, one group per shape and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in results if r.ms is not None]
    groups = sorted({(r.shape, r.mode) for r in ok})
    impls = list(dict.fromkeys(r.impl for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        by_group = {(r.shape, r.mode): r for r in ok if r.impl == impl}
        xs = [i + k * width for i in range(len(groups))]
        axes[0].bar(xs, [by_group[g].ms if g in by_group else 0 for g in groups], width, label=impl)
        axes[1].bar(xs, [(by_group[g].extra_gb or 0) if g in by_group else 0 for g in groups], width, label=impl)
    for ax, label in zip(axes, ("time (ms)", "extra memory (GB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in groups])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
