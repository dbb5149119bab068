"""`fastdpo plot RUN_DIR`: the curves of a run's metrics.jsonl in one PNG."""

from __future__ import annotations

from pathlib import Path

from .logs import METRICS, read_metrics

PANELS = [  # (title, metric names): train and eval_ versions are drawn together
    ("loss", ["loss"]),
    ("reward accuracy", ["rewards/accuracies"]),
    ("reward margin", ["rewards/margins"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
    ("learning rate", ["lr"]),
    ("grad norm", ["grad_norm"]),
    ("tokens/s", ["tokens/s"]),
]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves to `out` (default RUN_DIR/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not (run_dir / METRICS).is_file():
        raise FileNotFoundError(f"{run_dir / METRICS} not found (is {run_dir} a fastdpo run directory?)")
    records = read_metrics(run_dir)
    panels = [(title, names) for title, names in PANELS
              if any(_series(records, prefix + n)[0] for n in names for prefix in ("", "eval_"))]
    if not panels:
        raise ValueError(f"{run_dir / METRICS} holds no training metrics yet")
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            color = None  # a metric and its eval_ twin share a color: solid train, dashed eval
            for prefix, style in (("", "-"), ("eval_", "o--")):
                steps, values = _series(records, prefix + name)
                if steps:
                    (line,) = ax.plot(steps, values, style, color=color, markersize=3, label=prefix + name)
                    color = line.get_color()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _series(records: list[dict], name: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[name]) for r in records if name in r and "sft_step" not in r]
    return [p[0] for p in points], [p[1] for p in points]
