"""torch.compile(fullgraph=True) of a training step through each loss entry point: one graph, eager numbers.

fullgraph=True turns any graph break into an error, and a counting backend checks that one graph
is compiled and reused. aot_eager runs Dynamo, AOTAutograd and functionalization (where breaks
and custom-op mistakes show) without a C++ compile; one test also goes through Inductor.
"""

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import fastdpo
import fastdpo.linear_chunks
from oracle64 import assert_close_rel


@pytest.fixture(autouse=True)
def torch_backend_only(monkeypatch):
    monkeypatch.setenv("FASTDPO_BACKEND", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Step(torch.nn.Module):
    """A tiny policy: hidden = tanh(body(x)), logits = head(hidden)."""

    def __init__(self, H=8, V=23):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V)


def batch(P=2, T=6, H=8, V=23):
    x = torch.randn(2 * P, T, H)
    labels = torch.randint(0, V, (2 * P, T))
    mask = torch.rand(2 * P, T) > 0.3
    mask[:, 0] = False
    return x, labels, mask, -10 * torch.rand(2 * P)


def counting(backend_name):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend(backend_name)(gm, example_inputs)

    return backend, graphs


def run(step_fn, model, args):
    """Loss, metrics and parameter gradients of one step."""
    model.zero_grad(set_to_none=True)
    loss, metrics = step_fn(model, *args)
    loss.backward()
    return loss.detach(), metrics, [p.grad.clone() for p in model.parameters()]


def assert_same(compiled, eager, rel=1e-6):
    (loss_c, metrics_c, grads_c), (loss_e, metrics_e, grads_e) = compiled, eager
    assert_close_rel(loss_c, loss_e, rel, "loss")
    for name in metrics_e:
        assert_close_rel(metrics_c[name], metrics_e[name], rel, name)
    for gc, ge in zip(grads_c, grads_e):
        assert_close_rel(gc, ge, rel, "parameter gradient")


def logits_step(model, x, labels, mask, ref, inplace=False):
    logits = model.head(torch.tanh(model.body(x)))
    return fastdpo.fused_dpo_loss(logits, labels, ref, mask=mask, softcap=5.0, return_metrics=True,
                                  inplace_backward=inplace)


def linear_step(model, x, labels, mask, ref, grad_in_forward=None, vocab_chunk_size=None):
    hidden = torch.tanh(model.body(x))
    return fastdpo.fused_linear_dpo_loss(hidden, model.head.weight, labels, ref, bias=model.head.bias, mask=mask,
                                         return_metrics=True, chunk_size=4, temperature=0.9,
                                         grad_in_forward=grad_in_forward, vocab_chunk_size=vocab_chunk_size)


@pytest.mark.parametrize("step_fn,options", [
    (logits_step, {}),
    (logits_step, {"inplace": True}),  # compiled: the out-of-place backward is used
    (linear_step, {"grad_in_forward": True}),
    (linear_step, {"grad_in_forward": False}),
    (linear_step, {"grad_in_forward": False, "vocab_chunk_size": 7}),
], ids=["logits", "logits-inplace", "linear-grad_in_forward", "linear-recompute", "linear-vocab-slabs"])
def test_fullgraph_step_matches_eager(step_fn, options):
    model = Step()
    backend, graphs = counting("aot_eager")
    compiled = torch.compile(lambda m, *a: step_fn(m, *a, **options), fullgraph=True, backend=backend)
    for _ in range(2):  # a second batch of the same shapes reuses the graph
        args = batch()
        assert_same(run(compiled, model, args), run(lambda m, *a: step_fn(m, *a, **options), model, args))
    assert len(graphs) == 1


