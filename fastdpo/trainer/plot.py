"""`fastdpo plot RUN_DIR`: the curves of a run's metrics.jsonl in one PNG."""

from __future__ import annotations

from pathlib import Path

from .logs import METRICS, read_metrics

PANELS = [  # (title, metric names): train and eval_ versions are drawn together
    ("loss", ["loss"]),
    ("task success (greedy)", ["eval/task_success"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("reward margin", ["rewards/margins"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
    ("chosen NLL (sft term)", ["nll_loss"]),
    ("learning rate", ["lr"]),
    ("grad norm", ["grad_norm"]),
    ("tokens/s", ["tokens/s"]),
]
WARMUP_PANEL = "warm-up NLL (chosen answers)"
FEW_POINTS = 30  # curves with at most this many points get a marker on each one


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves to `out` (default RUN_DIR/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        raise FileNotFoundError(f"{run_dir / METRICS} not found (is {run_dir} a fastdpo run directory?)")
    fig = build_figure(read_metrics(run_dir), str(run_dir))
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_figure(records: list[dict], title: str):
    """The matplotlib figure of a run's records: one panel per metric family, the warm-up first."""
    import matplotlib.pyplot as plt

    curves = [(name, _curves(records, names)) for name, names in PANELS]
    warmup = [(WARMUP_PANEL, [("sft_loss", "-", _warmup_series(records))])]
    panels = [(name, c) for name, c in warmup + curves if any(steps for _, _, (steps, _) in c)]
    if not panels:
        raise ValueError(f"{title}: {METRICS} holds no training metrics yet")
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, panel) in zip(axes.flat, panels):
        color, previous = None, None
        for label, style, (steps, values) in panel:
            if not steps:
                continue
            base = label.removeprefix("eval_")
            if base != previous:  # a metric and its eval_ twin share a color
                color, previous = None, base
            marker = "o" if len(steps) <= FEW_POINTS else None
            (line,) = ax.plot(steps, values, style, color=color, marker=marker, markersize=3, label=label)
            color = line.get_color()
        ax.set_title(name)
        ax.set_xlabel("warm-up step" if name == WARMUP_PANEL else "DPO step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _curves(records: list[dict], names: list[str]) -> list[tuple[str, str, tuple[list, list]]]:
    """(label, line style, series) for each metric and its eval_ twin: solid train, dashed eval."""
    out = []
    for name in names:
        for prefix, style in (("", "-"), ("eval_", "--")):
            out.append((prefix + name, style, _series(records, prefix + name)))
    return out


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if name in r and "sft_step" not in r]
    return [p[0] for p in points], [p[1] for p in points]


def _warmup_series(records: list[dict]) -> tuple[list[int], list[float]]:
    points = [(r["sft_step"], r["sft_loss"]) for r in records if "sft_step" in r and "sft_loss" in r]
    return [p[0] for p in points], [p[1] for p in points]
