"""Trainer runs on the embedded model: learning, reference modes, loss paths, models by path, formats."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import final_weights, tiny_config, train_losses, write_jsonl

from fastdpo import cli
from fastdpo.trainer import DPOTrainer, embedded
from fastdpo.trainer.logs import read_metrics
from fastdpo.trainer.plot import plot_run

LOG2 = math.log(2.0)


def run(run_dir, **options) -> dict:
    return DPOTrainer(tiny_config(run_dir, **options)).train()


def test_shortened_default_run_makes_the_model_better(tmp_path):
    """The embedded default with fewer steps: greedy answers to held-out prompts pass the task's
    rule more often after DPO than before it (eval/task_success), and the reward metrics rise."""
    from fastdpo.trainer import TrainConfig

    cfg = TrainConfig(run_dir=str(tmp_path / "run"), sft_steps=100, max_steps=60, eval_steps=30,
                      max_eval_pairs=200, progress_bar=False)
    summary = DPOTrainer(cfg).train()
    records = read_metrics(cfg.run_dir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    success = [(r["step"], r["eval/task_success"]) for r in records if "eval/task_success" in r]
    assert [step for step, _ in success] == [0, 30, 60]  # before the first DPO step, then every eval
    assert success[0][1] < success[1][1] < success[2][1] and success[2][1] >= success[0][1] + 0.05
    assert [r["step"] for r in evals] == [30, 60]
    assert train[0]["rewards/margins"] < evals[0]["eval_rewards/margins"] < evals[1]["eval_rewards/margins"]
    assert evals[1]["eval_rewards/accuracies"] >= 0.9
    assert train[-1]["loss"] < train[0]["loss"] and "nll_loss" in train[-1]  # sigmoid + the chosen NLL
    assert summary["eval"] == {k: v for k, v in evals[-1].items() if k not in ("step", "eval_set")}
    for name in ("lr", "grad_norm", "tokens/s", "peak_memory_gb", "logps/chosen", "logits/rejected"):
        assert name in train[-1]
    assert plot_run(cfg.run_dir).stat().st_size > 10_000
    assert cli.main(["plot", cfg.run_dir, "--out", str(tmp_path / "c.png")]) == 0 and (tmp_path / "c.png").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert AutoTokenizer.from_pretrained(summary["final_model"]).chat_template == embedded.CHAT_TEMPLATE
    saved = final_weights(cfg.run_dir)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)


def test_reference_modes_give_the_same_first_step_loss(tmp_path):
    firsts = {}
    for ref in ("copy", "precompute", "adapter"):
        run(tmp_path / f"lora-{ref}", ref=ref, lora_r=4, max_steps=1)
        firsts[ref] = train_losses(tmp_path / f"lora-{ref}")[0]
    # the same reference as a frozen copy (copy), a table (precompute), the LoRA base (adapter)
    assert firsts["copy"] == firsts["precompute"] == firsts["adapter"] == pytest.approx(LOG2, abs=1e-6)
    for ref in ("none", "copy", "precompute"):  # a reference-free loss ignores the reference
        run(tmp_path / f"simpo-{ref}", ref=ref, loss_type="simpo", max_steps=1)
        firsts[f"simpo-{ref}"] = train_losses(tmp_path / f"simpo-{ref}")[0]
    assert firsts["simpo-none"] == firsts["simpo-copy"] == firsts["simpo-precompute"]


def test_precomputed_reference_is_cached_by_model_data_and_settings(tmp_path):
    cache = tmp_path / "ref_cache"
    run(tmp_path / "a", ref="precompute", max_steps=3)
    assert len(list(cache.glob("*.pt"))) == 1
    run(tmp_path / "b", ref="precompute", max_steps=3)  # same model, data, settings: a cache hit
    assert len(list(cache.glob("*.pt"))) == 1
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    run(tmp_path / "c", ref="precompute", max_steps=1, seed=7)  # other weights
    run(tmp_path / "d", ref="precompute", max_steps=1, max_length=20)  # other tokens
    assert len(list(cache.glob("*.pt"))) == 3
    run(tmp_path / "e", ref="copy", max_steps=3)
    assert train_losses(tmp_path / "e") == pytest.approx(train_losses(tmp_path / "a"), rel=1e-6)


@pytest.mark.parametrize("damage, why", [
    (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "could not be read"),  # cut short
    (lambda f: f.write_text("not a torch file"), "could not be read"),
    (lambda f: torch.save({"train": torch.zeros(3, 2)}, f), "does not hold a table for every pair"),
])
def test_an_unusable_reference_cache_is_computed_again(tmp_path, capsys, damage, why):
    cache = tmp_path / "ref_cache"
    run(tmp_path / "a", ref="precompute", max_steps=2)
    (cached,) = cache.glob("*.pt")
    damage(cached)
    capsys.readouterr()
    run(tmp_path / "b", ref="precompute", max_steps=2)
    err = capsys.readouterr().err
    assert f"reference log-probs precomputed into {cached} (the cached file {why}" in err and "; replaced)\n" in err
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    run(tmp_path / "c", ref="precompute", max_steps=2)  # the replaced file serves the next run
    assert f"reference log-probs loaded from {cached}\n" in capsys.readouterr().err


def test_loss_implementations_agree(tmp_path):
    run(tmp_path / "fused", loss_impl="fused", max_steps=3)
    run(tmp_path / "reference", loss_impl="reference", max_steps=3)
    assert train_losses(tmp_path / "fused") == pytest.approx(train_losses(tmp_path / "reference"), rel=1e-5)
    a, b = final_weights(tmp_path / "fused"), final_weights(tmp_path / "reference")
    # 2% of one AdamW step (lr 1e-3): the two differ in rounding only, and for the confident tokens
    # of the warmed-up model in their label gradient, which eager computes as 1 - exp(logp) (it
    # cancels) and fastdpo from the other tokens' mass; AdamW's normalized step magnifies
    # differences in near-zero gradients (measured 1.1e-5 here, 5e-6 before the exact 1 - p).
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a)
    for ref in ("copy", "precompute"):  # the reference is scored from hidden states as well
        run(tmp_path / f"linear-{ref}", loss_impl="fused_linear", ref=ref, max_steps=3)
        assert train_losses(tmp_path / f"linear-{ref}") == pytest.approx(train_losses(tmp_path / "fused"), rel=1e-5)
        c = final_weights(tmp_path / f"linear-{ref}")
        assert all(torch.allclose(a[k], c[k], atol=1e-5) for k in a)


def test_every_loss_type_trains(tmp_path):
    from fastdpo.losses import LOSSES, REFERENCE_FREE

    needs = {"exo_pair": dict(label_smoothing=1e-3)}  # EXO takes log(eps)
    start = embedded.build_model(embedded.build_tokenizer(), 42).state_dict()  # the runs' seed
    for name in sorted(LOSSES):
        run(tmp_path / name, loss_type=name, max_steps=1, ref="none" if name in REFERENCE_FREE else "copy",
            max_train_pairs=8, max_eval_pairs=4, **needs.get(name, {}))
        assert math.isfinite(train_losses(tmp_path / name)[0]), name
        final = final_weights(tmp_path / name)
        assert all(torch.isfinite(w).all() for w in final.values()), name
        # the loss's gradient reached the model: the step moved every trained matrix
        moved = [k for k, w in final.items() if not torch.equal(w, start[k])]
        assert "model.layers.0.self_attn.q_proj.weight" in moved and "model.embed_tokens.weight" in moved, name


def test_a_model_saved_with_save_pretrained_trains_by_path(tmp_path):
    tokenizer = embedded.build_tokenizer()
    model = embedded.build_model(tokenizer, seed=42)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # The same weights and tokens by path as embedded: the same run.
    run(tmp_path / "by_path", model=str(tmp_path / "model"), learning_rate=1e-3, batch_size=4, max_steps=3)
    run(tmp_path / "embedded", max_steps=3)
    assert train_losses(tmp_path / "by_path") == pytest.approx(train_losses(tmp_path / "embedded"), rel=1e-6)


def test_gradient_checkpointing_and_accumulation_match_the_plain_step(tmp_path):
    run(tmp_path / "plain", batch_size=8, max_steps=3)
    run(tmp_path / "ckpt", batch_size=8, max_steps=3, gradient_checkpointing=True)
    run(tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=3)
    plain = final_weights(tmp_path / "plain")
    for other in ("ckpt", "accum"):
        assert train_losses(tmp_path / other) == pytest.approx(train_losses(tmp_path / "plain"), rel=1e-5)
        weights = final_weights(tmp_path / other)
        assert all(torch.allclose(weights[k], plain[k], atol=1e-5) for k in plain), other


def test_conversational_and_minimind_datasets_train(tmp_path):
    rows = embedded.make_split("test")[:16]
    conversational = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    minimind = [{"chosen": c["prompt"] + c["chosen"], "rejected": c["prompt"] + c["rejected"]} for c in conversational]
    for name, data in (("conversational", conversational), ("minimind", minimind)):
        path = write_jsonl(tmp_path / f"{name}.jsonl", data)
        run(tmp_path / name, dataset=str(path), eval_fraction=0.25, max_steps=2)
        assert train_losses(tmp_path / name)[0] == pytest.approx(LOG2, abs=1e-6)
    assert train_losses(tmp_path / "conversational") == train_losses(tmp_path / "minimind")
    (tmp_path / "data.json").write_text(json.dumps(conversational))
    run(tmp_path / "json", dataset=str(tmp_path / "data.json"), eval_fraction=0.25, max_steps=2)
    assert train_losses(tmp_path / "json") == train_losses(tmp_path / "conversational")


def test_lora_final_model_is_merged_for_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    summary = run(tmp_path / "lora", lora_r=4, ref="adapter", max_steps=3, learning_rate=1e-2)
    assert not any("lora" in k for k in final_weights(tmp_path / "lora"))
    merged = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    base = embedded.build_model(embedded.build_tokenizer(), seed=42)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)  # only the LoRA-adapted linears moved


@pytest.mark.parametrize("impl", ["fused", "fused_linear"])
def test_the_kernels_serve_the_trainer(tmp_path, backend, impl):
    """The trainer's shifted (non-contiguous) batches through both backends (conftest's `backend`:
    the PyTorch twin, and the Triton kernels, interpreted on CPU) match the pure-PyTorch loss."""
    run(tmp_path / impl, loss_impl=impl, max_steps=2, max_eval_pairs=4)
    run(tmp_path / "reference", loss_impl="reference", max_steps=2, max_eval_pairs=4)
    # The Triton variant trains on the GPU where there is one (conftest), under bf16 autocast:
    # there the implementations agree to ~1e-4 (8.6e-5 measured on an H100), not fp32's 1e-5.
    rel = 1e-3 if backend == "triton" and torch.cuda.is_available() else 1e-5
    assert train_losses(tmp_path / impl) == pytest.approx(train_losses(tmp_path / "reference"), rel=rel)


# The code of a training step that runs on the device's values: a host read there (`.item()`,
# `float()`, `.cpu()`, ...) would make the host wait for the device instead of queuing on.
STEP_CODE = ("fastdpo/trainer/loop.py", "fastdpo/trainer/loss.py", "fastdpo/trainer/ref.py", "fastdpo/head.py",
             "fastdpo/objective.py", "fastdpo/losses.py", "fastdpo/metrics.py", "fastdpo/logps.py",
             "fastdpo/linear.py")
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@pytest.mark.parametrize("ref,impl", [("copy", "fused"), ("precompute", "fused_linear")])
def test_steps_between_log_lines_read_nothing_back(tmp_path, monkeypatch, ref, impl):
    """Between log, eval and save steps the step's own code reads no tensor value on the host (on a
    GPU each read would stall the queue). On the CPU every such read is recorded with its caller;
    the layouts' host-side bookkeeping (tensors made on the host) is not step code."""
    import sys

    reads, watching = [], [False]

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if watching[0] and caller.endswith(STEP_CODE):
                reads.append(f"{name} in {caller.split('/fastdpo/')[-1]}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)

    for name in HOST_READS:
        spy(name)
    step, after = DPOTrainer.train_step, DPOTrainer._after_step

    def watched_step(self):
        watching[0] = (self.step + 1) % 4 != 0  # steps 1-3 of 4 neither log, evaluate nor save
        return step(self)

    def watched_after(self, *args):
        after(self, *args)
        watching[0] = False

    monkeypatch.setattr(DPOTrainer, "train_step", watched_step)
    monkeypatch.setattr(DPOTrainer, "_after_step", watched_after)
    DPOTrainer(tiny_config(tmp_path / "run", max_steps=4, logging_steps=4, save_steps=0, ref=ref,
                           loss_impl=impl)).train()
    assert reads == []
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [4]


def test_a_run_that_fails_while_setting_up_leaves_its_directory_reusable(tmp_path):
    """A fresh run whose model refuses an option (LoRA targets it does not have) names the option in
    one line and takes back its config and start record: the corrected command runs in the same
    directory, without --resume replaying the failing option."""
    from fastdpo.trainer import ConfigError

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="--lora-target-modules bogus_proj: .*bogus_proj"):
        DPOTrainer(tiny_config(run, lora_r=4, lora_target_modules="bogus_proj")).train()
    assert not run.exists()
    DPOTrainer(tiny_config(run, lora_r=4, max_steps=1)).train()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1]
