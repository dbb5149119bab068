"""Task success by generation: greedy-decode held-out prompts and check each answer by the task's rule.

Reward accuracy says the policy ranks chosen above rejected; it does not say the policy *produces*
right answers (DPO can lower both likelihoods and still rank them). `eval/task_success` is the
fraction of held-out prompts whose greedy answer passes the task's rule, a direct measure of
behaviour. Only tasks with a known rule have it (the embedded `sort` task).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch

Rule = Callable[[str, str], bool]


def sort_rule(prompt: str, answer: str) -> bool:
    """`sort: <letters>\\n` is answered by the letters in alphabetical order, nothing else."""
    head, sep, letters = prompt.strip().partition("sort: ")
    return bool(sep) and not head and answer == "".join(sorted(letters))


RULES: dict[str, Rule] = {"fastdpo:sort": sort_rule}


def rule_for(dataset: str) -> Optional[Rule]:
    """The answer check of a dataset, or None when it has none."""
    return RULES.get(dataset)


@torch.no_grad()
def greedy_decode(model, prompts: list[list[int]], *, eos_id: int | None, max_new_tokens: int,
                  device: torch.device, autocast: bool = False, max_positions: int | None = None) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, EOS excluded), cut where the sequence
    would pass the model's `max_positions` (or after `max_new_tokens`; every answer is, without an EOS).

    Prompts of equal length are decoded together, so no padding or position shifting is needed;
    each step reruns the whole (short) sequence, which keeps this independent of KV-cache
    support in the model."""
    out: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    was_training = model.training
    model.eval()
    for members in groups.values():
        ids = torch.tensor([prompts[i] for i in members], dtype=torch.long, device=device)
        done = torch.zeros(len(members), dtype=torch.bool, device=device)
        room = max_new_tokens if max_positions is None else min(max_new_tokens, max_positions - ids.shape[1])
        for _ in range(room):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids).logits[:, -1]
            nxt = logits.argmax(-1)
            if eos_id is None:  # no end token: every answer runs to its length limit
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                continue
            done |= nxt == eos_id
            ids = torch.cat([ids, nxt.masked_fill(done, eos_id)[:, None]], dim=1)
            if bool(done.all()):
                break
        start = len(prompts[members[0]])
        for row, i in zip(ids[:, start:].tolist(), members):
            out[i] = row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row
    model.train(was_training)
    return out


def task_success(model, tokenizer, prompts: list[list[int]], rule: Rule, *, device: torch.device,
                 autocast: bool = False, max_new_tokens: int = 16, max_positions: int | None = None) -> float:
    """Fraction of `prompts` (token ids) whose greedy answer passes `rule(prompt_text, answer_text)`."""
    if not prompts:
        raise ValueError("task_success: prompts is empty")
    answers = greedy_decode(model, prompts, eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens,
                            device=device, autocast=autocast, max_positions=max_positions)
    texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    replies = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return sum(rule(p, a) for p, a in zip(texts, replies)) / len(prompts)

