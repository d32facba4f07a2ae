"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): prune one weight matrix with error feedback, and optionally quantize the
weights that survive in the same pass.

It is GPTQ's column loop with a mask. Columns are processed left to right; a column's weights
that the mask prunes become zero (and, with a quantization scheme, the survivors are rounded to
the grid), and the error, scaled by the inverse Hessian, is spread over the columns not yet
processed so they compensate. The mask is chosen as the loop goes, from the weights as updated
so far: for unstructured sparsity once per block of ``block_size`` columns, pruning the
``floor(block_numel * sparsity)`` weights of least ``w² / [H⁻¹]_jj²`` (the OBS saliency, with
``H⁻¹``'s diagonal taken from its upper Cholesky factor, as the reference does) across the whole
block; for N:M at every M-th column, pruning the ``M - N`` least salient of each row's next ``M``.

What is the same as GPTQ is GPTQ's code (``quant/gptq.py``): the dead-input handling (``H_ii = 0``
gets ``H_ii = 1`` and a zero weight), the damping (``damp_percent`` of the mean diagonal), the
upper Cholesky factor of ``H⁻¹`` with its clear error when the Hessian cannot be factored, the
lazy block updates, and, when quantizing, the group parameters (taken when a group's first
column is reached, here from the group's weights with the block's pruned weights already zero,
so pruned weights do not stretch the range), the per-group clip search and the record of codes,
scales and zeros that every checkpoint writer reads. A pruned weight quantizes to exactly zero
(its code is the zero point), so the quantized checkpoint keeps the sparsity pattern.

Act-order is not offered: N:M runs and the sparsity pattern are defined in the original column
order, which is also the order the reference SparseGPT uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.awq_error import diagonal_blocks
from quantkit.quant.gptq import (
    GPTQConfig,
    _block_bounds,
    _check_shapes,
    _ClipSearch,
    _empty_params,
    _fixed_params,
    _group_of_processed_column,
    _inverse_cholesky_upper,
    _record,
    _set_group_params,
)
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme, check_group_size
from quantkit.sparsity.masks import layer_keep_mask, nm_keep_mask
from quantkit.sparsity.structure import MaskStructure

