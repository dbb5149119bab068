"""Fused per-token log-probabilities of the labels, and their gradient.

For token row n of the logits z (length V, any strides), label y_n (y_n < 0 marks a masked row),
optional soft-cap c and temperature tau, the scores are s = c * tanh(z / c) / tau (or z / tau):

    forward:   lse_n  = log sum_v exp(s_nv)                  online over BLOCK_V-wide tiles, fp32
               logp_n = s_{n, y_n} - lse_n                   0 for masked rows
               zsum_n = sum_v s_nv                           optional, for TRL's logits/* metrics
               H_n    = lse_n - sum_v softmax(s_n)_v s_nv    optional entropy (TRL's `entropy`)
               top1_n = 1[first argmax_v s_nv == y_n]        optional (TRL's `mean_token_accuracy`)
               lss_n  = log sum_v softmax(s_n)_v^2           optional (WPO's weights, TRL `use_weighting`)
    backward:  dz_nv  = g_n * (1[v == y_n] - exp(s_nv - lse_n)) * ds_nv/dz_nv   0 for masked rows

Confident tokens (the backward's label column): 1 - p_{n, y_n} computed as 1 - exp(logp_n) cancels
once p nears 1 (all fp32 digits lost at 1 - p ~ 1e-7). The forward therefore also sums the other
tokens' mass, online beside the logsumexp's sum and with the same rescaling,

               rest_n = sum_{v != y_n} exp(s_nv - lse_n)     (= 1 - p_{n, y_n}, a sum of positive terms)

and saves it beside lse_n: the backward state of a token is the pair (lse_n, rest_n), stored as
row n of an fp32 [N, 2] tensor (8 bytes a token), and the label column's gradient is g_n * rest_n,
exact to fp32 rounding at any confidence.

Vocabulary slabs (the fused linear pass may hand over the columns [o, o + V) of wider rows, with
o = label_offset): the label falls at column y_n - o, or outside the slab. The slab forward
returns the label's score s_{n, y_n - o} (0 when outside) in place of logp_n, and the slab's
max score for merging top1_n, and its rest_n is the slab's own share that is not the label (1
when the label is outside); the backward takes the whole row's state and adds a one-hot term
only inside the slab. Merging slabs: linear_chunks.merge_slabs.

lss_n (LOG_SUM_SQ) is one more online sum beside the logsumexp's: with the same running shift m,
S2 = sum_v exp(2 (s_v - m)) is rescaled by alpha^2 where S is rescaled by alpha, and at the end
lss_n = log S2 - 2 log S (= logsumexp(2 s) - 2 lse, with nothing of the logits' size cancelling).
In a slab it is the slab's own value, relative to the slab's logsumexp.

One program owns ROWS consecutive token rows (a [ROWS, BLOCK_V] tile, every reduction along the
vocabulary axis; 1 row by default, several for short vocabularies where one row is too little
work per program). Forward reads each row once; backward reads it once and writes the gradient
once, in place over the logits if asked. Masked rows are never read, so prompt and padding
tokens cost nothing forward (a program of masked rows only exits at once) and one write
backward.
"""

import struct

import torch
import triton
import triton.language as tl

from .contract import SlabResults, TokenOptions, TokenResults, backward_state


