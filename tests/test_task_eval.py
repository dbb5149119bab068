"""Task success by generation: the sort rule and batched greedy decoding."""

from __future__ import annotations

import pytest
import torch

from fastdpo.trainer import embedded
from fastdpo.trainer.task_eval import greedy_decode, rule_for, sort_rule, task_success


def test_sort_rule():
    assert sort_rule("sort: dcba\n", "abcd")
    assert sort_rule("sort: aab\n", "aab")
    assert not sort_rule("sort: dcba\n", "abdc")
    assert not sort_rule("sort: aab\n", "ab")  # a dropped duplicate is wrong
    assert not sort_rule("sort: dcba\n", "abcd ")
    assert not sort_rule("reverse: dcba\n", "abcd")
    assert rule_for("fastdpo:sort") is sort_rule and rule_for("my.jsonl") is None


def naive_greedy(model, prompt: list[int], eos: int, steps: int) -> list[int]:
    """One prompt at a time, from the logits of the whole sequence at every step."""
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_batched_greedy_decoding_matches_one_prompt_at_a_time():
    tokenizer = embedded.build_tokenizer()
    torch.manual_seed(0)
    model = embedded.build_model(tokenizer, seed=3).eval()
    rows = embedded.make_split("test")[:12]
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    got = greedy_decode(model, prompts, eos_id=tokenizer.eos_token_id, max_new_tokens=6, device=torch.device("cpu"))
    with torch.no_grad():
        want = [naive_greedy(model, p, tokenizer.eos_token_id, 6) for p in prompts]
    assert got == want


def test_greedy_decoding_stops_at_the_model_positions():
    """A model whose position table ends at `limit` (GPT-2's learned positions) gets no token past it:
    each answer is cut where prompt + answer reach the limit, and equals the uncut answer's start."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = embedded.build_tokenizer()
    rows = embedded.make_split("test")[:6]
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    limit = max(len(p) for p in prompts) + 2
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=limit, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    eos = tokenizer.eos_token_id
    got = greedy_decode(model, prompts, eos_id=eos, max_new_tokens=8, device=torch.device("cpu"), max_positions=limit)
    with torch.no_grad():
        for prompt, answer in zip(prompts, got):
            assert len(prompt) + len(answer) <= limit
            assert answer == naive_greedy(model, prompt, eos, limit - len(prompt))


def test_greedy_decoding_without_an_eos_runs_every_answer_to_its_length():
    tokenizer = embedded.build_tokenizer()
    model = embedded.build_model(tokenizer, seed=torch.randint(0, 2**31, ()).item()).eval()
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in embedded.make_split("test")[:4]]
    got = greedy_decode(model, prompts, eos_id=None, max_new_tokens=5, device=torch.device("cpu"))
    with torch.no_grad():
        assert got == [naive_greedy(model, p, None, 5) for p in prompts]
    assert all(len(answer) == 5 for answer in got)


def test_task_success_counts_rule_passes():
    tokenizer = embedded.build_tokenizer()
    rows = embedded.make_split("test")[:5]
    prompts = [tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows]
    answers = {tuple(p): tokenizer(r["chosen"] if i % 2 == 0 else r["rejected"], add_special_tokens=False)["input_ids"]
               for i, (p, r) in enumerate(zip(prompts, rows))}

    class Oracle(torch.nn.Module):
        """Emits a fixed answer per prompt, then EOS: right for even rows, wrong for odd ones."""

        def forward(self, input_ids):
            out = torch.full((*input_ids.shape, len(tokenizer)), -1.0)
            for r, row in enumerate(input_ids.tolist()):
                for n in range(len(row), 0, -1):
                    if tuple(row[:n]) in answers:
                        answer, done = answers[tuple(row[:n])], len(row) - n
                        nxt = answer[done] if done < len(answer) else tokenizer.eos_token_id
                        out[r, -1, nxt] = 1.0
                        break
            return type("Out", (), {"logits": out})()

    assert task_success(Oracle(), tokenizer, prompts, sort_rule, device=torch.device("cpu")) == pytest.approx(3 / 5)
