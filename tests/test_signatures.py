"""The public entry points agree on their keyword options: one name, one default, one annotation.

fused_dpo_loss is the source of truth for the options every entry point shares; the eager
implementation takes exactly its parameters, fused_linear_dpo_loss shares all but the logits-only
ones, and each Module takes exactly its function's parameters, split between __init__ (options)
and forward (tensors).
"""

import inspect

import pytest

import fastdpo
import fastdpo.reference
from fastdpo.eager import eager_dpo_loss

LOGITS_ONLY = {"policy_logits", "ref_logits", "inplace_backward"}
LINEAR_ONLY = {"hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias", "chunk_size", "vocab_chunk_size",
               "grad_in_forward"}


def params(fn) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(fn).parameters.items() if name != "self"}


def described(p: inspect.Parameter) -> tuple:
    return p.kind if p.kind != p.KEYWORD_ONLY else "keyword", p.default, str(p.annotation)


def test_eager_takes_the_fused_contract():
    assert {n: described(p) for n, p in params(eager_dpo_loss).items()} == \
        {n: described(p) for n, p in params(fastdpo.fused_dpo_loss).items()}
    assert fastdpo.reference.reference_dpo_loss is eager_dpo_loss  # the former name stays importable


def test_linear_shares_every_common_option():
    fused, linear = params(fastdpo.fused_dpo_loss), params(fastdpo.fused_linear_dpo_loss)
    assert set(fused) - LOGITS_ONLY == set(linear) - LINEAR_ONLY
    for name in set(fused) - LOGITS_ONLY - {"labels", "ref_logps"}:
        assert described(fused[name]) == described(linear[name]), name


@pytest.mark.parametrize("module,fn", [(fastdpo.FusedDPOLoss, fastdpo.fused_dpo_loss),
                                       (fastdpo.FusedLinearDPOLoss, fastdpo.fused_linear_dpo_loss)],
                         ids=["fused", "fused_linear"])
def test_module_declares_its_function_options(module, fn):
    init, forward, function = params(module.__init__), params(module.forward), params(fn)
    assert not (set(init) & set(forward)), "an option declared in both __init__ and forward"
    for name, p in function.items():
        if name in ("loss_options",):
            assert init[name].kind == p.VAR_KEYWORD
            continue
        side = init if name in init else forward
        assert name in side, f"{module.__name__} does not declare {name}"
        if p.default is not p.empty:
            assert side[name].default == p.default and str(side[name].annotation) == str(p.annotation), name
    assert (set(init) | set(forward)) - {"overrides"} == set(function)
    assert "beta: 'float' = 0.1" in str(inspect.signature(module))  # what help() shows