@triton.jit
def _scalar(hi, lo, ACC_DTYPE: tl.constexpr):
    """A float argument passed as two fp32 halves (Triton passes floats as fp32), rejoined."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _scores(z, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    """Soft-capped, temperature-scaled scores; tanh written with exp so every Triton build has it."""
    if HAS_SOFTCAP:
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z * inv_temp


@triton.jit
def _softcap_grad(z, softcap):
    """d (c * tanh(z / c)) / dz = 1 - tanh^2(z / c)."""
    th = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
    return 1.0 - th * th


@triton.jit
def token_logps_fwd_kernel(
    z_ptr, stride_zb, stride_zt, stride_zv,
    labels_ptr, logp_ptr, lse_ptr, zsum_ptr, ent_ptr, top1_ptr, max_ptr,
    N, T, V, label_offset, inv_temp, inv_temp_lo, softcap, softcap_lo,
    HAS_SOFTCAP: tl.constexpr, SAVE_LSE: tl.constexpr, SUM_SCORES: tl.constexpr,
    TOKEN_METRICS: tl.constexpr, SLAB: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    lss_ptr, LOG_SUM_SQ: tl.constexpr,  # WPO's log sum_v p_v^2 (see the module docstring)
    ROWS: tl.constexpr,  # token rows per program: the tile is [ROWS, BLOCK_V], every sum per row
):
    # int64: n * stride overflows int32 once N * V > 2^31
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_range = n < N
    inv_temp, softcap = _scalar(inv_temp, inv_temp_lo, ACC_DTYPE), _scalar(softcap, softcap_lo, ACC_DTYPE)
    label = tl.load(labels_ptr + n, mask=in_range, other=-1).to(tl.int64)
    live = label >= 0  # masked rows (and rows past N) are never read and store zeros
    neg_inf = float("-inf")
    zero = tl.zeros((ROWS,), ACC_DTYPE)
    logp, lse, zs, ent, top1, lss, rest = zero, zero, zero, zero, zero, zero, zero
    m = tl.full((ROWS,), neg_inf, ACC_DTYPE)
    if tl.max(label, axis=0) >= 0:  # a program of masked rows only reads nothing at all
        row = z_ptr + (n // T) * stride_zb + (n % T) * stride_zt
        s = zero
        sz = zero  # sum_v exp(s_v - shift) * (s_v - shift), for the entropy
        s2 = zero  # LOG_SUM_SQ: sum_v exp(2 (s_v - shift))
        best = tl.zeros((ROWS,), tl.int64)  # first index of the running max
        column = label - label_offset  # outside [0, V): the label is in another vocabulary slab
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = (offs < V)[None, :]
            z = tl.load(row[:, None] + offs[None, :] * stride_zv, mask=live[:, None] & valid, other=0.0)
            z = _scores(z.to(ACC_DTYPE), inv_temp, softcap, HAS_SOFTCAP)
            if SUM_SCORES:
                zs += tl.sum(tl.where(valid, z, 0.0), axis=1)
            z = tl.where(valid, z, neg_inf)  # the tail tile pads with -inf, so exp() adds 0
            tile_max = tl.max(z, axis=1)
            m_new = tl.maximum(m, tile_max)
            # A tile (or a prefix) of -inf leaves m_new = -inf: shift by 0 there, not by -inf (NaN).
            shift = tl.where(m_new == neg_inf, 0.0, m_new)
            alpha = tl.exp(m - shift)
            e = tl.exp(z - shift[:, None])
            if TOKEN_METRICS:
                # sz holds sum e * (z - shift): relative to the running max, so the entropy below
                # does not cancel two numbers of the size of the logits. Moving the shift adds
                # (old shift - new shift) * s before the usual rescale; e = 0 where z = -inf.
                prev_shift = tl.where(m == neg_inf, 0.0, m)
                tile_sz = tl.sum(e * tl.where(e > 0.0, z - shift[:, None], 0.0), axis=1)
                sz = alpha * (sz + (prev_shift - shift) * s) + tile_sz
                # Strictly greater: an earlier tile keeps a tie, as torch.argmax keeps the first.
                best = tl.where(tile_max > m, start + tl.argmax(z, axis=1).to(tl.int64), best)
            if SAVE_LSE:
                rest = rest * alpha + tl.sum(tl.where(offs[None, :] == column[:, None], 0.0, e), axis=1)
            s = s * alpha + tl.sum(e, axis=1)
            if LOG_SUM_SQ:
                s2 = s2 * (alpha * alpha) + tl.sum(e * e, axis=1)
            m = m_new
        lse = tl.where(m == neg_inf, 0.0, m) + tl.log(s)  # an all -inf row gives -inf, as torch does
        rest = rest / s
        if SLAB:  # the label's score, or 0 when the label is in another slab
            inside = (column >= 0) & (column < V)
            z_label = tl.load(row + column * stride_zv, mask=live & inside, other=0.0).to(ACC_DTYPE)
            logp = tl.where(inside, _scores(z_label, inv_temp, softcap, HAS_SOFTCAP), 0.0)
        else:
            # A label >= V (possible only with the host-side label check turned off) gives NaN,
            # not a read past the row.
            z_label = tl.load(row + label * stride_zv, mask=live & (label < V), other=float("nan")).to(ACC_DTYPE)
            logp = _scores(z_label, inv_temp, softcap, HAS_SOFTCAP) - lse
        if TOKEN_METRICS:
            ent = tl.log(s) - sz / s  # = lse - E_p[s]
            top1 = tl.where(best == column, 1.0, 0.0).to(ACC_DTYPE)
        if LOG_SUM_SQ:
            lss = tl.log(s2) - 2.0 * tl.log(s)
        if ROWS > 1:  # a masked row beside live ones ran through the loop on zeros: its results are 0
            logp, lse, rest = tl.where(live, logp, 0.0), tl.where(live, lse, 0.0), tl.where(live, rest, 0.0)
            zs, ent, top1 = tl.where(live, zs, 0.0), tl.where(live, ent, 0.0), tl.where(live, top1, 0.0)
            lss, m = tl.where(live, lss, 0.0), tl.where(live, m, neg_inf)
    tl.store(logp_ptr + n, logp, mask=in_range)
    if SAVE_LSE:  # the backward state: (lse_n, rest_n) at row n of an [N, 2] tensor
        tl.store(lse_ptr + 2 * n, lse, mask=in_range)
        tl.store(lse_ptr + 2 * n + 1, rest, mask=in_range)
    if SUM_SCORES:
        tl.store(zsum_ptr + n, zs, mask=in_range)
    if TOKEN_METRICS:
        tl.store(ent_ptr + n, ent, mask=in_range)
        tl.store(top1_ptr + n, top1, mask=in_range)
        if SLAB:
            tl.store(max_ptr + n, m, mask=in_range)
    if LOG_SUM_SQ:
        tl.store(lss_ptr + n, lss, mask=in_range)


@triton.jit
def token_logps_bwd_kernel(
    z_ptr, stride_zb, stride_zt, stride_zv,
    dz_ptr, stride_db, stride_dt, stride_dv,
    labels_ptr, lse_ptr, g_ptr,
    N, T, V, label_offset, inv_temp, inv_temp_lo, softcap, softcap_lo,
    HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
    ROWS: tl.constexpr,  # token rows per program, as in the forward
):
    n = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_range = n < N
    inv_temp, softcap = _scalar(inv_temp, inv_temp_lo, ACC_DTYPE), _scalar(softcap, softcap_lo, ACC_DTYPE)
    label = tl.load(labels_ptr + n, mask=in_range, other=-1).to(tl.int64)
    g = tl.load(g_ptr + n, mask=in_range, other=0.0).to(ACC_DTYPE)
    # A masked row (or a row whose loss ignores it) gets exactly zero, written without reading z.
    live = (label >= 0) & (g != 0.0)
    row = z_ptr + (n // T) * stride_zb + (n % T) * stride_zt
    drow = (dz_ptr + (n // T) * stride_db + (n % T) * stride_dt)[:, None]
    stored = in_range[:, None]

    if tl.max(live.to(tl.int32), axis=0) == 0:
        zeros = tl.zeros((ROWS, BLOCK_V), ACC_DTYPE).to(dz_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            offs = (start + tl.arange(0, BLOCK_V))[None, :]
            tl.store(drow + offs * stride_dv, zeros, mask=stored & (offs < V))
    else:
        lse = tl.load(lse_ptr + 2 * n, mask=live, other=0.0).to(ACC_DTYPE)[:, None]
        rest = tl.load(lse_ptr + 2 * n + 1, mask=live, other=0.0).to(ACC_DTYPE)[:, None]  # 1 - p_label, exact
        column = (label - label_offset)[:, None]  # outside [0, V) when the label is in another slab: no one-hot
        scale = tl.where(live, g * inv_temp, 0.0)[:, None]
        for start in range(0, V, BLOCK_V):
            offs = (start + tl.arange(0, BLOCK_V))[None, :]
            valid = offs < V
            z = tl.load(row[:, None] + offs * stride_zv, mask=live[:, None] & valid, other=0.0).to(ACC_DTYPE)
            p = tl.exp(_scores(z, inv_temp, softcap, HAS_SOFTCAP) - lse)
            dz = scale * tl.where(offs == column, rest, -p)
            if HAS_SOFTCAP:
                dz = dz * _softcap_grad(z, softcap)
            if ROWS > 1:  # +0, not 0 * -p = -0, for a masked row beside live ones
                dz = tl.where(live[:, None], dz, 0.0)
            tl.store(drow + offs * stride_dv, dz.to(dz_ptr.dtype.element_ty), mask=stored & valid)


# ----------------------------------------------------------------------------------------------
# Launchers. Tensors are [B, T, V] logits with any strides and [B * T] per-token vectors; what a
# pass computes comes in one TokenOptions, and its results go back named (kernels/contract.py).

_TL_ACC = {torch.float64: tl.float64}


# Widest vocabulary tile. Chosen on an H100 (benchmarks/tune_kernel.py, README): 4096-wide tiles
# with 4 warps forward and 16 backward were the fastest at shapes A and C, masked and not, or
# within 1% backward and 6% forward (masked A) of it; 8 or 16 warps forward cost up to 1.5x.
MAX_BLOCK_V = 4096


def _launch_config(V: int, block_v: int | None, num_warps: int | None, rows: int | None,
                   backward: bool) -> tuple[int, int, int]:
    """Tile width, warps and token rows per program. One row per program unless asked: whether
    several rows pay off for short vocabularies is measured by benchmarks/tune_kernel.py (--rows)."""
    rows = 1 if rows is None else rows
    if block_v is None:  # a tile of at most MAX_BLOCK_V elements, however many rows it spans
        block_v = min(triton.next_power_of_2(V), max(1, MAX_BLOCK_V // rows))
    for name, value in (("rows_per_program", rows), ("block_v", block_v)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if num_warps is None:
        per_warp = 256 if backward else 1024  # elements of one tile each warp holds
        num_warps = max(1, min(16 if backward else 4, rows * block_v // per_warp))
    return block_v, num_warps, rows


def _split(x: float) -> tuple[float, float]:
    """x as fp32 hi + lo, so fp64 kernels see it to ~48 bits rather than fp32's 24."""
    hi = _fp32(x)
    return hi, _fp32(x - hi)


