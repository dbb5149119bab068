"""The command line and what a run prints: help, version, exact option names, missing extras,
write failures, the progress bar's tok/s and the end-of-run summary."""

from __future__ import annotations

import errno
import importlib
import os
import re
import subprocess
import sys

import pytest
from train_helpers import REPO, tiny_config

from fastdpo import cli
from fastdpo.losses import LOSSES
from fastdpo.trainer import ConfigError, DPOTrainer, TrainConfig
from fastdpo.trainer.checkpoint import latest_checkpoint, read_state
from fastdpo.trainer.logs import RunLog


def test_top_level_help_version_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert "train [options]" in out and "plot RUN_DIR" in out and not err
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"fastdpo \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "fastdpo: error: unknown command 'trian' (choose from train, plot)"
    assert cli.main([]) == 2 and "no command given" in capsys.readouterr().err


def test_train_help_groups_every_option_with_one_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    headers = [line[:-1] for line in text.splitlines() if re.fullmatch(r"[a-z][a-z, ]*:", line)]
    assert headers == ["options", "model", "data", "reference", "loss", "optimisation", "run, eval and checkpoints",
                       "distributed"]
    flat = " ".join(text.split())  # the help text without its line wrapping
    # One "(default: ...)" per option, never an empty or None one.
    options = [f for f in TrainConfig.__dataclass_fields__]
    assert flat.count("(default:") == len(options)
    assert "(default: None)" not in flat and "(default: )" not in flat
    for name in options:
        assert f"--{name.replace('_', '-')} " in flat or f"--{name.replace('_', '-')}," in flat, name
    assert "(default: 0.001 for fastdpo:tiny, 5e-07 otherwise)" in flat  # the embedded model's and the others'
    assert "(default: 32 for fastdpo:tiny, 4 otherwise)" in flat
    assert all(name in flat for name in LOSSES)


def test_options_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--lr", "1e-4"])  # once read as --lr-scheduler
    assert e.value.code == 2 and "unrecognized arguments: --lr" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, line", [
    ("transformers", ["train", "--max-steps", "1"], "fastdpo train: error: training needs transformers"),
    ("accelerate", ["train", "--max-steps", "1"], "fastdpo train: error: training needs accelerate"),
    ("tqdm", ["train", "--max-steps", "1"], "fastdpo train: error: training needs tqdm"),
    ("matplotlib", ["plot", "nowhere"], "fastdpo plot: error: plotting needs matplotlib"),
])
def test_missing_extra_is_one_line(tmp_path, module, argv, line):
    # A fresh interpreter in which `import module` fails as if it were not installed.
    code = f"import sys; sys.modules[{module!r}] = None; from fastdpo import cli; sys.exit(cli.main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 2 and done.stderr == f"{line}, which is not installed: pip install 'fastdpo[train]'\n"
    assert not (tmp_path / "runs").exists()


def test_missing_peft_and_trl_name_their_extras(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"--lora-r needs peft, which is not installed: pip install 'fastdpo\[lora\]'"):
        DPOTrainer(tiny_config(tmp_path / "run", lora_r=4))
    monkeypatch.setitem(sys.modules, "trl", None)
    monkeypatch.delitem(sys.modules, "fastdpo.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"fastdpo.integrations.trl needs trl, which is not installed: "
                                          r"pip install 'fastdpo\[trl\]'"):
        importlib.import_module("fastdpo.integrations.trl")


