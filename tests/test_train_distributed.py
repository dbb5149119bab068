"""Two CPU processes (gloo) through `accelerate launch` match one process at the same global batch."""

from __future__ import annotations

import socket
import sys

import pytest
import torch
from train_helpers import final_weights, run_cli, step_records, tiny_config

from fastdpo.trainer.logs import read_metrics

STEPS, GLOBAL_BATCH = 4, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Both runs on the CPU, also on a machine with a GPU: hiding it keeps accelerate's workers off
# CUDA (their barrier would name a device) and the one-process baseline in the same fp32 numerics.
CPU_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def train_flags(run_dir, batch_size: int, ref: str, cache) -> list[str]:
    # --loss-type sigmoid, not the embedded default's sigmoid + NLL: the NLL term is a token mean
    # per process, averaged over processes, so it differs slightly from one process's token mean.
    return ["--run-dir", str(run_dir), "--loss-type", "sigmoid", "--batch-size", str(batch_size),
            "--max-steps", str(STEPS), "--sft-steps", "2", "--eval-steps", "2", "--max-train-pairs", "64",
            "--max-eval-pairs", "13", "--logging-steps", "1", "--ref", ref, "--ref-cache-dir", str(cache),
            "--no-progress-bar"]


CASES = {  # reference, then the loss path and batch layout (padding-free is the default)
    "copy": ("copy", []),
    "precompute": ("precompute", []),
    "copy-linear-padded": ("copy", ["--loss-impl", "fused_linear", "--no-padding-free"]),
    "precompute-linear-shared": ("precompute", ["--loss-impl", "fused_linear", "--share-prompt"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, case):
    """DDP on two processes equals one process: metrics, eval and final weights. Every logging step
    also checks that both ranks hold the same parameters (check_ranks_agree)."""
    ref, options = CASES[case]
    one = run_cli(train_flags(tmp_path / "one", GLOBAL_BATCH, ref, tmp_path / "cache1") + options, env=CPU_ENV)
    assert one.returncode == 0, one.stderr[-3000:]

    cfg = tiny_config(tmp_path / "two", batch_size=GLOBAL_BATCH // 2)
    # accelerate's CPU multi-process path: torchrun-style workers (--multi_gpu) told to use the
    # CPU and gloo (ACCELERATE_USE_CPU); `--cpu` alone would expect an MPI launcher.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "fastdpo.train"]
    result = run_cli(launch + train_flags(cfg.run_dir, cfg.batch_size, ref, tmp_path / "cache2") + options,
                     env=CPU_ENV)
    assert result.returncode == 0, result.stderr[-3000:]

    start = read_metrics(cfg.run_dir)[0]
    assert (start["processes"], start["per_device_batch"], start["global_batch"]) == (2, 4, GLOBAL_BATCH)
    one, two = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        names = ["loss", "rewards/margins", "logps/chosen", "grad_norm"]
        # Accuracy counts the signs of per-pair margins; at the first step (policy = reference) the
        # margins are rounding noise (a precomputed reference met other batch shapes), so their
        # signs are only compared once the margins are clearly above it.
        if abs(one[step]["rewards/margins"]) > 1e-3:
            names.append("rewards/accuracies")
        for name in names:
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-4, abs=1e-6), (step, name)
    evals = [[r for r in read_metrics(d) if "eval_loss" in r] for d in (tmp_path / "one", tmp_path / "two")]
    assert [r["step"] for r in evals[1]] == [2, 4]  # 13 eval pairs: uneven shards, each pair counted once
    for a, b in zip(*evals):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["eval_rewards/accuracies"] == pytest.approx(a["eval_rewards/accuracies"], abs=1e-6)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    # rtol as the metrics above: two processes sum gradients in another order than one. atol: AdamW's
    # first steps divide by the root of the squared gradient, so rounding-level differences of
    # near-zero gradient entries become updates of up to the learning rate's size; the packed
    # (padding-free) default runs other matmul shapes on one and two processes (seen: 1.2e-5).
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=3e-5) for k in a)


def test_an_fsdp_launch_without_gpus_fails_instead_of_training_alone(tmp_path):
    """Without GPUs accelerate turns an FSDP launch into separate one-process runs; the trainer refuses."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "--use_fsdp", "--fsdp_version", "2", "-m", "fastdpo.train"]
    for use_cpu, got in (("false", "NO over 1"), ("true", "MULTI_CPU over 2")):
        run_dir = tmp_path / f"run-{use_cpu}"
        result = run_cli(launch + train_flags(run_dir, 4, "copy", tmp_path / "cache"),
                         env={**CPU_ENV, "ACCELERATE_USE_CPU": use_cpu})
        assert result.returncode != 0
        assert (f"the launch asked for FSDP over 2 processes but accelerate set up {got}: FSDP and DeepSpeed need "
                "GPUs") in result.stderr
        # one line from fastdpo (the launcher adds its own ChildFailedError report) and nothing written
        assert "fastdpo/trainer" not in result.stderr and not run_dir.exists()


def test_ranks_that_diverge_are_caught():
    """The check itself: two ranks whose parameter fingerprints differ stop the run."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from fastdpo.trainer.loop import check_ranks_agree

    model = torch.nn.Linear(3, 2)
    same = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"),
                           gather=lambda t: torch.cat([t, t]))
    check_ranks_agree(same, model, 3)
    apart = SimpleNamespace(**{**vars(same), "gather": lambda t: torch.cat([t, t + 1e-9])})
    with pytest.raises(RuntimeError, match="after step 3 the 2 processes hold different parameters"):
        check_ranks_agree(apart, model, 3)
