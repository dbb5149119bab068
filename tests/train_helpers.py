"""Shared helpers of the trainer tests (tests/test_train*.py): tiny configs and run readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastdpo.trainer import TrainConfig
from fastdpo.trainer.logs import read_metrics

REPO = Path(__file__).resolve().parent.parent


def tiny_config(run_dir, **options) -> TrainConfig:
    """The embedded model on a slice of the embedded data: a few seconds per run."""
    base = dict(run_dir=str(run_dir), loss_type="sigmoid", sft_steps=0, max_steps=2, batch_size=4,
                max_train_pairs=64, max_eval_pairs=16, logging_steps=1, eval_steps=0, progress_bar=False,
                ref_cache_dir=str(Path(run_dir).parent / "ref_cache"))
    if options.get("max_tokens"):  # a token budget replaces the pairs per micro-batch
        del base["batch_size"]
    return TrainConfig(**{**base, **options})


def train_losses(run_dir) -> list[float]:
    """The logged training loss of every step, in step order."""
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def step_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_cli(args: list[str], env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`python -m fastdpo.train ARGS` (or another command when args[0] is an executable path)."""
    cmd = args if args and os.path.isabs(args[0]) else [sys.executable, "-m", "fastdpo.train", *args]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)
