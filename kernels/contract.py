"""What a token log-prob backend takes and returns, by name (kernels/token_logps.py for the math).

Both backends (the Triton launchers in kernels/token_logps.py and their PyTorch twin in
fastdpo/torch_backend.py) take one `TokenOptions` and return a `TokenResults` (or, for one
vocabulary slab of wider rows, a `SlabResults`), so that every caller reads a result by its name
and no caller counts positions. Plain types, with nothing of Triton in them: the PyTorch backend
imports them on machines without Triton.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, NamedTuple, Sequence

import torch


@dataclass(frozen=True)
class TokenOptions:
    """What one pass over token rows computes: scores s = softcap * tanh(z / softcap) * inv_temp
    (no tanh without a softcap), and which statistics besides the label log-probs.

    Custom ops take scalars, not objects: a caller passes `flatten()` (the fields' values in
    declaration order, subclasses appending theirs) as an op's last arguments, and the op rebuilds
    the options from its parameters by name (`from_params`); `unflatten` is the positional inverse
    for what sees the op's inputs as a tuple (fake implementations, autograd's setup). An op lists
    its option parameters in field order, which tests/test_options.py checks on each op's schema.
    """

    inv_temp: float = 1.0
    softcap: float | None = None
    sum_scores: bool = False  # sum_v s_nv (TRL's logits/* metrics)
    token_metrics: bool = False  # entropy and is-top-1 (TRL's entropy, mean_token_accuracy)
    log_sum_sq: bool = False  # log sum_v p_v^2 (WPO's weights)
    save_lse: bool = True  # the backward state (logsumexp, 1 - p_label)

    def flatten(self) -> tuple:
        """The fields' values in declaration order: the options as a custom op takes them."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def unflatten(cls, flat: Sequence) -> "TokenOptions":
        """The inverse of `flatten`: options from the values of their fields, in order."""
        if len(flat) != cls.arity():
            raise ValueError(f"{cls.__name__} has {cls.arity()} fields, got {len(flat)} values")
        return cls(*flat)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TokenOptions":
        """The options from a custom op's parameters, by their names (the op passes its `locals()`
        first thing), so that the op's body does not depend on where its options stand."""
        return cls(**{f.name: params[f.name] for f in fields(cls)})

    @classmethod
    def arity(cls) -> int:
        """How many values `flatten` gives."""
        return len(fields(cls))

    @classmethod
    def from_op_inputs(cls, inputs: Sequence) -> "TokenOptions":
        """The options of a custom op whose inputs end with the flattened options."""
        return cls.unflatten(tuple(inputs[len(inputs) - cls.arity():]))


class TokenResults(NamedTuple):
    """A forward's per-token results [N] (N = B * T token rows, masked rows 0); None unless asked
    for by the options. Iteration follows this order, which is the order of a custom op's outputs."""

    logps: torch.Tensor  # log p(label) of each token
    state: torch.Tensor | None  # [N, 2] backward state: logsumexp, 1 - p_label (save_lse)
    score_sums: torch.Tensor | None  # sum_v s_nv (sum_scores)
    entropy: torch.Tensor | None  # entropy of softmax(s_n) (token_metrics)
    top1: torch.Tensor | None  # 1 where the label is the first argmax, else 0 (token_metrics)
    log_sum_sq: torch.Tensor | None  # log sum_v p_v^2 (log_sum_sq)


class SlabResults(NamedTuple):
    """The forward of the vocabulary columns [o, o + V) of wider rows (o = label_offset), per token;
    the statistics are the slab's own, relative to its logsumexp (linear_chunks.merge_slabs merges
    them into a TokenResults)."""

    label_scores: torch.Tensor  # the label's score, 0 where the label is in another slab
    state: torch.Tensor  # [N, 2]: the slab's logsumexp, its mass that is not the label (1 outside)
    score_sums: torch.Tensor | None
    entropy: torch.Tensor | None
    top1: torch.Tensor | None
    log_sum_sq: torch.Tensor | None
    max_scores: torch.Tensor | None  # the slab's max score (token_metrics), to merge top1

    @classmethod
    def of(cls, results: TokenResults, max_scores: torch.Tensor | None) -> "SlabResults":
        """A slab's results from a backend's forward over it, whose `logps` hold the label scores."""
        return cls(label_scores=results.logps, state=results.state, score_sums=results.score_sums,
                   entropy=results.entropy, top1=results.top1, log_sum_sq=results.log_sum_sq, max_scores=max_scores)


def backward_state(state: torch.Tensor, n: int) -> torch.Tensor:
    """The forward's backward state as a backward reads it: contiguous [n, 2], else a clear error."""
    if state.shape != (n, 2):
        raise ValueError(f"state must be the forward's [{n}, 2] backward state (logsumexp, 1 - p_label), "
                         f"got {tuple(state.shape)}")
    return state.contiguous()