def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: TokenOptions = TokenOptions(),
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int | None = None,
) -> TokenResults:
    """Per-token results [B*T] for labels [B*T] (int, < 0 = masked), those `options` ask for.
    `block_v`, `num_warps` and `rows_per_program` override the launch settings (`_launch_config`)."""
    results, _max_scores = _forward(logits, labels, None, options, (block_v, num_warps, rows_per_program))
    return results


def token_slab_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_offset: int,
    options: TokenOptions = TokenOptions(),
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int | None = None,
) -> SlabResults:
    """The forward of the vocabulary columns [label_offset, label_offset + V) of wider rows (the
    state always saved, `options.save_lse` notwithstanding)."""
    results, max_scores = _forward(logits, labels, label_offset, options, (block_v, num_warps, rows_per_program))
    return SlabResults.of(results, max_scores)


def _forward(logits, labels, label_offset, options: TokenOptions, launch: tuple):
    """(TokenResults, the max scores of a slab with token metrics or None); with a label offset,
    `logps` holds the label scores (the slab forward) and the state is always saved."""
    B, T, V = logits.shape
    N = B * T
    acc = _acc_dtype(logits.dtype)
    slab = label_offset is not None
    save_lse, token_metrics = options.save_lse or slab, options.token_metrics

    def vector(wanted: bool) -> torch.Tensor | None:
        return torch.empty(N, dtype=acc, device=logits.device) if wanted else None

    results = TokenResults(
        logps=vector(True),
        state=torch.empty((N, 2), dtype=acc, device=logits.device) if save_lse else None,  # (lse, 1 - p_label)
        score_sums=vector(options.sum_scores), entropy=vector(token_metrics), top1=vector(token_metrics),
        log_sum_sq=vector(options.log_sum_sq),
    )
    top = vector(slab and token_metrics)
    # Outputs not asked for point at this empty buffer, never at a result: the constexpr flags skip
    # every store to it, and a store that a wrong flag let through could not overwrite a result.
    unused = torch.empty(0, dtype=acc, device=logits.device)

    def ptr(x: torch.Tensor | None) -> torch.Tensor:
        return x if x is not None else unused

    block_v, num_warps, rows = _launch_config(V, *launch, backward=False)
    if N > 0:
        token_logps_fwd_kernel[(triton.cdiv(N, rows),)](
            logits, *logits.stride(),
            labels, results.logps, ptr(results.state), ptr(results.score_sums), ptr(results.entropy),
            ptr(results.top1), ptr(top),
            N, T, V, label_offset or 0, *_split(options.inv_temp), *_split(options.softcap or 1.0),
            HAS_SOFTCAP=options.softcap is not None, SAVE_LSE=save_lse, SUM_SCORES=options.sum_scores,
            TOKEN_METRICS=token_metrics, SLAB=slab, ACC_DTYPE=_TL_ACC.get(acc, tl.float32), BLOCK_V=block_v,
            lss_ptr=ptr(results.log_sum_sq), LOG_SUM_SQ=options.log_sum_sq, ROWS=rows,
            num_warps=num_warps,
        )
    return results, top


