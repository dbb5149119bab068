"""Bad input fails at start, in one line, before any model loads (or, with --skip-invalid, is counted)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from train_helpers import tiny_config, write_jsonl

from fastdpo import cli
from fastdpo.trainer import ConfigError, DataError, DPOTrainer, loop
from fastdpo.trainer.logs import read_metrics

GOOD = {"prompt": "sort: ba\n", "chosen": "ab", "rejected": "ba"}


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Any model load in these tests is a failure: every error must come before one."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(loop, "load_model", refuse)


def start(tmp_path, **options):
    return DPOTrainer(tiny_config(tmp_path / "run", **options))


BAD_ROWS = [
    ("{not json", "invalid JSON"),
    (json.dumps({"chosen": "ab", "rejected": "ba"}), "missing field 'prompt'"),
    (json.dumps({"prompt": "sort: ba\n", "rejected": "ba"}), "missing field 'chosen'"),
    (json.dumps({**GOOD, "chosen": ""}), "empty field 'chosen'"),
    (json.dumps({**GOOD, "rejected": 3}), "field 'rejected' must be a string, got a number"),
    (json.dumps({**GOOD, "prompt": [{"role": "user"}]}), "needs a string 'content'"),
    (json.dumps([1, 2]), "expected an object"),
    (json.dumps({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}),
     "share no leading messages"),
]


@pytest.mark.parametrize("line, reason", BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_malformed_row_names_file_and_row(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, line, GOOD])
    with pytest.raises(DataError) as e:
        start(tmp_path, dataset=str(path))
    message = str(e.value)
    assert f"{path} row 3: " in message and reason in message and "\n" not in message


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": ]')
    with pytest.raises(DataError, match=r"data.json: invalid JSON at line 2"):
        start(tmp_path, dataset=str(path))


def test_skip_invalid_skips_and_counts(tmp_path, monkeypatch):
    rows = [GOOD] * 8 + [line for line, _ in BAD_ROWS]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    trainer = start(tmp_path, dataset=str(path), skip_invalid=True)
    assert len(trainer.data.train) == 8 and trainer.data.skipped_invalid == len(BAD_ROWS)
    trainer._report_start()  # the start record of metrics.jsonl carries the count
    assert read_metrics(trainer.cfg.run_dir)[0]["skipped_invalid"] == len(BAD_ROWS)


@pytest.mark.parametrize("content", ["", "\n\n", None])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content or "")
    if content is None:  # only malformed rows, all skipped: empty as well
        write_jsonl(path, ["{bad"])
    with pytest.raises(DataError, match="the dataset is empty"):
        start(tmp_path, dataset=str(path), skip_invalid=True)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        start(tmp_path, dataset=str(tmp_path / "nope.jsonl"))


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="model path not found: .*nope"):
        start(tmp_path, model=str(tmp_path / "nope"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        start(tmp_path, model=str(tmp_path / "empty_dir"))
    with pytest.raises(ConfigError, match=f"^tokenizer path not found: {tmp_path / 'nope'}$"):
        start(tmp_path, tokenizer=str(tmp_path / "nope"))


def test_unknown_loss_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown loss_type 'sigmoidd'"):
        start(tmp_path, loss_type="sigmoidd")
    with pytest.raises(ConfigError, match="unknown option 'gama'"):
        start(tmp_path, loss_type="simpo", loss_options={"gama": 1.0})


@pytest.mark.parametrize("options, reason", [
    (dict(ref="none", loss_type="sigmoid"), "--ref none conflicts with --loss-type sigmoid"),
    (dict(ref="none", loss_type="simpo,ipo"), "--ref none conflicts"),
    (dict(ref="adapter"), "--ref adapter needs LoRA"),
    (dict(ref="adapter", lora_r=4, sft_steps=3), "--ref adapter conflicts with --sft-steps"),
    (dict(eval_split="test", eval_fraction=0.1), "--eval-split and --eval-fraction conflict"),
    (dict(inplace_backward=True, loss_impl="reference"), "--inplace-backward applies to --loss-impl fused only"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(resume=True, run_dir=""), "--resume needs --run-dir"),
    (dict(share_prompt=True, attn_implementation="flash_attention_2"),
     "--share-prompt: attn_implementation 'flash_attention_2' cannot take a custom attention mask (it needs one of "
     "sdpa, eager, flex_attention)"),
    (dict(attn_implementation="flash"), "--attn-implementation must be one of auto, sdpa, eager"),
    # numbers that would train to NaN or climb the loss
    (dict(max_grad_norm=-1.0), "--max-grad-norm must be >= 0 and finite, got -1.0"),
    (dict(max_grad_norm=float("nan")), "--max-grad-norm must be >= 0 and finite"),
    (dict(weight_decay=-1.0), "--weight-decay must be >= 0 and finite"),
    (dict(beta=float("inf")), "beta must be finite"),
    (dict(learning_rate=float("inf")), "--learning-rate must be > 0 and finite"),
    (dict(num_epochs=float("inf"), max_steps=0), "--num-epochs must be > 0 and finite"),
    (dict(seed=-1), "--seed must be in [0, 2^32)"),
    (dict(lora_r=4, lora_alpha=float("nan")), "--lora-alpha must be > 0 and finite"),
    (dict(lora_r=4, lora_dropout=2.0), "--lora-dropout must be in [0, 1)"),
    (dict(dtype="float16"), "--dtype float16 needs LoRA"),
    (dict(split="train", eval_split="train"), "--eval-split train is the training split"),
    (dict(loss_options={"beta": 0.5}), "--loss-options: give beta as --beta"),
    (dict(loss_options={"use_weighting": "yes"}), "use_weighting must be True or False"),
])
def test_conflicting_options(tmp_path, options, reason):
    cfg = dataclasses.replace(tiny_config(tmp_path / "run"), **options)
    with pytest.raises(ConfigError) as e:
        DPOTrainer(cfg)
    assert reason in str(e.value)


def test_training_on_the_test_split_has_no_default_eval_split(tmp_path):
    """The default eval split is 'test': not when 'test' is what trains (it would not be held out)."""
    trainer = start(tmp_path, split="test")
    assert len(trainer.data.eval) == 0 and len(trainer.data.train) > 0


def test_run_dir_holding_a_run_needs_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        start(tmp_path)
    with pytest.raises(ConfigError, match="--resume: .* holds no run to continue \\(no config.json\\)"):
        start(tmp_path, resume=True)


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '{"prompt": 1}'])
    code = cli.main(["train", "--dataset", str(path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"fastdpo train: error: {path} row 2: field 'prompt' must be a string or a list " \
        "of messages, got a number (pass --skip-invalid to skip such rows)"
    assert cli.main(["train", "--model", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "r2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def model_dir_smaller_than_its_tokenizer(path, cut: int, pad_past_vocab: bool = False):
    """A model directory (config and tokenizer, no weights: nothing may load here) whose embeddings
    hold `cut` ids fewer than its tokenizer: the embedded character tokenizer's last ids are the
    letters w-z, punctuation, newline and tab."""
    from transformers import LlamaConfig

    from fastdpo.trainer import embedded

    tokenizer = embedded.build_tokenizer()
    if pad_past_vocab:
        tokenizer.add_special_tokens({"pad_token": "<extra-pad>"})  # a new id past the model's rows
    LlamaConfig(vocab_size=len(embedded.build_tokenizer()) - cut, hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_token_ids_past_the_model_vocabulary_name_the_row(tmp_path):
    """A tokenizer larger than the model's embeddings (added tokens, the wrong --tokenizer): the first
    row holding an id past them is named, before any model loads (on a GPU the embedding lookup
    would end the process with a device-side assert)."""
    model = model_dir_smaller_than_its_tokenizer(tmp_path / "model", cut=3)  # newline, tab and '~' are out
    rows = [GOOD, GOOD, {**GOOD, "chosen": "a~b"}, GOOD]
    path = write_jsonl(tmp_path / "data.jsonl", [{**r, "prompt": r["prompt"].rstrip()} for r in rows])
    with pytest.raises(DataError) as e:
        start(tmp_path, model=str(model), dataset=str(path), eval_fraction=0.0)
    message = str(e.value)
    assert message.startswith(f"{path} row 3: token '~' has id ") and "\n" not in message
    assert "outside the model's vocabulary of 100 ids (the tokenizer has 103)" in message


def test_rows_keep_their_source_row_through_the_eval_split(tmp_path):
    model = model_dir_smaller_than_its_tokenizer(tmp_path / "model", cut=3)
    rows = [{**GOOD, "prompt": "sort: ba"} for _ in range(9)] + [GOOD]  # only row 10 has a newline
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path} row 10: token '\\n' has id "):
        start(tmp_path, model=str(model), dataset=str(path), eval_fraction=0.5)


def test_a_pad_token_past_the_model_vocabulary_is_refused(tmp_path):
    model = model_dir_smaller_than_its_tokenizer(tmp_path / "model", cut=0, pad_past_vocab=True)
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD] * 4)
    with pytest.raises(DataError, match=r"^the tokenizer's pad token '<extra-pad>' has id 103, outside the "
                                        r"model's vocabulary of 103 ids"):
        start(tmp_path, model=str(model), dataset=str(path))


def test_a_pair_longer_than_the_model_positions_names_the_row(tmp_path):
    """GPT-2's learned position table (n_positions): a sequence past it would index past the table."""
    from transformers import GPT2Config

    from fastdpo.trainer import embedded

    model = tmp_path / "model"
    GPT2Config(vocab_size=len(embedded.build_tokenizer()), n_positions=12, n_embd=16, n_layer=1,
               n_head=2).save_pretrained(model)
    embedded.build_tokenizer().save_pretrained(model)
    short = {"prompt": "sort: ba", "chosen": "ab", "rejected": "ba"}  # 8 + 2 + EOS = 11 tokens
    path = write_jsonl(tmp_path / "data.jsonl", [short, short, {**short, "prompt": "sort: dcba"}, short])
    with pytest.raises(DataError, match=rf"^{path} row 3: 13 tokens \(the prompt and its longer answer\), more "
                                        r"than the model's 12 positions: lower --max-length to 12 or less$"):
        start(tmp_path, model=str(model), dataset=str(path), eval_fraction=0.0)
    start(tmp_path, model=str(model), dataset=str(path), eval_fraction=0.0, max_length=12)  # truncated: fits


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(tmp_path):
    from transformers import LlamaConfig

    from fastdpo.trainer import embedded

    model = tmp_path / "model"
    tokenizer = embedded.build_tokenizer()
    tokenizer.eos_token = tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(model)
    with pytest.raises(ConfigError, match=rf"^the tokenizer of {model} has neither a pad nor an EOS token"):
        start(tmp_path, model=str(model), dataset=str(write_jsonl(tmp_path / "data.jsonl", [GOOD] * 4)))


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path):
    from transformers import T5Config

    model = tmp_path / "model"
    T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(model)
    with pytest.raises(ConfigError, match=rf"^model {model} is a T5 model, not a causal language model"):
        start(tmp_path, model=str(model))


