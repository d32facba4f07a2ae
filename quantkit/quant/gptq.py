"""GPTQ (Frantar et al., 2022): quantize one weight matrix column by column with error feedback.

Columns are quantized one at a time; each column's rounding error, scaled by the inverse Hessian,
is spread over the columns not yet quantized, so they compensate for it. Following the reference
code (IST-DASLab/gptq, ``fasterquant``): dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero
weight; ``H`` is damped by ``damp_percent * mean(diag(H))``; the algorithm works with the upper
Cholesky factor ``U`` of ``H⁻¹``; updates inside a block of ``block_size`` columns are applied
column by column and to the rest of the matrix once per block ("lazy batch" updates); with
act-order, columns go in order of decreasing ``diag(H)``; group scales are chosen when a group's
first column is reached, from the weights as updated so far (or, with static groups, up front
from the original weights); per-channel scales (group_size -1) are chosen up front.

Scales and zero points come from ``compute_qparams(..., min_zero=1, fp16_scales=True)``, so the
returned codes, scales and zeros are exactly what a GPTQ v1 checkpoint stores and
``QuantizedWeight.dequantize()`` equals what the checkpoint decodes to.

Speed choices (the column loop is sequential by nature, so its cost is kernel launches and
Python work, not arithmetic):

* the weight is kept transposed, (in, out), in processing order, so a column is a contiguous
  row and the lazy update of the remaining columns is one GEMM per block;
* a column costs six small tensor operations (divide, round, clamp, error, scale, rank-1
  update) and no host synchronisation; clamping ``round(w / s)`` to ``[-zero, maxq - zero]``
  keeps the zero point out of the loop, and codes are shifted and un-permuted once at the end;
* on CUDA with Triton each block's column loop is one kernel (``kernels/gptq_block_triton.py``),
  a program per tile of rows; without Triton (or with ``GPTQ_BLOCK_KERNEL = False``) it runs in
  fixed buffers and is captured once as a CUDA graph, then replayed for every block of that size
  (``CUDA_GRAPHS = False`` turns this off);
* with dynamic groups, blocks are cut so that each group starts a block: its scales are then
  computed outside the graph, from weights that already hold every earlier update;
* the loss is summed per block on the device and read once, with the Cholesky check the only
  other host synchronisation;
* linears that read the same inputs (q, k, v; gate, up) share one Hessian, and ``prepare_hessian``
  does once what GPTQ does to it (dead inputs, act-order, damping, the factorization) for all
  of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.quant.awq_clip import range_qparams, search_clip_ranges
from quantkit.quant.awq_error import diagonal_blocks
from quantkit.quant.qdq import compute_qparams, max_code
from quantkit.quant.rtn import QuantizedWeight, default_g_idx
from quantkit.quant.scheme import QuantScheme, check_group_size

CUDA_GRAPHS = True  # replay each block's column loop as a CUDA graph on CUDA devices
GPTQ_BLOCK_KERNEL = True  # on CUDA with Triton, run each block's column loop as one Triton kernel


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs; the defaults are the reference code's."""

    damp_percent: float = 0.01  # λ = damp_percent * mean(diag(H)), added to diag(H)
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # "desc_act": process columns by decreasing diag(H)
    static_groups: bool = False  # group scales fixed up front from the original weight
    clip_search: bool = True  # shrink each group's range where that lowers its output error (off: the reference GPTQ)
    clip_grid: int = 20  # shrink ratios evenly spaced from 1.0 down to 1 - clip_max_shrink
    clip_max_shrink: float = 0.5

    def __post_init__(self) -> None:
        damp = self.damp_percent
        if (
            isinstance(damp, bool)
            or not isinstance(damp, (int, float))
            or not 0 < damp < 1
        ):
            raise QuantkitError(
                f"damp_percent must be a number between 0 and 1 (exclusive), got {damp!r}; "
                "0.01 is the usual value"
            )
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise QuantkitError(
                f"GPTQ block_size must be a positive integer, got {size!r}; 128 is the usual value"
            )
        if isinstance(self.clip_grid, bool) or not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise QuantkitError(f"GPTQ clip_grid must be a positive integer, got {self.clip_grid!r}")
        shrink = self.clip_max_shrink
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 <= shrink < 1:
            raise QuantkitError(f"GPTQ clip_max_shrink must be a number in [0, 1), got {shrink!r}")
        for name in ("act_order", "static_groups", "clip_search"):
            if not isinstance(getattr(self, name), bool):
                raise QuantkitError(
                    f"GPTQ {name} must be true or false, got {getattr(self, name)!r}"
                )


