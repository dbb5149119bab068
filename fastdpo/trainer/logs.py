"""Run logging: metrics.jsonl under the run directory, a tqdm bar, and a few printed lines.

Records use TRL's metric names (loss, rewards/accuracies, logps/chosen, ...; eval_ prefix for
eval) plus step, epoch, lr, grad_norm, tokens/s and peak_memory_gb. Only the main process writes.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.jsonl"
TASK_SUCCESS = "eval/task_success"


class RunLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool, progress_bar: bool) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.progress_bar = progress_bar and enabled
        self.bar = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def restart(self, keep_warmup: bool) -> None:
        """Starting a run over: drop its records, except the warm-up's when its result is kept."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if keep_warmup and line.strip() and "sft_step" in json.loads(line)]
        self.path.write_text("".join(line + "\n" for line in kept))

    def task_success(self) -> list[tuple[int, float]]:
        """(step, eval/task_success) of every eval so far, in order."""
        if not self.enabled or not self.path.is_file():
            return []
        return [(r["step"], r[TASK_SUCCESS]) for r in read_metrics(self.path.parent) if TASK_SUCCESS in r]

    def info(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v
