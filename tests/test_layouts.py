"""Padding-free and shared-prompt batches equal the padded batch of the same pairs, through real models.

For tiny random-weight Llama, Qwen2 (bias on q/k/v) and Gemma 2 (final logit soft-cap, attention
soft-cap (eager), alternating sliding-window layers with a window shorter than the sequences) in fp32,
with sdpa and eager attention: per-row log-probs, the loss, every metric and the gradient of every
parameter are the same in the padded, packed and shared layouts. The padded layout itself is
checked against float64 log-probs from the model's own logits (a plain forward, no fastdpo head).
With flex attention (the shared layout's attention on a GPU, BlockMasks), the same per-row
log-probs, forward only: torch's FlexAttention has no backward on the CPU.

Tolerance: fp32 rounding of a different summation order. Log-prob sums and losses within 2e-5
relative; gradients within 1e-4 relative elementwise or 1e-5 of the tensor's largest entry.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastdpo.attention import allowed, layout_support, shared_mask_mod
from fastdpo.layouts import PairTokens, build, layout_tokens, pairs_from_padded
from fastdpo.trainer.config import TrainConfig
from fastdpo.trainer.loss import LossFn, attach_head, head_options, rows

VOCAB = 61
LAYOUTS = ("padded", "packed", "shared")


def tiny_model(arch: str, attn: str, head_dim: int = 8):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    else:
        # transformers' sdpa cannot soft-cap attention scores: only eager gets that soft-cap
        config = tf.Gemma2Config(**common, head_dim=head_dim, sliding_window=5, final_logit_softcapping=3.0,
                                 attn_logit_softcapping=20.0 if attn == "eager" else None,
                                 layer_types=["sliding_attention", "full_attention"])
        model = tf.Gemma2ForCausalLM(config)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    return model.eval()  # no dropout: the layouts must see the same function


def random_pairs(g: torch.Generator) -> list[PairTokens]:
    """Very different lengths, a one-token answer, and prompts from 1 to 9 tokens."""
    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    shapes = [(9, 1, 12), (1, 15, 2), (4, 7, 7), (6, 3, 1)]
    return [PairTokens(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def per_row64(model, pairs: list[PairTokens]) -> torch.Tensor:
    """[chosen; rejected] log-prob sums in float64 from each sequence run alone through the model."""
    out = []
    for prompt, answer in [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]:
        ids = torch.tensor([list(prompt) + list(answer)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()[0]
        logp = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(answer)[:, None])
        out.append(logp.sum())
    return torch.stack(out)


@pytest.fixture
def flex_copy(monkeypatch):
    """(make, masks): make(model) is a copy of `model` with flex attention; masks names the mask of
    each flex call (a spy on transformers' flex function), since a silent fallback to another
    attention would pass an equality test and prove nothing. torch.compile builds flex's kernels:
    here with static shapes, compiled afresh (once a recompiled flex call turns dynamic, torch
    2.13's CPU code for it fails to build, g++: 'cur_kvSplitSize0' was not declared: an inductor bug
    of its CPU template, not of the masks)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks: list[str] = []
    flex_attention = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(type(attention_mask).__name__)
        return flex_attention(module, query, key, value, attention_mask, **kwargs)

    def make(model):
        flex = copy.deepcopy(model)
        flex.config._attn_implementation = "flex_attention"
        return flex

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", spy)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield make, masks


def leaky(shared):
    """`shared` with one answer branch: its rejected tokens see the chosen answer (a wrong mask)."""
    out = copy.copy(shared)
    out.branch_ids = torch.where(shared.branch_ids == 2, 1, shared.branch_ids)
    return out


def step(model, batch, loss_fn, ref):
    model.zero_grad(set_to_none=True)
    loss, metrics = loss_fn(model, batch, ref)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return loss.detach(), metrics, grads


def assert_grads_close(actual, expected, label):
    for name, e in expected.items():
        atol = 1e-5 * e.abs().max().item() + 1e-9
        torch.testing.assert_close(actual[name], e, rtol=1e-4, atol=atol, msg=lambda m: f"{label} {name}: {m}")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_layouts_equal_padded(arch, attn, _fresh_seed):
    g = torch.Generator().manual_seed(_fresh_seed)
    model = tiny_model(arch, attn)
    pairs = random_pairs(g)
    assert per_row64(model, pairs).shape == (8,)
    cfg = TrainConfig(loss_type="sigmoid,sft", loss_options={"loss_weights": [1.0, 0.5]})
    attach_head(model, head_options(cfg))
    loss_fn = LossFn(cfg, autocast=False)
    ref = per_row64(model, pairs).float() + torch.randn(8, generator=g)
    results = {kind: step(model, build(kind, pairs, range(4), pad_id=0), loss_fn, ref) for kind in LAYOUTS}

    with torch.no_grad():  # the padded layout against float64 from the model's own logits
        padded_rows = rows(model, build("padded", pairs, range(4), pad_id=0), "reference", False).logps
    torch.testing.assert_close(padded_rows.double(), per_row64(model, pairs), rtol=2e-5, atol=1e-5)

    loss0, metrics0, grads0 = results["padded"]
    for kind in ("packed", "shared"):
        loss, metrics, grads = results[kind]
        torch.testing.assert_close(loss, loss0, rtol=2e-5, atol=1e-6, msg=lambda m: f"{kind} loss: {m}")
        assert set(metrics) == set(metrics0)
        for name in metrics0:
            torch.testing.assert_close(metrics[name], metrics0[name], rtol=2e-5, atol=1e-5,
                                       msg=lambda m: f"{kind} {name}: {m}")
        assert_grads_close(grads, grads0, kind)
    assert any(g.abs().max() > 0 for g in grads0.values())


@pytest.mark.parametrize("mode", ["fused_linear", "reference"])
def test_layouts_equal_padded_in_every_head_mode(mode, _fresh_seed):
    g = torch.Generator().manual_seed(_fresh_seed)
    model = tiny_model("gemma2", "sdpa")
    pairs = random_pairs(g)
    cfg = TrainConfig(loss_impl=mode, loss_type="ipo")
    attach_head(model, head_options(cfg))
    loss_fn = LossFn(cfg, autocast=False)
    ref = torch.randn(8, generator=g) - 20
    results = {kind: step(model, build(kind, pairs, range(4), pad_id=0), loss_fn, ref) for kind in LAYOUTS}
    for kind in ("packed", "shared"):
        torch.testing.assert_close(results[kind][0], results["padded"][0], rtol=2e-5, atol=1e-6)
        assert_grads_close(results[kind][2], results["padded"][2], f"{mode} {kind}")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_flex_attention_layouts_equal_padded(arch, flex_copy, _fresh_seed):
    """FlexAttention, the attention that takes the shared layout's mask on a GPU: the BlockMask that
    transformers builds from packed position ids, and fastdpo's shared-prompt BlockMask (for Gemma 2
    one per layer type, the sliding-window layers' own), handed to the model as `attention_mask`,
    give the per-row log-probs of the padded layout under sdpa (eager for Gemma 2, with its
    attention soft-cap, which flex applies as a score_mod) and of float64. Forward only: torch's
    FlexAttention has no backward on the CPU (tests/test_gpu_flex.py runs it on a GPU);
    torch.compile builds its CPU kernel here, about 10 s an architecture."""
    make_flex, masks = flex_copy
    g = torch.Generator().manual_seed(_fresh_seed)
    model = tiny_model(arch, "eager" if arch == "gemma2" else "sdpa")
    pairs = random_pairs(g)
    want64 = per_row64(model, pairs)
    attach_head(model, head_options(TrainConfig()))
    flex = make_flex(model)
    with torch.no_grad():
        padded = rows(model, build("padded", pairs, range(4), pad_id=0), "reference", False).logps
        for kind in ("packed", "shared"):
            masks.clear()
            got = rows(flex, build(kind, pairs, range(4), pad_id=0), "reference", False).logps
            assert masks == ["BlockMask"] * flex.config.num_hidden_layers, (kind, masks)
            torch.testing.assert_close(got, padded, rtol=2e-5, atol=1e-5, msg=lambda m: f"{kind}: {m}")
            torch.testing.assert_close(got.double(), want64, rtol=2e-5, atol=1e-5, msg=lambda m: f"{kind}: {m}")
        # the shared mask is the one flex applies: letting rejected tokens see the chosen answer shows
        bad = rows(flex, leaky(build("shared", pairs, range(4), pad_id=0)), "reference", False).logps
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad[4:], padded[4:], rtol=2e-5, atol=1e-6)


