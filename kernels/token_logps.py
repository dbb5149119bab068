"""Fused per-token log-probabilities of the labels, and their gradient.

For token row n of the logits z (length V, any strides), label y_n (y_n < 0 marks a masked row),
optional soft-cap c and temperature tau, the scores are s = c * tanh(z / c) / tau (or z / tau):

    forward:   lse_n  = log sum_v exp(s_nv)                  online over BLOCK_V-wide tiles, fp32
               logp_n = s_{n, y_n} - lse_n                   0 for masked rows
               zsum_n = sum_v s_nv                           optional, for TRL's logits/* metrics
    backward:  dz_nv  = g_n * (1[v == y_n] - exp(s_nv - lse_n)) * ds_nv/dz_nv   0 for masked rows

One program owns one token row. Forward reads the row once; backward reads it once and writes
the gradient once, in place over the logits if asked. Masked rows skip the read entirely, so
prompt and padding tokens cost nothing forward and one write backward.
"""

import torch
import triton
import triton.language as tl


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
    labels_ptr, logp_ptr, lse_ptr, zsum_ptr,
    T, V, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, SAVE_LSE: tl.constexpr, SUM_SCORES: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # int64: n * stride overflows int32 once N * V > 2^31
    label = tl.load(labels_ptr + n).to(tl.int64)
    logp = tl.zeros((), ACC_DTYPE)
    lse = tl.zeros((), ACC_DTYPE)
    zs = tl.zeros((), ACC_DTYPE)
    if label >= 0:  # masked rows are not read at all
        row = z_ptr + (n // T) * stride_zb + (n % T) * stride_zt
        neg_inf = float("-inf")
        m = tl.full((), neg_inf, ACC_DTYPE)
        s = tl.zeros((), ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            z = tl.load(row + offs * stride_zv, mask=valid, other=0.0).to(ACC_DTYPE)
            z = _scores(z, inv_temp, softcap, HAS_SOFTCAP)
            if SUM_SCORES:
                zs += tl.sum(tl.where(valid, z, 0.0), axis=0)
            z = tl.where(valid, z, neg_inf)  # the tail tile pads with -inf, so exp() adds 0
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # A tile (or a prefix) of -inf leaves m_new = -inf: shift by 0 there, not by -inf (NaN).
            shift = tl.where(m_new == neg_inf, 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
            m = m_new
        lse = tl.where(m == neg_inf, 0.0, m) + tl.log(s)  # an all -inf row gives -inf, as torch does
        z_label = tl.load(row + label * stride_zv).to(ACC_DTYPE)
        logp = _scores(z_label, inv_temp, softcap, HAS_SOFTCAP) - lse
    tl.store(logp_ptr + n, logp)
    if SAVE_LSE:
        tl.store(lse_ptr + n, lse)
    if SUM_SCORES:
        tl.store(zsum_ptr + n, zs)


@triton.jit
def token_logps_bwd_kernel(
    z_ptr, stride_zb, stride_zt, stride_zv,
    dz_ptr, stride_db, stride_dt, stride_dv,
    labels_ptr, lse_ptr, g_ptr,
    T, V, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + n).to(tl.int64)
    g = tl.load(g_ptr + n).to(ACC_DTYPE)
    b = n // T
    t = n % T
    row = z_ptr + b * stride_zb + t * stride_zt
    drow = dz_ptr + b * stride_db + t * stride_dt

    if (label < 0) | (g == 0.0):
        # Masked row (or a row whose loss ignores it): exactly zero, written without reading z.
        zero = tl.zeros((BLOCK_V,), ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(drow + offs * stride_dv, zero.to(dz_ptr.dtype.element_ty), mask=offs < V)
    else:
        lse = tl.load(lse_ptr + n).to(ACC_DTYPE)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            z = tl.load(row + offs * stride_zv, mask=valid, other=0.0).to(ACC_DTYPE)
            p = tl.exp(_scores(z, inv_temp, softcap, HAS_SOFTCAP) - lse)
            dz = (g * inv_temp) * (tl.where(offs == label, 1.0, 0.0) - p)
            if HAS_SOFTCAP:
                dz = dz * _softcap_grad(z, softcap)
            tl.store(drow + offs * stride_dv, dz.to(dz_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launchers. Tensors are [B, T, V] logits with any strides and [B * T] per-token vectors.

_TL_ACC = {torch.float64: tl.float64}


def _launch_config(V: int, block_v: int | None) -> tuple[int, int]:
    """Tile width and warps: 2048-wide tiles keep the row in flight without spilling registers."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 2048)
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 512 else 1
    return block_v, num_warps


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    inv_temp: float = 1.0,
    softcap: float | None = None,
    save_lse: bool = True,
    sum_scores: bool = False,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token log-probs [B*T] (and logsumexp, score sums). labels: [B*T] int, < 0 = masked."""
    B, T, V = logits.shape
    N = B * T
    acc = _acc_dtype(logits.dtype)
    logp = torch.empty(N, dtype=acc, device=logits.device)
    lse = torch.empty(N, dtype=acc, device=logits.device) if save_lse else logp
    zsum = torch.empty(N, dtype=acc, device=logits.device) if sum_scores else logp
    if N == 0:
        return logp, (lse if save_lse else None), (zsum if sum_scores else None)
    block_v, num_warps = _launch_config(V, block_v)
    token_logps_fwd_kernel[(N,)](
        logits, *logits.stride(),
        labels, logp, lse, zsum,
        T, V, inv_temp, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, SAVE_LSE=save_lse, SUM_SCORES=sum_scores,
        ACC_DTYPE=_TL_ACC.get(acc, tl.float32), BLOCK_V=block_v, num_warps=num_warps,
    )
    return logp, (lse if save_lse else None), (zsum if sum_scores else None)


def token_logps_backward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    *,
    inv_temp: float = 1.0,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """Gradient of sum_n grad_logp[n] * logp[n] w.r.t. the logits, written to `out` (may be `logits`)."""
    B, T, V = logits.shape
    N = B * T
    if out is None:
        out = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
    if N == 0:
        return out
    block_v, num_warps = _launch_config(V, block_v)
    token_logps_bwd_kernel[(N,)](
        logits, *logits.stride(),
        out, *out.stride(),
        labels, lse, grad_logp,
        T, V, inv_temp, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, ACC_DTYPE=_TL_ACC.get(_acc_dtype(logits.dtype), tl.float32),
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return out
