"""Exact pure-PyTorch twin of kernels/token_logps.py, for CPU and any device without Triton.

Same math and signatures as the kernels, the exact 1 - p_label of confident tokens included
(summed from the other tokens' probabilities, saved beside the logsumexp). It works on chunks of
the unmasked token rows, so its working memory is a few [chunk x V] fp32 tiles however long the
batch (reused in place where it can), and masked rows are never read (forward) and only
zero-filled (backward).
"""

from __future__ import annotations

import torch

from .kernels.contract import SlabResults, TokenOptions, TokenResults, backward_state

# Rows per chunk are chosen so that one fp32 [rows, V] tile stays near this many bytes.
CHUNK_BYTES = 64 * 2**20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(z: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor:
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z * inv_temp if inv_temp != 1.0 else z


def _scores_grad(z: torch.Tensor, inv_temp: float, softcap: float | None) -> torch.Tensor | float:
    if softcap is not None:
        return (1.0 - torch.tanh(z / softcap).square()) * inv_temp
    return inv_temp


def _chunks(labels: torch.Tensor, T: int, V: int):
    """Yield (batch index, time index, flat index, label) of unmasked token rows, chunk by chunk."""
    flat = torch.nonzero(labels >= 0).squeeze(1)
    rows = max(1, CHUNK_BYTES // (4 * max(V, 1)))
    for start in range(0, flat.numel(), rows):
        idx = flat[start : start + rows]
        yield idx // T, idx % T, idx, labels[idx].long()


def token_logps_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    options: TokenOptions = TokenOptions(),
    *,
    block_v: int | None = None,
    num_warps: int | None = None,
    rows_per_program: int | None = None,
) -> TokenResults:
    """Per-token results [B*T] for labels [B*T] (int, < 0 = masked), those `options` ask for
    (`block_v`, `num_warps` and `rows_per_program` are the kernels' launch settings, accepted
    and unused)."""
    results, _max_scores = _forward(logits, labels, None, options)
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
    state always saved)."""
    results, max_scores = _forward(logits, labels, label_offset, options)
    return SlabResults.of(results, max_scores)


def _forward(logits, labels, label_offset, options: TokenOptions):
    """(TokenResults, the max scores of a slab with token metrics or None), as the kernels' `_forward`."""
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    slab = label_offset is not None
    inv_temp, softcap, token_metrics = options.inv_temp, options.softcap, options.token_metrics
    save_lse = options.save_lse or slab
    logp = torch.zeros(B * T, dtype=acc, device=logits.device)

    def vector(wanted: bool) -> torch.Tensor | None:
        return torch.zeros_like(logp) if wanted else None

    lse_all = logp.new_zeros(B * T, 2) if save_lse else None  # the backward state (lse, 1 - p_label)
    zsum, ent, top1, lss = (vector(options.sum_scores), vector(token_metrics), vector(token_metrics),
                            vector(options.log_sum_sq))
    top = torch.full_like(logp, float("-inf")) if slab and token_metrics else None
    for b, t, idx, y in _chunks(labels, T, V):
        # Indexing with tensors copies: s is this loop's own tile, so it is reused in place below
        # (on CPU the tiles are most of the memory this pass holds).
        s = _scores(logits[b, t].to(acc), inv_temp, softcap)
        if lss is not None:  # WPO's statistic first, from the scores before the tile is reused in place
            lss[idx] = _log_sum_sq(s)
        column = y - (label_offset or 0)
        inside = (column >= 0) & (column < V)
        at = column.clamp(0, V - 1)[:, None]
        picked = s.gather(1, at).squeeze(1)
        if zsum is not None:
            zsum[idx] = s.sum(-1)
        best = s.max(-1, keepdim=True).values
        shift = torch.where(best == float("-inf"), 0.0, best)  # an all -inf row: lse = -inf, as torch's
        shifted = s.sub_(shift)
        e = shifted.exp() if token_metrics else shifted.exp_()  # the entropy needs both tiles
        total = e.sum(-1)
        lse = shift.squeeze(1) + total.log()
        if slab:  # the label's score, or 0 when the label is in another slab
            logp[idx] = torch.where(inside, picked, 0.0)
        else:
            logp[idx] = torch.where(y < V, picked - lse, float("nan"))  # as the kernel: NaN for a label >= V
        if save_lse:
            lse_all[idx, 0] = lse
        if token_metrics:
            # log S - E_p[s - max] with S = sum exp(s - max): no cancellation at the logits' size.
            ent[idx] = total.log() - (e * torch.where(e > 0, shifted, 0.0)).sum(-1) / total  # e = 0 where s = -inf
            top1[idx] = (s.argmax(-1) == column).to(acc)
            if slab:
                top[idx] = best.squeeze(1)
        if save_lse:  # exact 1 - p_label: the sum of the other tokens' mass (e is not needed after this)
            e.scatter_(1, at, torch.where(inside[:, None], 0.0, e.gather(1, at)))
            lse_all[idx, 1] = e.sum(-1) / total
    results = TokenResults(logps=logp, state=lse_all, score_sums=zsum, entropy=ent, top1=top1, log_sum_sq=lss)
    return results, top


def _log_sum_sq(s: torch.Tensor) -> torch.Tensor:
    """log sum_v softmax(s)_v^2 per row, as the kernel sums it: log S2 - 2 log S, both relative to the
    row max (logsumexp(2 s) - 2 lse would cancel two numbers of the size of the logits)."""
    shifted = s - s.max(-1, keepdim=True).values
    return torch.logsumexp(2 * shifted, -1) - 2 * torch.logsumexp(shifted, -1)


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
    """The kernels' `token_logps_backward` (same contract): the logits gradient of
    sum_n grad_logp[n] * logp[n] from the forward's state, written to `out` (may be `logits`)."""
    B, T, V = logits.shape
    acc = _acc_dtype(logits.dtype)
    inv_temp, softcap = options.inv_temp, options.softcap
    state = backward_state(state, B * T)
    if out is None:
        out = torch.zeros((B, T, V), dtype=logits.dtype, device=logits.device)
    else:  # in place: every masked row must become exactly zero too
        masked = torch.nonzero(labels < 0).squeeze(1)
        out[masked // T, masked % T] = 0
    for b, t, idx, y in _chunks(labels, T, V):
        z = logits[b, t].to(acc)  # a copy (tensor indexing); the softcap's gradient needs it kept
        state_c = state[idx]
        # The scores are a new tile, or z itself when there is neither softcap nor temperature (and
        # then z is not needed after): dz is made in place over them.
        dz = _scores(z, inv_temp, softcap).sub_(state_c[:, :1]).exp_().neg_()
        column = y - label_offset  # outside [0, V): the label is in another vocabulary slab
        inside = (column >= 0) & (column < V)
        at = column.clamp(0, V - 1)[:, None]
        # The label column: 1 - p_label from the forward's sum over the other tokens, not 1 - p (cancels).
        dz.scatter_(1, at, torch.where(inside[:, None], state_c[:, 1:].to(acc), dz.gather(1, at)))
        dz *= grad_logp[idx, None].to(acc)
        dz *= _scores_grad(z, inv_temp, softcap)
        out[b, t] = dz.to(out.dtype)
    return out
