"""INT8 GEMM in Triton with the scales applied in the epilogue.

``out[m, n] = (Σ_k a[m, k] · b[n, k]) · a_scale[m] · b_scale[n] (+ bias[n])``: a (M, K) int8
activations, b (N, K) int8 weight (row-major, read as its (K, N) transpose), the sum in int32 on
the tensor cores, then float32 scaling and one store in the output dtype — no int32 round trip
through memory as with ``torch._int_mm`` followed by torch ops. Programs walk the output tiles in
groups of GROUP_M row tiles so neighbouring programs share weight tiles in L2.
"""

from __future__ import annotations

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


def choose_int8_config(m: int, n: int) -> Int8GemmConfig:
    """Tiles by the number of rows and the width of the output: the fastest of
    ``scripts/gpu/bench_w8a8_gemm.py --sweep`` at the Llama-3-8B shapes (H100, torch 2.11,
    Triton 3.6; N = 1024, 4096, 14336). Few rows: the GEMM streams the weight, so narrow tiles and
    deep K blocks give enough programs; from ~1024 rows it is compute-bound: 128 x 128 x 128 with
    8 warps (128 x 256 was slower at every measured shape but down_proj, within 2% there)."""
    narrow, wide = n <= 2048, n > 8192
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


def choose_int8_tma_config(m: int, n: int) -> Int8GemmConfig:
    """Tiles for the persistent TMA kernel: the tiled kernel's below 1024 rows; above, 128 x 256 x
    128 with 8 warps and 3 stages, as measured (H100, Triton 3.6: 1.46-1.62x bf16 from 4096 rows
    at N >= 4096). The epilogue subtiling and loop flattening are ``--sweep`` candidates until a
    run shows them faster."""
    if m < 1024:
        return choose_int8_config(m, n)
    return Int8GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3)


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
    config = config or choose_int8_config(m, n)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _int8_gemm_kernel[grid](
        a, b, a_scale.reshape(-1), b_scale.reshape(-1), bias if bias is not None else b_scale, out,
        m, n, k, a.stride(0), b.stride(0), out.stride(0),
        A_PER_ROW=a_scale.numel() != 1 or m == 1, HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


# --- persistent TMA variant (Hopper) --------------------------------------------------------------
#
# One program per multiprocessor walks the output tiles; A, B and the output move through tensor
# descriptors (TMA on sm_90: asynchronous bulk copies, no address arithmetic in the loop, edges
# zero-filled on load and clipped on store). With ``flatten`` the tile loop and the K loop become
# one software-pipelined loop (loads of the next tile overlap this tile's epilogue) and the
# epilogue recomputes its tile from its own counter (``tile_c``), as the Triton tutorial
# ``09-persistent-matmul.py`` does; ``epilogue_subtile`` stores the tile in two halves along N.
# Opt-in (``QUANTKIT_INT8_GEMM=tma`` or ``bench_w8a8_gemm.py``) until measured against the
# default kernel; needs K a multiple of 16 and N of 8 (16-byte aligned rows).


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
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN):
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
    config = config or choose_int8_tma_config(m, n)
    if a.is_cuda:
        triton.set_allocator(_scratch)  # device-side descriptors need a little global scratch memory
        programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    else:
        programs = 4
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    programs = min(programs, tiles)
    _int8_gemm_tma_kernel[(programs,)](
        a, b, a_scale.reshape(-1), b_scale.reshape(-1), bias if bias is not None else b_scale, out, m, n, k,
        A_PER_ROW=a_scale.numel() != 1 or m == 1, HAS_BIAS=bias is not None, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m, NUM_PROGRAMS=programs,
        EPILOGUE_SUBTILE=config.epilogue_subtile, FLATTEN=config.flatten,
        STORE_N=config.block_n // 2 if config.epilogue_subtile else config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
