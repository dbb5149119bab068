"""The fused linear pass: chunks of valid tokens through cuBLAS and the token log-prob kernels.

Only the valid (unmasked) tokens are gathered, so prompt and padding never reach a matmul. For a
chunk of them with hidden rows h [C, H], lm_head weight W [V, H] and bias b [V]:

    forward:   z = h W^T + b                        [C, V] in the input dtype, the only
               logp, lse, zsum, entropy, top1      [tokens x vocab] buffer (reused chunk to chunk)
                   = token kernels(z)              (zsum, entropy, top1 only when asked)
    backward:  with g_t = dLoss / dlogps[row(t)]    (one scalar per row, from the loss)
               dz = token backward(z, g)            written over z
               dH[t] = dz W,   dW += dz^T h,   db += sum_t dz

`forward` keeps two fp32 per token (the logsumexp and an exact 1 - p_label, the kernels' backward
state), and `backward` recomputes z: 8 Nv H V FLOPs in all
(Nv valid tokens). `forward_with_grads` does the backward's work inside the forward, group of
pairs by group of pairs, as soon as a group's loss gradient is known, so z is never recomputed:
6 Nv H V. A single pair longer than a chunk is the exception: it is done in chunks, forward then
recompute (8 Nv H V for that pair), so that both hold at most one chunk of logits at a time
besides the gradients themselves, however long the rows.

`backward` can also take the vocabulary in slabs of W (`vocab_chunk` rows), for the least memory:

    for each chunk:  for each slab W_s:  z_s = h W_s^T + b_s  ->  dz_s   [C, Vs], the only logits
                     dW_s += dz_s^T h,   db_s += sum_t dz_s,   dh += dz_s W_s   (dh: fp32 [C, H])
                     dH[chunk] = dh

The token backward takes the slab's first column: the state is the whole row's (saved by the forward),
and a label outside the slab adds no one-hot term. The FLOPs stay 8 Nv H V; what the slabs cost is
smaller GEMMs, and what a small `chunk_tokens` costs is one more read and write of dW per chunk.

dW accumulates over chunks in the weight's dtype (each chunk's GEMM accumulates in fp32 inside
cuBLAS, then adds into dW with one rounding): an fp32 accumulator would cost 2 x |W| more bytes
(2.1 GB at V = 128256, H = 4096), more than the whole budget of the pass. With k chunks the
rounding error is about sqrt(k) half-ulps of the input dtype; db accumulates in fp32 ([V] only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch

from .backend import get_backend
from .kernels.contract import SlabResults, TokenOptions, TokenResults
from .packed import segment_sums

# One chunk of logits (input dtype) stays near this many bytes unless a chunk size is given.
# 512 MiB holds a whole pair of shape A in benchmarks/common.py (2 x 1024 tokens x 128256, bf16), which the
# grad-in-forward path needs for 6 N H V; a tuning knob, to be set by measurement.
CHUNK_BYTES = 512 * 2**20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# On CPU the pass's extra memory is the gradients plus a few fp32 [chunk, V] tiles (the logits and
# the PyTorch twin's), and a matmul of a few dozen rows runs as fast per FLOP as a large one. So
# the CPU default is a chunk of H / CPU_TOKENS_PER_HIDDEN tokens: each tile is then 1/32 of the
# weight (in fp32), the tiles together under a tenth of the weight gradient, and the pass holds
# about what torch's chunked linear_cross_entropy holds (the gradients and chunks sized by the
# same aspect ratio), while scoring only valid tokens keeps it faster (README, the CPU table).
# Pairs are not kept whole on CPU: one longer than a chunk is recomputed (8 N H V for it). Small
# heads (V near H) get at least CPU_MIN_CHUNK_BYTES of logits a chunk, so that the loop is not
# Python overhead; that is still little memory in absolute terms.
CPU_TOKENS_PER_HIDDEN = 32
CPU_MIN_CHUNK_BYTES = 2**20


def default_chunk_tokens(vocab: int, dtype: torch.dtype) -> int:
    """Tokens per chunk so that one [chunk, V] logits buffer is about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))