@dataclass
class _GroupParams:
    """Per-group quantization parameters, stored (n_groups, out) so a group is a contiguous row."""

    scales: torch.Tensor  # float32
    zeros: torch.Tensor  # int32
    low: torch.Tensor  # float32: -zero, the smallest value of code - zero
    high: torch.Tensor  # float32: maxq - zero, the largest


@dataclass(frozen=True, eq=False)
class PreparedHessian:
    """A Hessian made ready for GPTQ once, for every linear that reads the same inputs.

    The linears of a group (q, k and v; gate and up) share their inputs' Hessian, and all that
    GPTQ does to it (dead inputs, act-order, damping, the Cholesky factor of the inverse, the clip
    search's blocks) depends on the Hessian and the settings alone, not on the weight. Made by
    ``prepare_hessian`` and passed to ``gptq_quantize`` in place of the Hessian, it spares every
    further linear a factorization, and gives the same result bit for bit.
    """

    hinv_upper: torch.Tensor  # (in, in) upper Cholesky factor of the damped H⁻¹, in processing order
    dead: torch.Tensor  # (in,) bool: inputs never seen (H_ii == 0), whose weights are zeroed
    perm: torch.Tensor | None  # processing order under act-order
    clip_blocks: torch.Tensor | None  # the clip search's diagonal blocks of the undamped H
    group_size: int
    config: GPTQConfig


def prepare_hessian(
    hessian: torch.Tensor,
    scheme: QuantScheme,
    config: GPTQConfig = GPTQConfig(),
    *,
    module_name: str = "<weight>",
    overwrite_hessian: bool = False,
) -> PreparedHessian:
    """``hessian`` (in, in) made ready, on its own device, for ``gptq_quantize`` of each linear
    that shares it under ``scheme`` and ``config``.

    With ``overwrite_hessian`` a float32 ``hessian`` is used as working memory and freed, so
    only the (in, in) factor is kept, however many linears then use it.
    """
    cols = _check_square(hessian, module_name)
    check_group_size(cols, scheme.group_size, module_name)
    h = _working_copy(hessian, hessian.device, overwrite_hessian)
    dead = _fill_dead(h)
    blocks = None
    if config.clip_search and not _dynamic(scheme, config):
        blocks = diagonal_blocks(h, scheme.group_size)  # fixed groups: original column order
    return _factor(h, dead, blocks, scheme, config, module_name)


