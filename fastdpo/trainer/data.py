"""Preference data: read rows, check them, tokenize pairs, and cut [2P, T] batches.

    rows (JSONL / JSON / Parquet / Hub) --to_pair--> Pair --Encoder--> Encoded --collate--> Batch

Three row formats are accepted (the format is decided per row):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant messages
  (or strings); the chat template is applied, the prompt with the generation prompt;
- minimind / implicit prompt: `chosen` and `rejected` full conversations that share a prefix of
  messages; the shared prefix is the prompt.
Batches are [chosen; rejected]: pair i is rows i and i + P. Labels are -100 on prompt and padding.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

import torch

from .config import EMBEDDED_DATASET, ConfigError, TrainConfig

Messages = list[dict[str, str]]
Text = Union[str, Messages]
FILE_KINDS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


class DataError(ConfigError):
    """Unusable data: a malformed row (named by file and row), an empty dataset, a missing split."""


class RowError(Exception):
    """Why one row is malformed (the caller adds where the row is)."""


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class Encoded:
    """Token ids of one pair: the shared prompt and each completion (already truncated)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class Source:
    """Where one split's rows come from: a local file, or a split of a Hub dataset."""

    kind: str  # jsonl | json | parquet | hub
    where: str  # the file path or the Hub name
    split: str = "train"


# ----------------------------------------------------------------------------------------------
# Finding the splits


def find_sources(cfg: TrainConfig) -> tuple[Source, Source | None]:
    """The training source and the eval source (None: no eval split, or carved by --eval-fraction)."""
    name = cfg.dataset
    if name.startswith("fastdpo:"):
        from .embedded import DATA_DIR

        files = {p.name.split(".")[1]: p for p in DATA_DIR.glob(f"{name.split(':', 1)[1]}.*.jsonl")}
        if not files:
            raise DataError(f"unknown embedded dataset {name!r}; the embedded one is {EMBEDDED_DATASET!r}")
        return _pick_splits(name, {s: Source("jsonl", str(p), s) for s, p in files.items()}, cfg)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix not in FILE_KINDS:
            raise DataError(f"dataset file {name} must end in .jsonl, .json or .parquet")
        if cfg.eval_split:
            raise DataError(f"--eval-split {cfg.eval_split}: a single file has no splits; use a directory of "
                            "<split>.jsonl files or --eval-fraction")
        return Source(FILE_KINDS[path.suffix], str(path)), None
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in FILE_KINDS}
        return _pick_splits(name, {s: Source(FILE_KINDS[p.suffix], str(p), s) for s, p in files.items()}, cfg)
    if _looks_like_path(name):
        raise DataError(f"dataset not found: {name}")
    return _pick_splits(name, {s: Source("hub", name, s) for s in _hub_splits(name)}, cfg)


def _pick_splits(name: str, splits: dict[str, Source], cfg: TrainConfig) -> tuple[Source, Source | None]:
    if cfg.split not in splits:
        raise DataError(f"dataset {name} has no split {cfg.split!r} (it has: {', '.join(sorted(splits)) or 'none'})")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise DataError(f"dataset {name} has no eval split {cfg.eval_split!r} (it has: {', '.join(sorted(splits))})")
    eval_split = cfg.eval_split or ("test" if "test" in splits and not cfg.eval_fraction else "")
    return splits[cfg.split], splits.get(eval_split)


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "org/name"; anything else with a separator or a file suffix is a path.
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in FILE_KINDS
            or os.sep != "/" and os.sep in name)


