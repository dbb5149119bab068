"""The embedded default: a character-level tokenizer, a tiny random-init Llama, and a sorting task.

The task: the prompt is `sort: <letters>\\n`, the chosen answer is the letters in alphabetical
order, and the rejected answer breaks the rule (left unsorted, shuffled, one adjacent swap, or
one wrong letter). A 2-layer, 64-wide Llama learns the rule partly from a short supervised
warm-up on the chosen answers (about a fifth of its greedy answers to held-out prompts are then
right); DPO with an NLL term on the chosen answers then raises that share (`eval/task_success`,
checked by `task_eval.sort_rule`) in well under a minute on two CPU cores.

The shipped data files (fastdpo/data/sort.{train,test}.jsonl) are written by
`python -m fastdpo.trainer.embedded`; a test checks they match this generator.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TASK = "sort"
SPLIT_SIZES = {"train": 4000, "test": 400}
LETTERS = "abcdefghijklmnopqrstuvwxyz"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# A minimal chat template, so the embedded model also serves conversational data (tests).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A character-level tokenizer over printable ASCII, built locally (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


MAX_POSITIONS = 256  # the embedded model's context


def build_model(tokenizer, seed: int, attn_implementation: str | None = None):
    """A 2-layer Llama with random weights drawn from `seed` (the global RNG is left untouched), with
    transformers' default attention or `attn_implementation`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------------------------
# The sorting task


def make_pair(rng: random.Random) -> dict[str, str]:
    """One preference pair: the sorted letters beat an answer that breaks the rule."""
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))
    good = "".join(sorted(word))
    return {"prompt": f"sort: {word}\n", "chosen": good, "rejected": _break_rule(word, good, rng)}


def _break_rule(word: str, good: str, rng: random.Random) -> str:
    """A wrong answer of one of four kinds; never equal to the right one."""
    while True:
        kind = rng.randrange(4)
        s = list(good)
        if kind == 0:  # the letters as given
            s = list(word)
        elif kind == 1:  # a random order
            rng.shuffle(s)
        elif kind == 2:  # one adjacent swap
            i = rng.randrange(len(s) - 1)
            s[i], s[i + 1] = s[i + 1], s[i]
        else:  # one wrong letter
            s[rng.randrange(len(s))] = rng.choice(LETTERS)
        if "".join(s) != good:
            return "".join(s)


def make_split(split: str) -> list[dict[str, str]]:
    """The rows of one split; each split has its own seed, so test words are drawn independently."""
    rng = random.Random(f"{TASK}-{split}")
    return [make_pair(rng) for _ in range(SPLIT_SIZES[split])]


def split_path(split: str) -> Path:
    return DATA_DIR / f"{TASK}.{split}.jsonl"


def write_data() -> None:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    for split in SPLIT_SIZES:
        with open(split_path(split), "w") as f:
            for row in make_split(split):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_data()
    print("wrote", ", ".join(str(split_path(s)) for s in SPLIT_SIZES))