def gptq_quantize(
    weight_out_in: torch.Tensor,
    hessian: torch.Tensor | PreparedHessian,
    scheme: QuantScheme,
    config: GPTQConfig = GPTQConfig(),
    *,
    module_name: str = "<weight>",
    overwrite_hessian: bool = False,
) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize a weight (out, in) given its inputs' Hessian (in, in).

    ``hessian`` is the Hessian itself, or for linears that share one, what ``prepare_hessian``
    made of it with the same scheme and config, on the weight's device: the result is the same.
    With ``overwrite_hessian`` a float32 ``hessian`` on the weight's device is used as working
    memory (and left overwritten) instead of copied, which saves a full matrix where no other
    linear needs it (a ``PreparedHessian`` is never changed).

    Returns the quantized weight (codes in original column order; with act-order ``g_idx`` maps
    each column to its group in processing order) and the reference code's loss
    ``Σ (w - q)² / d² / 2``, for reporting. Works on the weight's device, in float32.
    """
    weight = weight_out_in.detach()
    shared = isinstance(hessian, PreparedHessian)
    rows, cols = _check_shapes(weight, hessian.hinv_upper if shared else hessian, module_name)
    check_group_size(cols, scheme.group_size, module_name)
    device = weight.device
    w = weight.to(torch.float32, copy=True)
    dynamic = _dynamic(scheme, config)
    clip = _ClipSearch(config) if config.clip_search else None
    if shared:
        _check_prepared(hessian, scheme, config, device, module_name)
        prepared = hessian
        w.masked_fill_(prepared.dead, 0.0)
        params = None if dynamic else _fixed_params_from_blocks(w, scheme, clip, prepared.clip_blocks)
    else:
        prepared, params = _prepare_alone(w, hessian, scheme, config, clip, module_name, overwrite_hessian)
    del hessian

    perm = prepared.perm
    weight_t = w.t().contiguous() if perm is None else w.t().index_select(0, perm)
    del w
    if clip is not None and dynamic:
        clip.blocks = prepared.clip_blocks  # groups follow processing order
    group_index = _group_of_processed_column(
        cols, scheme.group_size, perm, dynamic, device
    )
    if dynamic:
        params = _empty_params(cols // scheme.group_size, rows, device)
    shifted_codes_t, loss = _quantize_columns(
        weight_t, prepared.hinv_upper, params, group_index, scheme, config.block_size, dynamic, clip
    )

    return _record(shifted_codes_t, params, group_index, perm, scheme, dynamic), float(
        loss
    ) / 2


def _prepare_alone(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    config: GPTQConfig,
    clip: _ClipSearch | None,
    module_name: str,
    overwrite_hessian: bool,
) -> tuple[PreparedHessian, _GroupParams | None]:
    """The Hessian prepared for the one weight ``w`` (dead inputs zeroed in place), and that
    weight's fixed group parameters (None for dynamic groups).

    The fixed parameters are chosen before the factorization, so that their clip search's
    blocks (a whole (in, in) matrix per channel) are gone before it needs its working memory.
    """
    h = _working_copy(hessian, w.device, overwrite_hessian)
    dead = _fill_dead(h)
    w.masked_fill_(dead, 0.0)
    params = None if _dynamic(scheme, config) else _fixed_params(w, scheme, clip, h)
    return _factor(h, dead, None, scheme, config, module_name), params


def _working_copy(hessian: torch.Tensor, device: torch.device, overwrite: bool) -> torch.Tensor:
    """``hessian`` as float32 on ``device``: itself where it may be overwritten and already is."""
    if overwrite and hessian.dtype == torch.float32 and hessian.device == device:
        return hessian
    return hessian.detach().to(device=device, dtype=torch.float32, copy=True)


def _fill_dead(h: torch.Tensor) -> torch.Tensor:
    """Inputs never seen (H_ii == 0), given H_ii = 1 in place, as the reference code does."""
    dead = h.diagonal() == 0
    h.diagonal().masked_fill_(dead, 1.0)
    return dead


def _factor(
    h: torch.Tensor,
    dead: torch.Tensor,
    clip_blocks: torch.Tensor | None,
    scheme: QuantScheme,
    config: GPTQConfig,
    module_name: str,
) -> PreparedHessian:
    """Act-order, damping and the upper Cholesky factor of H⁻¹ from the working Hessian ``h``
    (dead inputs filled), which is used up. With dynamic groups the clip search's blocks are
    taken here, in processing order and undamped; fixed groups' come in as ``clip_blocks``."""
    perm = _processing_order(h, config.act_order)
    if perm is not None:
        permuted = h.index_select(0, perm).index_select(1, perm)
        _release(h)
        h = permuted
    if config.clip_search and _dynamic(scheme, config):
        clip_blocks = diagonal_blocks(h, scheme.group_size)
    h.diagonal().add_(config.damp_percent * h.diagonal().mean())
    hinv_upper = _inverse_cholesky_upper(h, config.damp_percent, module_name)
    return PreparedHessian(hinv_upper, dead, perm, clip_blocks, scheme.group_size, config)


def _dynamic(scheme: QuantScheme, config: GPTQConfig) -> bool:
    """Whether group parameters are chosen as the columns go (else up front, "fixed")."""
    return scheme.group_size != -1 and not config.static_groups


def _check_prepared(
    prepared: PreparedHessian,
    scheme: QuantScheme,
    config: GPTQConfig,
    device: torch.device,
    module_name: str,
) -> None:
    if prepared.group_size != scheme.group_size or prepared.config != config:
        raise QuantkitError(
            f"the Hessian of layer '{module_name}' was prepared for group size "
            f"{prepared.group_size} and {prepared.config}, but is used with group size "
            f"{scheme.group_size} and {config}; prepare it with the settings it is used with"
        )
    if prepared.hinv_upper.device != device:
        raise QuantkitError(
            f"the Hessian of layer '{module_name}' was prepared on {prepared.hinv_upper.device}, "
            f"but the weight is on {device}; prepare it on the weight's device"
        )


