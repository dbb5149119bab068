"""The `fastdpo` command: `fastdpo train [options]` and `fastdpo plot RUN_DIR`."""

from __future__ import annotations

import argparse
import sys


def train_main(argv: list[str] | None = None, prog: str = "fastdpo train") -> int:
    """Parse the TrainConfig flags and train. Exit codes: 0 done, 2 bad input, 130 interrupted."""
    from .trainer.config import ConfigError, parse_args

    cfg = parse_args(argv, prog=prog)
    try:
        from .trainer import DPOTrainer

        summary = DPOTrainer(cfg).train()
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 130 if summary.get("interrupted") else 0


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpo plot", description="Plot a run's training and eval curves to a PNG.")
    parser.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", default="", help="output PNG (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    from .trainer.plot import plot_run

    try:
        path = plot_run(args.run_dir, args.out or None)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastdpo plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"train": lambda rest: train_main(rest), "plot": plot_main}
    if not argv or argv[0] not in commands:
        print("usage: fastdpo {train,plot} ...\n  fastdpo train [options]   DPO training (fastdpo train --help)\n"
              "  fastdpo plot RUN_DIR      write RUN_DIR/curves.png", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
