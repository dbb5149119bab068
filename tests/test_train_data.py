"""Trainer data: row formats, tokenization (masking, EOS, truncation), file kinds, batching."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import tiny_config, write_jsonl

from fastdpo.layouts import build
from fastdpo.trainer import embedded
from fastdpo.trainer.data import (
    DataError,
    Encoder,
    Pair,
    PairLoader,
    find_sources,
    load_pairs,
    prepare_data,
    sharded_batches,
    to_pair,
)


@pytest.fixture(scope="module")
def tok():
    return embedded.build_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_shipped_data_matches_its_generator():
    for split in embedded.SPLIT_SIZES:
        rows = [json.loads(line) for line in embedded.split_path(split).read_text().splitlines()]
        assert rows == embedded.make_split(split)
    assert sum(embedded.split_path(s).stat().st_size for s in embedded.SPLIT_SIZES) < 1_000_000


def test_embedded_pairs_follow_the_rule():
    for row in embedded.make_split("test")[:200]:
        word = row["prompt"].removeprefix("sort: ").removesuffix("\n")
        assert row["chosen"] == "".join(sorted(word)) != row["rejected"]


def test_standard_rows_mask_the_prompt_and_append_eos(tok):
    pair = to_pair({"prompt": "sort: ba\n", "chosen": "ab", "rejected": "ba"})
    (e,), kept = Encoder(tok, max_length=64).encode([pair])
    assert kept == [0]
    assert e.prompt == ids(tok, "sort: ba\n")
    assert e.chosen == ids(tok, "ab") + [tok.eos_token_id]
    assert e.rejected == ids(tok, "ba") + [tok.eos_token_id]
    batch = build("padded", [e, e], [0, 1], tok.pad_token_id)
    P, n, T = 2, len(e.prompt), len(e.prompt) + 3
    assert batch.input_ids.shape == (2 * P, T)
    # position n - 1 + k of each row scores answer token k; prompt tokens are not scored
    s = batch.scoring
    assert s.offsets.tolist() == [0, 3, 6, 9, 12]
    assert s.positions[:3].tolist() == [n - 1, n, n + 1] and s.positions[6:9].tolist() == [2 * T + n - 1 + k for k in range(3)]
    assert s.targets[:3].tolist() == e.chosen and s.targets[6:9].tolist() == e.rejected
    assert batch.attention_mask.sum().item() == 4 * (n + 3)


def test_conversational_rows_use_the_chat_template(tok):
    prompt = [{"role": "user", "content": "hi"}]
    pair = to_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "yo"}], "rejected": "no"})
    assert pair.rejected == [{"role": "assistant", "content": "no"}]  # a plain string reply is one message
    (e,), _ = Encoder(tok, max_length=64).encode([pair])
    assert e.prompt == ids(tok, "<|user|>hi<eos><|assistant|>")  # with the generation prompt
    assert e.chosen == ids(tok, "yo<eos>")  # the template ends the turn: no second EOS
    assert e.rejected == ids(tok, "no<eos>")


def test_minimind_rows_split_the_shared_prefix(tok):
    talk = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    row = {"chosen": talk + [{"role": "assistant", "content": "yo"}],
           "rejected": talk + [{"role": "assistant", "content": "no"}]}
    pair = to_pair(row)
    assert pair.prompt == talk and pair.chosen == [{"role": "assistant", "content": "yo"}]
    explicit = to_pair({"prompt": talk, "chosen": "yo", "rejected": "no"})
    encoder = Encoder(tok, max_length=64)
    assert encoder.encode([pair])[0] == encoder.encode([explicit])[0]


def test_truncation_keeps_the_start_and_drops_prompt_only_pairs(tok):
    short = Pair("ab:", "cdef", "xy")
    long = Pair("a prompt as long as the budget", "ok", "no")
    encoded, kept = Encoder(tok, max_length=5).encode([short, long])
    assert kept == [0]  # the second prompt alone fills max_length
    assert encoded[0].chosen == ids(tok, "cd")  # completion cut to the budget, start kept (EOS lost)
    assert encoded[0].rejected == ids(tok, "xy")


def test_prepare_data_counts_dropped_pairs(tmp_path):
    rows = [{"prompt": "p" * n, "chosen": "a", "rejected": "b"} for n in (3, 30, 4, 40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_data(tiny_config(tmp_path / "run", dataset=str(path), max_length=10), embedded.build_tokenizer())
    assert len(data.train) == 2 and data.dropped_too_long == 2 and data.eval == []


def test_jsonl_json_parquet_and_split_directories_read_the_same(tmp_path):
    rows = embedded.make_split("test")[:20]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    folder = tmp_path / "splits"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows[:15])
    datasets.Dataset.from_list(rows[15:]).to_parquet(str(folder / "test.parquet"))

    expected = [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    for name in ("d.jsonl", "d.json", "d.parquet"):
        source, eval_source = find_sources(tiny_config(tmp_path / "run", dataset=str(tmp_path / name)))
        assert eval_source is None
        assert load_pairs(source, skip_invalid=False)[0] == expected
    train, test = find_sources(tiny_config(tmp_path / "run", dataset=str(folder)))  # eval: the test split
    assert load_pairs(train, skip_invalid=False)[0] == expected[:15]
    assert load_pairs(test, skip_invalid=False)[0] == expected[15:]
    (folder / "train.json").write_text(json.dumps(rows))  # now two files claim the train split
    with pytest.raises(DataError, match=f"^dataset directory {folder} has two files for split 'train' "
                                        r"\(train.json and train.jsonl\): keep one$"):
        find_sources(tiny_config(tmp_path / "run", dataset=str(folder)))


def test_eval_fraction_holds_out_pairs(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", embedded.make_split("test")[:40])
    data = prepare_data(tiny_config(tmp_path / "run", dataset=str(path), eval_fraction=0.25, max_eval_pairs=0),
                        embedded.build_tokenizer())
    assert (len(data.train), len(data.eval)) == (30, 10)
    assert not {tuple(e.prompt) for e in data.eval} & {tuple(e.prompt) for e in data.train} - {()}
    capped = prepare_data(tiny_config(tmp_path / "run", dataset=str(path), eval_fraction=0.25, max_eval_pairs=4),
                          embedded.build_tokenizer())
    assert (len(capped.train), len(capped.eval)) == (36, 4)  # pairs past the cap train, none are dropped
    assert {tuple(e.prompt) for e in capped.eval} <= {tuple(e.prompt) for e in data.eval}


def test_two_ranks_see_the_single_rank_batch(tok):
    encoder = Encoder(tok, max_length=64)
    data, _ = encoder.encode([Pair(r["prompt"], r["chosen"], r["rejected"]) for r in embedded.make_split("test")[:50]])
    one = PairLoader(data, 8, world=1, rank=0, seed=3, pad_id=0)
    two = [PairLoader(data, 4, world=2, rank=k, seed=3, pad_id=0) for k in range(2)]
    for m in range(one.per_epoch * 2 + 1):  # across an epoch boundary
        assert one.batch(m).index.tolist() == two[0].batch(m).index.tolist() + two[1].batch(m).index.tolist()
    assert one.batch(0).index.tolist() != one.batch(one.per_epoch).index.tolist()  # reshuffled per epoch


def test_sharded_batches_cover_every_pair_once(tok):
    data, _ = Encoder(tok, max_length=64).encode([Pair("p", "a", "b")] * 11)
    seen, steps = [], []
    for rank in range(2):
        batches = list(sharded_batches(data, 4, world=2, rank=rank, pad_id=0))
        steps.append(len(batches))
        seen += [i for b, n in batches for i in b.index.tolist()[:n]]
    assert steps[0] == steps[1] and sorted(seen) == list(range(11))
    assert isinstance(batches[-1][0].input_ids, torch.Tensor)


def test_hub_datasets_load_through_datasets(tmp_path, monkeypatch):
    """A Hub name goes through datasets (stubbed here: CI is offline); its test split is the eval split."""
    import datasets

    rows = embedded.make_split("test")[:24]
    hub = {"train": datasets.Dataset.from_list(rows[:16]), "test": datasets.Dataset.from_list(rows[16:])}
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name: list(hub))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub[split])
    data = prepare_data(tiny_config(tmp_path / "run", dataset="someone/prefs", max_eval_pairs=0),
                        embedded.build_tokenizer())
    assert (len(data.train), len(data.eval)) == (16, 8)


def test_unknown_hub_names_fail_in_one_line(tmp_path, monkeypatch):
    import datasets
    import transformers

    from fastdpo.trainer import ConfigError, DataError, DPOTrainer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(DataError, match=r"^dataset 'someone/prefs' is not a local path and could not be found on "
                                        r"the Hub \(We couldn't connect to 'https://huggingface.co'.\)$"):
        prepare_data(tiny_config(tmp_path / "run", dataset="someone/prefs"), embedded.build_tokenizer())
    with pytest.raises(ConfigError, match=r"^model 'someone/model' is not a local path and could not be found"):
        DPOTrainer(tiny_config(tmp_path / "run", model="someone/model"))
