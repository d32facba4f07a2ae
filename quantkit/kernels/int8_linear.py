"""W8A8 INT8 linear: quantize the activations (per token or with a static scale), multiply in int8
with int32 sums, scale in the epilogue. Three implementations of one function:

* ``int8_linear_reference``: plain torch, exact (``quant.w8a8.w8a8_matmul_reference``: the int32
  sums are exact in float64), runs anywhere;
* ``int8_linear_int_mm``: ``torch._int_mm`` (cuBLASLt int8 on CUDA, also on the CPU) for the sum,
  then the scales in torch; the same numbers as the reference, bit for bit, on the CPU;
* ``int8_linear_triton``: the activations quantized by one Triton kernel, the GEMM and its
  scaled epilogue by another (``int8_gemm_triton``), writing x's dtype directly.

``int8_linear`` picks: Triton on CUDA (``kernels/backend.py``), ``torch._int_mm`` on the CPU
(exact and much faster than float64), the reference with ``QUANTKIT_KERNELS=reference``.
The Triton GEMM is the tiled kernel, or on Hopper its persistent tensor-descriptor variant
(``int8_gemm_tma_triton``, same results) where that measured faster: from 2048 rows for N > 8192
or K > 8192, from 4096 rows at N >= 4096 otherwise (``_tma_pays``);
``QUANTKIT_INT8_GEMM=tiled`` or ``tma`` forces one.
"""

from __future__ import annotations

import functools
import os

import torch

from quantkit.kernels.backend import kernel_mode, use_triton
from quantkit.kernels.w8a8 import W8A8Weight
from quantkit.quant.w8a8 import quantize_activation, w8a8_matmul_reference

# torch._int_mm on CUDA needs more than 16 rows and K, N multiples of 8 (cuBLASLt's int8 layout).
_INT_MM_MIN_ROWS = 17


def _check(packed: W8A8Weight) -> None:
    if packed.type != "int" or packed.activations == "none":
        raise ValueError(f"int8_linear takes INT8 weights with quantized activations, got {packed.type}/"
                         f"{packed.activations}")


def _flatten(x: torch.Tensor, packed: W8A8Weight) -> torch.Tensor:
    return x.reshape(-1, packed.in_features)


def int8_linear_reference(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check(packed)
    x2 = _flatten(x, packed)
    xq, x_scale = quantize_activation(x2, "int", packed.input_scale)
    y = w8a8_matmul_reference(xq, x_scale, packed.weight, packed.weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], packed.out_features)


