"""The trainer's batch layouts: padded, padding-free and shared-prompt runs log the same numbers,
--max-tokens micro-batches weigh every pair alike, and layouts a model cannot run fail or fall back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from train_helpers import step_records, tiny_config, write_jsonl

from fastdpo.trainer import ConfigError, DataError, DPOTrainer
from fastdpo.trainer.data import PairLoader, budget_groups, group_tokens
from fastdpo.trainer.loss import LossFn

LAYOUT_FLAGS = {"padded": dict(padding_free=False), "packed": dict(padding_free=True),
                "shared": dict(padding_free=True, share_prompt=True)}


@pytest.mark.parametrize("impl", ["fused", "fused_linear"])
def test_every_layout_logs_the_same_steps(tmp_path, impl):
    records = {}
    for kind, flags in LAYOUT_FLAGS.items():
        trainer = DPOTrainer(tiny_config(tmp_path / kind, max_steps=3, loss_impl=impl, **flags))
        assert trainer.layout == kind
        trainer.train()
        records[kind] = step_records(tmp_path / kind)
    for kind in ("packed", "shared"):
        first, padded = records[kind][1], records["padded"][1]
        for name in ("loss", "logps/chosen", "logps/rejected"):
            assert first[name] == pytest.approx(padded[name], rel=2e-5, abs=1e-6), (kind, name)
    for kind, by_step in records.items():
        for record in by_step.values():
            assert record["tokens"] > 0 and record["tokens/s"] > 0 and record["real_tokens/s"] > 0
    for step in (1, 2, 3):
        padded, packed, shared = (records[k][step] for k in LAYOUT_FLAGS)
        assert padded["real_tokens"] == packed["real_tokens"] == shared["real_tokens"]
        assert padded["tokens"] > packed["tokens"] == packed["real_tokens"] > shared["tokens"]


@pytest.mark.parametrize("kind", ["padded", "shared"])
def test_attn_implementation_reaches_the_model_and_keeps_the_numbers(tmp_path, kind):
    """--attn-implementation eager against transformers' default (sdpa for Llama): the loaded models
    run eager (the attention modules read it from their config), and step 1 logs the same numbers."""
    records, attention = {}, {}
    for impl in ("auto", "eager"):
        trainer = DPOTrainer(tiny_config(tmp_path / impl, max_steps=1, attn_implementation=impl,
                                         **LAYOUT_FLAGS[kind]))
        trainer.setup()
        attention[impl] = {m.config._attn_implementation for m in (trainer.model, trainer.reference.model)}
        trainer.train()
        records[impl] = step_records(tmp_path / impl)[1]
    assert attention == {"auto": {"sdpa"}, "eager": {"eager"}}
    for name in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert records["eager"][name] == pytest.approx(records["auto"][name], rel=2e-5, abs=1e-6), name


def test_padding_free_is_the_default_where_the_model_supports_it(tmp_path):
    assert DPOTrainer(tiny_config(tmp_path / "run")).layout == "packed"


def test_max_tokens_weighs_every_pair_of_the_step_alike(tmp_path):
    """One step of two micro-batches of different sizes gives the gradient of the mean loss over all
    of its pairs, computed here in one padded batch."""
    for budget in range(120, 400, 20):  # a budget that cuts micro-batches of different sizes
        trainer = DPOTrainer(tiny_config(tmp_path / f"run{budget}", max_tokens=budget, grad_accum=2, max_steps=1,
                                         ref="copy"))
        if len(trainer.loader.pairs_of(0)) != len(trainer.loader.pairs_of(1)):
            break
    else:
        pytest.fail("no budget gave micro-batches of different sizes")
    trainer.setup()
    pairs = trainer.loader.pairs_of(0) + trainer.loader.pairs_of(1)
    grads = {}
    optimizer_step = trainer.optimizer.step

    def capture(*args, **kwargs):
        if trainer.accelerator.sync_gradients:
            grads.update({k: p.grad.clone() for k, p in trainer.model.named_parameters()})
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = capture
    trainer.accelerator.clip_grad_norm_ = lambda *a, **k: torch.tensor(0.0)  # compare the raw gradients
    trainer.train_step()

    from fastdpo.layouts import build

    fresh = DPOTrainer(tiny_config(tmp_path / "fresh", max_steps=1, ref="copy", padding_free=False))
    fresh.setup()
    whole = build("padded", [fresh.data.train[i] for i in pairs], pairs, pad_id=fresh.tokenizer.pad_token_id)
    loss, _ = LossFn(fresh.cfg, autocast=False)(fresh.model, whole, fresh.reference.logps(whole, "train"))
    loss.backward()
    for name, p in fresh.model.named_parameters():
        e = p.grad
        torch.testing.assert_close(grads[name], e, rtol=1e-4, atol=1e-5 * e.abs().max().item() + 1e-9)


def test_budget_groups_cover_each_pair_once_within_the_budget(tmp_path):
    trainer = DPOTrainer(tiny_config(tmp_path / "run"))
    data = trainer.data.train
    for kind in ("padded", "packed", "shared"):
        groups = budget_groups(list(range(len(data))), data, kind, 100)
        assert sorted(i for g in groups for i in g) == list(range(len(data)))
        assert all(group_tokens([data[i] for i in g], kind) <= 100 for g in groups)
        assert all(group_tokens([data[i] for i in g + [h[0]]], kind) > 100 for g, h in zip(groups, groups[1:]))
    loader = PairLoader(data, 4, world=2, rank=1, seed=0, pad_id=0, layout="packed", max_tokens=100)
    assert loader.global_pairs(3) == len(loader.pairs_of(3, 0)) + len(loader.pairs_of(3))


def test_max_tokens_below_the_longest_pair_fails_before_training(tmp_path):
    """The first pair over the budget is named by its file and row."""
    with pytest.raises(DataError, match=r"^--max-tokens 20 is smaller than \S+/sort\.train\.jsonl row \d+, which needs "
                                        r"\d+ token positions in the shared layout; raise --max-tokens to at least"):
        DPOTrainer(tiny_config(tmp_path / "run", max_tokens=20, share_prompt=True))
    rows = [{"prompt": "ab", "chosen": "c", "rejected": "d"}] * 3 + [{"prompt": "ab" * 20, "chosen": "c", "rejected": "d"}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=rf"^--max-tokens 30 is smaller than {data} row 4, which needs 84 token "
                                        r"positions in the packed layout; raise --max-tokens to at least 84 or"):
        DPOTrainer(tiny_config(tmp_path / "run", dataset=str(data), max_tokens=30, max_eval_pairs=0))
    assert not (tmp_path / "run").exists()


def test_batch_size_and_max_tokens_conflict(tmp_path):
    with pytest.raises(ConfigError, match="^--batch-size 4 and --max-tokens 100 conflict: a micro-batch is either"):
        DPOTrainer(dataclasses.replace(tiny_config(tmp_path / "run", max_tokens=100), batch_size=4))
    run = DPOTrainer(tiny_config(tmp_path / "run", max_tokens=100, max_steps=1))
    run.train()
    # resuming takes the run's own (default) batch size silently: only what the user gives conflicts
    assert DPOTrainer(tiny_config(tmp_path / "run", max_tokens=100, max_steps=2, resume=True)).train()["step"] == 2


def _model_without_attention_interface(tmp_path):
    """A tiny BLOOM (ALiBi attention, outside transformers' attention interface) saved by path."""
    from transformers import BloomConfig, BloomForCausalLM

    from fastdpo.trainer import embedded

    tokenizer = embedded.build_tokenizer()
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=4))
    model.save_pretrained(tmp_path / "bloom")
    tokenizer.save_pretrained(tmp_path / "bloom")
    return str(tmp_path / "bloom")