def _record(
    shifted_codes_t: torch.Tensor,
    params: _GroupParams,
    group_index: torch.Tensor,
    perm: torch.Tensor | None,
    scheme: QuantScheme,
    dynamic: bool,
) -> QuantizedWeight:
    """Codes back in original column order, and each original column's group."""
    cols = shifted_codes_t.shape[0]
    codes_t = shifted_codes_t + params.zeros.index_select(0, group_index)
    g_idx = default_g_idx(cols, scheme.group_size, codes_t.device)
    if perm is not None:
        inverse = torch.argsort(perm)
        codes_t = codes_t.index_select(0, inverse)
        if dynamic:  # groups follow processing order: g_idx[perm[j]] = j // group_size
            g_idx = g_idx.index_select(0, inverse)
    return QuantizedWeight(
        codes=codes_t.t().to(torch.int32).contiguous(),
        scales=params.scales.t().contiguous(),
        zeros=params.zeros.t().contiguous(),
        g_idx=g_idx,
        bits=scheme.bits,
        group_size=scheme.group_size,
        symmetric=scheme.symmetric,
    )


def _quantize_columns(
    weight_t: torch.Tensor,
    hinv_upper: torch.Tensor,
    params: _GroupParams,
    group_index: torch.Tensor,
    scheme: QuantScheme,
    block_size: int,
    dynamic: bool,
    clip: _ClipSearch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTQ loop over ``weight_t`` (in, out), updated in place; codes minus zero, Σ err²."""
    cols, rows = weight_t.shape
    shifted_codes_t = torch.empty_like(weight_t)
    loss = torch.zeros((), dtype=torch.float32, device=weight_t.device)
    runners: dict[int, _BlockRunner] = {}
    for start, end in _block_bounds(cols, block_size, scheme.group_size, dynamic):
        if dynamic and start % scheme.group_size == 0:
            # a group starts a block, where every earlier update has landed
            group = start // scheme.group_size
            _set_group_params(
                params, group, weight_t[start : start + scheme.group_size], scheme, clip
            )
        runner = runners.get(end - start)
        if runner is None:
            runner = runners[end - start] = _BlockRunner(
                end - start, rows, weight_t.device
            )
        errors = runner.run(
            weight_t[start:end],
            hinv_upper[start:end, start:end],
            params,
            group_index[start:end],
            out_codes=shifted_codes_t[start:end],
        )
        loss += errors.square().sum()
        if end < cols:
            weight_t[end:].addmm_(hinv_upper[start:end, end:].t(), errors, alpha=-1)
    return shifted_codes_t, loss


class _BlockRunner:
    """Quantizes the columns of one block, ``size`` columns over ``rows`` rows at a time.

    On CUDA with Triton the whole column loop is one kernel launch (``gptq_block_triton``),
    reading the weights, parameters and ``hinv`` where they lie. Otherwise the loop is
    ``gptq_block_reference`` in fixed buffers: on CUDA it is captured once as a CUDA graph and
    replayed for every later block of the same size, so a block costs a few launches instead of
    one Python round per kernel (the first block of each size runs eagerly, which also warms the
    kernels up before capture); on the CPU every block runs eagerly. ``GPTQ_BLOCK_KERNEL = False``
    or ``QUANTKIT_KERNELS=reference`` keep the graph on CUDA; ``QUANTKIT_KERNELS=triton`` runs
    the kernel anywhere (on the CPU under ``TRITON_INTERPRET=1``).
    """

    def __init__(self, size: int, rows: int, device: torch.device) -> None:
        from quantkit.kernels.backend import use_triton

        def buffer(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        self.errors = buffer(size, rows)
        self._kernel = GPTQ_BLOCK_KERNEL and use_triton(self.errors)
        if not self._kernel:  # the loop's fixed inputs and outputs
            self.weight, self.codes = buffer(size, rows), buffer(size, rows)
            self.scale, self.low, self.high = (buffer(size, rows) for _ in range(3))
            self.hinv = buffer(size, size)
        self._use_graph = CUDA_GRAPHS and device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_runs = 0

    def run(
        self,
        weight_t: torch.Tensor,
        hinv: torch.Tensor,
        params: _GroupParams,
        group_index: torch.Tensor,
        *,
        out_codes: torch.Tensor,
    ) -> torch.Tensor:
        """Quantize ``weight_t`` (size, out); write codes minus zero; return the scaled errors."""
        if self._kernel:
            from quantkit.kernels.gptq_block_triton import gptq_block_triton

            gptq_block_triton(
                weight_t, hinv, params.scales, params.low, params.high, group_index,
                codes=out_codes, errors=self.errors,
            )
            return self.errors
        self.weight.copy_(weight_t)
        self.hinv.copy_(hinv)
        torch.index_select(params.scales, 0, group_index, out=self.scale)
        torch.index_select(params.low, 0, group_index, out=self.low)
        torch.index_select(params.high, 0, group_index, out=self.high)
        if self._graph is not None:
            self._graph.replay()
        elif self._use_graph and self._eager_runs > 0:
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                self._steps()
            self._graph.replay()
        else:
            self._steps()
            self._eager_runs += 1
        out_codes.copy_(self.codes)
        return self.errors

    def _steps(self) -> None:
        from quantkit.kernels.gptq_block import gptq_block_reference

        gptq_block_reference(
            self.weight, self.hinv, self.scale, self.low, self.high,
            codes=self.codes, errors=self.errors,
        )


def _block_bounds(
    cols: int, block_size: int, group_size: int, dynamic: bool
) -> list[tuple[int, int]]:
    """Lazy-update blocks; with dynamic groups, cut so that every group starts a block.

    A group's scales are then taken at a block start, where the weights hold every update so
    far. Lazy batching is an exact regrouping of the updates, so cutting blocks at other places
    does not change the result (only the order of float additions).
    """
    if dynamic and group_size < block_size:
        block_size = group_size
    starts = set(range(0, cols, block_size))
    if dynamic:
        starts |= set(range(0, cols, group_size))
    ordered = sorted(starts)
    return list(zip(ordered, ordered[1:] + [cols]))


def _fixed_params(
    w: torch.Tensor, scheme: QuantScheme, clip: _ClipSearch | None, h: torch.Tensor
) -> _GroupParams:
    """Per-channel or static-group parameters from the whole (dead-zeroed) weight, up front,
    the clip search's blocks taken from the undamped ``h`` in original column order."""
    blocks = None if clip is None else diagonal_blocks(h, scheme.group_size)
    return _fixed_params_from_blocks(w, scheme, clip, blocks)


def _fixed_params_from_blocks(
    w: torch.Tensor, scheme: QuantScheme, clip: _ClipSearch | None, blocks: torch.Tensor | None
) -> _GroupParams:
    """``_fixed_params`` given the clip search's blocks (a prepared Hessian's)."""
    if clip is not None:
        scales, zeros = clip.qparams(w, blocks, scheme)
    else:
        scales, zeros = compute_qparams(
            w, scheme.bits, scheme.group_size, scheme.symmetric, min_zero=1, fp16_scales=True
        )
    return _params_from(scales.t().contiguous(), zeros.t().contiguous(), scheme.bits)


class _ClipSearch:
    """Clipped group ranges for GPTQ: each (row, group) keeps the shrink ratio of its range (1.0
    included) with the least output error ``d H_g dᵀ`` of that group's columns alone, as AWQ's
    clipping search does; the columns' later error feedback then works from the clipped grid."""

    def __init__(self, config: GPTQConfig) -> None:
        self.ratios = torch.linspace(1.0, 1.0 - config.clip_max_shrink, config.clip_grid).tolist()
        self.blocks: torch.Tensor | None = None  # (n_groups, size, size) in processing order

    def qparams(
        self, w: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scales and zeros (out, n_groups) of ``w`` (out, in) on the best clipped ranges."""
        ranges = search_clip_ranges(w, blocks, scheme, self.ratios)
        return range_qparams(ranges, scheme)


def _params_from(
    scales_t: torch.Tensor, zeros_t: torch.Tensor, bits: int
) -> _GroupParams:
    zeros_float = zeros_t.to(torch.float32)
    return _GroupParams(scales_t, zeros_t, -zeros_float, max_code(bits) - zeros_float)


def _empty_params(n_groups: int, rows: int, device: torch.device) -> _GroupParams:
    shape = (n_groups, rows)
    floats = {"dtype": torch.float32, "device": device}
    return _GroupParams(
        torch.empty(shape, **floats),
        torch.empty(shape, dtype=torch.int32, device=device),
        torch.empty(shape, **floats),
        torch.empty(shape, **floats),
    )


def _set_group_params(
    params: _GroupParams,
    group: int,
    columns_t: torch.Tensor,
    scheme: QuantScheme,
    clip: _ClipSearch | None = None,
) -> None:
    """Fill one group's parameters from its current weights ``columns_t`` (group_size, out)."""
    if clip is not None:
        per_group = QuantScheme(bits=scheme.bits, group_size=-1, symmetric=scheme.symmetric)
        scales, zeros = clip.qparams(columns_t.t(), clip.blocks[group : group + 1], per_group)
    else:
        scales, zeros = compute_qparams(
            columns_t.t(), scheme.bits, -1, scheme.symmetric, min_zero=1, fp16_scales=True
        )
    zeros_float = zeros[:, 0].to(torch.float32)
    params.scales[group].copy_(scales[:, 0])
    params.zeros[group].copy_(zeros[:, 0])
    params.low[group].copy_(-zeros_float)
    params.high[group].copy_(max_code(scheme.bits) - zeros_float)


def _group_of_processed_column(
    cols: int,
    group_size: int,
    perm: torch.Tensor | None,
    dynamic: bool,
    device: torch.device,
) -> torch.Tensor:
    """Group of the j-th processed column: by processing position, or by original column."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.long, device=device)
    if dynamic or perm is None:
        return torch.arange(cols, device=device) // group_size
    return perm // group_size


def _processing_order(h: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """Columns by decreasing diag(H) under act-order (stable, so ties keep their order)."""
    if not act_order:
        return None
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def _release(matrix: torch.Tensor) -> None:
    """Free a working matrix's memory now, even where a caller still holds the tensor (the
    Hessian it asked us to overwrite)."""
    matrix.set_(torch.empty(0, device=matrix.device, dtype=matrix.dtype))


def _inverse_cholesky_upper(
    h: torch.Tensor, damp_percent: float, module_name: str
) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), with one host sync to check that it exists.

    On the CPU as the GPTQ reference computes it (factor, invert, factor again), so the CPU figures
    published against other tools stay as measured. On accelerators by reversal: with J the
    reversal permutation and J H J = L Lᵀ, H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper
    triangular with a positive diagonal, so it is U: one factorisation and one triangular solve,
    half the time (H100, 28,672 inputs: 0.75 against 1.57 s; the factors agree to 1e-6 of their
    largest entry, ``scripts/gpu/profile_gptq_layer.py``). Either way at most two (in, in)
    matrices live at once: each step frees its input.
    """
    if h.device.type == "cpu":
        lower, info = torch.linalg.cholesky_ex(h)
        _release(h)
        inverse = torch.cholesky_inverse(lower)
        del lower
        upper, info_inverse = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        info = info | info_inverse
    else:
        upper, info = _inverse_cholesky_upper_by_reversal(h)
    if not bool((info == 0) & torch.isfinite(upper.diagonal()).all()):
        raise QuantkitError(
            f"GPTQ could not factor the Hessian of layer '{module_name}' (not positive definite "
            f"with damp_percent={damp_percent}); raise damp_percent (for example to 0.1) or "
            "calibrate on more tokens"
        )
    return upper


def _inverse_cholesky_upper_by_reversal(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J L⁻¹ J, cholesky info) for J H J = L Lᵀ; frees ``h``."""
    flipped = h.flip(0, 1)
    _release(h)
    lower, info = torch.linalg.cholesky_ex(flipped)
    del flipped
    inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # in place: no third matrix
    del lower
    return inverse.flip(0, 1), info


def _check_square(hessian: torch.Tensor, module_name: str) -> int:
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise QuantkitError(
            f"the Hessian of layer '{module_name}' must be a square (in, in) matrix, "
            f"got shape {tuple(hessian.shape)}"
        )
    return hessian.shape[0]


def _check_shapes(
    weight: torch.Tensor, hessian: torch.Tensor, module_name: str
) -> tuple[int, int]:
    if weight.dim() != 2:
        raise QuantkitError(
            f"GPTQ needs a 2-D weight (out, in) for layer '{module_name}', "
            f"got shape {tuple(weight.shape)}"
        )
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise QuantkitError(
            f"the Hessian of layer '{module_name}' has shape {tuple(hessian.shape)}, but the layer "
            f"has {cols} inputs, so it must be ({cols}, {cols}); collect it from this layer's inputs"
        )
    return rows, cols


__all__ = ["GPTQConfig", "PreparedHessian", "gptq_quantize", "prepare_hessian"]
