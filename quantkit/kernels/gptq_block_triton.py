"""GPTQ's column loop over one lazy-update block in one Triton launch (``gptq_block_reference``'s
work).

As separate torch kernels the loop costs about six launches per column whatever the number of
rows, so on a GPU a block takes as long for 1,000 rows as for 28,000 (even replayed as a CUDA
graph) and does not get faster when data-parallel ranks split the rows. Rows are independent
given the block's ``hinv``, so here each program holds the block's weights for ``BLOCK_R`` rows
in registers, as a (size, BLOCK_R) float32 tile, and runs all the columns itself: per column it
reads the column out of the tile, rounds it, writes its code and scaled error, and applies the
rank-1 update to the tile. The weights never go back to memory (GPTQ only needs the codes and the
errors afterwards).

The arithmetic is the reference's, operation for operation: IEEE division (``div_rn``, where
Triton's ``/`` is approximate on GPUs), round half to even, clamp as min(max(x, low), high), and
``w - code * s`` and the rank-1 update as fmas (torch's ``addcmul`` and ``addr`` round once or
twice depending on the compiler's contraction, on the CPU on whether an element falls in a
vectorized loop or the scalar tail). Codes therefore equal the reference's but for a value within
one rounding of a .5 tie, and errors agree to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.backend import next_power_of_2

TILE_ELEMENTS_PER_THREAD = 32  # the weight tile's floats per thread (registers), as rows per program allow
MANY_ROWS = 4096  # from here, more rows per program (``block_config``)


@triton.jit
def _round_half_even(x):
    """torch.round from floor (libdevice's rint does not run under TRITON_INTERPRET=1).

    ``x - floor(x)`` is exact in floating point, and above 2**23 every float is an integer.
    """
    below = tl.floor(x)
    fraction = x - below
    below_is_odd = (below - 2.0 * tl.floor(below * 0.5)) == 1.0
    up = (fraction > 0.5) | ((fraction == 0.5) & below_is_odd)
    return tl.where(up, below + 1.0, below)


@triton.jit
def _column_inputs(j, size, r, r_ok, k, group_ptr, scale_ptr, low_ptr, high_ptr, hinv_ptr, stride_scale,
                   stride_low, stride_high, stride_h_row, stride_h_col):
    """Column j's scale, code range, hinv[j, j] and hinv[j, j + 1:] (h, zero elsewhere).

    For j == size (the prefetch after the last column) it reads the last column's, unused.
    """
    last = tl.minimum(j, size - 1)  # a clamped address, not a mask: a scalar mask fails when interpreted
    group = tl.load(group_ptr + last).to(tl.int64)
    s = tl.load(scale_ptr + group * stride_scale + r, mask=r_ok, other=1.0)
    low = tl.load(low_ptr + group * stride_low + r, mask=r_ok, other=0.0)
    high = tl.load(high_ptr + group * stride_high + r, mask=r_ok, other=0.0)
    diagonal = tl.load(hinv_ptr + last * (stride_h_row + stride_h_col))
    h = tl.load(hinv_ptr + last * stride_h_row + k * stride_h_col, mask=(k > j) & (k < size), other=0.0)
    return s, low, high, diagonal, h


@triton.jit
def _gptq_block_kernel(
    w_ptr, hinv_ptr, scale_ptr, low_ptr, high_ptr, group_ptr, codes_ptr, errors_ptr,
    size, rows, stride_w, stride_h_row, stride_h_col, stride_scale, stride_low, stride_high, stride_codes,
    stride_errors,
    SIZE: tl.constexpr, BLOCK_R: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    k = tl.arange(0, SIZE)  # the tile's column (of the block) index, padded to a power of two
    tile = tl.load(w_ptr + k[:, None] * stride_w + r[None, :],
                   mask=(k[:, None] < size) & r_ok[None, :], other=0.0)
    s, low, high, diagonal, h = _column_inputs(0, size, r, r_ok, k, group_ptr, scale_ptr, low_ptr, high_ptr,
                                               hinv_ptr, stride_scale, stride_low, stride_high, stride_h_row,
                                               stride_h_col)
    for j in range(size):
        # the next column's loads go out now and arrive while this column computes: with few
        # rows per GPU the loop's latency, not its arithmetic, is the block's time
        s_next, low_next, high_next, diagonal_next, h_next = _column_inputs(
            j + 1, size, r, r_ok, k, group_ptr, scale_ptr, low_ptr, high_ptr, hinv_ptr, stride_scale,
            stride_low, stride_high, stride_h_row, stride_h_col)
        w = tl.sum(tl.where(k[:, None] == j, tile, 0.0), axis=0)  # column j: one term, exact
        code = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(w, s)), low), high)
        error = tl.math.div_rn(tl.math.fma(-code, s, w), diagonal)
        tl.store(codes_ptr + j * stride_codes + r, code, mask=r_ok)
        tl.store(errors_ptr + j * stride_errors + r, error, mask=r_ok)
        tile = tl.math.fma(-h[:, None], error[None, :], tile)  # columns after j only (h is 0 elsewhere)
        s, low, high, diagonal, h = s_next, low_next, high_next, diagonal_next, h_next


def block_config(size: int, rows: int = 0) -> tuple[int, int]:
    """(BLOCK_R, num_warps) for a block of ``size`` columns over ``rows`` rows: one warp, so that
    reading a column out of the tile reduces within a warp, without a barrier. Below
    ``MANY_ROWS`` rows it holds 32 of the tile's floats per thread (8 rows of a 128-column block),
    so short weights still make many programs; from there four times as many rows per warp, fewer
    programs re-reading ``hinv`` (H100, 128 columns, ``scripts/gpu/bench_gptq_block.py --sweep``:
    1,024 rows 81.5 us at 8 rows against 94.2 at 32; 8,192 rows 96.7 against 121.7; 28,672 rows
    151 against 312; 64 rows per warp spills and is several times slower).
    """
    padded = next_power_of_2(size)
    block_r = max(1, min(64, 32 * TILE_ELEMENTS_PER_THREAD // padded))  # 64: a row's values, 2 per thread
    if rows >= MANY_ROWS:
        block_r = min(32, 4 * block_r)
    return block_r, 1


def gptq_block_triton(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    scales: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    group_index: torch.Tensor,
    *,
    codes: torch.Tensor,
    errors: torch.Tensor,
    block_r: int | None = None,
    num_warps: int | None = None,
) -> None:
    """``gptq_block_reference`` in one launch, reading each column's parameters from its group.

    ``weight`` (size, rows) is read, not updated; ``hinv`` (size, size) may be any view;
    ``scales``, ``low`` and ``high`` are (groups, rows), and column j uses their row
    ``group_index[j]`` (the reference takes them gathered, one row per column); ``codes`` and
    ``errors`` (size, rows) are written. Float32 throughout; row-major operands need unit last
    stride. ``block_r`` and ``num_warps`` override ``block_config`` (for tuning).
    """
    size, rows = weight.shape
    _check_operands(weight, hinv, scales, low, high, group_index, codes, errors)
    if size == 0 or rows == 0:
        return
    default_r, default_warps = block_config(size, rows)
    block_r = block_r or default_r
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        weight, hinv, scales, low, high, group_index, codes, errors,
        size, rows, weight.stride(0), hinv.stride(0), hinv.stride(1), scales.stride(0), low.stride(0),
        high.stride(0), codes.stride(0), errors.stride(0),
        SIZE=next_power_of_2(size), BLOCK_R=block_r, num_warps=num_warps or default_warps,
    )


def _check_operands(weight, hinv, scales, low, high, group_index, codes, errors) -> None:
    size, rows = weight.shape
    named = {"weight": weight, "hinv": hinv, "scales": scales, "low": low, "high": high,
             "codes": codes, "errors": errors}
    for name, t in named.items():
        if t.dtype != torch.float32 or t.device != weight.device:
            raise ValueError(f"{name} must be float32 on {weight.device}, got {t.dtype} on {t.device}")
    for name in ("weight", "scales", "low", "high", "codes", "errors"):
        if named[name].stride(1) != 1 and rows > 1:
            raise ValueError(f"{name} must have unit last stride")
    if hinv.shape != (size, size) or codes.shape != weight.shape or errors.shape != weight.shape:
        raise ValueError(f"hinv must be ({size}, {size}) and codes, errors ({size}, {rows})")
    if scales.shape[1] != rows or low.shape != scales.shape or high.shape != scales.shape:
        raise ValueError(f"scales, low and high must be (groups, {rows}) alike")
    if (group_index.shape != (size,) or group_index.device != weight.device
            or group_index.dtype not in (torch.int32, torch.int64) or (size > 1 and group_index.stride(0) != 1)):
        raise ValueError(f"group_index must be ({size},) integers, contiguous, on {weight.device}")
