"""INT8 GEMM in Triton with the scales applied in the epilogue.

``out[m, n] = (Σ_k a[m, k] · b[n, k]) · a_scale[m] · b_scale[n] (+ bias[n])``: a (M, K) int8
activations, b (N, K) int8 weight (row-major, read as its (K, N) transpose), the sum in int32 on
the tensor cores, then float32 scaling and one store in the output dtype — no int32 round trip
through memory as with ``torch._int_mm`` followed by torch ops. Programs walk the output tiles in
groups of GROUP_M row tiles so neighbouring programs share weight tiles in L2.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Int8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # persistent TMA kernel only: the epilogue stores the tile in two halves along N (half the
    # shared memory for the output staging, which can go to one more pipeline stage), and the
    # tile loop and the K loop are flattened into one software-pipelined loop, so the next tile's
    # loads overlap this tile's epilogue
    epilogue_subtile: bool = False
    flatten: bool = False
    # persistent TMA kernel only: Triton's automatic warp specialization of the tile loop
    # (``tl.range(..., warp_specialize=True)``; on Hopper Triton 3.5+ runs its ``hopper_warpspec``
    # pass: producer warps issue the TMA loads, consumer warp groups the wgmma). Its tutorial
    # ``09-persistent-matmul.py`` turns flattening off with it on Hopper ("Hopper warpspec doesn't
    # work with flatten"). ``bench_w8a8_gemm.py --sweep --warp-specialize`` candidates, not a
    # default: not yet measured
    warp_specialize: bool = False


def choose_int8_config(m: int, n: int) -> Int8GemmConfig:
    """Tiles by the number of rows and the width of the output: the fastest of
    ``scripts/gpu/bench_w8a8_gemm.py --sweep`` at the Llama-3-8B shapes (H100, torch 2.11,
    Triton 3.6; N = 1024, 4096, 14336; ``scripts/results/w8a8_gemm_h100_sweep2.json``, where this
    table is the fastest swept tile at every measured row count up to 2048 but gate/up_proj's 1 to 4
    rows, now 16 x 128 x 128 as measured there). Few rows: the GEMM streams the weight, so narrow
    tiles and deep K blocks give enough programs; from ~1024 rows it is compute-bound: 128 x 128 x
    128 with 8 warps (128 x 256 was slower at every measured shape)."""
    narrow, wide = n <= 2048, n > 8192
    if m <= 4 and wide:
        return Int8GemmConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=4)
    if m <= 16:
        if narrow or (m > 8 and not wide):
            return Int8GemmConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4)
        return Int8GemmConfig(16, 64, 256, group_m=1, num_warps=4, num_stages=4)
    if m <= 32:
        if wide:
            return Int8GemmConfig(32, 64, 256, group_m=8, num_warps=4, num_stages=4)
        return Int8GemmConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        if narrow:
            return Int8GemmConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4)
        if wide:
            return Int8GemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=4)
        return Int8GemmConfig(32, 64, 256, group_m=8, num_warps=4, num_stages=4)
    if m <= 256:
        if narrow:
            return Int8GemmConfig(16 if m <= 128 else 32, 64, 256, group_m=1 if m <= 128 else 8, num_warps=4,
                                  num_stages=4)
        if wide:
            if m <= 128:
                return Int8GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4)
            return Int8GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3)
        return Int8GemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=4)
    if m <= 512:
        if narrow:
            return Int8GemmConfig(64, 64, 128, group_m=8, num_warps=4, num_stages=4)
        if wide:
            return Int8GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3)
        return Int8GemmConfig(64, 128, 128, group_m=8, num_warps=4, num_stages=4)
    if narrow and m <= 2048:
        return Int8GemmConfig(64, 64 if m <= 1024 else 128, 128, group_m=8, num_warps=4, num_stages=4)
    return Int8GemmConfig(128, 128, 128, group_m=8, num_warps=8, num_stages=3)


def choose_int8_tma_config(m: int, n: int, k: int | None = None) -> Int8GemmConfig:
    """Tiles for the persistent TMA kernel: the tiled kernel's below 1024 rows; above, by shape
    class, the fastest of the H100 sweep (Triton 3.6, ``scripts/results/w8a8_gemm_h100_sweep2.json``,
    4 stages, epilogue in halves, flattened loops): 256 x 128 x 128 for wide outputs (N > 8192,
    gate/up_proj: 1.57-1.60x bf16 from 2048 rows) and long sums (K > 8192, down_proj: 1.63-1.67x
    from 4096), 128 x 256 x 128 otherwise (q/o_proj: 1.53-1.55x; 256 x 128 within 1% there). With
    bf16 or fp16 output both need 229,408 bytes of shared memory (H100: 232,448); a float32 output
    does not fit, and ``fit_shared_memory`` drops a stage."""
    if m < 1024:
        return choose_int8_config(m, n)
    if n > 8192 or (k is not None and k > 8192):
        return Int8GemmConfig(256, 128, 128, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=True,
                              flatten=True)
    return Int8GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=True, flatten=True)


# --- shared memory ---------------------------------------------------------------------------------


def shared_memory_bytes(config: Int8GemmConfig, out_bytes: int, tma: bool) -> int:
    """Shared memory a launch of ``config`` takes, as Triton 3.6 lays it out on Hopper: one int8 A
    (BLOCK_M, BLOCK_K) and B (BLOCK_N, BLOCK_K) tile per pipeline stage; the TMA kernel adds the
    output tile (half of it with ``epilogue_subtile``) staged for its store and an 8-byte barrier
    per stage. 128 x 256 x 128 in 3 stages with a float32 output: 278,552 bytes, what the H100
    refused (OutOfResources, limit 232,448). The tiled kernel's epilogue reuses the stages' memory."""
    stages = config.num_stages * (config.block_m + config.block_n) * config.block_k
    if not tma:
        return stages
    store_n = config.block_n // 2 if config.epilogue_subtile else config.block_n
    return stages + config.block_m * store_n * out_bytes + 8 * config.num_stages


def _smaller(config: Int8GemmConfig, tma: bool) -> Int8GemmConfig | None:
    """The next smaller config: the TMA epilogue in halves, then fewer stages (down to 2), then
    shorter K blocks (down to 32), then the larger of the M and N blocks halved (down to 16)."""
    if tma and not config.epilogue_subtile and config.block_n >= 32:
        return dataclasses.replace(config, epilogue_subtile=True)
    if config.num_stages > 2:
        return dataclasses.replace(config, num_stages=config.num_stages - 1)
    if config.block_k > 32:
        return dataclasses.replace(config, block_k=config.block_k // 2)
    if max(config.block_m, config.block_n) > 16:
        if config.block_m >= config.block_n:
            return dataclasses.replace(config, block_m=config.block_m // 2)
        return dataclasses.replace(config, block_n=config.block_n // 2)
    return None


def fit_shared_memory(config: Int8GemmConfig, out_bytes: int, tma: bool, limit: int | None) -> Int8GemmConfig:
    """``config``, or the first smaller one (``_smaller``) whose ``shared_memory_bytes`` fit in
    ``limit`` (no limit: unchanged); ValueError when even the smallest does not."""
    if limit is None:
        return config
    fitted = config
    while shared_memory_bytes(fitted, out_bytes, tma) > limit:
        fitted = _smaller(fitted, tma)
        if fitted is None:
            raise ValueError(f"no INT8 GEMM tile from {config} fits in {limit} bytes of shared memory")
    return fitted


@functools.cache
def _shared_memory_limit(index: int) -> int | None:
    """The device's shared memory per block (opt-in maximum: 232,448 bytes on an H100)."""
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - another driver or Triton layout: launch and see
        limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0)
        return int(limit) or None


