"""Batch layouts of preference pairs through a causal LM: padded, padding-free, shared prompt.

A pair is (prompt, chosen, rejected) token ids. Each layout is one model input plus the list of
positions that score a token, grouped into rows in the order every loss expects: the P chosen
answers, then the P rejected ones ([chosen; rejected], pair i = rows i and i + P).

    padded   [2P, T]  rows prompt+chosen and prompt+rejected, right-padded; a 2D padding mask.
    packed   [1, N]   the same 2P sequences one after another, no padding; position ids restart
                      at 0 for each sequence, so the model keeps attention inside each sequence.
    shared   [1, N]   each pair once, as [prompt, chosen, rejected]: the prompt is computed once for
                      both answers. Rejected positions continue from the prompt's end (as if the
                      chosen answer were not there) and rejected tokens never attend chosen ones
                      (the model gets a custom mask, see fastdpo.attention).

Scoring follows next-token prediction inside each sequence: the token at index i of a sequence is
scored by the position at index i - 1, so the last prompt token scores the first answer token (in
the shared layout it scores the first token of both answers, which is why scoring is a list of
(position, target) rather than shifted labels). A completion token with nothing before it (an empty
prompt) is not scored, as in every causal LM trainer.

Layouts only arrange token ids; they know nothing of a model, and all three give the same per-row
sums (tests/test_layouts.py checks it against the padded layout, forward and backward).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

KINDS = ("padded", "packed", "shared")


@dataclass(frozen=True)
class PairTokens:
    """Token ids of one preference pair (completions already truncated)."""

    prompt: Sequence[int]
    chosen: Sequence[int]
    rejected: Sequence[int]


@dataclass(frozen=True)
class Bounds:
    """The ranges of a Scoring's positions and targets, read where they were on the host (free there),
    so that the model head checks them against the batch and the vocabulary without waiting for
    the device. Empty ranges are (0, -1)."""

    positions: tuple[int, int]
    targets: tuple[int, int]


@dataclass
class Scoring:
    """Which positions score which tokens, row by row.

    positions: int64 [M] flat indices into the model input ([R, T] read row-major) that score a token.
    targets:   int64 [M] the token each of those positions scores.
    offsets:   int64 [rows + 1]: row r owns entries offsets[r] : offsets[r + 1] (rows [chosen; rejected]).
    bounds:    the ranges of positions and targets, read when the Scoring is made on the host
               (and kept by `to`); None for one made on a device, whose values the head reads.
               They describe the tensors they were read from: change a moved Scoring's tensors
               only by making it again on the host.
    """

    positions: torch.Tensor
    targets: torch.Tensor
    offsets: torch.Tensor
    bounds: Bounds | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Checked where a Scoring is made on the host (free there); the model head trusts them.
        if self.offsets.device.type != "cpu":
            return
        n = self.positions.numel()
        if self.targets.numel() != n or self.offsets.numel() < 2 or int(self.offsets[0]) != 0 \
                or int(self.offsets[-1]) != n or bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise ValueError(f"a Scoring needs as many targets as positions ({self.targets.numel()} vs {n}) and "
                             f"offsets from 0 to {n} that never decrease, got {self.offsets.tolist()}")
        if self.positions.device.type == "cpu" and self.targets.device.type == "cpu":
            self.bounds = Bounds(_span(self.positions), _span(self.targets))  # these tensors', whatever was passed

    @property
    def rows(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """Scored tokens per row [rows]."""
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str) -> "Scoring":
        return Scoring(*(t.to(device, non_blocking=True) for t in (self.positions, self.targets, self.offsets)),
                       bounds=self.bounds)


def _span(values: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a host tensor, (0, -1) when it is empty."""
    return (int(values.min()), int(values.max())) if values.numel() else (0, -1)


