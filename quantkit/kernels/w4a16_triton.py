"""``quantized_linear`` on the GPU: pick a kernel by the number of rows of x.

* M <= GEMV_MAX_M (decode): the GEMV kernel, split over K until the GPU is full; one row of x
  against a large 4-bit weight takes its variant with packed unpacking (``w4a16_gemv_packed_triton``);
* M <= DENSE_MIN_M: the tensor-core GEMM kernel with a tile sized for M (split over K when the
  tiles alone do not fill the GPU);
* larger M: dequantize the weight to x's dtype and use ``torch.matmul``. The GEMM is
  compute-bound there, so this costs a 16-bit layer's time plus one pass over the weight (about
  the time of a 16-bit GEMV), and nothing extra with ``PackedWeight.keep_dense``, which keeps
  the dequantized weight after the first call.

The thresholds and tiles are starting points from the kernels' shapes; ``scripts/gpu/bench_kernels.py``
measures them (``--sweep``) and tells where to move them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from quantkit.kernels.backend import dot_precision
from quantkit.kernels.packed_weight import PackedWeight, check_linear_input
from quantkit.kernels.w4a16_dequant_triton import dequantize_triton
from quantkit.kernels.w4a16_gemm_triton import w4a16_gemm_kernel
from quantkit.kernels.w4a16_gemv_triton import w4a16_gemv_kernel

GEMV_MAX_M = 2
DENSE_MIN_M = 256
# One row of x and a weight of at least this many values takes the GEMV with packed unpacking
# (``w4a16_gemv_packed_triton``), H100, M = 1 (``scripts/results/w4a16_gemv_packed_h100.txt``):
# gate/up 4096x28672 34.2 against 45.9 us, down 14336x4096 20.7 against 26.3 us, with 256-wide
# tiles; qkv (25M values) and o (17M) gained nothing, so they keep the GEMV below.
PACKED_GEMV_MIN_WEIGHTS = 1 << 25
# A memory-bound kernel needs several resident programs per multiprocessor to keep enough loads in
# flight; split-K supplies them when the output tiles alone are too few.
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class GemmConfig:
    """One launch choice: ``kernel`` is ``gemv``, ``gemv-packed`` (4-bit, CUDA only), ``gemm`` or
    ``dense``; split_k None = automatic."""

    kernel: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    fast_codes: bool = True  # codes to floats by bit operations (see the kernels' docstrings)


PACKED_GEMV_CONFIG = GemmConfig("gemv-packed", block_m=1, block_n=256, block_k=128)


def choose_config(m: int, dtype: torch.dtype = torch.bfloat16, out_features: int = 0) -> GemmConfig:
    """The default launch for m rows of x.

    From the H100 tile sweep at the 4096 x 14336 shape (``bench_kernels.py --sweep``, results in
    scripts/results/kernels_sweep_h100.txt): M=1 26 us with 128-wide GEMV tiles against 174 us
    with 64-wide ones; 16x256x64 tiles with 8 warps for M up to 16; 64x64x128 without split-K up
    to 64; 128x64x128 below 256; dequantize + matmul from 256 rows. Other shapes not yet swept.
    float32 activations double the shared memory of a tile, so they keep smaller GEMM tiles.
    """
    if m <= GEMV_MAX_M:
        # the fused gate/up (4096 x 28672): 256-wide tiles 44.5 us against 49.8 (H100 sweep at M=1)
        return GemmConfig("gemv", block_m=1, block_n=256 if out_features >= 16384 else 128, block_k=128)
    if m >= DENSE_MIN_M:
        return GemmConfig("dense")
    if dtype == torch.float32:
        if m <= 16:
            return GemmConfig("gemm", block_m=16, block_n=64, block_k=128, num_stages=3)
        if m <= 64:
            return GemmConfig("gemm", block_m=32, block_n=128, block_k=64, num_stages=3)
        return GemmConfig("gemm", block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=2)
    if m <= 16:
        return GemmConfig("gemm", block_m=16, block_n=256, block_k=64, num_warps=8, num_stages=3)
    if m <= 64:
        return GemmConfig("gemm", block_m=64, block_n=64, block_k=128, split_k=1, num_stages=3)
    return GemmConfig("gemm", block_m=128, block_n=64, block_k=128, split_k=1, num_stages=3)


def quantized_linear_triton(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x (..., in) float16/bfloat16 (float32 works, slower); no host sync."""
    check_linear_input(x, packed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, packed.in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if config is None and _packed_gemv_pays(x2, packed):
        config = PACKED_GEMV_CONFIG
    config = config or choose_config(m, x2.dtype, packed.out_features)
    if m == 0:
        y = x2.new_empty(0, packed.out_features)
    elif config.kernel == "dense":
        y = _dense_matmul(x2, packed, bias)
    else:
        y = _fused(x2, packed, bias, config)
    return y.reshape(*lead, packed.out_features)


def _packed_gemv_pays(x: torch.Tensor, packed: PackedWeight) -> bool:
    """One row, a large 4-bit weight, 16-bit x, a CUDA device: the packed GEMV (its inline PTX
    does not run under the Triton interpreter)."""
    from quantkit.kernels.w4a16_gemv_packed_triton import supports

    return (x.shape[0] == 1 and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and packed.in_features * packed.out_features >= PACKED_GEMV_MIN_WEIGHTS and supports(packed, 128))


def _fused(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, config: GemmConfig
) -> torch.Tensor:
    m, k = x.shape
    n = packed.out_features
    rows = m if config.kernel.startswith("gemv") else triton.cdiv(m, config.block_m)
    tiles = rows * triton.cdiv(n, config.block_n)
    split_k, k_per_split = _split_k(tiles, k, config, x.device)
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    common = {
        "BITS": packed.bits,
        "PACK": packed.pack,
        "GROUP_SIZE": packed.group_size,
        "BLOCK_N": config.block_n,
        "BLOCK_K": config.block_k,
        "SPLIT_K": split_k,
        "HAS_PERM": packed.perm is not None,
        "HAS_BIAS": bias is not None,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
    # a kernel never reads the perm or bias pointer it is told it lacks: any tensor fills the slot
    perm = packed.perm if packed.perm is not None else packed.qweight
    bias_arg = bias if bias is not None else packed.scales
    args = (x, packed.qweight, packed.scales, packed.zeros, perm, bias_arg, out)
    grid = (rows, triton.cdiv(n, config.block_n), split_k)
    if config.kernel == "gemv":
        w4a16_gemv_kernel[grid](
            *args,
            n,
            k,
            x.stride(0),
            out.stride(0),
            k_per_split,
            FAST_CODES=config.fast_codes and packed.bits <= 16,
            **common,
        )
    elif config.kernel == "gemv-packed":
        from quantkit.kernels.w4a16_gemv_packed_triton import w4a16_gemv_packed_kernel

        w4a16_gemv_packed_kernel[grid](*args, n, k, x.stride(0), out.stride(0), k_per_split, **common)
    elif config.kernel == "gemm":
        w4a16_gemm_kernel[grid](
            *args,
            m,
            n,
            k,
            x.stride(0),
            out.stride(0),
            k_per_split,
            BLOCK_M=config.block_m,
            DOT_PRECISION=dot_precision(x.dtype),
            FAST_CODES=_fast_codes_mode(config, x.dtype, packed.bits),
            **common,
        )
    else:
        raise ValueError(f"unknown kernel {config.kernel!r} (gemv, gemv-packed, gemm or dense)")
    if split_k == 1:
        return out
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def _fast_codes_mode(config: GemmConfig, dtype: torch.dtype, bits: int) -> int:
    """The GEMM's FAST_CODES: 1 bfloat16 (codes below 128), 2 float16 (below 1024), 0 off."""
    if not config.fast_codes:
        return 0
    if dtype == torch.bfloat16 and bits <= 7:
        return 1
    if dtype == torch.float16 and bits <= 10:
        return 2
    return 0


def _split_k(
    tiles: int, k: int, config: GemmConfig, device: torch.device
) -> tuple[int, int]:
    """(split_k, k_per_split): about PROGRAMS_PER_SM programs per multiprocessor, 4+ K tiles each."""
    k_tiles = triton.cdiv(k, config.block_k)
    split_k = config.split_k
    if split_k is None:
        wanted = PROGRAMS_PER_SM * _multiprocessors(device)
        split_k = max(1, min(triton.cdiv(wanted, tiles), k_tiles // 4))
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    split_k = triton.cdiv(k_tiles, tiles_per_split)
    return split_k, tiles_per_split * config.block_k


def _dense_matmul(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    weight_t = packed.cached_dense(
        ("triton", x.dtype), lambda: dequantize_triton(packed, x.dtype)
    )
    if packed.perm is not None:
        x = x.index_select(1, packed.perm)
    if bias is None:
        return x @ weight_t
    return torch.addmm(bias.to(x.dtype), x, weight_t)


def _multiprocessors(device: torch.device) -> int:
    return _cuda_multiprocessors(device.index or 0) if device.type == "cuda" else 4


@functools.cache
def _cuda_multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