def test_a_wrong_mask_would_be_caught(_fresh_seed):
    """The equality above can fail: letting rejected tokens see the chosen answer changes the result."""
    g = torch.Generator().manual_seed(_fresh_seed)
    model = tiny_model("llama", "sdpa")
    pairs = random_pairs(g)
    attach_head(model, head_options(TrainConfig()))
    shared = build("shared", pairs, range(4), pad_id=0)
    good = rows(model, shared, "reference", False).logps
    bad = rows(model, leaky(shared), "reference", False).logps
    assert torch.equal(bad[:4], good[:4])
    # Caught at the tolerance the equality tests use (a leak changes a row by about 1e-4 relative
    # or more in these tiny models, sometimes less than 1e-3: seed 4071078596).
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad[4:], good[4:], rtol=2e-5, atol=1e-6)


def test_layout_tokens_and_scoring():
    pair = PairTokens([5, 6, 7], [8, 9], [10])
    assert [layout_tokens(pair, k) for k in LAYOUTS] == [10, 9, 6]
    shared = build("shared", [pair], [3], pad_id=0)
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]  # rejected continues from the prompt
    # the last prompt token (position 2) scores the first token of both answers
    assert shared.scoring.positions.tolist() == [2, 3, 2] and shared.scoring.targets.tolist() == [8, 9, 10]
    assert shared.scoring.counts.tolist() == [2, 1] and (shared.tokens, shared.real_tokens) == (6, 9)
    ok = allowed(shared, None)
    assert not ok[5, 3] and not ok[5, 4] and ok[5, 2] and ok[4, 3] and not ok[2, 3]
    packed = build("packed", [pair], [3], pad_id=0)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert packed.scoring.positions.tolist() == [2, 3, 7] and packed.scoring.targets.tolist() == [8, 9, 10]