def _hub_splits(name: str) -> list[str]:
    import datasets

    try:
        return datasets.get_dataset_split_names(name)
    except Exception as e:  # noqa: BLE001 - any failure means the name does not resolve
        raise DataError(f"dataset {name!r} is not a local path and could not be found on the Hub "
                        f"({_first_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# Reading and checking rows


def read_rows(source: Source) -> Iterator[tuple[int, Any]]:
    """(row number, row) pairs; a row that is not valid JSON comes as a RowError. Rows count from 1
    (for JSONL the row number is the line number)."""
    if source.kind == "jsonl":
        with open(source.where, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, _parse_json_line(line)
    elif source.kind == "json":
        with open(source.where, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{source.where}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{source.where}: expected a JSON list of rows, got {_type(rows)}")
        yield from enumerate(rows, 1)
    else:
        yield from enumerate(_load_with_datasets(source), 1)


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return RowError(f"invalid JSON ({e.msg})")


def _load_with_datasets(source: Source):
    import datasets

    try:
        if source.kind == "parquet":
            return datasets.load_dataset("parquet", data_files=source.where, split="train")
        return datasets.load_dataset(source.where, split=source.split)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot load {source.where} ({_first_line(e)})") from None


def to_pair(row: Any) -> Pair:
    """Check one row and bring it to a Pair; raise RowError saying what is wrong."""
    if not isinstance(row, dict):
        raise RowError(f"expected an object with prompt/chosen/rejected, got {_type(row)}")
    prompt = row.get("prompt")
    if prompt is None:  # minimind: two full conversations with a shared prefix
        if isinstance(row.get("chosen"), str):
            raise RowError("missing field 'prompt'")
        return _split_shared_prefix(_messages(row, "chosen"), _messages(row, "rejected"))
    if isinstance(prompt, str):
        return Pair(_text(row, "prompt"), _text(row, "chosen"), _text(row, "rejected"))
    if isinstance(prompt, list):
        return Pair(_messages(row, "prompt"), _reply(row, "chosen"), _reply(row, "rejected"))
    raise RowError(f"field 'prompt' must be a string or a list of messages, got {_type(prompt)}")


def _field(row: dict, key: str, kind: type, what: str):
    """row[key], present, of `kind` and not empty; else a RowError naming the field."""
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field {key!r}")
    if not isinstance(value, kind):
        raise RowError(f"field {key!r} must be {what}, got {_type(value)}")
    if not value:
        raise RowError(f"empty field {key!r}")
    return value


def _text(row: dict, key: str) -> str:
    return _field(row, key, str, "a string")


def _messages(row: dict, key: str) -> Messages:
    value = _field(row, key, list, "a list of messages")
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise RowError(f"field {key!r} message {i} must be an object with role and content, got {_type(m)}")
        for part in ("role", "content"):
            if not isinstance(m.get(part), str):
                raise RowError(f"field {key!r} message {i} needs a string {part!r}")
    if not value[-1]["content"]:
        raise RowError(f"empty field {key!r} (its last message has no content)")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(row: dict, key: str) -> Messages:
    """A completion of a conversational row: assistant messages, or a plain string for one."""
    if isinstance(row.get(key), str):
        return [{"role": "assistant", "content": _text(row, key)}]
    return _messages(row, key)


def _split_shared_prefix(chosen: Messages, rejected: Messages) -> Pair:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise RowError("missing field 'prompt', and chosen and rejected share no leading messages to use as one")
    if shared == len(chosen) or shared == len(rejected):
        raise RowError("chosen and rejected do not differ after their shared prompt messages")
    return Pair(chosen[:shared], chosen[shared:], rejected[shared:])


def load_pairs(source: Source, *, skip_invalid: bool, limit: int = 0) -> tuple[list[Pair], int]:
    """All pairs of one source and the number of malformed rows skipped (--skip-invalid)."""
    pairs, skipped = [], 0
    for number, row in read_rows(source):
        try:
            if isinstance(row, RowError):
                raise row
            pairs.append(to_pair(row))
        except RowError as e:
            if not skip_invalid:
                raise DataError(f"{source.where} row {number}: {e} (pass --skip-invalid to skip such rows)") from None
            skipped += 1
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        detail = f" ({skipped} malformed rows skipped)" if skipped else ""
        raise DataError(f"{source.where}: the dataset is empty{detail}")
    return pairs, skipped


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Tokenizing


class Encoder:
    """Turns Pairs into token ids: prompt tokens, completion tokens + EOS, truncated to max_length."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.prefix = _leading_special_tokens(tokenizer)

    def texts(self, pair: Pair) -> tuple[str, str, str]:
        """Prompt and completion strings; for conversations, cut out of the chat-templated text."""
        if not pair.conversational:
            return pair.prompt, pair.chosen, pair.rejected
        apply = self.tokenizer.apply_chat_template
        prompt = apply(pair.prompt, tokenize=False, add_generation_prompt=True)
        completions = []
        for reply in (pair.chosen, pair.rejected):
            full = apply(pair.prompt + reply, tokenize=False)
            if not full.startswith(prompt):
                raise DataError("the tokenizer's chat template renders the prompt differently once a reply "
                                "follows, so the completion cannot be cut out of it")
            completions.append(full[len(prompt):])
        return prompt, completions[0], completions[1]

    def encode(self, pairs: list[Pair]) -> tuple[list[Encoded], list[int]]:
        """Encoded pairs and the indices (into `pairs`) of those kept; a pair whose prompt alone
        fills max_length is dropped."""
        texts = [self.texts(p) for p in pairs]
        ids = [self._tokenize([t[k] for t in texts]) for k in range(3)]
        encoded, kept = [], []
        for i, (prompt, chosen, rejected) in enumerate(zip(*ids)):
            if not pairs[i].conversational:
                prompt = self.prefix + prompt  # BOS, for tokenizers that add one (templates carry their own)
            budget = self.max_length - len(prompt)
            if budget <= 0:
                continue
            encoded.append(Encoded(prompt, self._complete(chosen)[:budget], self._complete(rejected)[:budget]))
            kept.append(i)
        return encoded, kept

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(texts), 1024):
            out += self.tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]
        return out

    def _complete(self, ids: list[int]) -> list[int]:
        # Chat templates usually end the turn with EOS themselves; plain strings need it appended.
        return ids if self.eos is None or self.eos in ids else ids + [self.eos]


def _leading_special_tokens(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (e.g. Llama's BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


# ----------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """[2P, T] rows: chosen then rejected. `index` [P] are the pairs' positions in their split."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask,
                                                                  self.labels, self.index)))

    @property
    def pairs(self) -> int:
        return self.index.numel()