def int8_linear_int_mm(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None,
                       quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``torch._int_mm`` for the int32 sums; ``quantized`` = (codes, scale) when done already."""
    _check(packed)
    xq, x_scale = quantized if quantized is not None else quantize_activation(_flatten(x, packed), "int",
                                                                              packed.input_scale)
    m = xq.shape[0]
    if xq.is_cuda and m < _INT_MM_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, _INT_MM_MIN_ROWS - m))
    acc = torch._int_mm(xq, packed.weight.t())[:m]
    y = acc.to(torch.float32).mul_(x_scale.reshape(-1, 1)).mul_(packed.weight_scale.reshape(1, -1))
    if bias is not None:
        y += bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features)


def int8_linear_triton(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None,
                       config=None) -> torch.Tensor:
    from quantkit.kernels.act_quant_triton import quantize_activation_triton

    _check(packed)
    x2 = _flatten(x, packed)
    xq, x_scale = quantize_activation_triton(x2, "int", packed.input_scale)
    y = _triton_gemm()(xq, x_scale, packed.weight, packed.weight_scale, bias, x.dtype, config)
    return y.reshape(*x.shape[:-1], packed.out_features)


# ``auto``: the persistent TMA kernel where it measured faster than the best swept tiled tile (H100,
# Triton 3.6, ``scripts/results/w8a8_gemm_h100_sweep2.json``, defaults of ``choose_int8_tma_config``):
# from 2048 rows for wide outputs or long sums (gate/up_proj: 1.57x bf16 against 1.45x at 2048
# rows, 1.60x against 1.42x at 8192; down_proj: 1.64x against 1.61x at 2048, 1.67x against
# 1.43x at 8192), from 4096 rows otherwise (q/o_proj: 1.55x against 1.50x at 4096, 1.53x
# against 1.43x at 8192; the tiled 128 x 128 x 128 was faster at 2048 rows, 1.56x against 1.47x);
# never for k/v_proj's N = 1024 (tiled 1.62x against 1.38x at 4096 rows).
TMA_FROM_ROWS = 4096
TMA_FROM_ROWS_LARGE = 2048  # N > 8192 or K > 8192
TMA_MIN_N = 4096


def _tma_pays(m: int, n: int, k: int) -> bool:
    """Whether ``auto`` takes the persistent TMA kernel for an (M, K) x (K, N) GEMM."""
    large = n > 8192 or k > 8192
    return n >= TMA_MIN_N and m >= (TMA_FROM_ROWS_LARGE if large else TMA_FROM_ROWS)


def _triton_gemm():
    """The Triton INT8 GEMM ``QUANTKIT_INT8_GEMM`` names: ``auto`` (default: the TMA kernel for large
    GEMMs on Hopper, the tiled one otherwise), ``tiled`` or ``tma`` (wherever the shapes allow)."""
    from quantkit.kernels.int8_gemm_triton import int8_gemm_tma_triton, int8_gemm_triton

    choice = os.environ.get("QUANTKIT_INT8_GEMM", "auto").strip().lower() or "auto"
    if choice not in ("auto", "tiled", "tma"):
        raise ValueError(f"QUANTKIT_INT8_GEMM={choice!r} is not one of auto, tiled, tma")
    if choice == "tiled":
        return int8_gemm_triton

    def chosen(a, a_scale, b, b_scale, bias, out_dtype, config=None):
        fits = a.shape[1] % 16 == 0 and b.shape[0] % 8 == 0 and _has_tma(a.device)
        if choice == "auto":
            fits = fits and config is None and _tma_pays(a.shape[0], b.shape[0], a.shape[1])
        if fits:
            return int8_gemm_tma_triton(a, a_scale, b, b_scale, bias, out_dtype, config)
        return int8_gemm_triton(a, a_scale, b, b_scale, bias, out_dtype, config)

    return chosen


def _has_tma(device: torch.device) -> bool:
    """Tensor descriptors: Hopper or newer; the interpreter emulates them on the CPU."""
    if device.type == "cuda":
        return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def int8_linear(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with x quantized to INT8 as ``packed`` says; output in x's dtype."""
    if use_triton(x):
        return int8_linear_triton(x, packed, bias)
    if kernel_mode() == "auto" and (x.is_cuda or _cpu_int_mm_works()):
        return int8_linear_int_mm(x, packed, bias)
    return int8_linear_reference(x, packed, bias)


def int8_gemm(codes: torch.Tensor, scale: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM alone, on activations already quantized (codes (M, K) int8, scale (M, 1) or (1,)),
    e.g. by the kernel that produced them (``kernels/quant_fused.py``); (M, N) in ``out_dtype``."""
    _check(packed)
    if use_triton(codes):
        return _triton_gemm()(codes, scale, packed.weight, packed.weight_scale, bias, out_dtype)
    if kernel_mode() == "auto" and (codes.is_cuda or _cpu_int_mm_works()):
        like = torch.empty(codes.shape, dtype=out_dtype, device="meta")
        return int8_linear_int_mm(like, packed, bias, quantized=(codes, scale))
    return w8a8_matmul_reference(codes, scale, packed.weight, packed.weight_scale, bias, out_dtype)


@functools.cache
def _cpu_int_mm_works() -> bool:
    try:
        a = torch.ones(2, 8, dtype=torch.int8)
        return bool((torch._int_mm(a, a.t()) == 8).all())
    except (RuntimeError, AttributeError):
        return False
