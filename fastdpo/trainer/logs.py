"""Run logging: metrics.jsonl under the run directory, the Window of steps each record sums, a tqdm
bar, and a few printed lines.

Records use TRL's metric names (loss, rewards/accuracies, logps/chosen, ...; eval_ prefix for
eval) plus step, epoch, lr, grad_norm, tokens/s and peak_memory_gb; events ("event": start, resume,
finished) mark where a run began, continued and ended. Only the main process writes.
"""

from __future__ import annotations

import json
import resource
import sys
import time
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


class Window:
    """Metrics summed over the steps since the last log line, on the device: adding a step's metrics
    reads nothing back, so the host never waits for the device between log lines."""

    COUNTS = ("tokens", "real_tokens")  # summed over the window and the ranks, not averaged

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(self.COUNTS, 0)
        self.steps, self.seconds = 0, 0.0

    def add(self, stats: dict, seconds: float) -> None:
        """One step's metrics (tensors, left where they are) and counts; `seconds` is the host's time
        in the step, which `settle` completes with the wait for what it queued."""
        for name, value in stats.items():
            if name not in self.COUNTS:
                self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.steps += 1
        self.seconds += seconds
        for name in self.COUNTS:
            self.counts[name] += stats[name]

    def state(self) -> dict[str, Any]:
        """This process's unlogged steps, for a checkpoint (reads the sums from the device: saving
        waits for the device anyway)."""
        return {"sums": {n: v.item() for n, v in self.sums.items()}, "counts": dict(self.counts),
                "steps": self.steps, "seconds": self.seconds}

    def restore(self, state: dict[str, Any], device: torch.device) -> None:
        """Continue the window a checkpoint saved: the record that spans a stop and a resume then
        holds the same steps as without the stop."""
        self.sums = {n: torch.tensor(v, dtype=torch.float32, device=device) for n, v in state["sums"].items()}
        self.counts = {n: int(state["counts"][n]) for n in self.COUNTS}
        self.steps, self.seconds = int(state["steps"]), float(state["seconds"])

    def settle(self, device: torch.device) -> None:
        """Wait for the steps queued on the device, counting the wait as their time (the host's time
        in a step is only the time it took to queue it)."""
        if device.type == "cuda":
            start = time.perf_counter()
            torch.cuda.synchronize(device)
            self.seconds += time.perf_counter() - start

    def flush(self, accelerator) -> dict[str, float]:
        """Means over the window and over the ranks; `tokens` (positions the policy computed, padding
        included) and `real_tokens` (prompt and answer tokens of every row) summed over the window and
        the ranks, and each per second. One read from the device."""
        names, device = sorted(self.sums), accelerator.device
        means = torch.stack([self.sums[n].to(device).reshape(()) for n in names]) / self.steps
        counts = [self.counts[c] for c in self.COUNTS]
        if accelerator.num_processes > 1:  # (counts as int64: a float32 sum is inexact past 2^24 tokens)
            means = accelerator.reduce(means, "sum") / accelerator.num_processes
            counts = accelerator.reduce(torch.tensor(counts, device=device), "sum").tolist()
        record = dict(zip(names, means.tolist()))
        for name, total in zip(self.COUNTS, counts):
            record[name] = int(total)
            record[f"{name}/s"] = total / max(self.seconds, 1e-9)
        self._reset()
        return record
