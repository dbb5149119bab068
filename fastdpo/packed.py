"""Packed, padding-free batches: rows given by cumulative sequence lengths.

A packed batch puts its B rows one after another in a [1, total_tokens] layout (flash-attention's
varlen convention): ``cu_seqlens`` is an integer [B + 1] vector with ``cu_seqlens[0] = 0``,
non-decreasing, and ``cu_seqlens[B] = total_tokens``; row b owns tokens
``cu_seqlens[b] : cu_seqlens[b + 1]``. The kernels are layout-agnostic (they see one vector of
per-token results), so a packed batch only changes how per-token results are summed into rows.

Every layout is reduced to row offsets: a padded [B, T] batch is the packed batch with offsets
0, T, 2T, ..., BT, so one segment sum serves both.
"""

from __future__ import annotations

import torch

from . import validation as V


def check_cu_seqlens(cu_seqlens: object, batch_shape: torch.Size, like: torch.Tensor) -> int:
    """Static checks (no device sync); returns the number of rows B. Values are checked by `row_offsets`."""
    cu_seqlens = V.check_tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if batch_shape[0] != 1:
        raise ValueError(
            f"with cu_seqlens the batch must be packed as [1, total_tokens], got {tuple(batch_shape)}"
        )
    V.check_same_device(like, cu_seqlens=cu_seqlens)
    return cu_seqlens.numel() - 1


@torch.library.custom_op("fastdpo::row_offsets", mutates_args=())
def _row_offsets(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    # A custom op so that torch.compile sees an opaque call instead of data-dependent Python
    # branches (the value checks read the tensor).
    cu = cu_seqlens.to(torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    if first != 0 or last != total or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at total_tokens = {total}; "
            f"got first {first}, last {last}"
        )
    return cu.clone()


@_row_offsets.register_fake
def _(cu_seqlens, total):
    return cu_seqlens.new_empty(cu_seqlens.shape, dtype=torch.int64)


def row_offsets(cu_seqlens: torch.Tensor | None, rows: int, tokens_per_row: int, device: torch.device) -> torch.Tensor:
    """int64 [B + 1] offsets of each row in the flat token vector (validated cu_seqlens, or padded rows)."""
    if cu_seqlens is None:
        return torch.arange(rows + 1, device=device, dtype=torch.int64) * tokens_per_row
    return _row_offsets(cu_seqlens, rows * tokens_per_row)


def segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B] sums of ``values[offsets[b] : offsets[b + 1]]``: int64 for bool / integer values, else the
    values' dtype (differentiable).

    A difference of prefix sums taken in float64 (int64 for integers): deterministic on every
    device (no atomics), and exact enough that the result matches a plain fp32 row sum. A NaN or
    inf would poison the prefix of every later segment, so the prefix runs over the finite values
    and each segment's non-finite ones are added back from their counts: NaN, inf or -inf in that
    segment alone, as a plain sum gives.
    """
    if not values.is_floating_point():  # counts (bool / integer input): int64 sums
        prefix = torch.cat([values.new_zeros(1, dtype=torch.int64), values.to(torch.int64).cumsum(0)])
        return prefix[offsets[1:]] - prefix[offsets[:-1]]
    finite = torch.isfinite(values)
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64),
                        torch.where(finite, values, 0.0).to(torch.float64).cumsum(0)])
    sums = prefix[offsets[1:]] - prefix[offsets[:-1]]
    nan, pos, neg = (segment_sums(x, offsets) > 0 for x in (values.isnan(), values == float("inf"),
                                                            values == float("-inf")))
    special = torch.where(nan | (pos & neg), float("nan"), torch.where(pos, float("inf"), float("-inf")))
    return torch.where(nan | pos | neg, special, sums).to(values.dtype)