_FITTED: dict[tuple, Int8GemmConfig] = {}


def _launch_fitting(launch, config: Int8GemmConfig, out_dtype: torch.dtype, tma: bool, device: torch.device):
    """``launch(config)`` with ``config`` shrunk to the device's shared memory; should Triton still
    refuse it (OutOfResources: the estimate is Triton 3.6's layout), the next smaller config, and
    so on; the config that ran is remembered per (config, dtype, kernel, device)."""
    from triton.runtime.errors import OutOfResources

    key = (config, out_dtype, tma, device)
    fitted = _FITTED.get(key)
    if fitted is None:
        limit = _shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        fitted = fit_shared_memory(config, torch.empty((), dtype=out_dtype).element_size(), tma, limit)
    while True:
        try:
            out = launch(fitted)
        except OutOfResources:
            smaller = _smaller(fitted, tma)
            if smaller is None:
                raise
            fitted = smaller
            continue
        _FITTED[key] = fitted
        return out


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_om,
    A_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows and columns past the edge read a valid row instead (their results are not stored)
    safe_m = tl.where(rm < M, rm, 0).to(tl.int64)
    safe_n = tl.where(rn < N, rn, 0).to(tl.int64)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + safe_n[None, :] * stride_bn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + rk)[None, :] < K, other=0)
            b = tl.load(b_ptrs, mask=(k0 + rk)[:, None] < K, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_valid = rm < M
    n_valid = rn < N
    if A_PER_ROW:
        a_scale = tl.load(a_scale_ptr + rm, mask=m_valid, other=0.0)
    else:
        a_scale = tl.load(a_scale_ptr + rm * 0)
    b_scale = tl.load(b_scale_ptr + rn, mask=n_valid, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


def int8_gemm_triton(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype,
                     config: Int8GemmConfig | None = None) -> torch.Tensor:
    """(M, N) in ``out_dtype`` from a (M, K) int8, a_scale (M, 1) or (1,), b (N, K) int8, b_scale (N,)."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a is (M, {k}) but b is {tuple(b.shape)}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    def launch(config):
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        _int8_gemm_kernel[grid](
            a, b, a_scale.reshape(-1), b_scale.reshape(-1), bias if bias is not None else b_scale, out,
            m, n, k, a.stride(0), b.stride(0), out.stride(0),
            A_PER_ROW=a_scale.numel() != 1 or m == 1, HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return out

    return _launch_fitting(launch, config or choose_int8_config(m, n), out_dtype, False, a.device)


# --- persistent TMA variant (Hopper) --------------------------------------------------------------
#
# One program per multiprocessor walks the output tiles; A, B and the output move through tensor
# descriptors (TMA on sm_90: asynchronous bulk copies, no address arithmetic in the loop, edges
# zero-filled on load and clipped on store). With ``flatten`` the tile loop and the K loop become
# one software-pipelined loop (loads of the next tile overlap this tile's epilogue) and the
# epilogue recomputes its tile from its own counter (``tile_c``), as the Triton tutorial
# ``09-persistent-matmul.py`` does; ``epilogue_subtile`` stores the tile in two halves along N.
# ``int8_linear``'s ``auto`` takes it for large GEMMs on Hopper (``int8_linear._tma_pays``);
# needs K a multiple of 16 and N of 8 (16-byte aligned rows).


@triton.jit
def _tile_coordinates(tile, num_m, per_group, GROUP_M: tl.constexpr):
    first_m = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _int8_gemm_tma_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    A_PER_ROW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
    FLATTEN: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    STORE_N: tl.constexpr,
):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, STORE_N])
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_c = tl.program_id(0) - NUM_PROGRAMS  # the epilogue's own tile counter (see above)
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coordinates(tile, num_m, per_group, GROUP_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        tile_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_coordinates(tile_c, num_m, per_group, GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if A_PER_ROW:
            a_scale = tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)
        else:
            a_scale = tl.load(a_scale_ptr + rm * 0)
        b_scale = tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(out, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], left.to(out_ptr.dtype.element_ty))
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], right.to(out_ptr.dtype.element_ty))
        else:
            out_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(out_ptr.dtype.element_ty))


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def int8_gemm_tma_triton(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype,
                         config: Int8GemmConfig | None = None) -> torch.Tensor:
    """``int8_gemm_triton`` as a persistent kernel over tensor descriptors (same result, bit for bit)."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or k % 16 or n % 8:
        raise ValueError(f"the TMA kernel needs a (M, K), b (N, K) with K % 16 == 0 and N % 8 == 0; got {tuple(a.shape)}"
                         f" and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    if a.is_cuda:
        triton.set_allocator(_scratch)  # device-side descriptors need a little global scratch memory
        processors = torch.cuda.get_device_properties(a.device).multi_processor_count
    else:
        processors = 4

    def launch(config):
        programs = min(processors, triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n))
        _int8_gemm_tma_kernel[(programs,)](
            a, b, a_scale.reshape(-1), b_scale.reshape(-1), bias if bias is not None else b_scale, out, m, n, k,
            A_PER_ROW=a_scale.numel() != 1 or m == 1, HAS_BIAS=bias is not None, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, NUM_PROGRAMS=programs,
            EPILOGUE_SUBTILE=config.epilogue_subtile, FLATTEN=config.flatten, WARP_SPECIALIZE=config.warp_specialize,
            STORE_N=config.block_n // 2 if config.epilogue_subtile else config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return out

    return _launch_fitting(launch, config or choose_int8_tma_config(m, n, k), out_dtype, True, a.device)