@dataclass
class LayoutBatch:
    """One micro-batch in one layout (see the module docstring)."""

    kind: str
    input_ids: torch.Tensor  # [2P, T] padded, [1, N] packed / shared
    attention_mask: torch.Tensor | None  # padded: [2P, T] 1 on tokens, 0 on padding; else None
    position_ids: torch.Tensor | None  # packed / shared: [1, N]
    sequence_ids: torch.Tensor | None  # packed / shared: [1, N] which sequence (pair, in shared) a token is in
    branch_ids: torch.Tensor | None  # shared: [1, N] 0 prompt, 1 chosen, 2 rejected
    scoring: Scoring
    index: torch.Tensor  # [P] the pairs' positions in their split; on the host (`to` keeps it there)
    real_tokens: int  # prompt + answer tokens of every row, each prompt counted per row (the padded count)

    @property
    def pairs(self) -> int:
        return self.index.numel()

    @property
    def tokens(self) -> int:
        """Token positions the model computes for this batch, padding included."""
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> "LayoutBatch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       position_ids=move(self.position_ids), sequence_ids=move(self.sequence_ids),
                       branch_ids=move(self.branch_ids), scoring=self.scoring.to(device))


def pair_rows(pairs: Sequence[PairTokens], chosen_only: bool = False) -> list[tuple[Sequence[int], Sequence[int]]]:
    """(prompt, answer) of every row: the chosen answers, then the rejected ones (unless chosen_only)."""
    rows = [(p.prompt, p.chosen) for p in pairs]
    return rows if chosen_only else rows + [(p.prompt, p.rejected) for p in pairs]


def layout_tokens(pair: PairTokens, kind: str) -> int:
    """Token positions one pair takes in a layout without padding (for the padded layout: its two
    rows at the longer one's length)."""
    c, r = len(pair.prompt) + len(pair.chosen), len(pair.prompt) + len(pair.rejected)
    if kind == "shared":
        return len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
    return 2 * max(c, r) if kind == "padded" else c + r


def build(kind: str, pairs: Sequence[PairTokens], index: Sequence[int], pad_id: int, *,
          chosen_only: bool = False) -> LayoutBatch:
    """The micro-batch of `pairs` (ids `index`) in layout `kind`. `chosen_only` keeps the chosen
    rows alone (the supervised warm-up); with nothing to share, "shared" then packs."""
    if kind not in KINDS:
        raise ValueError(f"layout must be one of {KINDS}, got {kind!r}")
    if not pairs or len(pairs) != len(index):
        raise ValueError(f"need one index per pair and at least one pair, got {len(pairs)} pairs, {len(index)} ids")
    ids = torch.tensor(list(index), dtype=torch.long)
    if kind == "shared" and not chosen_only:
        return _shared(pairs, ids)
    rows = pair_rows(pairs, chosen_only)
    return _padded(rows, ids, pad_id) if kind == "padded" else _packed(rows, ids)


def _scored(prompt_len: int, answer_len: int, start: int) -> tuple[range, int]:
    """Positions (flat, from `start` = the flat index of the sequence's first token) that score
    the answer's tokens, and how many leading answer tokens go unscored (1 for an empty prompt)."""
    skip = 1 if prompt_len == 0 else 0
    first = start + prompt_len - 1 + skip
    return range(first, first + answer_len - skip), skip


