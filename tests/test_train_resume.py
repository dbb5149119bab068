"""Checkpoints: Ctrl-C saves, --resume continues exactly (10 + 10 steps = 20 steps), saves are atomic."""

from __future__ import annotations

import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import final_weights, step_records, tiny_config

from fastdpo import cli
from fastdpo.trainer import DPOTrainer
from fastdpo.trainer.checkpoint import latest_checkpoint, read_state

# A warm-up, accumulation and a decaying schedule, so that every piece of state matters.
OPTIONS = dict(sft_steps=3, grad_accum=2, max_steps=20, batch_size=4, eval_steps=5, save_steps=0,
               lr_scheduler="cosine", learning_rate=3e-3)


def interrupt_after(monkeypatch, steps: int) -> None:
    """Send this process a real SIGINT (Ctrl-C) right after optimizer step `steps`."""
    original = DPOTrainer.train_step

    def train_step(self):
        out = original(self)
        if self.step + 1 == steps:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(DPOTrainer, "train_step", train_step)


def cli_args(run_dir, resume=False) -> list[str]:
    cfg = tiny_config(run_dir, **OPTIONS)
    args = ["train", "--run-dir", cfg.run_dir, "--no-progress-bar", "--ref-cache-dir", cfg.ref_cache_dir]
    for name in ("sft_steps", "grad_accum", "max_steps", "batch_size", "eval_steps", "save_steps", "lr_scheduler",
                 "learning_rate", "max_train_pairs", "max_eval_pairs", "logging_steps"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return args + (["--resume"] if resume else [])


def printed_command(err: str, start: str) -> list[str]:
    """The arguments of the command printed after `start` (e.g. 'continue with: ')."""
    line = next(line for line in err.splitlines() if start in line)
    words = shlex.split(line.split(start, 1)[1])
    assert words[:2] == ["fastdpo", "train"]
    return words[1:]


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    assert cli.main(cli_args(tmp_path / "whole")) == 0

    interrupt_after(monkeypatch, 10)
    capsys.readouterr()
    assert cli.main(cli_args(tmp_path / "split")) == 130  # Ctrl-C: checkpoint, then exit 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step to save a checkpoint" in err
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert read_state(checkpoint)["step"] == 10 and (checkpoint / "model.safetensors").is_file()
    assert not (tmp_path / "split" / "final").exists()
    # The printed hint works as printed: it names no option, the run's saved ones are used.
    assert cli.main(printed_command(err, "continue with: ")) == 0

    whole, split = step_records(tmp_path / "whole"), step_records(tmp_path / "split")
    assert sorted(split) == sorted(whole) == list(range(1, 21))
    for step in whole:
        for name in ("loss", "lr", "grad_norm", "rewards/margins"):
            assert split[step][name] == whole[step][name], (step, name)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_log_record_spanning_a_stop_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    """Logging every 4 steps, stopped after step 6: the step-8 record still averages steps 5-8 and
    counts their tokens, as the run without the stop logs it."""
    options = dict(max_steps=8, logging_steps=4, grad_accum=2, learning_rate=3e-3)
    DPOTrainer(tiny_config(tmp_path / "whole", **options)).train()
    interrupt_after(monkeypatch, 6)
    assert DPOTrainer(tiny_config(tmp_path / "split", **options)).train()["interrupted"]
    monkeypatch.undo()
    assert sorted(step_records(tmp_path / "split")) == [4]
    DPOTrainer(tiny_config(tmp_path / "split", resume=True, **options)).train()
    whole, split = step_records(tmp_path / "whole"), step_records(tmp_path / "split")
    assert sorted(split) == sorted(whole) == [4, 8]
    timing = {"tokens/s", "real_tokens/s", "peak_memory_gb"}  # measured, not computed
    assert {k: v for k, v in split[8].items() if k not in timing} == \
        {k: v for k, v in whole[8].items() if k not in timing}


def test_a_crash_while_saving_leaves_the_latest_checkpoint_whole(tmp_path, monkeypatch):
    from accelerate import Accelerator

    cfg = tiny_config(tmp_path / "run", max_steps=4, save_steps=2)
    original, calls = Accelerator.save_state, []

    def crashing_save_state(self, output_dir, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second save dies half-way through
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half a file")
            raise OSError("disk full")
        return original(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", crashing_save_state)
    with pytest.raises(OSError, match="disk full"):
        DPOTrainer(cfg).train()
    monkeypatch.undo()
    checkpoint = latest_checkpoint(cfg.run_dir)
    assert checkpoint.name == "step-00000002" and read_state(checkpoint)["step"] == 2

    resumed = DPOTrainer(tiny_config(tmp_path / "run", max_steps=4, save_steps=2, resume=True))
    assert resumed.train()["step"] == 4
    assert latest_checkpoint(cfg.run_dir).name == "step-00000004"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the half-written one is gone
    DPOTrainer(tiny_config(tmp_path / "plain", max_steps=4)).train()
    a, b = final_weights(tmp_path / "run"), final_weights(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_checkpoints_are_pruned(tmp_path):
    DPOTrainer(tiny_config(tmp_path / "run", max_steps=7, save_steps=2, save_total_limit=2)).train()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000006", "step-00000007"]


def snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag, value", [("--beta", "0.2"), ("--batch-size", "8"), ("--learning-rate", "0.01"),
                                         ("--seed", "7"), ("--loss-type", "ipo"), ("--sft-steps", "0")])
def test_a_refused_resume_leaves_the_run_directory_byte_for_byte(tmp_path, capsys, flag, value):
    run_dir = tmp_path / "run"
    args = cli_args(run_dir)
    args[args.index("--max-steps") + 1] = "4"
    assert cli.main(args) == 0
    before = snapshot(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())[flag[2:].replace("-", "_")]
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "6", flag, value]) == 2
    err = capsys.readouterr().err
    assert err == (f"fastdpo train: error: --resume: {flag} {value} differs from this run's {saved} "
                   f"({run_dir / 'config.json'}); only run length, logging, eval and checkpoint options may change "
                   "when resuming\n")
    assert snapshot(run_dir) == before


