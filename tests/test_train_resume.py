"""Checkpoints: Ctrl-C saves, --resume continues exactly (10 + 10 steps = 20 steps), saves are atomic."""

from __future__ import annotations

import os
import signal

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


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    assert cli.main(cli_args(tmp_path / "whole")) == 0

    interrupt_after(monkeypatch, 10)
    assert cli.main(cli_args(tmp_path / "split")) == 130  # Ctrl-C: checkpoint, then exit 130
    monkeypatch.undo()
    checkpoint = latest_checkpoint(tmp_path / "split")
    assert read_state(checkpoint)["step"] == 10 and (checkpoint / "model.safetensors").is_file()
    assert not (tmp_path / "split" / "final").exists()
    assert cli.main(cli_args(tmp_path / "split", resume=True)) == 0

    whole, split = step_records(tmp_path / "whole"), step_records(tmp_path / "split")
    assert sorted(split) == sorted(whole) == list(range(1, 21))
    for step in whole:
        for name in ("loss", "lr", "grad_norm", "rewards/margins"):
            assert split[step][name] == whole[step][name], (step, name)
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
