"""Two CPU processes (gloo) through `accelerate launch` match one process at the same global batch:
DDP, and FSDP2 from examples/accelerate/ (through tests/sharded_on_cpu.py, see there)."""

from __future__ import annotations

import re
import shutil
import socket
import sys

import pytest
import torch
from train_helpers import REPO, final_weights, run_cli, step_records, tiny_config

from fastdpo import cli
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
    # The embedded default loss (sigmoid + NLL): its NLL term is one token mean over the step on
    # any number of processes, so it must match too.
    return ["--run-dir", str(run_dir), "--batch-size", str(batch_size),
            "--max-steps", str(STEPS), "--sft-steps", "2", "--eval-steps", "2", "--max-train-pairs", "64",
            "--max-eval-pairs", "13", "--logging-steps", "1", "--ref", ref, "--ref-cache-dir", str(cache),
            "--no-progress-bar"]


def launcher(engine: str) -> list[str]:
    """Two processes under `engine`, each running `fastdpo train` (flags follow)."""
    port = ["--num_processes", "2", "--main_process_port", str(free_port())]
    if engine == "ddp":
        # accelerate's CPU multi-process path: torchrun-style workers (--multi_gpu) told to use the
        # CPU and gloo (ACCELERATE_USE_CPU); `--cpu` alone would expect an MPI launcher.
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", *port, "-m", "fastdpo.train"]
    # FSDP2 or DeepSpeed from the shipped config file; tests/sharded_on_cpu.py lets accelerate keep
    # them on CPUs. fp32 on both sides of the comparison (the zero configs ask for bf16).
    config = REPO / "examples" / "accelerate" / f"{engine}.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *port,
            "--mixed_precision", "no", str(REPO / "tests" / "sharded_on_cpu.py")]


def engine_env(engine: str) -> dict:
    """The launch environment: CPU processes; DeepSpeed must not be told ACCELERATE_USE_CPU (accelerate
    would then skip it), its CPU accelerator is chosen because no GPU is visible."""
    return {**CPU_ENV, "ACCELERATE_USE_CPU": "false"} if engine.startswith("zero") else CPU_ENV


def one_process(flags: list[str]) -> None:
    """The one-process baseline: in this process where it is CPU-only anyway (no interpreter start-up,
    nor imports, per case), else a subprocess with the GPU hidden."""
    if torch.cuda.is_available():
        one = run_cli(flags, env=CPU_ENV)
        assert one.returncode == 0, one.stderr[-3000:]
    else:
        assert cli.main(["train", *flags]) == 0


