"""fastdpo.integrations.trl against TRL's own DPOTrainer on a tiny Llama (CPU, fp32, no downloads).

The reference for "same as TRL" is TRL itself: two training steps from the same seed must give the
same loss, metrics and parameter update (SGD, so the update is the gradient). Where the question
is not "same as TRL" (precomputed reference log-probs used as given), the check is a float64
computation from the formulas.
"""

from __future__ import annotations

import copy
import logging
import importlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from fastdpo.integrations import trl as fast_trl
from fastdpo.integrations.trl import FastDPOTrainer, patch_trainer

WORDS = [f"w{i}" for i in range(16)]
BETA = 0.1
RTOL, ATOL = 1e-5, 1e-6


# ---- tiny world: tokenizer, data, models ---------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    # Prompts and completions of different lengths, so padding and prompt masks differ per row. The
    # first prompt is empty: its completion starts at position 0, which no label scores (TRL's IPO
    # still counts it).
    rows = [{"prompt": sentence(i % 3 + (i > 0)), "chosen": " " + sentence(1 + i % 4),
             "rejected": " " + sentence(2 + (3 * i) % 4)} for i in range(8)]
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def models_(tokenizer):
    """(policy, reference): different random weights, so the reference log-ratios are not zero."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=2, bos_token_id=2)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(cfg)
    torch.manual_seed(1)
    return policy, LlamaForCausalLM(cfg)


def dpo_args(tmp_path, **overrides) -> DPOConfig:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, optim="sgd",
                   learning_rate=0.5, report_to="none", logging_steps=1, use_cpu=True, seed=0,
                   save_strategy="no", bf16=False, gradient_checkpointing=False, disable_tqdm=True, beta=BETA)
    options.update(overrides)
    return DPOConfig(**options)


def build(kind, models_, tokenizer, dataset, args, **fast_options):
    """A trainer on fresh copies of the tiny models: "trl", "fast" (subclass) or "patch" (patched)."""
    policy, ref = (copy.deepcopy(m) for m in models_)
    common = dict(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    if kind == "fast":
        return FastDPOTrainer(**common, **{f"fastdpo_{k}": v for k, v in fast_options.items()})
    trainer = DPOTrainer(**common)
    return patch_trainer(trainer, **fast_options) if kind == "patch" else trainer


def train_two_steps(trainer):
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    trainer.train()
    update = {k: p.detach() - before[k] for k, p in trainer.model.named_parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    return logs, update


def assert_same_training(expected, actual, update_atol: float = 1e-8):
    """Same logged metrics and the same parameter update. `update_atol` is the absolute slack of the
    update beside 1e-5 of its largest entry (one fp32 ulp of a weight near 1 is 2^-23)."""
    (logs_e, upd_e), (logs_a, upd_a) = expected, actual
    for step_e, step_a in zip(logs_e, logs_a):
        assert set(step_e) == set(step_a), set(step_e) ^ set(step_a)
        for key, value in step_e.items():
            assert step_a[key] == pytest.approx(value, rel=RTOL, abs=ATOL), (key, step_a["step"])
    assert any(u.abs().max() > 1e-3 for u in upd_e.values())  # the steps did move the weights
    for name, u in upd_e.items():
        assert_close_scaled(upd_a[name], u, name, update_atol)


def assert_close_scaled(actual, expected, label, atol: float = 1e-8):
    """fp32 agreement: elementwise within 1e-4 relative, or 1e-5 of the tensor's largest entry (+ atol)."""
    atol = 1e-5 * expected.abs().max().item() + atol
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{label}: {m}")