def cli_args(run_dir, *extra) -> list[str]:
    cfg = tiny_config(run_dir)
    return ["train", "--run-dir", cfg.run_dir, "--no-progress-bar", "--sft-steps", "0", "--batch-size", "4",
            "--max-train-pairs", "64", "--max-eval-pairs", "16", "--eval-steps", "0", *extra]


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only file system")])
def test_disk_full_or_read_only_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys, code, cause):
    from accelerate import Accelerator

    original, calls = Accelerator.save_state, []

    def failing_save_state(self, output_dir, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint finds the disk full half-way through
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half a file")
            raise OSError(code, os.strerror(code), os.path.join(output_dir, "model.safetensors"))
        return original(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    run_dir = tmp_path / "run"
    assert cli.main(cli_args(run_dir, "--max-steps", "4", "--save-steps", "2")) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"fastdpo train: error: cannot write {run_dir}")
    assert last.endswith(f"model.safetensors: {cause}; the latest checkpoint is still "
                         f"{run_dir / 'checkpoints' / 'step-00000002'}; continue with: fastdpo train --resume "
                         f"--run-dir {run_dir}")
    assert read_state(latest_checkpoint(run_dir))["step"] == 2


def test_a_library_write_error_without_errno_is_recognised(tmp_path, monkeypatch, capsys):
    """torch.save and safetensors report a full disk as a RuntimeError holding only the OS's text."""
    def failing_write(self, record):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr(RunLog, "write", failing_write)
    assert cli.main(cli_args(tmp_path / "run", "--max-steps", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "run"
    assert err == (f"fastdpo train: error: cannot write {run_dir}: no space left on device; no checkpoint was saved "
                   f"yet; continue with: fastdpo train --resume --run-dir {run_dir}")


def test_other_errors_are_not_disguised(tmp_path, monkeypatch):
    def broken(self, record):
        raise RuntimeError("something else")

    monkeypatch.setattr(RunLog, "write", broken)
    with pytest.raises(RuntimeError, match="something else"):
        cli.main(cli_args(tmp_path / "run", "--max-steps", "1"))


def test_progress_bar_shows_the_real_token_rate(tmp_path, monkeypatch):
    """Every step is a logging step here, where the bar used to show 0 tok/s."""
    shown = []
    monkeypatch.setattr(RunLog, "advance", lambda self, postfix=None: shown.append(postfix))
    DPOTrainer(tiny_config(tmp_path / "run", max_steps=3, logging_steps=1)).train()
    rates = [p["tok/s"] for p in shown if p and "tok/s" in p]
    assert len(rates) == 3 and all(rate > 0 for rate in rates)


def test_end_of_run_summary(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(cli_args(run_dir, "--max-steps", "2")) == 0
    err = capsys.readouterr().err
    summary = err[err.index("done: "):].splitlines()
    assert re.fullmatch(r"done: 2 DPO steps in \dm \d\ds \(wall time, set-up and warm-up included\)", summary[0])
    assert re.fullmatch(r"  final eval:  loss \d\.\d{4}, reward accuracy \d\.\d{3}, margin -?\d\.\d{3}", summary[1])
    assert re.fullmatch(r"  task success \(greedy answers checked by the task's rule\): \d\.\d\d at step 0 "
                        r"-> \d\.\d\d at step 2", summary[2])
    assert summary[3:] == [f"  metrics:     {run_dir / 'metrics.jsonl'}",
                           f"  checkpoints: {run_dir / 'checkpoints'} (latest step-00000002)",
                           f"  final model: {run_dir / 'final'}",
                           f"  plot:        fastdpo plot {run_dir}"]


def test_plot_marks_sparse_curves_and_draws_the_warm_up_apart():
    from fastdpo.trainer.plot import WARMUP_PANEL, build_figure

    records = [{"step": 0, "sft_step": s, "sft_loss": 3.0 / s} for s in range(1, 41)]
    records += [{"step": 0, "eval/task_success": 0.2}]
    records += [{"step": s, "loss": 0.7 - s / 1000, "lr": 1e-3} for s in range(1, 101)]
    records += [{"step": s, "eval_loss": 0.5, "eval/task_success": 0.5} for s in (50, 100)]
    fig = build_figure(records, "run")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert list(panels)[:3] == [WARMUP_PANEL, "loss", "task success (greedy)"]
    warmup = panels[WARMUP_PANEL].lines
    assert [len(line.get_xdata()) for line in warmup] == [40] and warmup[0].get_marker() in ("None", None, "")
    loss = {line.get_label(): line for line in panels["loss"].lines}
    assert list(loss["loss"].get_xdata()) == list(range(1, 101))  # the warm-up is not in the DPO panels
    assert loss["loss"].get_marker() in ("None", None, "") and loss["eval_loss"].get_marker() == "o"
    (success,) = panels["task success (greedy)"].lines
    assert list(success.get_xdata()) == [0, 50, 100] and success.get_marker() == "o"


def test_a_cpu_run_prints_no_library_notes(tmp_path):
    """A whole CPU run in a fresh process prints fastdpo's own lines only: no progress bars of
    transformers' saves, and no DeepSpeed note about its missing GPU (transformers imports
    DeepSpeed wherever it is installed, as the `deepspeed` extra and CI install it)."""
    from train_helpers import run_cli

    done = run_cli(["--max-steps", "1", "--sft-steps", "0", "--batch-size", "4", "--max-train-pairs", "16",
                    "--max-eval-pairs", "8", "--no-progress-bar", "--run-dir", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for note in ("Setting accelerator to CPU", "Writing model shards", "[WARNING]"):
        assert note not in output, output
