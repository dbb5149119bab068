"""The `fastdpo` command: `fastdpo train [options]` and `fastdpo plot RUN_DIR`.

Exit codes: 0 done, 1 a write failed (disk full, read-only), 2 bad input or a missing extra,
130 interrupted (Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: fastdpo [--help] [--version] COMMAND ...

commands:
  train [options]   DPO training; with no options, the embedded tiny model on the embedded task
                    (fastdpo train --help lists the options)
  plot RUN_DIR      draw a run's logged curves to RUN_DIR/curves.png (fastdpo plot --help)
"""


def train_main(argv: list[str] | None = None, prog: str = "fastdpo train") -> int:
    """Parse the TrainConfig flags and train. Exit codes as in the module docstring."""
    from .extras import TRAIN, MissingExtra, require
    from .trainer.config import ConfigError, parse_args_given

    cfg, given = parse_args_given(argv, prog=prog)
    trainer = None
    try:
        require(TRAIN, "train", "training")
        from .trainer import DPOTrainer
        from .trainer.distributed import finish

        # given: with --resume, the run's saved options fill in every flag not on this command line
        trainer = DPOTrainer(cfg, given=given)
        summary = trainer.train()
        finish(trainer.accelerator)  # the process ends with the run: close its process group
    except (ConfigError, MissingExtra) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: stopped without saving; {_where_to_continue(trainer)}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - only write failures are reported here, the rest re-raised
        from .trainer.checkpoint import storage_error

        message = storage_error(e, trainer.cfg.run_dir if trainer else cfg.run_dir or "the run directory")
        if message is None:
            raise
        print(f"{prog}: error: {message}; {_where_to_continue(trainer)}", file=sys.stderr)
        return 1
    return 130 if summary.get("interrupted") else 0


def _where_to_continue(trainer) -> str:
    """After an abort: what the run directory holds now, and the command that continues it."""
    if trainer is None:
        return "nothing was trained"
    from .trainer.checkpoint import latest_checkpoint

    latest = latest_checkpoint(trainer.cfg.run_dir)
    held = f"the latest checkpoint is still {latest}" if latest else "no checkpoint was saved yet"
    return f"{held}; continue with: {trainer.resume_command()}"


def plot_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpo plot", allow_abbrev=False,
                                     description="Plot a run's training and eval curves to a PNG.")
    parser.add_argument("run_dir", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", default="", help="output PNG (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    from .extras import PLOT, MissingExtra, require

    try:
        require(PLOT, "train", "plotting")
        from .trainer.plot import plot_run

        path = plot_run(args.run_dir, args.out or None)
    except (FileNotFoundError, ValueError, MissingExtra) as e:
        print(f"fastdpo plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


COMMANDS = {"train": train_main, "plot": plot_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0] if argv else None
    if first in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    if first == "--version":
        from . import __version__

        print(f"fastdpo {__version__}")
        return 0
    if first not in COMMANDS:
        problem = "no command given" if first is None else (
            f"unknown option {first!r}" if first.startswith("-") else f"unknown command {first!r}")
        print(f"{USAGE}fastdpo: error: {problem} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return COMMANDS[first](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