NM_SELECTIONS = ("joint", "diagonal")
MAX_JOINT_CHOICES = 128  # larger N:M runs fall back to the diagonal saliency


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT's knobs; the defaults are the reference code's (the clip search is quantkit's
    GPTQ default, used only when the survivors are quantized)."""

    block_size: int = 128
    damp_percent: float = 0.01
    clip_search: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    nm_selection: str = "joint"  # N:M runs: "joint" OBS error of each choice, or "diagonal" (the reference)

    def __post_init__(self) -> None:
        if self.nm_selection not in NM_SELECTIONS:
            raise QuantkitError(f"nm_selection must be one of {', '.join(NM_SELECTIONS)}, got {self.nm_selection!r}")
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise QuantkitError(f"SparseGPT block_size must be a positive integer, got {size!r}; 128 is the usual value")
        damp = self.damp_percent
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise QuantkitError(f"damp_percent must be a number between 0 and 1 (exclusive), got {damp!r}; "
                                "0.01 is the usual value")
        self.gptq_config()  # the clip options, checked where GPTQ checks them

    def gptq_config(self) -> GPTQConfig:
        return GPTQConfig(damp_percent=self.damp_percent, block_size=self.block_size, clip_search=self.clip_search,
                          clip_grid=self.clip_grid, clip_max_shrink=self.clip_max_shrink)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # (out, in) float32: pruned and, with a scheme, the quantized weight it represents
    keep: torch.Tensor  # (out, in) bool: True where the weight survived
    qweight: QuantizedWeight | None  # with a scheme: codes, scales and zeros for the checkpoint
    loss: float  # Σ (w - q)² / d² / 2, the reference code's loss


def check_block_alignment(structure: MaskStructure, block_size: int, group_size: int, in_features: int,
                          module_name: str) -> None:
    """N:M runs must not straddle a block (nor, when quantizing, a group): their starts are multiples of M."""
    if not structure.is_nm:
        return
    m = structure.m
    if in_features % m:
        raise QuantkitError(f"{structure.name} sparsity needs the input size of layer '{module_name}' "
                            f"({in_features}) to be divisible by {m}")
    if block_size % m:
        raise QuantkitError(f"SparseGPT block_size {block_size} must be a multiple of {m} for {structure.name} sparsity")
    if group_size != -1 and group_size % m:
        raise QuantkitError(f"group size {group_size} must be a multiple of {m} for {structure.name} sparsity")


def sparsegpt_prune(
    weight_out_in: torch.Tensor,
    hessian: torch.Tensor,
    structure: MaskStructure,
    sparsity: float,
    config: SparseGPTConfig = SparseGPTConfig(),
    *,
    scheme: QuantScheme | None = None,
    module_name: str = "<weight>",
    overwrite_hessian: bool = False,
) -> SparseGPTResult:
    """Prune (and with ``scheme``, quantize) a weight (out, in) given its inputs' Hessian (in, in).

    With ``overwrite_hessian`` a float32 ``hessian`` on the weight's device is used as working
    memory instead of copied (the last linear of a group that shares one Hessian). Works on the
    weight's device, in float32.
    """
    weight = weight_out_in.detach()
    rows, cols = _check_shapes(weight, hessian, module_name)
    group_size = scheme.group_size if scheme is not None else -1
    if scheme is not None:
        check_group_size(cols, group_size, module_name)
    check_block_alignment(structure, config.block_size, group_size, cols, module_name)
    device = weight.device
    w = weight.to(torch.float32, copy=True)
    reuse = overwrite_hessian and hessian.dtype == torch.float32 and hessian.device == device
    h = hessian if reuse else hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    del hessian

    dead = h.diagonal() == 0
    h.diagonal().masked_fill_(dead, 1.0)
    w.masked_fill_(dead, 0.0)

    quantize = scheme is not None
    dynamic = quantize and group_size != -1
    clip = _ClipSearch(config.gptq_config()) if quantize and config.clip_search else None
    params = _fixed_params(w, scheme, clip, h) if quantize and not dynamic else None
    if clip is not None and dynamic:
        clip.blocks = diagonal_blocks(h, group_size)
    h.diagonal().add_(config.damp_percent * h.diagonal().mean())
    try:
        hinv_upper = _inverse_cholesky_upper(h, config.damp_percent, module_name)
    except QuantkitError as error:
        raise QuantkitError(str(error).replace("GPTQ", "SparseGPT", 1)) from None

    weight_t = w.t().contiguous()  # (in, out): a column is a contiguous row
    del w
    keep_t = torch.ones(weight_t.shape, dtype=torch.bool, device=device)
    codes_t = torch.zeros_like(weight_t) if quantize else None  # code minus zero
    if dynamic:
        params = _empty_params(cols // group_size, rows, device)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for start, end in _block_bounds(cols, config.block_size, group_size, dynamic):
        if not structure.is_nm:
            block, diag = weight_t[start:end], hinv_upper.diagonal()[start:end]
            keep_t[start:end] = layer_keep_mask(block.square() / diag.square().unsqueeze(1), sparsity)
        if dynamic and start % group_size == 0:
            # the group's weights with this block's pruned ones zeroed (later blocks: as they are)
            group = start // group_size
            columns = weight_t[start : start + group_size] * keep_t[start : start + group_size]
            _set_group_params(params, group, columns, scheme, clip)
        errors = _prune_block(weight_t, keep_t, codes_t, hinv_upper, params, start, end, structure, group_size,
                              joint=config.nm_selection == "joint")
        loss += errors.square().sum()
        if end < cols:
            weight_t[end:].addmm_(hinv_upper[start:end, end:].t(), errors, alpha=-1)

    qweight = None
    if quantize:
        group_index = _group_of_processed_column(cols, group_size, None, dynamic, device)
        qweight = _record(codes_t, params, group_index, None, scheme, dynamic)
    return SparseGPTResult(weight=weight_t.t().contiguous(), keep=keep_t.t().contiguous(), qweight=qweight,
                           loss=float(loss) / 2)


def _prune_block(weight_t: torch.Tensor, keep_t: torch.Tensor, codes_t: torch.Tensor | None,
                 hinv_upper: torch.Tensor, params, start: int, end: int, structure: MaskStructure,
                 group_size: int, joint: bool = True) -> torch.Tensor:
    """Columns ``start:end`` in place: choose N:M runs as they come, prune, quantize, feed the
    error forward inside the block; returns the block's scaled errors (count, out)."""
    block, keep = weight_t[start:end], keep_t[start:end]
    hinv = hinv_upper[start:end, start:end]
    diag = hinv.diagonal()
    errors = torch.empty_like(block)
    for j in range(end - start):
        if structure.is_nm and j % structure.m == 0:
            run = slice(j, j + structure.m)
            if joint and math.comb(structure.m, structure.n) <= MAX_JOINT_CHOICES:
                keep[run] = joint_nm_keep(block[run], hinv[run, run], structure.n, structure.m)
            else:
                saliency = block[run].square() / diag[run].square().unsqueeze(1)  # (m, out)
                keep[run] = nm_keep_mask(saliency.t(), structure.n, structure.m).t()
        column = block[j]
        target = column * keep[j]
        if codes_t is not None:
            g = (start + j) // group_size if group_size != -1 else 0
            code = torch.round(target / params.scales[g]).clamp_(min=params.low[g], max=params.high[g])
            codes_t[start + j] = code
            target = code * params.scales[g]
        error = (column - target) / diag[j]
        errors[j] = error
        block[j] = target
        if j + 1 < end - start:
            block[j + 1 :].addr_(hinv[j, j + 1 :], error, alpha=-1)
    return errors


