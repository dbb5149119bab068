"""Large shapes on a GPU (collected only when CUDA is present; see conftest.py).

The shapes A and C of benchmarks/common.py (Llama-3-8B and Qwen2.5-7B heads), N * V > 2^31, long rows and a 262144 vocabulary, against a float64
reference computed chunk by chunk so that it fits next to the inputs.
"""

import pytest
import torch

import fastdpo
from fastdpo.eager import chunked_logps64
from oracle64 import CONFIDENT_GAPS, assert_close_rel, confident_logits, not_label_mass64


def grad64_rows(logits, labels, mask, g, rows):
    """Float64 gradient of sum_b g_b * logps_b at a few (b, t) positions."""
    out = []
    for b, t in rows:
        s = logits[b, t].double()
        p = torch.softmax(s, 0)
        d = -p
        d[labels[b, t]] += 1
        out.append(d * g[b] * mask[b, t])
    return torch.stack(out)


@pytest.mark.parametrize(
    "P,T,V",
    [(4, 1024, 128256), (4, 2048, 151936), (1, 8192, 32000), (1, 2048, 262144)],
    ids=["A", "C (N*V > 2^31)", "T=8192", "V=262144"],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_large_shapes(P, T, V, inplace):
    torch.manual_seed(0)
    logits = (4 * torch.randn(2 * P, T, V, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, V, (2 * P, T), device="cuda")
    mask = torch.rand(2 * P, T, device="cuda") > 0.35
    expected = chunked_logps64(logits, labels, mask)
    y = logits.clone().requires_grad_() * 1  # a non-leaf, whose storage the in-place backward reuses
    out = fastdpo.sequence_logps(y, labels, mask=mask, inplace_backward=inplace)
    assert_close_rel(out, expected, 1e-6, "logps")
    g = torch.randn(2 * P, device="cuda")
    (grad,) = torch.autograd.grad(out, y, g)
    picks = [(0, 0), (2 * P - 1, T - 1), (P, T // 2), (1 % (2 * P), 7)]
    got = torch.stack([grad[b, t].double() for b, t in picks])
    assert_close_rel(got, grad64_rows(logits, labels, mask, g, picks), 8e-3, "grad rows")
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("P,T,V,rows", [(8, 1024, 32000, 2), (8, 1024, 32000, 4), (8, 1024, 32000, 8),
                                        (4, 2048, 151936, 4)],
                         ids=["B-2-rows", "B-4-rows", "B-8-rows", "C-4-rows (N*V > 2^31)"])
def test_several_rows_a_program_at_large_shapes(P, T, V, rows):
    """The [rows, tile] launch setting on the compiled kernels: log-probs against float64 (N * V past
    2^31 at C, where a row offset in int32 would wrap), the saved state beside the one-row-a-program
    kernels' (fp32 rounding: the tiles sum in another order), and the whole gradient from the same
    state equal to theirs up to one bf16 rounding step, masked rows exactly zero."""
    from fastdpo.kernels import token_logps as K

    torch.manual_seed(0)
    logits = (4 * torch.randn(2 * P, T, V, device="cuda")).to(torch.bfloat16)
    labels = torch.randint(0, V, (2 * P, T), device="cuda")
    mask = torch.rand(2 * P, T, device="cuda") > 0.35
    flat = torch.where(mask, labels, -1).view(-1).to(torch.int32)
    got = K.token_logps_forward(logits, flat, rows_per_program=rows)
    logps = got.logps.view(2 * P, T).sum(-1)
    assert_close_rel(logps, chunked_logps64(logits, labels, mask), 1e-6, "logps")
    one = K.token_logps_forward(logits, flat)
    assert_close_rel(got.state, one.state, 1e-6, "state")
    g = torch.randn(2 * P * T, device="cuda")
    grad = K.token_logps_backward(logits, flat, one.state, g, rows_per_program=rows).float()
    want = K.token_logps_backward(logits, flat, one.state, g).float()
    assert ((grad - want).abs() <= 2**-7 * want.abs()).all(), "gradient differs by more than one bf16 rounding"
    assert (grad.view(2 * P, T, V)[~mask] == 0).all()


@pytest.mark.parametrize("V", [128256, 262144])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_confident_tokens_at_large_vocab(V, dtype):
    """1 - p_label down to 1e-7 over long vocabularies (many tiles) on the compiled kernels: the
    saved 1 - p_label to fp32 rounding, the label column's gradient to the logits' rounding."""
    torch.manual_seed(0)
    rows = 4 * len(CONFIDENT_GAPS)
    gaps = torch.tensor(CONFIDENT_GAPS * 4, dtype=torch.float64)
    labels = torch.randint(0, V, (rows,), device="cuda")
    logits = confident_logits(labels, V, gaps).to(dtype).view(2, rows // 2, V)  # rounding moves the gaps a little
    want = not_label_mass64(logits.view(rows, V), labels)
    from fastdpo.backend import get_backend

    state = get_backend(logits.device).token_logps_forward(logits, labels.to(torch.int32)).state
    rel = ((state[:, 1].double() - want) / want).abs().max().item()
    assert rel < 1e-5, f"saved 1 - p_label: relative error {rel:.2g}"
    x = logits.clone().requires_grad_()
    g = torch.randn(2, device="cuda")
    (grad,) = torch.autograd.grad(fastdpo.sequence_logps(x, labels.view(2, -1)), x, g)
    label_grad = grad.view(rows, V).gather(1, labels[:, None]).squeeze(1).double()
    expected = g.double().repeat_interleave(rows // 2) * want
    err = ((label_grad - expected) / expected).abs().max().item()
    assert err < (8e-3 if dtype == torch.bfloat16 else 1e-5), f"label column gradient: relative error {err:.2g}"


def _syncs(fn) -> list[str]:
    """file:line of each host-device synchronization torch's sync debug mode sees during fn()."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


def test_from_logits_step_never_waits_with_value_checks_off():
    """Checks off, a from-logits step queues its work without waiting for the GPU: the host can
    run ahead of the model's forward, as it does without fastdpo."""
    logits = torch.randn(8, 256, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (8, 256), device="cuda")
    mask = torch.rand(8, 256, device="cuda") > 0.3
    ref = -100 * torch.rand(8, device="cuda")

    def step():
        with fastdpo.value_checks(False):
            fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask).backward()

    step()  # compile the kernels outside the watched span
    assert _syncs(step) == []
    assert len(_syncs(lambda: fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask).backward())) == 1


def test_fused_linear_waits_once_per_pass_not_per_pair():
    """grad_in_forward: one read of the token layout in the forward and one of the gradient check
    in the backward, however many pair groups the forward walks through."""
    hidden = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(32000, 512, device="cuda") / 8).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32000, (8, 256), device="cuda")
    mask = torch.rand(8, 256, device="cuda") > 0.3

    def step():
        with fastdpo.value_checks(False):
            loss = fastdpo.fused_linear_dpo_loss(hidden, weight, labels, torch.zeros(8, device="cuda"), mask=mask,
                                                 grad_in_forward=True, chunk_size=256)  # 4 groups of one pair
            torch.autograd.grad(loss, (hidden, weight))

    step()
    assert len(_syncs(step)) == 2, _syncs(step)


def test_a_trainer_step_through_the_head_never_waits_with_checks_on():
    """fastdpo's own batches carry host bounds, so the model head's position and target checks
    (value checks on, the default) read nothing back from the GPU in the fused path."""
    from test_layouts import random_pairs, tiny_model

    from fastdpo.layouts import build
    from fastdpo.trainer.config import TrainConfig
    from fastdpo.trainer.loss import attach_head, head_options

    model = tiny_model("llama", "sdpa").cuda()
    attach_head(model, head_options(TrainConfig()))
    batch = build("packed", random_pairs(torch.Generator().manual_seed(0)), range(4), pad_id=0).to("cuda")
    assert batch.scoring.bounds is not None

    def step():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, fastdpo_head="policy",
                    fastdpo_scoring=batch.scoring)
        out.logps.sum().backward()

    step()  # compile the kernels outside the watched span
    assert fastdpo.validation.value_checks_enabled()
    assert [s for s in _syncs(step) if s.split(":")[0] in ("head.py", "validation.py", "layouts.py")] == []
