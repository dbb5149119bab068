"""The run directory under misuse: a second command on a live run, damaged or partial files."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
from pathlib import Path

import pytest
from train_helpers import run_cli, step_records, tiny_config

from fastdpo import cli
from fastdpo.trainer import DPOTrainer
from fastdpo.trainer.config import ConfigError
from fastdpo.trainer.logs import read_metrics

IN_USE = "is in use by another fastdpo process: wait for it to end (or stop it), or choose another --run-dir"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


def test_a_second_command_on_a_live_run_is_refused_and_the_run_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    live = DPOTrainer(tiny_config(run_dir, max_steps=2))
    live.setup()  # the run has started: its directory exists and is locked
    before = snapshot(run_dir)
    for options in (dict(resume=True), dict(resume=True, max_steps=4), dict()):
        with pytest.raises(ConfigError, match=re.escape(IN_USE)):
            DPOTrainer(tiny_config(run_dir, **options))
    assert snapshot(run_dir) == before
    assert live.train()["step"] == 2  # the live run is unharmed ...
    resumed = DPOTrainer(tiny_config(run_dir, max_steps=3, resume=True))  # ... and, once ended, frees the directory
    assert resumed.train()["step"] == 3
    assert sorted(step_records(run_dir)) == [1, 2, 3]


def test_two_fresh_runs_racing_for_one_directory(tmp_path):
    """Both pass their checks before either creates the directory: the second to claim it is refused,
    under the lock while the first runs and as 'already holds a run' once it has ended."""
    run_dir = tmp_path / "run"
    first, second = (DPOTrainer(tiny_config(run_dir, max_steps=1)) for _ in range(2))
    first.setup()
    with pytest.raises(ConfigError, match=re.escape(IN_USE)):
        second.setup()
    first.train()
    before = snapshot(run_dir)
    with pytest.raises(ConfigError, match="already holds a run \\(started by another command since this one's "
                                          "checks\\): pass --resume"):
        second.setup()
    assert snapshot(run_dir) == before
    assert not second.lock.held  # its refusal left the directory free
    assert DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True)).train()["step"] == 2


def test_a_failed_setup_frees_the_directory(tmp_path, monkeypatch):
    from fastdpo.trainer import loop

    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=1)).train()

    def fail(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(loop, "load_model", fail)
    failing = DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True))
    with pytest.raises(RuntimeError, match="out of memory") as error:
        failing.setup()
    assert error.traceback and not failing.lock.held
    monkeypatch.undo()
    assert DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True)).train()["step"] == 2


def test_train_runs_once_and_later_writes_take_the_lock(tmp_path):
    """After train() the directory is free, so the object may be stale: a second train() is refused,
    and evaluate() takes the lock for its own span (refused while another process holds it)."""
    run_dir = tmp_path / "run"
    trainer = DPOTrainer(tiny_config(run_dir, max_steps=1))
    trainer.train()
    with pytest.raises(RuntimeError, match="train\\(\\) has ended and its run directory was released"):
        trainer.train()
    assert trainer.evaluate()["eval_loss"] > 0 and not trainer.lock.held
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = snapshot(run_dir)
        with pytest.raises(ConfigError, match=re.escape(IN_USE)):
            trainer.evaluate()
        assert snapshot(run_dir) == before
    finally:
        os.close(fd)


def test_every_rank_is_refused_a_locked_run_dir(tmp_path):
    """Two processes: the main one takes the lock and is refused; the other must be refused with it,
    not left waiting at a barrier (the launcher would then kill it and print its traceback)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", "2", "--main_process_port",
              str(free_port()), "-m", "fastdpo.train", "--run-dir", str(run_dir), "--max-steps", "1",
              "--no-progress-bar"]
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli(launch, env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
                                      "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    finally:
        os.close(fd)
    # Each rank says the one line and exits (then the launcher reports the failed workers, as it does
    # for any refusal); no rank dies in a collective.
    # (the two processes' lines may interleave: counted without their newlines)
    assert result.stderr.count(f"fastdpo train: error: {run_dir} {IN_USE}") == 2, result.stderr[-3000:]
    assert "[rank" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert not any(run_dir.iterdir())


def test_the_cli_refuses_a_locked_run_in_one_line(tmp_path, capsys):
    """Another process's lock (a separate open of the directory, as a second process holds it)."""
    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=1)).train()
    capsys.readouterr()
    before = snapshot(run_dir)
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = cli.main(["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "2"])
    finally:
        os.close(fd)
    assert code == 2
    assert capsys.readouterr().err == f"fastdpo train: error: {run_dir} {IN_USE}\n"
    assert snapshot(run_dir) == before


def test_a_refused_command_frees_the_directory_at_once(tmp_path):
    """A check that fails after the lock was taken (here: a run needing --resume) does not keep it,
    even while the error (and its traceback) is still held."""
    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=1)).train()
    with pytest.raises(ConfigError, match="already holds a run") as refused:
        DPOTrainer(tiny_config(run_dir, max_steps=2))
    assert refused.traceback  # alive: it references the refused trainer
    assert DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True)).train()["step"] == 2