def token_logps_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    state: torch.Tensor,
    grad_logp: torch.Tensor,
    options: TokenOptions = TokenOptions(),
    *,
    out: torch.Tensor | None = None,
    label_offset: int = 0,
    block_v: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """Gradient of sum_n grad_logp[n] * logp[n] w.r.t. the logits, written to `out` (may be `logits`).
    `state` is the forward's backward state [B*T, 2]: (logsumexp, 1 - p_label) of each token row;
    of `options` only the score transform (inv_temp, softcap) is read.
    With `label_offset` o the logits are the vocabulary columns [o, o + V) of rows whose state is
    `state`, and label y's one-hot term falls at column y - o (none outside the slab)."""
    B, T, V = logits.shape
    N = B * T
    state = backward_state(state, N)
    if out is None:
        out = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    block_v, num_warps, rows = _launch_config(V, block_v, num_warps, rows_per_program, backward=True)
    if N == 0:
        return out
    token_logps_bwd_kernel[(triton.cdiv(N, rows),)](
        logits, *logits.stride(),
        out, *out.stride(),
        labels, state, grad_logp,
        N, T, V, label_offset, *_split(options.inv_temp), *_split(options.softcap or 1.0),
        HAS_SOFTCAP=options.softcap is not None, ACC_DTYPE=_TL_ACC.get(_acc_dtype(logits.dtype), tl.float32),
        BLOCK_V=block_v, ROWS=rows, num_warps=num_warps,
    )
    return out