def test_empty_prompt_scores_nothing_before_the_first_token():
    pair = PairTokens([], [8, 9], [10, 11, 12])
    for kind in LAYOUTS:
        s = build(kind, [pair], [0], pad_id=0).scoring
        assert s.counts.tolist() == [1, 2] and s.targets.tolist() == [9, 11, 12], kind


def test_pairs_from_padded_round_trip():
    pairs = [PairTokens([5, 6], [7], [8, 9, 3]), PairTokens([4], [2, 2, 2], [1])]
    batch = build("padded", pairs, [0, 1], pad_id=0)
    completion = torch.zeros_like(batch.attention_mask)
    for r, (p, a) in enumerate([(x.prompt, x.chosen) for x in pairs] + [(x.prompt, x.rejected) for x in pairs]):
        completion[r, len(p):len(p) + len(a)] = 1
    assert pairs_from_padded(batch.input_ids, batch.attention_mask, completion) == [
        PairTokens(list(p.prompt), list(p.chosen), list(p.rejected)) for p in pairs]
    other = batch.input_ids.clone()
    other[2, 0] = 9  # pair 0's rejected row has another prompt
    with pytest.raises(ValueError, match="pair 0: the chosen and rejected rows have different prompts"):
        pairs_from_padded(other, batch.attention_mask, completion)


def test_unsupported_attention_is_named():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig()
    for flash in ("flash_attention_2", "kernels-community/flash-attn2"):  # varlen: packed, no custom mask
        config._attn_implementation = flash
        assert layout_support(LlamaForCausalLM, config, "packed") is None
        assert "cannot take a custom attention mask" in layout_support(LlamaForCausalLM, config, "shared")
    config._attn_implementation = "paged|eager"
    assert "cannot take packed sequences" in layout_support(LlamaForCausalLM, config, "packed")

    class OldStyle(torch.nn.Module):
        pass

    assert "does not use transformers' attention interface" in layout_support(OldStyle, config, "packed")


@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_is_the_dense_rule(window, _fresh_seed):
    """FlexAttention's mask function gives the same mask as the dense one that the sdpa / eager tests
    above check through the models, at every pair of tokens (test_flex_attention_layouts_equal_padded
    runs it through the models, forward)."""
    shared = build("shared", random_pairs(torch.Generator().manual_seed(_fresh_seed)), range(4), pad_id=0)
    n = shared.input_ids.shape[1]
    q, k = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    dense = shared_mask_mod(shared, window)(0, 0, q, k)
    assert torch.equal(dense, allowed(shared, window))
    if window:  # the window does cut attention in these pairs
        assert not torch.equal(allowed(shared, window), allowed(shared, None))