def test_max_steps_can_be_raised_and_the_schedule_follows_the_new_total(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    used = []  # the learning rate each optimizer step runs with
    original = DPOTrainer.train_step

    def train_step(self):
        used.append(self.optimizer.param_groups[0]["lr"])
        return original(self)

    monkeypatch.setattr(DPOTrainer, "train_step", train_step)
    cfg = tiny_config(run_dir, max_steps=4, learning_rate=1e-3, lr_scheduler="linear", warmup_ratio=0.0)
    DPOTrainer(cfg).train()
    assert cli.main(["train", "--resume", "--run-dir", str(run_dir), "--max-steps", "8"]) == 0
    # Linear decay: steps 1-4 were planned to end at 0 after step 4; from step 5 the rate is that
    # of a schedule planned for 8 steps at the same point (not 0, the old schedule's last value).
    assert used == pytest.approx([1e-3 * (4 - s) / 4 for s in range(4)] + [1e-3 * (8 - s) / 8 for s in range(4, 8)])
    assert sorted(step_records(run_dir)) == list(range(1, 9))
    with pytest.raises(Exception, match="has trained 8 steps, more than the 6 asked for"):
        DPOTrainer(tiny_config(run_dir, max_steps=6, learning_rate=1e-3, lr_scheduler="linear", warmup_ratio=0.0,
                               resume=True))


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the warm-up leaves no checkpoint: --resume starts over instead of a dead end."""
    original = DPOTrainer._sft_step

    def sft_step(self, model, optimizer, scheduler, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model, optimizer, scheduler, step)

    monkeypatch.setattr(DPOTrainer, "_sft_step", sft_step)
    run_dir = tmp_path / "run"
    assert cli.main(cli_args(run_dir)) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert latest_checkpoint(run_dir) is None
    assert cli.main(cli_args(run_dir)) == 2  # a plain start refuses the directory ...
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert cli.main(printed_command(err, "Start over with: ")) == 0  # ... and --resume starts it over
    assert "has no checkpoint yet; starting the run over in the same directory" in capsys.readouterr().err
    assert cli.main(cli_args(tmp_path / "whole")) == 0
    assert step_records(run_dir).keys() == step_records(tmp_path / "whole").keys()
    for step, record in step_records(tmp_path / "whole").items():
        assert step_records(run_dir)[step]["loss"] == record["loss"]
    warmup_rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "sft_step" in r]
    assert [r["sft_step"] for r in warmup_rows] == [1, 2, 3]  # the interrupted warm-up's rows are gone


def test_a_second_ctrl_c_quits_at_once_keeping_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """The first Ctrl-C asks for a save; a second one, during that save, exits without a traceback."""
    from accelerate import Accelerator

    interrupt_after(monkeypatch, 6)
    original = Accelerator.save_state

    def save_state(self, output_dir, **kw):
        if "00000006" in str(output_dir):  # the save the first Ctrl-C asked for
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    args = cli_args(tmp_path / "run")
    args[args.index("--save-steps") + 1] = "4"
    # A SIGINT handler that does not raise, installed before the run (as a library may): the
    # promise must hold by fastdpo's own handler, whatever the process had before.
    before = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        assert cli.main(args) == 130
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err
    assert "SIGINT: stopping after this step to save a checkpoint" in err and "Traceback" not in err
    run_dir = tmp_path / "run"
    assert err.strip().splitlines()[-1] == (f"fastdpo train: stopped without saving; the latest checkpoint is still "
                                            f"{run_dir / 'checkpoints' / 'step-00000004'}; continue with: "
                                            f"fastdpo train --resume --run-dir {run_dir}")
    assert read_state(latest_checkpoint(tmp_path / "run"))["step"] == 4
