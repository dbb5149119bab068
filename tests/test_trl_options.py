"""TRL DPOConfig options beyond the loss type: f-divergences, WPO weighting (use_weighting), LD-DPO
(ld_alpha), and TRL's completion-token counts with an empty prompt, a one-token answer and a
truncated answer. "Same as TRL" is checked against TRL's own DPOTrainer (the pattern of
test_integration_trl.py); the formulas themselves against float64 implementations written here
from the papers and TRL's definitions."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from test_integration_trl import (  # noqa: F401  (fixtures)
    ATOL, BETA, RTOL, WORDS, VocabWideOps, assert_same_step, build, dataset, dpo_args, loss_grads_metrics, models_,
    assert_same_training, one_batch_pair, tokenizer, train_two_steps,
)

MODES = ["logits", "linear"]

OPTIONS = {
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "js_divergence": dict(f_divergence_type="js_divergence", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
                             loss_type=["ipo"]),
    "use_weighting": dict(use_weighting=True, loss_type=["sigmoid", "sigmoid_norm"], loss_weights=[1.0, 0.5]),
    "ld_alpha": dict(ld_alpha=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_two_steps_match_trl(option, mode, models_, tokenizer, dataset, tmp_path):
    overrides = OPTIONS[option]
    expected = train_two_steps(build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a", **overrides)))
    actual = train_two_steps(build("fast", models_, tokenizer, dataset, dpo_args(tmp_path / "b", **overrides),
                                   mode=mode))
    # the update is a difference of fp32 parameters: one ulp of a weight near 1 (2^-23) whatever the gradient
    assert_same_training(expected, actual, update_atol=2.0**-23)



# ---- TRL's completion-token counts: empty prompt, one-token answer, truncated answer ------------
@pytest.fixture(scope="module")
def edge_dataset():
    """Row 0: empty prompt (its first completion token is at position 0, which no label scores, and
    TRL's ipo / sigmoid_norm still count it); row 1: one-token answers; row 2: answers cut by
    max_length; row 3: an ordinary pair."""
    w = lambda *ids: " ".join(WORDS[i] for i in ids)  # noqa: E731
    rows = [
        {"prompt": "", "chosen": w(1, 2, 3), "rejected": w(4, 5)},
        {"prompt": w(6, 7), "chosen": " " + w(8), "rejected": " " + w(9)},
        {"prompt": w(10), "chosen": " " + w(*range(11)), "rejected": " " + w(*range(3, 15))},
        {"prompt": w(1, 3), "chosen": " " + w(5, 7), "rejected": " " + w(2, 4, 6)},
    ]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss_type", [["ipo"], ["sigmoid_norm"], ["ipo", "sigmoid_norm", "sft"]])
@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_length_normalized_counts_match_trl(loss_type, truncation, mode, models_, tokenizer, edge_dataset, tmp_path):
    args = dict(loss_type=loss_type, max_length=8, truncation_mode=truncation)
    trl_trainer = build("trl", models_, tokenizer, edge_dataset, dpo_args(tmp_path / "a", **args))
    fast_trainer = build("fast", models_, tokenizer, edge_dataset, dpo_args(tmp_path / "b", **args), mode=mode)
    batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(4)])
    mask = batch["completion_mask"]
    assert mask[0, 0] == 1 and (mask.sum(-1) == 2).any()  # the empty prompt; a one-token answer (and its EOS)
    if truncation == "keep_start":
        assert mask[2, -1] == 1 and mask[6, -1] == 1  # answers cut by max_length
    else:  # keep_end cuts from the left: the long rows keep only completion tokens, from position 0
        assert mask[2].all() and mask[6].all()
    assert_same_step(loss_grads_metrics(trl_trainer, batch), loss_grads_metrics(fast_trainer, batch), loss_type)


# ---- LD-DPO against its definition, and TRL's precompute with it --------------------------------
def ld_logps64(model, batch, alpha):
    """LD-DPO (Liu et al., 2024, arXiv:2409.06411) as TRL 1.16 defines it, float64 from the logits: a
    row's first l_p scored tokens count fully and the rest with weight alpha, l_p the smaller
    number of scored tokens of the pair's two answers."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    scored = batch["completion_mask"][:, 1:].bool()
    P = scored.shape[0] // 2
    lengths = scored.sum(-1)
    shared = torch.minimum(lengths[:P], lengths[P:]).repeat(2)
    out = torch.zeros(scored.shape[0], dtype=torch.float64)
    for b in range(scored.shape[0]):
        tokens = logp[b][scored[b]]
        out[b] = tokens[: shared[b]].sum() + alpha * tokens[shared[b]:].sum()
    return out


@pytest.mark.parametrize("mode", MODES)
def test_ld_alpha_matches_float64_definition(mode, models_, tokenizer, dataset, tmp_path):
    alpha = 0.25
    trainer = build("fast", models_, tokenizer, dataset, dpo_args(tmp_path, ld_alpha=alpha), mode=mode)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    P = batch["input_ids"].shape[0] // 2
    lengths = batch["completion_mask"][:, 1:].sum(-1)
    assert (lengths[:P] != lengths[P:]).all()  # every pair has a tail to weight
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    logps, ref = ld_logps64(trainer.model, batch, alpha), ld_logps64(trainer.ref_model, batch, alpha)
    d = (logps[:P] - ref[:P]) - (logps[P:] - ref[P:])
    assert loss.item() == pytest.approx(F.softplus(-BETA * d).mean().item(), rel=1e-5)
    assert trainer._metrics["train"]["logps/chosen"][-1] == pytest.approx(logps[:P].mean().item(), rel=1e-5)


def test_ld_alpha_precompute_matches_trl(models_, tokenizer, dataset, tmp_path):
    args = dict(ld_alpha=0.4, precompute_ref_log_probs=True)
    trainers = [build(kind, models_, tokenizer, dataset, dpo_args(tmp_path / kind, **args)) for kind in ("trl", "fast")]
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        expected, actual = (torch.tensor(t.train_dataset[column]) for t in trainers)
        torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif("linear" not in MODES, reason="no fused-linear op in this build")
def test_wpo_linear_mode_builds_gradients_in_the_forward(models_, tokenizer, dataset, tmp_path, monkeypatch):
    """WPO's weights enter the loss gradient of each pair group inside the fused-linear forward: no
    recomputation (6 N H V), and the step still equals TRL's."""
    from fastdpo import linear_chunks

    recomputed = []
    recompute = linear_chunks.backward
    monkeypatch.setattr(linear_chunks, "backward", lambda *a, **k: recomputed.append(1) or recompute(*a, **k))
    args = dict(use_weighting=True, loss_type=["sigmoid"])
    trl_trainer = build("trl", models_, tokenizer, dataset, dpo_args(tmp_path / "a", **args))
    fast_trainer = build("fast", models_, tokenizer, dataset, dpo_args(tmp_path / "b", **args), mode="linear")
    batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(4)])
    assert_same_step(loss_grads_metrics(trl_trainer, batch), loss_grads_metrics(fast_trainer, batch))
    assert not recomputed


@pytest.mark.parametrize("mode", MODES)
def test_wpo_takes_no_second_pass(mode, models_, tokenizer, dataset, tmp_path):
    """WPO's log sum_v p_v^2 comes from the pass that gives the log-probs: besides fastdpo's ops only
    the projection of "logits" mode (policy, reference) makes vocabulary-wide tensors, none in "linear"."""
    trl_trainer, fast_trainer, batch = one_batch_pair(models_, tokenizer, dataset, tmp_path, dict(mode=mode),
                                                      use_weighting=True)
    expected = loss_grads_metrics(trl_trainer, batch)
    with VocabWideOps(len(tokenizer)) as seen:
        actual = loss_grads_metrics(fast_trainer, batch)
    assert seen.ops == (["aten::mm", "aten::mm"] if mode == "logits" else []), seen.ops
    assert_same_step(expected, actual)