def test_the_head_refuses_bad_scoring_before_running_the_model():
    from fastdpo.layouts import Scoring

    model = tiny_model("llama", "sdpa")
    attach_head(model, head_options(TrainConfig()))
    batch = build("padded", random_pairs(torch.Generator().manual_seed(0)), range(4), pad_id=0)
    s = batch.scoring
    beyond = Scoring(s.positions + batch.input_ids.numel(), s.targets, s.offsets)
    with pytest.raises(ValueError, match=r"scored positions must lie in \[0, \d+\) for a batch of \(8, \d+\)"):
        model(input_ids=batch.input_ids, fastdpo_head="policy", fastdpo_scoring=beyond)
    with pytest.raises(ValueError, match="needs exactly one of fastdpo_scoring=, labels="):
        model(input_ids=batch.input_ids, labels=batch.input_ids, fastdpo_head="policy", fastdpo_scoring=s)


def test_a_scoring_is_checked_where_it_is_made_and_its_targets_in_the_head():
    from fastdpo.layouts import Scoring

    with pytest.raises(ValueError, match="offsets from 0 to 3 that never decrease"):
        Scoring(torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]), torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match=r"as many targets as positions \(2 vs 3\)"):
        Scoring(torch.tensor([0, 1, 2]), torch.tensor([5, 6]), torch.tensor([0, 3]))
    model = tiny_model("llama", "sdpa")
    attach_head(model, head_options(TrainConfig()))
    batch = build("padded", random_pairs(torch.Generator().manual_seed(0)), range(4), pad_id=0)
    s = batch.scoring
    beyond = Scoring(s.positions, s.targets.clone().fill_(VOCAB), s.offsets)  # a token the vocabulary lacks
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {VOCAB}\)"):
        model(input_ids=batch.input_ids, fastdpo_head="policy", fastdpo_scoring=beyond)


def test_the_head_checks_a_host_made_scoring_from_its_bounds_without_reading_the_device():
    """fastdpo's own batches are made on the host: the head range-checks positions and targets from
    the bounds read there (no wait for the device), and a Scoring keeps them through .to(). Shown
    here by bounds that disagree with the values: the head believes the bounds."""
    from fastdpo import validation
    from fastdpo.head import token_layout
    from fastdpo.layouts import Bounds

    model = tiny_model("llama", "sdpa")
    attach_head(model, head_options(TrainConfig()))
    batch = build("packed", random_pairs(torch.Generator().manual_seed(0)), range(4), pad_id=0)
    s = batch.scoring.to("cpu")
    size = batch.input_ids.numel()
    assert s.bounds == Bounds((int(s.positions.min()), int(s.positions.max())),
                              (int(s.targets.min()), int(s.targets.max())))
    assert s.bounds.positions[1] < size and s.bounds.targets[1] < VOCAB
    from dataclasses import replace

    assert replace(s, targets=s.targets + 1).bounds.targets == (s.bounds.targets[0] + 1, s.bounds.targets[1] + 1)

    calls = []  # the label op's calls that read the device back (check on)
    op = validation._token_labels
    validation._token_labels = lambda *a: (calls.append(a) if a[-1] else None) or op(*a)
    try:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, fastdpo_head="policy",
                    fastdpo_scoring=s)
        assert calls == [], "a host-made Scoring's targets were checked on the device"
        assert torch.isfinite(out.logps).all()
        claims_past_end = copy.copy(s)
        claims_past_end.bounds = Bounds((0, size), s.bounds.targets)
        with pytest.raises(ValueError, match=rf"scored positions must lie in \[0, {size}\)"):
            model(input_ids=batch.input_ids, position_ids=batch.position_ids, fastdpo_head="policy",
                  fastdpo_scoring=claims_past_end)
        claims_bad_target = copy.copy(s)
        claims_bad_target.bounds = Bounds(s.bounds.positions, (0, VOCAB))
        token_layout(claims_bad_target, VOCAB)
        assert len(calls) == 1, "targets whose bounds leave the vocabulary are checked on the device"
        token_layout(s, VOCAB)
        assert len(calls) == 1
    finally:
        validation._token_labels = op