def test_a_beta_schedule_compiles_with_the_recomputing_backward():
    """A beta that changes between calls is traced as a value (after the first change), not a
    constant: the recomputing path takes it in one reused graph (what the README advises for
    fused_linear_dpo_loss, whose grad-in-forward op needs the loss options as constants)."""
    model = Step()
    backend, graphs = counting("aot_eager")

    def step(m, x, labels, mask, ref, beta):
        hidden = torch.tanh(m.body(x))
        return fastdpo.fused_linear_dpo_loss(hidden, m.head.weight, labels, ref, bias=m.head.bias, mask=mask, beta=beta,
                                             return_metrics=True, chunk_size=4, grad_in_forward=False)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for beta in (0.1, 0.2, 0.3, 0.4):
        args = (*batch(), beta)
        assert_same(run(compiled, model, args), run(step, model, args))
    assert len(graphs) <= 2  # the first constant beta, then one graph for every later value


def test_compiled_grad_in_forward_only_scales(monkeypatch):
    """Under compile too, the grad-in-forward backward scales the forward's buffers, no recompute."""
    model = Step()
    compiled = torch.compile(lambda m, *a: linear_step(m, *a, grad_in_forward=True), fullgraph=True,
                             backend="aot_eager")
    args = batch()
    eager = run(linear_step, model, args)

    def recompute(*a, **k):
        raise AssertionError("the backward recomputed the logits")

    monkeypatch.setattr(fastdpo.linear_chunks, "backward", recompute)
    assert_same(run(compiled, model, args), eager)


def test_packed_linear_step_compiles():
    """cu_seqlens (its value checks run inside a custom op) under fullgraph compile."""
    model = Step()
    x, labels, mask, ref = batch()
    cu = torch.tensor([0, 5, 9, 16, 24], dtype=torch.int32)
    flat = lambda t: t.reshape(1, -1, *t.shape[2:])  # noqa: E731

    def step(m, x, labels, mask, ref):
        hidden = torch.tanh(m.body(x))
        return fastdpo.fused_linear_dpo_loss(hidden, m.head.weight, labels, ref, bias=m.head.bias, mask=mask,
                                             cu_seqlens=cu, return_metrics=True, chunk_size=5)

    args = (flat(x), flat(labels), flat(mask), ref)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, model, args), run(step, model, args))


def test_inductor_linear_step():
    """The full default stack (Inductor) on the fused-linear step with its mutating backward op."""
    model = Step()
    args = batch()
    compiled = torch.compile(linear_step, fullgraph=True)
    assert_same(run(compiled, model, args), run(linear_step, model, args), rel=1e-5)


@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["grad_in_forward", "recompute"])
def test_linear_token_metrics_compile(grad_in_forward):
    """linear_sequence_stats(token_metrics=True) under fullgraph compile: the fake outputs of both
    fused-linear ops carry the entropy sums and top-1 counts, and the numbers are eager's."""
    from fastdpo.linear import linear_sequence_stats
    from fastdpo.losses import LossConfig

    model = Step()
    args = batch()
    spec = LossConfig(loss_type="sigmoid", beta=0.1).encode()

    def step(m, x, labels, mask, ref):
        stats = linear_sequence_stats(torch.tanh(m.body(x)), m.head.weight, labels, bias=m.head.bias, mask=mask,
                                      token_metrics=True, chunk_size=4,
                                      grad_spec=(spec, ref) if grad_in_forward else None)
        tokens = stats.counts.clamp(min=1)  # per-row means: in-graph uses of the fake shapes
        return stats.logps.sum(), {"entropy": stats.entropy_sums / tokens, "accuracy": stats.top1_counts / tokens}

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, model, args), run(step, model, args))


def test_unchecked_step_compiles():
    """value_checks(False) around a fullgraph-compiled step: one graph, the eager numbers."""
    model = Step()
    backend, graphs = counting("aot_eager")
    compiled = torch.compile(logits_step, fullgraph=True, backend=backend)
    with fastdpo.value_checks(False):
        for _ in range(2):
            args = batch()
            assert_same(run(compiled, model, args), run(logits_step, model, args))
    assert len(graphs) == 1
