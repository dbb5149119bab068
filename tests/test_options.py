"""The contract between the public API, the custom ops and the kernels: one options object per pass,
flattened at the op boundary in one order, and results read by name."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from fastdpo.kernels import SlabResults, TokenOptions, TokenResults
from fastdpo.linear_chunks import LinearOptions, RowResults
from fastdpo.logps import LogitsOptions

OPTIONS = [TokenOptions, LogitsOptions, LinearOptions]


def distinct_values(cls) -> dict:
    """A value for every field that differs from its default, so a swapped or dropped field shows."""
    values = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        default = f.default
        if isinstance(default, bool):
            values[f.name] = not default
        elif f.name == "softcap":
            values[f.name] = 7.5
        else:
            values[f.name] = type(default)(default + 3 + i)
    return values


@pytest.mark.parametrize("cls", OPTIONS, ids=lambda c: c.__name__)
def test_flatten_round_trips_every_field(cls):
    values = distinct_values(cls)
    options = cls(**values)
    flat = options.flatten()
    assert len(flat) == cls.arity() == len(values)
    assert cls.unflatten(flat) == options
    assert {f.name: v for f, v in zip(dataclasses.fields(cls), flat)} == values
    assert cls.from_op_inputs(("a tensor", "another", *flat)) == options
    assert cls.from_params({"labels": "not an option", **values}) == options
    with pytest.raises(ValueError, match="fields"):
        cls.unflatten(flat[:-1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.inv_temp = 2.0


def test_subclasses_extend_the_kernel_options():
    """The kernels read the TokenOptions part of either pass's options, at the same positions."""
    base = [f.name for f in dataclasses.fields(TokenOptions)]
    for cls in (LogitsOptions, LinearOptions):
        assert [f.name for f in dataclasses.fields(cls)][: len(base)] == base


def _schema(op) -> torch.FunctionSchema:
    return op._opoverload._schema


def _ops():
    import fastdpo.linear_ops as L
    import fastdpo.logps as P

    logits = [P.token_logps_op, P.token_logps_backward_op, P.token_logps_backward_inplace_op]
    linear = [L.linear_logps, L.linear_logps_backward, L.linear_logps_grad_in_forward, L.linear_logps_finish_]
    return [(op, LogitsOptions) for op in logits] + [(op, LinearOptions) for op in linear]


@pytest.mark.parametrize("op,cls", _ops(), ids=lambda x: str(getattr(x, "_name", "")))
def test_ops_take_the_flattened_options_last(op, cls):
    """Each op's last parameters are its options' fields, in `flatten`'s order, with matching types."""
    args = _schema(op).arguments[-cls.arity():]
    assert [a.name for a in args] == [f.name for f in dataclasses.fields(cls)]
    types = {float: "float", bool: "bool", int: "int"}
    for a, f in zip(args, dataclasses.fields(cls)):
        want = "Optional[float]" if f.name == "softcap" else types[type(f.default)]
        assert str(a.type) == want, (a.name, str(a.type))


def test_op_outputs_follow_the_named_results():
    import fastdpo.linear_ops as L
    import fastdpo.logps as P

    assert len(_schema(P.token_logps_op).returns) == len(TokenResults._fields)
    assert len(_schema(L.linear_logps).returns) == len(RowResults._fields)
    assert len(_schema(L.linear_logps_grad_in_forward).returns) == len(RowResults._fields) + len(L.GuessedGrads._fields)
    # Row results are the token results summed per row: the same names in the same order.
    assert RowResults._fields == TokenResults._fields
    assert SlabResults._fields[1:-1] == TokenResults._fields[1:]


def test_op_outputs_are_distinct_tensors_in_field_order():
    from fastdpo.logps import op_outputs

    logps = torch.zeros(3)
    results = TokenResults(logps=logps, state=None, score_sums=torch.ones(3), entropy=None, top1=None, log_sum_sq=None)
    out = op_outputs(results, logps)
    assert len(out) == len(TokenResults._fields)
    assert out[0] is logps and out[2] is results.score_sums
    empties = [x for x, r in zip(out, results) if r is None]
    assert all(x.numel() == 0 for x in empties)
    assert len({x.data_ptr() for x in empties if x.data_ptr()} | {id(x) for x in empties}) == len(empties)
    assert TokenResults._make(out).score_sums is results.score_sums


@pytest.mark.parametrize("name", ["token_logps_forward", "token_slab_forward", "token_logps_backward"])
def test_backends_share_one_signature(name):
    """fastdpo.backend hands either module to the same callers."""
    import inspect

    from fastdpo import kernels, torch_backend

    kernel, twin = (inspect.signature(getattr(m, name), eval_str=True) for m in (kernels, torch_backend))
    assert kernel == twin


def test_contract_imports_without_triton():
    """The PyTorch backend shares the contract on machines without Triton: with `import triton`
    failing, fastdpo.kernels still gives the contract, and the log-probs run on PyTorch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastdpo\n"
        "from fastdpo.kernels import TokenOptions, TokenResults\n"
        "import fastdpo.kernels as k; assert not hasattr(k, 'token_logps_forward')\n"
        "from fastdpo.torch_backend import token_logps_forward\n"
        "out = token_logps_forward(torch.randn(1, 2, 5), torch.tensor([1, -1], dtype=torch.int32), TokenOptions())\n"
        "assert isinstance(out, TokenResults) and out.logps.shape == (2,)\n"
    )
    env = {"FASTDPO_BACKEND": "torch", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