def resolve_chunk_tokens(chunk_tokens: int, weight: torch.Tensor, plan: "Plan | None" = None) -> int:
    """`chunk_tokens`, or for 0 (the default) about CHUNK_BYTES of logits (on CPU H / 32 tokens or 1 MiB);
    given the `plan` of a pass that groups whole pairs, on a GPU at least the largest pair, so
    that no pair is recomputed."""
    if chunk_tokens:
        return chunk_tokens
    if weight.device.type == "cpu":
        vocab, hidden = weight.shape
        return max(1, hidden // CPU_TOKENS_PER_HIDDEN, CPU_MIN_CHUNK_BYTES // (4 * vocab))
    tokens = default_chunk_tokens(weight.shape[0], weight.dtype)
    return max(tokens, max(pair_sizes(plan), default=0)) if plan is not None else tokens


@dataclass
class Plan:
    """Where the valid tokens are. Rows are contiguous in the flat layout, so they stay contiguous here."""

    order: torch.Tensor  # [Nv] int64 flat indices of the valid tokens, ascending
    labels: torch.Tensor  # [Nv] int32 their labels
    rows: torch.Tensor  # [Nv] int64 their row
    starts: list[int]  # [B + 1] on the host: row b owns order[starts[b] : starts[b + 1]]
    starts_t: torch.Tensor  # the same on the device, for segment sums

    @property
    def num_valid(self) -> int:
        return self.starts[-1]

    @property
    def counts(self) -> torch.Tensor:
        return self.starts_t[1:] - self.starts_t[:-1]


def valid_starts(labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B + 1] positions, among the valid tokens, where each row's valid tokens start (no sync)."""
    valid = labels >= 0
    prefix = torch.cat([valid.new_zeros(1, dtype=torch.int64), valid.cumsum(0)])
    return prefix[offsets]


def _positions_of(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n true entries; with n known, no second sync (torch.nonzero waits to learn it)."""
    try:
        return torch.nonzero_static(valid, size=n).squeeze(1)
    except (NotImplementedError, RuntimeError):  # a device without nonzero_static
        return torch.nonzero(valid).squeeze(1)


def make_plan(labels: torch.Tensor, offsets: torch.Tensor) -> Plan:
    """labels: flat [N] int32 (-1 = masked); offsets: int64 [B + 1] row offsets into them."""
    starts_t = valid_starts(labels, offsets)
    starts = starts_t.tolist()  # the host learns the chunk layout: one sync per pass
    order = _positions_of(labels >= 0, starts[-1])
    B = offsets.numel() - 1
    counts = starts_t[1:] - starts_t[:-1]
    rows = torch.repeat_interleave(torch.arange(B, device=labels.device), counts, output_size=starts[-1])
    return Plan(order=order, labels=labels[order], rows=rows, starts=starts, starts_t=starts_t)


# ---- chunk layouts: a chunk is a list of [start, end) ranges of positions in plan.order ----

Chunk = list[tuple[int, int]]


def token_chunks(plan: Plan, chunk_tokens: int) -> list[Chunk]:
    """Consecutive valid tokens, `chunk_tokens` at a time (rows may straddle chunks); never empty."""
    n = plan.num_valid
    return [[(a, min(a + chunk_tokens, n))] for a in range(0, n, chunk_tokens)]


def pair_groups(plan: Plan, chunk_tokens: int) -> list[tuple[list[int], Chunk]]:
    """Groups of whole pairs (rows i and i + P), as many as fit in `chunk_tokens` (at least one).

    Returns (rows of the group, chunk) for the groups with any valid token. Rows are [chosen;
    rejected], so the chosen rows of pairs i..j-1 are one range of positions and their rejected
    rows another.
    """
    s, P = plan.starts, (len(plan.starts) - 1) // 2
    size = pair_sizes(plan)
    groups, i = [], 0
    while i < P:
        j, tokens = i + 1, size[i]
        while j < P and tokens + size[j] <= chunk_tokens:
            tokens += size[j]
            j += 1
        if tokens:  # a group whose rows have no completion token contributes nothing
            rows = list(range(i, j)) + list(range(P + i, P + j))
            groups.append((rows, [(s[i], s[j]), (s[P + i], s[P + j])]))
        i = j
    return groups


def pair_sizes(plan: Plan) -> list[int]:
    """Valid tokens of each pair (rows i and i + P)."""
    s, P = plan.starts, (len(plan.starts) - 1) // 2
    return [s[i + 1] - s[i] + s[P + i + 1] - s[P + i] for i in range(P)]


def split(chunk: Chunk, chunk_tokens: int) -> list[Chunk]:
    """Cut a chunk into consecutive pieces of at most `chunk_tokens` positions."""
    pieces, piece, size = [], [], 0
    for a, b in chunk:
        while a < b:
            take = min(b - a, chunk_tokens - size)
            piece.append((a, a + take))
            size, a = size + take, a + take
            if size == chunk_tokens:
                pieces.append(piece)
                piece, size = [], 0
    return pieces + ([piece] if piece else [])


def _positions(chunk: Chunk, device: torch.device) -> torch.Tensor | slice:
    if len(chunk) == 1:
        return slice(*chunk[0])
    return torch.cat([torch.arange(a, b, device=device) for a, b in chunk])


def _size(chunk: Chunk) -> int:
    return sum(b - a for a, b in chunk)


# ---- the three stages of one chunk ----

@dataclass(frozen=True)
class LinearOptions(TokenOptions):
    """One fused linear pass: what the kernels compute (TokenOptions; the state is always saved),
    and how the tokens and the vocabulary are chunked."""

    chunk_tokens: int = 0  # valid tokens per chunk of logits (0: `resolve_chunk_tokens`'s default)
    vocab_chunk: int = 0  # vocabulary rows per slab (0: the whole vocabulary at once)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """z = h W^T (+ b) into `out`, in the input dtype: cuBLAS on GPU."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


@dataclass
class Grads:
    """Gradient buffers being filled (None where not wanted)."""

    hidden: torch.Tensor | None  # [N, H], zero on masked rows
    weight: torch.Tensor | None  # [V, H]
    bias: torch.Tensor | None  # [V] in the accumulation dtype; the op casts it to the bias dtype (linear_ops)
    weight_started: bool = False  # dW holds a first chunk of tokens (over the whole vocabulary)

    def add(self, dz: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
            vocab: slice = slice(None), dh: torch.Tensor | None = None) -> None:
        """Fold the logits gradient dz [C, Vs] of the vocabulary rows `vocab` into dW[vocab] and
        db[vocab], and into dH: written at once when dz spans the whole vocabulary (dh None), else
        added to `dh` [C, H], the chunk's running sum over vocabulary slabs (see `end_chunk`)."""
        w = weight[vocab]
        if self.hidden is not None:
            if dh is None:
                self.hidden.index_copy_(0, idx, torch.mm(dz, w))
            elif dh.dtype == dz.dtype:
                dh.addmm_(dz, w)
            else:  # each slab's [C, H] product is rounded once to the input dtype, summed in fp32
                dh += torch.mm(dz, w)
        if self.weight is not None:
            dw = self.weight[vocab]
            if self.weight_started:
                dw.addmm_(dz.t(), h)
            else:  # the first chunk of tokens writes dW, so it needs no zero fill
                torch.mm(dz.t(), h, out=dw)
        if self.bias is not None:
            self.bias[vocab] += dz.sum(0, dtype=self.bias.dtype)

    def end_chunk(self, idx: torch.Tensor, dh: torch.Tensor | None = None) -> None:
        """A chunk of tokens is done over the whole vocabulary: store its dH sum, if it kept one."""
        if self.hidden is not None and dh is not None:
            self.hidden.index_copy_(0, idx, dh.to(self.hidden.dtype))
        self.weight_started = True

    def finish(self) -> None:
        if self.weight is not None and not self.weight_started:
            self.weight.zero_()  # no valid token at all


def new_grads(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              want: tuple[bool, bool, bool]) -> Grads:
    want_h, want_w, want_b = want
    return Grads(
        hidden=hidden.new_zeros(hidden.shape) if want_h else None,
        weight=torch.empty_like(weight, memory_format=torch.contiguous_format) if want_w else None,
        bias=torch.zeros(weight.shape[0], dtype=acc_dtype(weight.dtype), device=weight.device)
        if want_b and bias is not None else None,
    )


class _Pass:
    """The per-chunk work shared by every mode: gather, matmul, kernels, gradient."""

    def __init__(self, plan: Plan, hidden, weight, bias, options: LinearOptions, max_chunk: int, max_vocab: int = 0):
        self.plan, self.hidden, self.weight, self.bias = plan, hidden, weight, bias
        self.options = replace(options, save_lse=True)  # every mode keeps or uses the backward state
        self.backend = get_backend(hidden.device)
        # One logits buffer for the whole pass ([chunk, vocabulary slab]), sliced per chunk: no
        # allocator churn.
        self.buf = hidden.new_empty(max(max_chunk, 0) * (max_vocab or weight.shape[0]))

    def gather(self, chunk: Chunk):
        """(positions among the valid tokens, flat token indices, hidden rows [C, H]) of a chunk."""
        pos = _positions(chunk, self.hidden.device)
        idx = self.plan.order[pos]
        return pos, idx, self.hidden.index_select(0, idx)

    def logits(self, chunk: Chunk):
        pos, idx, h = self.gather(chunk)
        return pos, idx, h, self.slab_logits(h, slice(0, self.weight.shape[0]))

    def slab_logits(self, h: torch.Tensor, vocab: slice) -> torch.Tensor:
        """z = h W[vocab]^T (+ b[vocab]) [C, Vs], contiguous, in the pass's buffer."""
        z = self.buf[: h.shape[0] * (vocab.stop - vocab.start)].view(h.shape[0], -1)
        return _logits(h, self.weight[vocab], None if self.bias is None else self.bias[vocab], z)

    def token_forward(self, z: torch.Tensor, pos) -> TokenResults:
        """The chunk's token results: log-probs, backward state and the statistics asked for."""
        return self.backend.token_logps_forward(z.unsqueeze(0), self.plan.labels[pos], self.options)

    def slab_forward(self, h: torch.Tensor, pos, slabs: list[slice]) -> TokenResults:
        """`token_forward` of a chunk whose logits are made one vocabulary slab at a time."""
        if len(slabs) == 1:
            return self.token_forward(self.slab_logits(h, slabs[0]), pos)
        labels = self.plan.labels[pos]
        parts = [self.backend.token_slab_forward(self.slab_logits(h, vocab).unsqueeze(0), labels, vocab.start,
                                                 self.options)
                 for vocab in slabs]
        return merge_slabs(parts, labels, slabs[-1].stop)

    def token_backward_(self, z: torch.Tensor, pos, state: torch.Tensor, g_tok: torch.Tensor,
                        first_column: int = 0) -> torch.Tensor:
        """dz over z, in place (each element is read before it is written, softcap included);
        z holds the vocabulary columns from `first_column` on, the state is the whole rows'."""
        view = z.unsqueeze(0)
        self.backend.token_logps_backward(view, self.plan.labels[pos], state, g_tok.contiguous(), self.options,
                                          out=view, label_offset=first_column)
        return z


def merge_slabs(parts: list[SlabResults], labels: torch.Tensor, vocab: int) -> TokenResults:
    """One token's results from those of its vocabulary slabs (`token_slab_forward`'s, in
    vocabulary order), as `token_forward` gives them for the whole rows:

        lse = logsumexp_s lse_s,   w_s = exp(lse_s - lse)   (each slab's share of the probability)
        1 - p_label = sum_s w_s rest_s                       (rest_s: slab s's mass that is not the
                                                             label; positive terms, nothing cancels)
        entropy = sum_s w_s H_s - sum_s w_s log w_s         (no cancellation at the logits' size)
        top1 = top1 of the first slab holding the overall max score
        log sum p^2 = logsumexp_s (lss_s + 2 log w_s)        (sum_v p_v^2 = sum_s w_s^2 sum_{v in s} p_sv^2)
    """
    # Each field stacked over the slabs: [slabs, tokens] (the state [slabs, tokens, 2]).
    s = SlabResults._make(None if p[0] is None else torch.stack(p) for p in zip(*parts))
    lse_s = s.state[..., 0]
    lse = torch.logsumexp(lse_s, 0)
    # A label >= V (label checks off) is in no slab: NaN, as the unsplit kernel gives.
    logp = torch.where(labels < vocab, s.label_scores.sum(0) - lse, float("nan"))
    log_w = lse_s - lse
    w = log_w.exp()
    rest = (w * s.state[..., 1]).sum(0)
    ent = top1 = lss = None
    if s.entropy is not None:
        ent = (w * s.entropy).sum(0) - (w * log_w).sum(0)
        top1 = s.top1.gather(0, s.max_scores.argmax(0, keepdim=True)).squeeze(0)  # argmax: the first maximum
    if s.log_sum_sq is not None:
        lss = torch.logsumexp(s.log_sum_sq + 2 * log_w, 0)
    return TokenResults(logps=logp, state=torch.stack([lse, rest], 1),
                        score_sums=None if s.score_sums is None else s.score_sums.sum(0), entropy=ent, top1=top1,
                        log_sum_sq=lss)


def vocab_slabs(vocab: int, width: int) -> list[slice]:
    """Consecutive vocabulary ranges of at most `width` rows (0: the whole vocabulary at once)."""
    width = width or vocab
    return [slice(a, min(a + width, vocab)) for a in range(0, vocab, width)]


class RowResults(NamedTuple):
    """A forward's results per row [B]: TokenResults' fields, in its order, summed over each row's
    valid tokens, but for the per-token `state` that the backward reads. None unless asked for."""

    logps: torch.Tensor  # [B] row sums of the label log-probs (fp32, fp64 for fp64 inputs)
    state: torch.Tensor  # [N, 2] per-token backward state: logsumexp, 1 - p_label (0 on masked tokens)
    score_sums: torch.Tensor | None  # [B] row sums of sum_v s_tv
    entropy: torch.Tensor | None  # [B] row sums of the token entropies
    top1: torch.Tensor | None  # [B] tokens whose label is the first argmax
    log_sum_sq: torch.Tensor | None  # [B] row sums of log sum_v p_tv^2 (WPO)


def _per_token(plan: Plan, like: torch.Tensor, options: TokenOptions) -> TokenResults:
    """Zeroed [Nv] vectors (the state [Nv, 2]) in the accumulation dtype for the results `options`
    ask for, to be filled chunk by chunk (`_store`)."""

    def vector(wanted: bool, *shape: int) -> torch.Tensor | None:
        size = (plan.num_valid, *shape)
        return torch.zeros(size, dtype=acc_dtype(like.dtype), device=like.device) if wanted else None

    return TokenResults(logps=vector(True), state=vector(True, 2), score_sums=vector(options.sum_scores),
                        entropy=vector(options.token_metrics), top1=vector(options.token_metrics),
                        log_sum_sq=vector(options.log_sum_sq))


def _store(per_token: TokenResults, pos, chunk: TokenResults) -> None:
    """Write one chunk's token results into the [Nv] vectors that were asked for."""
    for vector, value in zip(per_token, chunk):  # the same NamedTuple: field by field
        if vector is not None:
            vector[pos] = value


def _finish_forward(plan: Plan, n_tokens: int, per_token: TokenResults) -> RowResults:
    state = per_token.state.new_zeros(n_tokens, 2)
    state[plan.order] = per_token.state

    def rows(x: torch.Tensor | None) -> torch.Tensor | None:
        return segment_sums(x, plan.starts_t) if x is not None else None

    return RowResults(logps=rows(per_token.logps), state=state, score_sums=rows(per_token.score_sums),
                      entropy=rows(per_token.entropy), top1=rows(per_token.top1),
                      log_sum_sq=rows(per_token.log_sum_sq))


def forward(plan: Plan, hidden, weight, bias, options: LinearOptions) -> RowResults:
    """Row log-probs (and the statistics `options` ask for), saving each token's state for `backward`;
    with `options.vocab_chunk`, each chunk's logits are made slab by slab and the slabs' results merged."""
    chunks = token_chunks(plan, resolve_chunk_tokens(options.chunk_tokens, weight))
    slabs = vocab_slabs(weight.shape[0], options.vocab_chunk)
    max_chunk = max((_size(c) for c in chunks), default=0)
    run = _Pass(plan, hidden, weight, bias, options, max_chunk, max(s.stop - s.start for s in slabs))
    per_token = _per_token(plan, hidden, options)
    for chunk in chunks:
        pos, _idx, h = run.gather(chunk)
        _store(per_token, pos, run.slab_forward(h, pos, slabs))
    return _finish_forward(plan, hidden.shape[0], per_token)


def backward(plan: Plan, hidden, weight, bias, options: LinearOptions, state: torch.Tensor, grad_rows: torch.Tensor,
             grads: Grads) -> Grads:
    """Recompute each chunk's logits, turn them into dz in place, fold dz into `grads`.

    With `options.vocab_chunk` (rows of W per slab; 0: all), each chunk of tokens is done slab by
    slab, so the only [tokens x vocab] buffer is [chunk, vocab_chunk]; dH then sums the slabs in fp32
    (one [chunk, H] accumulator). The FLOPs are the same; the GEMMs are smaller.
    """
    chunks = token_chunks(plan, resolve_chunk_tokens(options.chunk_tokens, weight))
    slabs = vocab_slabs(weight.shape[0], options.vocab_chunk)
    max_chunk = max((_size(c) for c in chunks), default=0)
    run = _Pass(plan, hidden, weight, bias, options, max_chunk, max(s.stop - s.start for s in slabs))
    state_valid = state[plan.order]
    g_valid = grad_rows.to(state.dtype)[plan.rows]
    for chunk in chunks:
        pos, idx, h = run.gather(chunk)
        state_c, g_c = state_valid[pos], g_valid[pos]
        dh = None
        if grads.hidden is not None and len(slabs) > 1:
            dh = torch.zeros(h.shape, dtype=acc_dtype(h.dtype), device=h.device)
        for vocab in slabs:
            z = run.slab_logits(h, vocab)
            dz = run.token_backward_(z, pos, state_c, g_c, first_column=vocab.start)
            grads.add(dz, h, idx, weight, vocab, dh)
        grads.end_chunk(idx, dh)
    grads.finish()
    return grads


def forward_with_grads(plan: Plan, hidden, weight, bias, options: LinearOptions,
                       loss_grad: Callable[..., torch.Tensor | None], grads: Grads) -> tuple[RowResults, torch.Tensor]:
    """`forward` plus the gradients, computed while each group's logits are still in the buffer
    (whole rows: `options.vocab_chunk` is not read).

    `loss_grad(rows)` is dLoss/dlogps [B] at per-row log-probs `rows` [B] (or None when it cannot
    be computed: that group's guess is NaN and the backward recomputes); it is called once per
    group, with the rows not computed yet holding placeholders. With `options.log_sum_sq` it is called
    as `loss_grad(rows, log_sum_sq_rows)`, the rows' sums of log sum_v p_v^2 that WPO's weights need.
    So the gradient used for a group is exact when a pair's gradient depends on that pair alone
    (every loss that does not sort or otherwise couple pairs); the caller verifies that guess
    against the true gradient.

    Returns (RowResults, guess [B]: the row gradients the buffers were built with).
    """
    acc = acc_dtype(hidden.dtype)
    chunk_tokens = resolve_chunk_tokens(options.chunk_tokens, weight, plan)
    groups = pair_groups(plan, chunk_tokens)
    run = _Pass(plan, hidden, weight, bias, options,
                min(chunk_tokens, max((_size(c) for _, c in groups), default=0)))
    per_token = _per_token(plan, hidden, options)
    counts = plan.counts.to(acc)
    # Rows not computed yet hold a placeholder of -1 nat per token (finite for every loss); rows
    # without a valid token hold their true value, 0, from the start. Group k's rows are those
    # with group_id == k, and the rows known after it those with group_id <= k: comparisons with
    # a Python int, so the loop never copies to the device nor waits for it.
    group_id = _group_ids(groups, counts.numel(), hidden.device)
    current = -counts
    current_lss = -counts  # with log_sum_sq: WPO weight exp(0) = 1 for the rows not computed yet
    guess = torch.zeros_like(current)
    for k, (_, chunk) in enumerate(groups):
        # A group fits in one chunk unless it is a single pair longer than a chunk: then its
        # pieces are forwarded first and recomputed for the gradient.
        pieces = split(chunk, chunk_tokens)
        for piece in pieces:
            pos, idx, h, z = run.logits(piece)
            _store(per_token, pos, run.token_forward(z, pos))
        current = torch.where(group_id <= k, segment_sums(per_token.logps, plan.starts_t), current)
        if options.log_sum_sq:
            current_lss = torch.where(group_id <= k, segment_sums(per_token.log_sum_sq, plan.starts_t), current_lss)
            g = loss_grad(current, current_lss)
        else:
            g = loss_grad(current)
        rows = group_id == k
        if g is None:  # no gradient available here: a NaN guess makes the backward recompute
            guess = torch.where(rows, float("nan"), guess)
            continue
        guess = torch.where(rows, g, guess)
        g_valid = g.to(acc)[plan.rows]
        for piece in pieces:
            if len(pieces) > 1:
                pos, idx, h, z = run.logits(piece)
            dz = run.token_backward_(z, pos, per_token.state[pos], g_valid[pos])
            grads.add(dz, h, idx, weight)
            grads.end_chunk(idx)
    grads.finish()
    return _finish_forward(plan, hidden.shape[0], per_token), guess


def _group_ids(groups: list[tuple[list[int], Chunk]], B: int, device: torch.device) -> torch.Tensor:
    """[B] index of the group each row belongs to (-1: in none, i.e. no valid token), copied to
    the device once, asynchronously."""
    ids = [-1] * B
    for k, (rows, _) in enumerate(groups):
        for r in rows:
            ids[r] = k
    out = torch.tensor(ids, dtype=torch.int64)
    return out.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else out