def test_a_record_cut_short_by_a_crash_is_dropped_on_resume_and_by_plot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=2)).train()
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.69')  # the process died inside this write
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(run_dir)]) == 0
    assert DPOTrainer(tiny_config(run_dir, max_steps=3, resume=True)).train()["step"] == 3
    assert sorted(step_records(run_dir)) == [1, 2, 3]
    assert metrics.read_text().endswith("}\n")


@pytest.mark.parametrize("damage", ["not json", "[1, 2]"])
def test_a_damaged_metrics_line_is_named_by_resume_and_plot(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=2)).train()
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:2] + [damage + "\n"] + lines[2:]))
    before = snapshot(run_dir)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdpo train: error: {metrics} line 3 is not a JSON ") and err.count("\n") == 1
    assert err.endswith("the file is damaged; delete or repair that line\n")
    assert snapshot(run_dir) == before
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(run_dir)]) == 2
    assert capsys.readouterr().err.startswith(f"fastdpo plot: error: {metrics} line 3 is not a JSON ")


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    DPOTrainer(tiny_config(run_dir, max_steps=2)).train()
    before = snapshot(run_dir)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--run-dir", str(run_dir)]) == 0
    assert capsys.readouterr().err == (f"{run_dir} has finished its 2 steps (final model: {run_dir / 'final'}); "
                                       "nothing to do: raise --max-steps to train further\n")
    assert snapshot(run_dir) == before
    assert DPOTrainer(tiny_config(run_dir, max_steps=3, resume=True)).train()["step"] == 3  # a longer run goes on
    assert [r["step"] for r in read_metrics(run_dir) if r.get("event") == "finished"] == [2, 3]


@pytest.mark.parametrize("same_eval_set", [True, False])
def test_a_run_stopped_between_its_final_eval_and_save_is_finished_once(tmp_path, monkeypatch, same_eval_set):
    """... unless it resumes with another eval set (--max-eval-pairs may change), which is evaluated."""
    from fastdpo.trainer import loop

    run_dir = tmp_path / "run"
    original = loop.save_final_model

    def crash(*args, **kwargs):
        raise RuntimeError("killed while saving the final model")

    monkeypatch.setattr(loop, "save_final_model", crash)
    with pytest.raises(RuntimeError, match="killed while saving"):
        DPOTrainer(tiny_config(run_dir, max_steps=2)).train()
    monkeypatch.setattr(loop, "save_final_model", original)
    evals = [r for r in read_metrics(run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2] and not (run_dir / "final").exists()
    if not same_eval_set:
        summary = DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True, max_eval_pairs=4)).train()
        again = [r for r in read_metrics(run_dir) if "eval_loss" in r]
        assert [r["step"] for r in again] == [2, 2] and again[1]["eval_set"] != evals[0]["eval_set"]
        assert summary["eval"]["eval_loss"] == again[1]["eval_loss"] != evals[0]["eval_loss"]
        return
    summary = DPOTrainer(tiny_config(run_dir, max_steps=2, resume=True)).train()
    assert [r for r in read_metrics(run_dir) if "eval_loss" in r] == evals  # not evaluated and logged again
    assert summary["eval"]["eval_loss"] == evals[0]["eval_loss"]
    assert (run_dir / "final" / "config.json").is_file()
    assert [r["step"] for r in read_metrics(run_dir) if r.get("event") == "finished"] == [2]


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert cli.main(["train", "--run-dir", str(path), "--max-steps", "1"]) == 2
    assert capsys.readouterr().err == f"fastdpo train: error: --run-dir {path} is a file, not a directory\n"
    assert path.read_text() == "mine"


def test_max_eval_pairs_is_fixed_on_resume_where_it_decides_what_trains(tmp_path):
    """With --eval-fraction the cap on held-out pairs decides which pairs train: changing it on
    resume would move trained pairs into eval. Without it, the cap only sizes the eval."""
    held = tiny_config(tmp_path / "held", max_steps=1, eval_fraction=0.25, max_eval_pairs=4)
    DPOTrainer(held).train()
    with pytest.raises(ConfigError, match="--resume: --max-eval-pairs 8 differs from this run's 4"):
        DPOTrainer(tiny_config(tmp_path / "held", max_steps=2, eval_fraction=0.25, max_eval_pairs=8, resume=True))
    DPOTrainer(tiny_config(tmp_path / "split", max_steps=1, max_eval_pairs=4)).train()
    resumed = DPOTrainer(tiny_config(tmp_path / "split", max_steps=2, max_eval_pairs=8, resume=True))
    assert len(resumed.data.eval) == 8
