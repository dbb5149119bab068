"""Run logging: metrics.jsonl under the run directory, a tqdm bar, and a few printed lines.

Records use TRL's metric names (loss, rewards/accuracies, logps/chosen, ...; eval_ prefix for
eval) plus step, epoch, lr, grad_norm, tokens/s and peak_memory_gb; events ("event": start, resume,
finished) mark where a run began, continued and ended. Only the main process writes.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_text_atomic
from .config import ConfigError

METRICS = "metrics.jsonl"
TASK_SUCCESS = "eval/task_success"


class MetricsError(ConfigError):
    """metrics.jsonl holds a line that is not a record (a damaged or hand-edited file)."""


class RunLog:
    def __init__(self, run_dir: str | Path, *, enabled: bool, progress_bar: bool) -> None:
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.progress_bar = progress_bar and enabled
        self.bar = None
        self._tail_checked = False  # see drop_cut_short_record, once before this log's first write

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._tail_checked:
            drop_cut_short_record(self.path)
            self._tail_checked = True
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be logged again), and a
        last record that a crash cut short."""
        self._keep(lambda record: record.get("step", 0) <= step)

    def restart(self, keep_warmup: bool) -> None:
        """Starting a run over: drop its records, except the warm-up's when its result is kept."""
        self._keep(lambda record: keep_warmup and "sft_step" in record)

    def _keep(self, wanted) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [record for record in read_metrics(self.path.parent) if wanted(record)]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def records_at(self, step: int) -> list[dict[str, Any]]:
        """The records logged at `step` (none on the processes that do not log)."""
        if not self.enabled or not self.path.is_file():
            return []
        return [r for r in read_metrics(self.path.parent) if r.get("step") == step]

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


def drop_cut_short_record(path: Path) -> None:
    """Cut `path` after its last newline when what follows it is not a whole record (a write that a
    crash interrupted), or end that whole record's line: else the next record would continue it."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            f.write(b"\n")
        except ValueError:
            f.truncate(start)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl. A last line without its newline that is not JSON is a
    record whose write a crash cut short: it is left out. Any other line that is not a JSON object
    means the file was damaged or edited: MetricsError names it."""
    path = Path(run_dir) / METRICS
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            if number == len(lines):  # the last line and no newline after it: a cut-short write
                break
            raise MetricsError(f"{path} line {number} is not a JSON record ({e}): the file is damaged; "
                               "delete or repair that line") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path} line {number} is not a JSON object: the file is damaged; "
                               "delete or repair that line")
        records.append(record)
    return records


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) else v
