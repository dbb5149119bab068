"""`FastDPOTrainer` on two CPU processes (gloo) through `accelerate launch` equals one process at the
same global batch, from the shipped configs: DDP (examples/accelerate/ddp.yaml with
ACCELERATE_USE_CPU), FSDP2 (fsdp2.yaml, and fsdp2-offload.yaml with CPU offload of the
parameters) and DeepSpeed (zero2.yaml, zero3.yaml), the last two through tests/sharded_on_cpu.py,
which lets accelerate keep FSDP and DeepSpeed on CPU processes; everything after that switch is
the code a GPU run executes: transformers' Trainer, accelerate's fully_shard preparation or
DeepSpeed engine, TRL's preparation of the reference, the gathered save).

tests/trl_train_script.py trains 3 SGD steps of a tiny random Llama per case: fastdpo_mode
"logits" (from-logits kernel) or "linear" (fused linear: reads the whole lm_head weight inside the
wrapped forward, where FSDP2 has gathered it), each with TRL's reference model run at every step
(sharded by TRL's prepare_fsdp under FSDP2) or with `precompute_ref_log_probs` (TRL's precompute,
each rank scoring its share of the pairs), with no `ref_model` (TRL loads the reference from the
policy's folder) or with LoRA (the reference: the adapter disabled), on TRL's padded batches or
fastdpo's padding-free ones. After training, `trainer.evaluate()` on the same pairs (each process
scoring half of them, TRL gathering the metrics) must report what one process does.
One launch per engine runs all its cases (start-up is most of the time).

Tolerance: fp32 on both sides, so the runs differ by rounding only: two processes pad or pack each
half-batch on its own (other matmul shapes) and average two partial gradients where one process
sums four rows. Seen (2026-12-02, CPU): logged metrics within 2.5e-7 relative, except rewards near
zero, within 5e-8 absolute (a reward is beta times a difference of log-probs near -13, whose fp32
ulp is 1e-6); final weights within 1.5e-8. Checked at rel 1e-5 / abs 1e-6 (metrics) and 1e-6
absolute (weights): 20-60x above that rounding, and far below what a missing or mis-scaled
gradient synchronisation changes: the update itself, asserted above 1e-3 (SGD, so the update is
the gradient; the 7245 failure mode, calling the unwrapped model, was seen to fail this module).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from test_train_distributed import engine_env, free_port
from train_helpers import REPO, run_cli
from trl_train_script import MODES, save_policy, write_pairs

from fastdpo.integrations.trl import check_precompute_datasets

CASES = [f"{mode}-{ref}" for mode in MODES for ref in ("model", "precompute")]  # padded, TRL's layout
# engine -> its cases: both modes with a ref_model, run or precomputed; without one (TRL loads the
# reference from the policy's folder, and under FSDP frees it after the precompute); LoRA (the
# reference is the adapter disabled); one padding-free case each (fastdpo's packed layout: the
# same head, other model inputs). With CPU offload of the parameters (on CPU processes the offload
# copies are CPU to CPU: this runs the offload code path, it does not show the memory saving),
# two cases.
ENGINES = {"ddp": [*CASES, "linear-none_precompute", "logits-lora", "logits-precompute-packed"],
           "fsdp2": [*CASES, "logits-none_precompute", "linear-none", "linear-lora", "linear-model-packed"],
           "fsdp2-offload": ["logits-model", "linear-precompute"],
           # DeepSpeed (its CPU accelerator over gloo); fastdpo_mode="linear" is refused under ZeRO-3
           "zero2": ["logits-model", "linear-precompute", "logits-lora"],
           "zero3": ["logits-model", "logits-precompute", "logits-lora"]}
ALL_CASES = sorted({case for cases in ENGINES.values() for case in cases})
SCRIPT = str(REPO / "tests" / "trl_train_script.py")
STEPS = 3


def launch(engine: str) -> list[str]:
    """One process, or two from the shipped config examples/accelerate/ENGINE.yaml, on CPUs (gloo; the
    FSDP and DeepSpeed configs through --sharded-on-cpu)."""
    if engine == "one":
        return [sys.executable, SCRIPT, "--batch", "4", "--cases", ",".join(ALL_CASES)]
    config = REPO / "examples" / "accelerate" / f"{engine}.yaml"
    options = ["--check-refusal"] if engine == "ddp" else ["--sharded-on-cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", SCRIPT, "--batch", "2",
            "--cases", ",".join(ENGINES[engine]), *options]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(engine) -> its output folder; each engine is launched once per module, on first use."""
    root = tmp_path_factory.mktemp("trl-distributed")
    data = write_pairs(root / "pairs.jsonl")  # one file: every rank must see the same dataset cache
    init = save_policy(root / "init")
    done = {}

    def run(engine: str):
        if engine not in done:
            out = root / engine
            result = run_cli([*launch(engine), str(out), "--data", str(data), "--init", str(init)], env=engine_env(engine),
                             timeout=480)
            assert result.returncode == 0, result.stderr[-4000:]
            done[engine] = out
        return done[engine]

    return run


def read_log(run_dir) -> dict:
    return json.loads((run_dir / "log.json").read_text())


def steps(log: dict) -> list[dict]:
    return [h for h in log["log_history"] if "loss" in h]