def joint_nm_keep(run_t: torch.Tensor, upper: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask (m, out) of one N:M run chosen by the joint OBS error of each choice.

    ``run_t`` (m, out) holds the run's current weights (column j of the layer is row j here) and
    ``upper`` (m, m) the run's block of the upper Cholesky factor ``U`` of the remaining columns'
    inverse Hessian. Columns before the run are already final, so ``(H_F⁻¹)_SS`` for any set ``S``
    of the run's columns is ``(Uᵀ U)_SS`` of this block alone, and pruning ``S`` (with the optimal
    update of every later column, which the column loop then applies) costs
    ``w_S [(H_F⁻¹)_SS]⁻¹ w_Sᵀ`` for each output row. Every row keeps the choice of least cost
    among the C(m, n) choices. The reference instead ranks the columns one by one by
    ``w² / U_jj²``, which leaves out how the pruned columns' errors interact.
    """
    pruned = _choices(m, m - n, run_t.device)  # (c, p) column sets to prune
    inverse = upper.t() @ upper  # (m, m): the run's block of H_F⁻¹
    blocks = inverse[pruned.unsqueeze(2), pruned.unsqueeze(1)]  # (c, p, p)
    costs_of = torch.linalg.inv(blocks)
    weights = run_t.t()[:, pruned]  # (out, c, p)
    cost = torch.einsum("ocp,cpq,ocq->oc", weights, costs_of, weights)
    best = pruned[cost.argmin(1)]  # (out, p)
    keep = torch.ones(run_t.shape[1], m, dtype=torch.bool, device=run_t.device)
    keep.scatter_(1, best, False)
    return keep.t()


@lru_cache(maxsize=16)
def _choices_cpu(m: int, p: int) -> torch.Tensor:
    return torch.tensor(list(combinations(range(m), p)), dtype=torch.long)


def _choices(m: int, p: int, device: torch.device) -> torch.Tensor:
    return _choices_cpu(m, p).to(device)
