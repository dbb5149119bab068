"""Preference data: read rows, check them, tokenize pairs, and cut [2P, T] batches.

    rows (JSONL / JSON / Parquet / Hub) --to_pair--> Pair --Encoder--> Encoded --layout--> LayoutBatch

Three row formats are accepted (the format is decided per row):
- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant messages
  (or strings); the chat template is applied, the prompt with the generation prompt;
- minimind / implicit prompt: `chosen` and `rejected` full conversations that share a prefix of
  messages; the shared prefix is the prompt.
Micro-batches are LayoutBatches (fastdpo.layouts): padded, padding-free or shared-prompt, rows
[chosen; rejected] (pair i is rows i and i + P); only completion tokens are scored. A micro-batch is
--batch-size pairs, or with --max-tokens as many whole pairs as fit in that many token positions.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Union

from fastdpo.layouts import LayoutBatch, PairTokens, build, layout_tokens

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
    origin: str = field(default="", compare=False)  # "FILE row N", for errors found after reading

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


# Token ids of one pair (prompt, chosen, rejected), completions already truncated: the unit every
# batch layout (fastdpo.layouts) is built from.
Encoded = PairTokens


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
        files = {}
        for p in sorted(path.iterdir()):
            if p.suffix in FILE_KINDS and p.stem in files:
                raise DataError(f"dataset directory {name} has two files for split {p.stem!r} ({files[p.stem].name} "
                                f"and {p.name}): keep one")
            if p.suffix in FILE_KINDS:
                files[p.stem] = p
        return _pick_splits(name, {s: Source(FILE_KINDS[p.suffix], str(p), s) for s, p in files.items()}, cfg)
    if _looks_like_path(name):
        raise DataError(f"dataset not found: {name}")
    return _pick_splits(name, {s: Source("hub", name, s) for s in _hub_splits(name)}, cfg)


def _pick_splits(name: str, splits: dict[str, Source], cfg: TrainConfig) -> tuple[Source, Source | None]:
    if cfg.split not in splits:
        raise DataError(f"dataset {name} has no split {cfg.split!r} (it has: {', '.join(sorted(splits)) or 'none'})")
    if cfg.eval_split and cfg.eval_split not in splits:
        raise DataError(f"dataset {name} has no eval split {cfg.eval_split!r} (it has: {', '.join(sorted(splits))})")
    # The default eval split is never the training split: training on "test" has no held-out eval.
    default = "test" if "test" in splits and cfg.split != "test" and not cfg.eval_fraction else ""
    eval_split = cfg.eval_split or default
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
            pairs.append(replace(to_pair(row), origin=f"{source.where} row {number}"))
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
# Micro-batches


def budget_groups(order: list[int], data: list[Encoded], kind: str, max_tokens: int) -> list[list[int]]:
    """Pairs in `order`, cut into consecutive groups of at most `max_tokens` token positions in
    layout `kind` (a pair that does not fit alone makes a group of its own: see check_budget)."""
    groups: list[list[int]] = []
    group: list[int] = []
    for i in order:
        if group and group_tokens([data[j] for j in group + [i]], kind) > max_tokens:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group] if group else groups


def group_tokens(pairs: list[Encoded], kind: str) -> int:
    """Token positions a micro-batch of `pairs` takes in layout `kind` (padded: rows x longest row)."""
    if kind == "padded":
        return 2 * len(pairs) * max(len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in pairs)
    return sum(layout_tokens(p, kind) for p in pairs)


def check_budget(data: list[Encoded], kind: str, max_tokens: int, origins: list[str] | None = None) -> None:
    """Fail in one line if some pair alone needs more than --max-tokens positions; the first such
    pair is named by `origins` ("FILE row N", one per pair), or by its index."""
    if not data:
        return
    need = [layout_tokens(pair, kind) for pair in data]
    first = next((i for i, n in enumerate(need) if n > max_tokens), None)
    if first is not None:
        where = origins[first] if origins else f"pair {first}"
        raise DataError(f"--max-tokens {max_tokens} is smaller than {where}, which needs {need[first]} token "
                        f"positions in the {kind} layout; raise --max-tokens to at least {max(need)} or lower "
                        "--max-length")


class PairLoader:
    """Training micro-batches addressed by number: micro-batch m is a pure function of (seed, m).

    Each epoch is a seeded permutation of the pairs, cut into global micro-batches of `world`
    local ones (`batch_size` pairs each, or with `max_tokens` consecutive pairs up to that many
    token positions); rank k takes the k-th. So a run on 2 processes sees the same global batches
    as a run on one with twice the batch size, and resuming only needs m.
    """

    def __init__(self, data: list[Encoded], batch_size: int, *, world: int, rank: int, seed: int, pad_id: int,
                 layout: str = "padded", max_tokens: int = 0):
        self.data, self.batch_size, self.world, self.rank = data, batch_size, world, rank
        self.seed, self.pad_id, self.layout, self.max_tokens = seed, pad_id, layout, max_tokens
        self.global_batch = batch_size * world  # pairs per global micro-batch without max_tokens
        if max_tokens:
            check_budget(data, layout, max_tokens)
        self._groups_of: tuple[int, list[list[list[int]]]] = (-1, [])  # the last epoch's micro-batches
        self._counts: dict[int, int] = {}  # micro-batches per epoch
        self.per_epoch = len(self._groups(0))
        if self.per_epoch == 0:
            unit = f"{max_tokens}-token micro-batch" if max_tokens else f"micro-batch ({batch_size} pairs"
            raise DataError(f"{len(data)} training pairs are fewer than one global {unit} x {world} processes"
                            f"{'' if max_tokens else ')'}")

    def _groups(self, epoch: int) -> list[list[list[int]]]:
        """Global micro-batches of an epoch: per rank, the pair ids."""
        if self._groups_of[0] != epoch:
            order = list(range(len(self.data)))
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
            if self.max_tokens:
                local = budget_groups(order, self.data, self.layout, self.max_tokens)
            else:
                local = [order[s:s + self.batch_size]
                         for s in range(0, len(order) - self.batch_size + 1, self.batch_size)]
            count = len(local) // self.world  # the last, incomplete global micro-batch is dropped
            self._groups_of = (epoch, [local[g * self.world:(g + 1) * self.world] for g in range(count)])
            self._counts[epoch] = count
        return self._groups_of[1]

    def _count(self, epoch: int) -> int:
        if epoch not in self._counts:
            self._groups(epoch)
        return self._counts[epoch]

    def _locate(self, m: int) -> tuple[int, int]:
        """(epoch, position in it) of global micro-batch m."""
        if not self.max_tokens:  # every epoch has the same number of micro-batches
            return divmod(m, self.per_epoch)
        epoch = 0
        while m >= self._count(epoch):
            m -= self._count(epoch)
            epoch += 1
        return epoch, m

    def epoch_of(self, m: int) -> float:
        epoch, position = self._locate(m)
        return epoch + position / self._count(epoch)

    def pairs_of(self, m: int, rank: int | None = None) -> list[int]:
        """The pair ids of micro-batch m on `rank` (default: this process's)."""
        epoch, position = self._locate(m)
        return self._groups(epoch)[position][self.rank if rank is None else rank]

    def global_pairs(self, m: int) -> int:
        """Pairs in global micro-batch m, over every rank."""
        return sum(len(self.pairs_of(m, k)) for k in range(self.world))

    def global_chosen_tokens(self, m: int) -> int:
        """Chosen completion tokens in global micro-batch m, over every rank (known on every rank
        without communication: the NLL terms divide by the step's total)."""
        return sum(len(self.data[i].chosen) for k in range(self.world) for i in self.pairs_of(m, k))

    def batch(self, m: int, *, chosen_only: bool = False) -> LayoutBatch:
        index = self.pairs_of(m)
        return build(self.layout, [self.data[i] for i in index], index, self.pad_id, chosen_only=chosen_only)


def sharded_batches(data: list[Encoded], batch_size: int, *, world: int, rank: int, pad_id: int,
                    layout: str = "padded", max_tokens: int = 0) -> Iterator[tuple[LayoutBatch, int]]:
    """Every pair once, in order, split across ranks: (batch, pairs that count) per step.

    All ranks take the same number of steps (sharded models need every rank in each forward); a
    rank with nothing left gets pair 0 again with a count of 0.
    """
    order = list(range(len(data)))
    if max_tokens:
        groups = budget_groups(order, data, layout, max_tokens)
    else:
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for start in range(0, len(groups), world):
        index = groups[start + rank] if start + rank < len(groups) else []
        chosen = index or [0]
        yield build(layout, [data[i] for i in chosen], chosen, pad_id), len(index)


def split_off(pairs: list[Pair], fraction: float, seed: int, limit: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a seeded random `fraction` of the pairs (at most `limit`, 0 = no limit) held
    out for eval; every other pair trains."""
    order = list(range(len(pairs)))
    random.Random(f"{seed}-eval").shuffle(order)
    n_eval = min(max(1, round(fraction * len(pairs))), limit or len(pairs))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


@dataclass
class PreparedData:
    """Tokenized train and eval pairs, and what was left out on the way."""

    train: list[Encoded]
    eval: list[Encoded]
    skipped_invalid: int
    dropped_too_long: int
    train_origins: list[str] = field(default_factory=list)  # "FILE row N" of each train pair
    eval_origins: list[str] = field(default_factory=list)


def check_fits_model(pairs: list[Pair], encoded: list[Encoded], kept: list[int], tokenizer, limits) -> None:
    """Every token id the model will read (and the pad id) must have a row in its embeddings, and
    every sequence must fit its positions: past them, an embedding or position lookup is a raw
    IndexError on CPU and a device-side assert that ends the process on a GPU. Checked here on the
    host, once, with the row at fault named. `limits`: fastdpo.trainer.model.ModelLimits."""
    vocab, positions = limits.vocab, limits.positions
    pad = tokenizer.pad_token_id
    if vocab is not None and pad is not None and not 0 <= pad < vocab:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r} has id {pad}, outside the model's "
                        f"vocabulary of {vocab} ids: give the tokenizer a pad token the model knows (its EOS, say) "
                        "or resize the model's embeddings")
    for tokens, i in zip(encoded, kept):
        top = max(max(ids, default=0) for ids in (tokens.prompt, tokens.chosen, tokens.rejected))
        if vocab is not None and top >= vocab:
            raise DataError(f"{pairs[i].origin}: token {tokenizer.convert_ids_to_tokens(top)!r} has id {top}, outside "
                            f"the model's vocabulary of {vocab} ids (the tokenizer has {len(tokenizer)}): use the "
                            "model's own tokenizer, or resize the model's embeddings to this one")
        length = len(tokens.prompt) + max(len(tokens.chosen), len(tokens.rejected))
        if positions is not None and length > positions:
            raise DataError(f"{pairs[i].origin}: {length} tokens (the prompt and its longer answer), more than the "
                            f"model's {positions} positions: lower --max-length to {positions} or less")


def prepare_data(cfg: TrainConfig, tokenizer, limits=None) -> PreparedData:
    """Read, check, split and tokenize the dataset; fail in one line if nothing usable is left, or
    if a pair does not fit the model's `limits` (fastdpo.trainer.model.ModelLimits, when given)."""
    train_source, eval_source = find_sources(cfg)
    train, skipped = load_pairs(train_source, skip_invalid=cfg.skip_invalid, limit=cfg.max_train_pairs)
    held: list[Pair] = []
    if eval_source is not None:
        held, more = load_pairs(eval_source, skip_invalid=cfg.skip_invalid, limit=cfg.max_eval_pairs)
        skipped += more
    elif cfg.eval_fraction:
        train, held = split_off(train, cfg.eval_fraction, cfg.seed, limit=cfg.max_eval_pairs)
    if getattr(tokenizer, "chat_template", None) is None and any(p.conversational for p in train + held):
        raise DataError(f"{cfg.dataset} holds conversations but the tokenizer has no chat template")
    encoder = Encoder(tokenizer, cfg.max_length)
    train_ids, train_kept = encoder.encode(train)
    eval_ids, eval_kept = encoder.encode(held)
    if limits is not None:
        check_fits_model(train, train_ids, train_kept, tokenizer, limits)
        check_fits_model(held, eval_ids, eval_kept, tokenizer, limits)
    if not train_ids:
        raise DataError(f"{train_source.where}: every one of the {len(train)} pairs has a prompt of "
                        f"--max-length {cfg.max_length} tokens or more")
    dropped = len(train) - len(train_ids) + len(held) - len(eval_ids)
    return PreparedData(train_ids, eval_ids, skipped, dropped, [train[i].origin for i in train_kept],
                        [held[i].origin for i in eval_kept])