def weights(run_dir) -> dict[str, torch.Tensor]:
    """The final model as transformers loads it from the saved folder."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()


@pytest.mark.parametrize("engine, case", [(e, c) for e, cases in ENGINES.items() for c in cases])
def test_two_processes_match_one_at_the_same_global_batch(runs, engine, case):
    mode, ref = case.split("-")[:2]
    one, two = read_log(runs("one") / case), read_log(runs(engine) / case)
    assert (one["processes"], two["processes"]) == (1, 2)
    # The mode in effect: each of 3 steps scores the reference (or one precompute batch per rank) and the policy.
    assert one["head_calls"] == two["head_calls"] == {mode: 2 * STEPS}
    assert one["layout"] == two["layout"] == ("packed" if case.endswith("-packed") else "padded")
    # sharded for real under FSDP2, not accelerate's silent DDP fallback on CPUs; the reference too, unless
    # TRL dropped it after the precompute
    tensors = ["DTensor"] if engine.startswith("fsdp2") else ["Parameter"]
    assert two["fsdp"] == engine.startswith("fsdp2") and two["sharded"] == tensors
    assert two["ref_sharded"] == (None if ref in ("none_precompute", "lora") else tensors)

    a, b = steps(one), steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        assert {"loss", "grad_norm", "rewards/margins", "logps/chosen", "entropy", "logits/chosen"} <= set(ra)
        for name, value in ra.items():
            assert rb[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (ra["step"], name)
    assert_same_evaluation(one["eval"], two["eval"], expected=ref != "none_precompute")

    if ref == "lora":
        assert_same_adapter(runs("one") / case, runs(engine) / case)
        return
    wa, wb = weights(runs("one") / case), weights(runs(engine) / case)
    assert wa.keys() == wb.keys()
    # the steps moved the weights far beyond the tolerance (else a lost gradient could not show)
    start = weights_at_start()
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 1e-3
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def assert_same_evaluation(one: dict | None, two: dict | None, expected: bool) -> None:
    """`evaluate()` after training: each process scores half of the pairs and TRL gathers the metrics, so
    two processes report what one does (same tolerance as the training logs). Not run where TRL refuses
    to evaluate new data: a precomputed reference with no model left to compute it (trl_train_script)."""
    assert (one is not None, two is not None) == (expected, expected)
    if not expected:
        return
    assert set(one) == set(two)
    assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"} <= set(one)
    for name, value in one.items():
        assert two[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def assert_same_adapter(one_dir, two_dir) -> None:
    """The saved LoRA adapters. lora_B starts at zero and reaches ~1e-4 in 3 steps here, so the
    slack is relative to each tensor's largest entry: 3e-4 of it (seen: 3e-5, 3.7e-9 absolute)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one_dir, two_dir))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        if "lora_B" in name:
            assert a[name].abs().max() > 1e-5  # trained away from its zero start
        atol = 3e-4 * a[name].abs().max().item()
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def weights_at_start() -> dict[str, torch.Tensor]:
    from trl_train_script import tiny_models, tokenizer

    return tiny_models(len(tokenizer()))[0].state_dict()


@pytest.mark.parametrize("case", ENGINES["ddp"])
def test_ddp_ranks_hold_identical_parameters_after_every_step(runs, case):
    """TRL issue 7245's failure mode (DPO skipped DDP's gradient synchronisation: every parameter
    differed across ranks): bit-equal parameters on both ranks after each optimizer step."""
    run_dir = runs("ddp") / case
    rank0, rank1 = (json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1))
    assert len(rank0) == STEPS and rank0 == rank1
    assert len(set(rank0)) == STEPS  # each step changed the parameters


def test_precompute_from_an_in_memory_dataset_is_refused_on_two_processes(runs):
    """TRL writes precomputed log-probs beside the dataset's cache files and every rank reads them back; a
    dataset built in memory has none (rank 1 would fail with FileNotFoundError): one line at construction."""
    message = (runs("ddp") / "refusal.txt").read_text()
    assert message.startswith("train_dataset has no cache files") and "on 2 processes" in message
    assert "\n" not in message


def test_precompute_dataset_check(tmp_path):
    """The check itself, in this process: only several processes with an in-memory dataset are refused."""
    import datasets
    from datasets import Dataset, load_from_disk

    in_memory = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    in_memory.save_to_disk(str(tmp_path / "ds"))
    on_disk = load_from_disk(str(tmp_path / "ds"))
    two = SimpleNamespace(precompute_ref_log_probs=True, world_size=2)
    check_precompute_datasets(two, {"train_dataset": on_disk, "eval_dataset": {"a": on_disk}})
    check_precompute_datasets(SimpleNamespace(precompute_ref_log_probs=True, world_size=1),
                              {"train_dataset": in_memory})
    check_precompute_datasets(SimpleNamespace(precompute_ref_log_probs=False, world_size=2),
                              {"train_dataset": in_memory})
    with pytest.raises(ValueError, match=r"^eval_dataset\['b'\] has no cache files"):
        check_precompute_datasets(two, {"train_dataset": on_disk, "eval_dataset": {"a": on_disk, "b": in_memory}})
    datasets.disable_caching()  # then TRL names the file at random on every process, as for in-memory data
    try:
        with pytest.raises(ValueError, match=r"^train_dataset has no cache files .* on 2 processes"):
            check_precompute_datasets(two, {"train_dataset": on_disk})
    finally:
        datasets.enable_caching()