# ---- two training steps: TRL vs fastdpo ----------------------------------------------------------
TRAINING_CASES = {
    "sigmoid/subclass": ("fast", dict(loss_type=["sigmoid"])),
    "sigmoid+sft/patch": ("patch", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3])),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_two_steps_match_trl(case, models_, tokenizer, dataset, tmp_path):
    kind, overrides = TRAINING_CASES[case]
    expected = train_two_steps(build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a", **overrides)))
    actual = train_two_steps(build(kind, models_, tokenizer, dataset, dpo_args(tmp_path / "b", **overrides)))
    assert_same_training(expected, actual)


def test_fused_linear_mode_matches_trl(models_, tokenizer, dataset, tmp_path, monkeypatch):
    from fastdpo import linear_chunks

    recomputed = []
    recompute = linear_chunks.backward
    monkeypatch.setattr(linear_chunks, "backward", lambda *a, **k: recomputed.append(1) or recompute(*a, **k))
    expected = train_two_steps(build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a")))
    actual = train_two_steps(build("fast", models_, tokenizer, dataset, dpo_args(tmp_path / "b"), mode="linear"))
    assert_same_training(expected, actual)
    assert not recomputed  # the gradients were built in the forward (6 N H V), not recomputed (8 N H V)


# ---- precomputed reference log-probs -------------------------------------------------------------
def test_precompute_matches_trl(models_, tokenizer, dataset, tmp_path):
    """fastdpo's precompute pass gives TRL's columns, and training on them matches TRL."""
    trainers = [build(kind, models_, tokenizer, dataset, dpo_args(tmp_path / kind, precompute_ref_log_probs=True))
                for kind in ("trl", "fast")]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected, actual = (torch.tensor(t.train_dataset[column]) for t in trainers)
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    assert_same_training(*(train_two_steps(t) for t in trainers))


def policy_logps64(model, batch):
    """Per-row sum of log p(next token) over completion positions, in float64 from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logp * batch["completion_mask"][:, 1:]).sum(-1)


@pytest.mark.parametrize("kind", ["fast", "patch"])
def test_precomputed_reference_is_used_as_given(kind, models_, tokenizer, dataset, tmp_path):
    trainer = build(kind, models_, tokenizer, dataset, dpo_args(tmp_path, precompute_ref_log_probs=True))
    batch = next(iter(trainer.get_train_dataloader()))
    P = batch["input_ids"].shape[0] // 2
    g = torch.Generator().manual_seed(3)
    # Arbitrary reference values: only the columns can explain the loss below.
    batch["ref_chosen_logps"] = -20 * torch.rand(P, generator=g)
    batch["ref_rejected_logps"] = -20 * torch.rand(P, generator=g)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    logps = policy_logps64(trainer.model, batch)
    d = (logps[:P] - batch["ref_chosen_logps"].double()) - (logps[P:] - batch["ref_rejected_logps"].double())
    assert loss.item() == pytest.approx(-F.logsigmoid(BETA * d).mean().item(), rel=1e-5)
    chosen_rewards = BETA * (logps[:P] - batch["ref_chosen_logps"].double())
    assert trainer._metrics["train"]["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), rel=1e-5)


# ---- every loss type both libraries have, one batch ----------------------------------------------
def one_batch_pair(models_, tokenizer, dataset, tmp_path, fast_options=None, **overrides):
    args = dict(label_smoothing=0.1, **overrides)  # exo_pair needs label_smoothing > 0
    trl_trainer = build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a", **args))
    fast_trainer = build("fast", models_, tokenizer, dataset, dpo_args(tmp_path / "b", **args), **(fast_options or {}))
    batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(4)])  # has the empty prompt
    assert batch["completion_mask"][:, 0].any()
    return trl_trainer, fast_trainer, batch


def loss_grads_metrics(trainer, batch):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters()}
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def assert_same_step(expected, actual, label=""):
    (loss_e, grads_e, metrics_e), (loss_a, grads_a, metrics_a) = expected, actual
    assert loss_a == pytest.approx(loss_e, rel=RTOL, abs=ATOL), label
    assert set(metrics_a) == set(metrics_e), (label, set(metrics_a) ^ set(metrics_e))
    for key, value in metrics_e.items():
        assert metrics_a[key] == pytest.approx(value, rel=RTOL, abs=ATOL), (label, key)
    for name, g in grads_e.items():
        assert_close_scaled(grads_a[name], g, f"{label} {name}")


def test_every_shared_loss_type_matches_trl(models_, tokenizer, dataset, tmp_path):
    shared = fast_trl.supported_loss_types()
    assert {"sigmoid", "sft"} <= set(shared)
    trl_trainer, fast_trainer, batch = one_batch_pair(models_, tokenizer, dataset, tmp_path)
    for loss_type in shared:
        for trainer in (trl_trainer, fast_trainer):
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
        assert_same_step(loss_grads_metrics(trl_trainer, batch), loss_grads_metrics(fast_trainer, batch), loss_type)


def test_triton_kernels_match_trl(models_, tokenizer, dataset, tmp_path, monkeypatch):
    """The same step through the Triton kernels instead of the PyTorch twin: compiled, with both
    trainers on the GPU, where there is one; interpreted on the CPU otherwise."""
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    on_gpu = torch.cuda.is_available()
    trl_trainer, fast_trainer, batch = one_batch_pair(models_, tokenizer, dataset, tmp_path, use_cpu=not on_gpu)
    if on_gpu:
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    assert_same_step(loss_grads_metrics(trl_trainer, batch), loss_grads_metrics(fast_trainer, batch))


MODES = ["logits", "linear"]


class VocabWideOps(TorchDispatchMode):
    """Records the aten ops, views aside, that make a [..., vocab] tensor outside fastdpo's own ops.

    A custom op's body runs with the mode off, so the kernels' work inside fastdpo's ops is not
    seen; a second pass over the logits, or a second matmul to make them, anywhere else is.
    """

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.ops = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        wide = any(isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                   for t in tree_leaves(out))
        if wide and func.namespace != "fastdpo" and not func.is_view:
            self.ops.append(func.name())
        return out


@pytest.mark.parametrize("mode", MODES)
def test_token_metrics_take_no_second_pass(mode, models_, tokenizer, dataset, tmp_path):
    """entropy and mean_token_accuracy come from the pass that gives the log-probs: besides fastdpo's
    ops, only the projection of "logits" mode (one matmul per model call: policy, reference) makes
    vocabulary-wide tensors, and nothing does in "linear" mode."""
    trl_trainer, fast_trainer, batch = one_batch_pair(models_, tokenizer, dataset, tmp_path, dict(mode=mode))
    expected = loss_grads_metrics(trl_trainer, batch)
    with VocabWideOps(len(tokenizer)) as seen:
        actual = loss_grads_metrics(fast_trainer, batch)
    assert {"entropy", "mean_token_accuracy"} <= set(actual[2])
    assert seen.ops == (["aten::mm", "aten::mm"] if mode == "logits" else []), seen.ops
    assert_same_step(expected, actual)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale,softcap", [(1.7, None), (1.7, 3.0), (1.0, 2.0)])
def test_logit_scale_and_softcap_match_trl(scale, softcap, mode, models_, tokenizer, dataset, tmp_path):
    """Config-level logit transforms (Cohere's logit_scale, Gemma's final_logit_softcapping) as TRL applies them."""
    scaled = []
    for model in models_:
        model = copy.deepcopy(model)
        model.config.logit_scale, model.config.final_logit_softcapping = scale, softcap
        scaled.append(model)
    trl_trainer, fast_trainer, batch = one_batch_pair(tuple(scaled), tokenizer, dataset, tmp_path, dict(mode=mode))
    assert_same_step(loss_grads_metrics(trl_trainer, batch), loss_grads_metrics(fast_trainer, batch))


@pytest.mark.parametrize("mode", MODES)
def test_without_token_metrics_the_rest_still_match(mode, models_, tokenizer, dataset, tmp_path):
    """token_metrics=False drops entropy and mean_token_accuracy and nothing else."""
    trl_trainer, fast_trainer, batch = one_batch_pair(models_, tokenizer, dataset, tmp_path,
                                                      dict(mode=mode, token_metrics=False))
    loss_e, grads_e, metrics_e = loss_grads_metrics(trl_trainer, batch)
    dropped = {k: metrics_e.pop(k) for k in ("entropy", "mean_token_accuracy")}
    assert len(dropped) == 2
    assert_same_step((loss_e, grads_e, metrics_e), loss_grads_metrics(fast_trainer, batch), mode)


# ---- what it refuses -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["1.14.2", "1.17.0", "0.19.1", "2.0.0.dev0"])
def test_unsupported_trl_version_fails_at_import(bad, monkeypatch):
    monkeypatch.setattr(trl, "__version__", bad)
    monkeypatch.delitem(sys.modules, "fastdpo.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"trl>=1\.15\.0,<1\.17\.0.*found trl " + bad.replace(".", r"\.")):
        importlib.import_module("fastdpo.integrations.trl")


def test_supported_versions_pass_the_check():
    for good in ("1.15.0", "1.15.2", "1.16.0", "1.16.3.post1"):
        fast_trl.check_trl_version(good)
    fast_trl.check_trl_version(trl.__version__)


@pytest.mark.parametrize("overrides,error,match", [
    # TRL's own refusals, raised as TRL raises them (DPOTrainer.__init__), and an unknown f-divergence,
    # which TRL would only meet in the first loss computation.
    (dict(f_divergence_type="forward_kl", loss_type=["nca_pair"]), ValueError, "f_divergence_type"),
    (dict(use_weighting=True, loss_type=["aot"]), NotImplementedError, "aot"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(loss_type=["no_such_loss"]), ValueError, "no_such_loss"),
])
def test_unsupported_options_fail_before_training(overrides, error, match, models_, tokenizer, dataset, tmp_path):
    with pytest.raises(error, match=match):
        build("fast", models_, tokenizer, dataset, dpo_args(tmp_path, **overrides))


def test_fastdpo_imports_without_trl():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import fastdpo, fastdpo.integrations\n"
            "try:\n    import fastdpo.integrations.trl\nexcept ImportError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "refused"


# ---- evaluation and PEFT go through the same head ------------------------------------------------
def test_evaluate_matches_trl(models_, tokenizer, dataset, tmp_path):
    results = []
    for kind in ("trl", "fast"):
        policy, ref = (copy.deepcopy(m) for m in models_)
        cls = FastDPOTrainer if kind == "fast" else DPOTrainer
        trainer = cls(model=policy, ref_model=ref, args=dpo_args(tmp_path / kind, per_device_eval_batch_size=4),
                      train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
        results.append({k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "per_second" not in k})
    assert set(results[1]) == set(results[0]) and "eval_rewards/margins" in results[0]
    for key, value in results[0].items():
        assert results[1][key] == pytest.approx(value, rel=RTOL, abs=ATOL), key


def test_lora_without_ref_model_matches_trl(models_, tokenizer, dataset, tmp_path):
    """PEFT: the reference is the policy with its adapter disabled, as in TRL."""
    peft = pytest.importorskip("peft", reason="the LoRA case needs the lora extra: pip install 'fastdpo[lora]'")
    LoraConfig = peft.LoraConfig

    runs = []
    for kind in ("trl", "fast"):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        common = dict(model=copy.deepcopy(models_[0]), args=dpo_args(tmp_path / kind), train_dataset=dataset,
                      processing_class=tokenizer, peft_config=lora)
        trainer = FastDPOTrainer(**common) if kind == "fast" else DPOTrainer(**common)
        runs.append(train_two_steps(trainer))
    assert_same_training(*runs)


# ---- padding-free and shared-prompt batches --------------------------------------------------------
def layout_trainer(models_, tokenizer, dataset, args, kind="fast", **layout):
    """A FastDPOTrainer with share_prompt / padding_free, or a patched DPOTrainer with the same."""
    policy, ref = (copy.deepcopy(m) for m in models_)
    common = dict(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer)
    if kind == "fast":
        return FastDPOTrainer(**common, **layout)
    mode = layout.pop("fastdpo_mode", "logits")
    return patch_trainer(DPOTrainer(**common), mode=mode, **layout)


LAYOUT_CASES = {
    "padding_free/DPOConfig": ("fast", dict(), dict(padding_free=True), "packed"),
    "share_prompt/subclass": ("fast", dict(share_prompt=True), dict(), "shared"),
    "share_prompt/linear": ("fast", dict(share_prompt=True, fastdpo_mode="linear"), dict(), "shared"),
    "padding_free/patch": ("patch", dict(padding_free=True), dict(), "packed"),
    "share_prompt/ld_alpha+wpo": ("fast", dict(share_prompt=True), dict(ld_alpha=0.5, use_weighting=True), "shared"),
    # keep_end truncates nothing without max_length, so the pair's rows share their prompt
    "padding_free/keep_end-untruncated": ("fast", dict(padding_free=True), dict(truncation_mode="keep_end",
                                                                                max_length=None), "packed"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layouts_match_trls_padded_training(case, models_, tokenizer, dataset, tmp_path):
    """Two steps with fastdpo's padding-free / shared-prompt batches equal TRL's own padded path
    (the dataset has an empty prompt, prompts and answers of different lengths)."""
    kind, layout, config, expected_layout = LAYOUT_CASES[case]
    # the DPOConfig options apply to both runs (TRL itself ignores padding_free and pads)
    expected = train_two_steps(build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a", **config)))
    trainer = layout_trainer(models_, tokenizer, dataset, dpo_args(tmp_path / "b", **config), kind, **layout)
    assert trainer.fastdpo_layout == expected_layout
    assert_same_training(expected, train_two_steps(trainer))


def test_layout_options_that_cannot_work_fail_at_construction(models_, tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match="share_prompt=True runs pairs padding-free; it conflicts with padding_free"):
        layout_trainer(models_, tokenizer, dataset, dpo_args(tmp_path), share_prompt=True, padding_free=False)
    with pytest.raises(ValueError, match="needs truncation_mode='keep_start'"):
        layout_trainer(models_, tokenizer, dataset, dpo_args(tmp_path, truncation_mode="keep_end", max_length=8),
                       share_prompt=True)
    policy, ref = (copy.deepcopy(m) for m in models_)
    policy.config._attn_implementation = "flash_attention_2"  # takes packed rows, but no custom mask
    with pytest.raises(ValueError, match=r"share_prompt=True: attn_implementation 'flash_attention_2' cannot take a "
                                         r"custom attention mask"):
        patch_trainer(DPOTrainer(model=policy, ref_model=ref, args=dpo_args(tmp_path), train_dataset=dataset,
                                 processing_class=tokenizer), share_prompt=True)


def test_trls_padding_free_fallback_warning_is_not_shown_when_fastdpo_packs(models_, tokenizer, dataset, tmp_path,
                                                                            caplog):
    """TRL warns that padding_free=True falls back to padding; FastDPOTrainer packs, so that warning
    would be false. TRL's own trainer still shows it (the test would see a renamed warning)."""
    for kind, expected in (("trl", True), ("fast", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            build(kind, models_, tokenizer, dataset, dpo_args(tmp_path / kind, padding_free=True))
        assert any(fast_trl._TRL_FALLBACK in r.getMessage() for r in caplog.records) == expected, kind
    with caplog.at_level(logging.WARNING):  # patched after TRL warned: fastdpo says what happens instead
        trainer = build("patch", models_, tokenizer, dataset, dpo_args(tmp_path / "patch", padding_free=True))
    assert trainer.fastdpo_layout == "packed"
    assert any("fastdpo runs this trainer's batches packed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["fast", "patch"])
def test_prompt_learning_adapters_are_refused_before_training(kind, models_, tokenizer, dataset, tmp_path):
    """Prompt / prefix tuning adds virtual tokens the head's scored positions do not know about."""
    peft = pytest.importorskip("peft", reason="the PEFT case needs the lora extra: pip install 'fastdpo[lora]'")
    common = dict(model=copy.deepcopy(models_[0]), args=dpo_args(tmp_path), train_dataset=dataset,
                  processing_class=tokenizer,
                  peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match="not PEFT prompt learning"):
        FastDPOTrainer(**common) if kind == "fast" else patch_trainer(DPOTrainer(**common))
    # an already wrapped model (no peft_config argument) is refused the same way
    wrapped = peft.get_peft_model(copy.deepcopy(models_[0]), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                    num_virtual_tokens=3))
    with pytest.raises(NotImplementedError, match="not PEFT prompt learning"):
        FastDPOTrainer(model=wrapped, args=dpo_args(tmp_path), train_dataset=dataset, processing_class=tokenizer)