def gpt2_folder(tmp_path):
    """A GPT-2 config and the embedded tokenizer (no weights): a model class without flex attention."""
    from transformers import GPT2Config

    from fastdpo.trainer import embedded

    model = tmp_path / "gpt2"
    GPT2Config(vocab_size=len(embedded.build_tokenizer()), n_positions=64, n_embd=16, n_layer=1,
               n_head=2).save_pretrained(model)
    embedded.build_tokenizer().save_pretrained(model)
    return str(model)


def test_an_attention_that_cannot_train_here_is_refused_before_the_run_dir(tmp_path, monkeypatch):
    """--attn-implementation is checked from the model's class, the kernels' package and the device
    (this machine's: the CPU) before any weight is read or the run directory is written."""
    import importlib.util

    cases = [(dict(model=gpt2_folder(tmp_path), attn_implementation="flex_attention"),
              "--attn-implementation flex_attention: GPT2LMHeadModel does not support attn_implementation "
              "'flex_attention'"),
             (dict(attn_implementation="flex_attention"),
              "--attn-implementation flex_attention: torch's FlexAttention has no backward on the CPU"),
             (dict(attn_implementation="flash_attention_2"),
              "--attn-implementation flash_attention_2: attn_implementation 'flash_attention_2' needs the "
              "flash_attn package, or the kernels package to fetch it from the Hub; neither is installed")]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("flash_attn", "kernels") else
                        find_spec(name, *a))
    for options, message in cases:
        with pytest.raises(ConfigError) as e:
            start(tmp_path, **options)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / "run").exists()
    for package in ("flash_attn", "kernels"):  # installed (or fetched from the Hub), but there is no GPU
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, p=package: object() if name == p else
                            None if name in ("flash_attn", "kernels") else find_spec(name, *a))
        with pytest.raises(ConfigError, match="^--attn-implementation flash_attention_2: attn_implementation "
                                              "'flash_attention_2' runs on CUDA GPUs only, not on cpu$"):
            start(tmp_path, attn_implementation="flash_attention_2")
