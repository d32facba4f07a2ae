"""GPTQ's column loop over one lazy-update block, in plain torch: the reference of
``gptq_block_triton`` and what ``quantkit.quant.gptq`` runs on the CPU and in its CUDA graphs.

The loop is sequential over the block's columns (each column's rounding error moves the columns
after it) but independent across rows, which is what lets the Triton kernel give each program a
tile of rows and run the whole loop in one launch.
"""

from __future__ import annotations

import torch


def gptq_block_reference(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    *,
    codes: torch.Tensor,
    errors: torch.Tensor,
) -> None:
    """Quantize the columns of ``weight`` (size, rows) in order, with GPTQ's error feedback.

    ``hinv`` (size, size) is the block of the upper Cholesky factor of H⁻¹; ``scale``, ``low``
    and ``high`` (size, rows) hold each column's scale and code range minus its zero point. Writes
    ``codes`` = clamp(round(w / s), low, high) (the code minus zero, as floats) and ``errors`` =
    (w - code * s) / hinv[j, j] (size, rows); ``weight`` is left holding the updated columns.

    Six small tensor operations per column into fixed tensors and no host synchronisation, so a
    CUDA graph can capture the loop once and replay it for every block of this size.
    """
    size = weight.shape[0]
    column, code, error = weight.unbind(0), codes.unbind(0), errors.unbind(0)
    scales, lows, highs = scale.unbind(0), low.unbind(0), high.unbind(0)
    hinv_row, hinv_diag = hinv.unbind(0), hinv.diagonal().unbind(0)
    for j in range(size):
        c, e = code[j], error[j]
        torch.div(column[j], scales[j], out=c)
        c.round_().clamp_(lows[j], highs[j])  # = round(w / s) + zero, clamped, minus zero
        torch.addcmul(column[j], c, scales[j], value=-1, out=e)
        e.div_(hinv_diag[j])
        if j + 1 < size:
            weight[j + 1 :].addr_(hinv_row[j][j + 1 :], e, alpha=-1)