def collate(data: list[Encoded], index: list[int], pad_id: int) -> Batch:
    """Right-padded [2P, T] batch of the pairs data[i] for i in index."""
    rows = [(data[i].prompt, data[i].chosen) for i in index] + [(data[i].prompt, data[i].rejected) for i in index]
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(prompt) + len(completion)
        input_ids[r, :m] = torch.tensor(prompt + completion)
        labels[r, n:m] = torch.tensor(completion)
        attention_mask[r, :m] = 1
    return Batch(input_ids, attention_mask, labels, torch.tensor(index, dtype=torch.long))


class PairLoader:
    """Training micro-batches addressed by number: micro-batch m is a pure function of (seed, m).

    Each global micro-batch is `batch_size * world` consecutive pairs of a seeded per-epoch
    permutation, and rank k takes the k-th slice; so a run on 2 processes sees the same global
    batches as a run on one with twice the batch size, and resuming only needs m.
    """

    def __init__(self, data: list[Encoded], batch_size: int, *, world: int, rank: int, seed: int, pad_id: int):
        self.data, self.batch_size, self.world, self.rank = data, batch_size, world, rank
        self.seed, self.pad_id = seed, pad_id
        self.global_batch = batch_size * world
        self.per_epoch = len(data) // self.global_batch
        if self.per_epoch == 0:
            raise DataError(f"{len(data)} training pairs are fewer than one global micro-batch "
                            f"({batch_size} pairs x {world} processes)")
        self._order: tuple[int, list[int]] = (-1, [])

    def epoch_of(self, m: int) -> float:
        return m / self.per_epoch

    def batch(self, m: int) -> Batch:
        epoch, position = divmod(m, self.per_epoch)
        start = position * self.global_batch + self.rank * self.batch_size
        return collate(self.data, self._permutation(epoch)[start:start + self.batch_size], self.pad_id)

    def _permutation(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:
            order = list(range(len(self.data)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]


def sharded_batches(data: list[Encoded], batch_size: int, *, world: int, rank: int,
                    pad_id: int) -> Iterator[tuple[Batch, int]]:
    """Every pair once, in order, split across ranks: (batch, pairs that count) per step.

    All ranks take the same number of steps (sharded models need every rank in each forward); a
    rank with nothing left gets pair 0 again with a count of 0.
    """
    step = batch_size * world
    for start in range(0, len(data), step):
        lo = min(start + rank * batch_size, len(data))
        index = list(range(lo, min(lo + batch_size, start + step, len(data))))
        yield collate(data, index or [0], pad_id), len(index)


def split_off(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a seeded random `fraction` of the pairs held out for eval."""
    order = list(range(len(pairs)))
    random.Random(f"{seed}-eval").shuffle(order)
    n_eval = max(1, round(fraction * len(pairs)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


@dataclass
class PreparedData:
    """Tokenized train and eval pairs, and what was left out on the way."""

    train: list[Encoded]
    eval: list[Encoded]
    skipped_invalid: int
    dropped_too_long: int


def prepare_data(cfg: TrainConfig, tokenizer) -> PreparedData:
    """Read, check, split and tokenize the dataset; fail in one line if nothing usable is left."""
    train_source, eval_source = find_sources(cfg)
    train, skipped = load_pairs(train_source, skip_invalid=cfg.skip_invalid, limit=cfg.max_train_pairs)
    held: list[Pair] = []
    if eval_source is not None:
        held, more = load_pairs(eval_source, skip_invalid=cfg.skip_invalid, limit=cfg.max_eval_pairs)
        skipped += more
    elif cfg.eval_fraction:
        train, held = split_off(train, cfg.eval_fraction, cfg.seed)
        held = held[:cfg.max_eval_pairs or None]
    if getattr(tokenizer, "chat_template", None) is None and any(p.conversational for p in train + held):
        raise DataError(f"{cfg.dataset} holds conversations but the tokenizer has no chat template")
    encoder = Encoder(tokenizer, cfg.max_length)
    train_ids, _ = encoder.encode(train)
    eval_ids, _ = encoder.encode(held)
    if not train_ids:
        raise DataError(f"{train_source.where}: every one of the {len(train)} pairs has a prompt of "
                        f"--max-length {cfg.max_length} tokens or more")
    dropped = len(train) - len(train_ids) + len(held) - len(eval_ids)
    return PreparedData(train_ids, eval_ids, skipped, dropped)