CASES = {  # engine, reference, then the loss path and batch layout (padding-free is the default)
    "ddp-copy": ("ddp", "copy", []),
    "ddp-precompute": ("ddp", "precompute", []),
    "ddp-copy-linear-padded": ("ddp", "copy", ["--loss-impl", "fused_linear", "--no-padding-free"]),
    "ddp-precompute-linear-shared": ("ddp", "precompute", ["--loss-impl", "fused_linear", "--share-prompt"]),
    "ddp-lora-adapter-eager-padded": ("ddp", "adapter", ["--lora-r", "8", "--loss-impl", "reference",
                                                         "--no-padding-free", "--sft-steps", "0"]),
    "fsdp2-copy": ("fsdp2", "copy", []),
    "fsdp2-precompute-linear-padded": ("fsdp2", "precompute", ["--loss-impl", "fused_linear", "--no-padding-free"]),
    "fsdp2-copy-eager": ("fsdp2", "copy", ["--loss-impl", "reference"]),
    # (LoRA with --ref adapter starts from the base model: no warm-up)
    "fsdp2-offload-lora-adapter-linear": ("fsdp2-offload", "adapter",
                                          ["--lora-r", "8", "--loss-impl", "fused_linear", "--sft-steps", "0"]),
    # (a norm of about 0.7 clipped to 0.3: DeepSpeed's engine clips, and must do so as one process does)
    "zero2-copy-linear-clipped": ("zero2", "copy", ["--loss-impl", "fused_linear", "--max-grad-norm", "0.3"]),
    "zero3-precompute-padded": ("zero3", "precompute", ["--no-padding-free"]),
    "zero3-lora-adapter": ("zero3", "adapter", ["--lora-r", "8", "--sft-steps", "0"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, case):
    """DDP or FSDP2 on two processes equals one process: metrics, eval and final weights. Under DDP
    every logging step also checks that both ranks hold the same parameters (check_ranks_agree)."""
    engine, ref, options = CASES[case]
    one_process(train_flags(tmp_path / "one", GLOBAL_BATCH, ref, tmp_path / "cache1") + options)

    cfg = tiny_config(tmp_path / "two", batch_size=GLOBAL_BATCH // 2)
    result = run_cli(launcher(engine) + train_flags(cfg.run_dir, cfg.batch_size, ref, tmp_path / "cache2") + options,
                     env=engine_env(engine))
    assert result.returncode == 0, result.stderr[-3000:]

    start = read_metrics(cfg.run_dir)[0]
    assert (start["processes"], start["per_device_batch"], start["global_batch"]) == (2, 4, GLOBAL_BATCH)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def assert_same_run(one_dir, two_dir) -> None:
    """Two runs' step metrics (grad norm included), evals and final weights agree."""
    one, two = step_records(one_dir), step_records(two_dir)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        names = ["loss", "nll_loss", "rewards/margins", "logps/chosen", "grad_norm"]
        # Accuracy counts the signs of per-pair margins; at the first step (policy = reference) the
        # margins are rounding noise (a precomputed reference met other batch shapes), so their
        # signs are only compared once the margins are clearly above it.
        if abs(one[step]["rewards/margins"]) > 1e-3:
            names.append("rewards/accuracies")
        for name in names:
            assert two[step][name] == pytest.approx(one[step][name], rel=1e-4, abs=1e-6), (step, name)
    evals = [[r for r in read_metrics(d) if "eval_loss" in r] for d in (one_dir, two_dir)]
    assert [r["step"] for r in evals[1]] == [2, 4]  # 13 eval pairs: uneven shards, each pair counted once
    for a, b in zip(*evals):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
        assert b["eval_rewards/accuracies"] == pytest.approx(a["eval_rewards/accuracies"], abs=1e-6)
    assert_weights_close(final_weights(one_dir), final_weights(two_dir))


def assert_weights_close(a: dict, b: dict) -> None:
    """Final weights of two runs that differ by rounding only.

    rtol as the metrics above: two processes sum gradients in another order than one. atol: AdamW's
    first steps divide by the root of the squared gradient, so rounding-level differences of
    near-zero gradient entries become updates of up to the learning rate's size; the packed
    (padding-free) default runs other matmul shapes on one and two processes (seen: 1.2e-5 with
    torch 2.13). So a few entries may pass the atol (seen: 1 of 16384 at 3.3e-5 with torch 2.11):
    at most one in a thousand of each tensor, and none by more than the learning rates of the run
    added up (2 warm-up steps at 3e-3, STEPS at 1e-3). A gradient that is not synchronised, or
    synchronised wrongly, moves most entries.
    """
    assert a.keys() == b.keys()
    bound = 2 * 3e-3 + STEPS * 1e-3
    for name in a:
        diff = (a[name] - b[name]).abs()
        beyond = int((diff > 3e-5 + 1e-4 * b[name].abs()).sum())
        assert beyond <= a[name].numel() // 1000 and float(diff.max()) <= bound, \
            (name, beyond, a[name].numel(), float(diff.max()))


# Where each engine's checkpoint keeps the model's shards, and the name pattern of one rank's file.
SHARD_FILES = {"fsdp2": ("pytorch_model_fsdp_0", "*.distcp"), "zero3": ("pytorch_model", "*optim_states.pt")}


@pytest.mark.parametrize("engine", list(SHARD_FILES))
def test_a_resumed_sharded_run_equals_an_uninterrupted_one(tmp_path, engine):
    """Sharded checkpoints: one file per rank, and --resume from one continues exactly, down to the
    log record that spans the stop (logged every 3 steps, stopped after step 2: each rank's
    unlogged steps come back from its own file)."""
    ref = "precompute" if engine == "zero3" else "copy"  # (ZeRO-3 refuses --ref copy)
    flags = train_flags(tmp_path / "whole", GLOBAL_BATCH // 2, ref, tmp_path / "cache") + \
        ["--save-steps", "2", "--save-total-limit", "0"]
    flags[flags.index("--logging-steps") + 1] = "3"
    whole = run_cli(launcher(engine) + flags, env=engine_env(engine))
    assert whole.returncode == 0, whole.stderr[-3000:]
    folder, pattern = SHARD_FILES[engine]
    shards = list((tmp_path / "whole" / "checkpoints" / "step-00000002").rglob(f"{folder}/{pattern}"))
    assert len(shards) == 2, shards  # each rank wrote its own shard, nothing gathered

    # The same run stopped after its step-2 checkpoint: later checkpoints and the final model gone.
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "whole", split)
    shutil.rmtree(split / "checkpoints" / "step-00000004")
    shutil.rmtree(split / "final")
    (split / "checkpoints" / "latest").write_text("step-00000002")
    resumed = run_cli(launcher(engine) + ["--resume", "--run-dir", str(split)], env=engine_env(engine))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr

    a, b = step_records(tmp_path / "whole"), step_records(split)
    assert sorted(a) == sorted(b) == [3, STEPS]
    timing = {"tokens/s", "real_tokens/s", "peak_memory_gb"}  # measured, not computed
    for step in (3, 4):
        assert {k: v for k, v in b[step].items() if k not in timing} == \
            {k: v for k, v in a[step].items() if k not in timing}, step
    a, b = final_weights(tmp_path / "whole"), final_weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

    from fastdpo.trainer.distributed import check_ranks_agree

    model = torch.nn.Linear(3, 2)
    same = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU, device=torch.device("cpu"),
                           gather=lambda t: torch.cat([t, t]))
    check_ranks_agree(same, model, 3)
    apart = SimpleNamespace(**{**vars(same), "gather": lambda t: torch.cat([t, t + 1e-9])})
    with pytest.raises(RuntimeError, match="after step 3 the 2 processes hold different parameters"):
        check_ranks_agree(apart, model, 3)
    # ZeRO-2 keeps whole weights on every rank: checked; ZeRO-3 shards them: each rank differs by design
    for stage, checked in ((2, True), (3, False)):
        acc = fake_accelerator("DEEPSPEED", zero_stage=stage)
        acc.device, acc.gather = torch.device("cpu"), apart.gather
        if checked:
            with pytest.raises(RuntimeError, match="hold different parameters"):
                check_ranks_agree(acc, model, 3)
        else:
            check_ranks_agree(acc, model, 3)


def fake_accelerator(engine: str, **plugin):
    """What check_distributed reads of an Accelerator set up for `engine` on two processes."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(**plugin) if engine == "FSDP" else None,
                            deepspeed_plugin=SimpleNamespace(**plugin) if engine == "DEEPSPEED" else None)
    return SimpleNamespace(num_processes=2, distributed_type=DistributedType[engine], state=state)


@pytest.mark.parametrize("engine, plugin, ref, refused", [
    ("FSDP", {"fsdp_version": 1}, "precompute", "fastdpo runs FSDP version 2 (fully_shard): set fsdp_version: 2"),
    ("FSDP", {"fsdp_version": 2}, "copy", None),
    ("DEEPSPEED", {"zero_stage": 3}, "copy", "--ref copy would hold a whole unsharded model on every GPU beside ZeRO-3"),
    ("DEEPSPEED", {"zero_stage": 3}, "precompute", None),
    ("DEEPSPEED", {"zero_stage": 2}, "copy", None),
    ("DEEPSPEED", {"zero_stage": 3, "impl": "fused_linear"}, "precompute", "--loss-impl fused_linear reads lm_head"),
    ("DEEPSPEED", {"zero_stage": 2, "impl": "fused_linear"}, "copy", None),
])
def test_sharded_configurations_that_cannot_work_fail_at_start(tmp_path, monkeypatch, engine, plugin, ref, refused):
    from fastdpo.trainer.config import ConfigError
    from fastdpo.trainer.distributed import check_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(f"ACCELERATE_USE_{'FSDP' if engine == 'FSDP' else 'DEEPSPEED'}", "true")
    cfg = tiny_config(tmp_path / "run", ref=ref, loss_impl=plugin.pop("impl", "fused"))
    if refused is None:
        check_distributed(cfg, fake_accelerator(engine, **plugin))
    else:
        with pytest.raises(ConfigError, match=re.escape(refused)):
            check_distributed(cfg, fake_accelerator(engine, **plugin))


def test_fused_adamw_only_where_the_parameters_live_on_the_gpu():
    """Fused AdamW steps GPU tensors: not FSDP's CPU-offloaded shards, not under DeepSpeed's engine."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from fastdpo.trainer.distributed import fused_adamw

    def on(device, engine, **plugin):
        acc = fake_accelerator(engine, **plugin)
        acc.device = torch.device(device)
        return fused_adamw(acc)

    assert on("cuda", "MULTI_GPU") and on("cuda", "FSDP", cpu_offload=OffloadPolicy())
    assert not on("cuda", "FSDP", cpu_offload=CPUOffloadPolicy())
    assert not on("cuda", "DEEPSPEED", zero_stage=2) and not on("cpu", "MULTI_CPU")