def _scoring(positions: list[int], targets: list[int], counts: list[int]) -> Scoring:
    offsets = torch.zeros(len(counts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return Scoring(torch.tensor(positions, dtype=torch.long), torch.tensor(targets, dtype=torch.long), offsets)


def _real_tokens(rows) -> int:
    return sum(len(p) + len(a) for p, a in rows)


def _padded(rows, index: torch.Tensor, pad_id: int) -> LayoutBatch:
    T = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    positions, targets, counts = [], [], []
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[r, :n] = torch.tensor(list(prompt) + list(answer), dtype=torch.long)
        attention_mask[r, :n] = 1
        scored, skip = _scored(len(prompt), len(answer), r * T)
        positions += scored
        targets += answer[skip:]
        counts.append(len(scored))
    return LayoutBatch("padded", input_ids, attention_mask, None, None, None,
                       _scoring(positions, targets, counts), index, _real_tokens(rows))


def _packed(rows, index: torch.Tensor) -> LayoutBatch:
    tokens, position_ids, sequence_ids = [], [], []
    positions, targets, counts = [], [], []
    for r, (prompt, answer) in enumerate(rows):
        scored, skip = _scored(len(prompt), len(answer), len(tokens))
        positions += scored
        targets += answer[skip:]
        counts.append(len(scored))
        n = len(prompt) + len(answer)
        tokens += list(prompt) + list(answer)
        position_ids += range(n)
        sequence_ids += [r] * n
    return LayoutBatch("packed", _row(tokens), None, _row(position_ids), _row(sequence_ids), None,
                       _scoring(positions, targets, counts), index, _real_tokens(rows))


def _shared(pairs: Sequence[PairTokens], index: torch.Tensor) -> LayoutBatch:
    tokens, position_ids, sequence_ids, branch_ids = [], [], [], []
    chosen: list[tuple[range, Sequence[int]]] = []
    rejected: list[tuple[list[int], Sequence[int]]] = []
    for i, pair in enumerate(pairs):
        start, p, c, r = len(tokens), len(pair.prompt), len(pair.chosen), len(pair.rejected)
        scored, skip = _scored(p, c, start)
        chosen.append((scored, pair.chosen[skip:]))
        # The rejected answer's first token is scored by the last prompt token too; its later
        # tokens by their own predecessors, which sit after the chosen answer.
        first, skip = _scored(p, min(r, 1), start)
        after = range(start + p + c, start + p + c + r - 1)
        rejected.append(([*first, *after], pair.rejected[skip:]))
        tokens += list(pair.prompt) + list(pair.chosen) + list(pair.rejected)
        position_ids += [*range(p + c), *range(p, p + r)]
        sequence_ids += [i] * (p + c + r)
        branch_ids += [0] * p + [1] * c + [2] * r
    positions, targets, counts = [], [], []
    for scored, answer in chosen + rejected:
        positions += scored
        targets += answer
        counts.append(len(scored))
    rows = pair_rows(pairs)
    return LayoutBatch("shared", _row(tokens), None, _row(position_ids), _row(sequence_ids), _row(branch_ids),
                       _scoring(positions, targets, counts), index, _real_tokens(rows))


def _row(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).unsqueeze(0)


def scoring_from_labels(labels: torch.Tensor, ignore_index: int = -100) -> Scoring:
    """Scoring of a padded [R, T] batch from unshifted labels (the input ids, `ignore_index` off the
    completions): position t scores labels[:, t + 1], as a Hugging Face causal LM's loss does."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
    return scoring_from_shifted(shifted, ignore_index)


def scoring_from_shifted(shifted: torch.Tensor, ignore_index: int = -100) -> Scoring:
    """Scoring from labels already aligned with the positions (position t scores shifted[:, t])."""
    valid = shifted != ignore_index
    positions = valid.reshape(-1).nonzero().squeeze(1)
    offsets = torch.zeros(shifted.shape[0] + 1, dtype=torch.long, device=shifted.device)
    offsets[1:] = valid.sum(-1).cumsum(0)
    return Scoring(positions, shifted.reshape(-1)[positions].long(), offsets)


def pairs_from_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor) -> list[PairTokens]:
    """The pairs of a padded [2P, T] batch ([chosen; rejected] rows of prompt + answer, answer
    marked by `completion_mask`, padding by `attention_mask`), e.g. from TRL's collator.

    Raises ValueError when a pair's two rows do not start with the same prompt (it could not be
    shared) or a row's completion is not one block after its prompt.
    """
    rows = []
    for ids, attend, answer in zip(input_ids.tolist(), attention_mask.tolist(), completion_mask.tolist()):
        n = sum(attend)
        if attend[:n] != [1] * n:
            raise ValueError("padded rows must be right-padded (attention_mask 1...1 0...0)")
        p = next((t for t in range(n) if answer[t]), n)
        if answer[p:n] != [1] * (n - p):
            raise ValueError("each row must be prompt then completion (completion_mask 0...0 1...1 on its tokens)")
        rows.append((ids[:p], ids[p:n]))
    P = len(rows) // 2
    pairs = []
    for i in range(P):
        (prompt, chosen), (other, rejected) = rows[i], rows[i + P]
        if prompt != other:
            raise ValueError(f"pair {i}: the chosen and rejected rows have different prompts, which cannot be shared")
        pairs.append(PairTokens(prompt, chosen, rejected))
    return pairs