def test_a_model_that_cannot_pack_falls_back_or_fails(tmp_path, capsys):
    path = _model_without_attention_interface(tmp_path)
    with pytest.raises(ConfigError, match=r"^--share-prompt: BloomForCausalLM does not use transformers' attention "
                                          r"interface"):
        DPOTrainer(tiny_config(tmp_path / "a", model=path, share_prompt=True))
    with pytest.raises(ConfigError, match=r"^--padding-free: BloomForCausalLM"):
        DPOTrainer(tiny_config(tmp_path / "b", model=path, padding_free=True))
    trainer = DPOTrainer(tiny_config(tmp_path / "c", model=path, max_steps=1))
    assert trainer.layout == "padded"
    captured = capsys.readouterr()
    assert "padding-free batches are off for" in captured.out + captured.err
    trainer.train()


def test_share_prompt_conflicts_with_no_padding_free(tmp_path):
    with pytest.raises(ConfigError, match="--share-prompt runs pairs padding-free; it conflicts with --no-padding-free"):
        DPOTrainer(tiny_config(tmp_path / "run", share_prompt=True, padding_free=False))


def test_truncated_answers_and_dropped_prompts_give_the_same_steps(tmp_path):
    """--max-length 14 truncates answers and drops pairs whose prompt fills it; every layout agrees."""
    firsts = {}
    for kind, flags in LAYOUT_FLAGS.items():
        trainer = DPOTrainer(tiny_config(tmp_path / kind, max_steps=1, max_length=14, **flags))
        assert trainer.data.dropped_too_long > 0
        assert any(len(p.prompt) + len(p.chosen) == 14 for p in trainer.data.train)  # a truncated answer
        trainer.train()
        firsts[kind] = step_records(tmp_path / kind)[1]
    for kind in ("packed", "shared"):
        for name in ("loss", "logps/chosen", "logps/rejected"):
            assert firsts[kind][name] == pytest.approx(firsts["padded"][name], rel=2e-5, abs=1e-6), (kind, name)


def test_a_reference_cache_made_padded_serves_a_padding_free_run(tmp_path):
    cache = tmp_path / "cache"
    padded = DPOTrainer(tiny_config(tmp_path / "padded", ref="precompute", ref_cache_dir=str(cache),
                                    padding_free=False, max_steps=1))
    padded.train()
    shared = DPOTrainer(tiny_config(tmp_path / "shared", ref="precompute", ref_cache_dir=str(cache),
                                    share_prompt=True, max_steps=1))
    shared.setup()
    assert len(list(cache.iterdir())) == 1  # no second cache file: the same key
    batch = shared.loader.batch(0)
    torch.testing.assert_close(shared.reference.logps(batch, "train"), padded.reference.logps(batch, "train"))
