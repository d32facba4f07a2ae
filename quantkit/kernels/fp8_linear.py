"""FP8 (e4m3) linear: W8A8 with dynamic per-token or static per-tensor activation scales, and W8A16
(FP8 weights, 16-bit activations). Implementations:

* ``fp8_linear_reference``: plain torch, runs anywhere: codes widened to float32, products summed
  in float32 (each e4m3 product is exact in float32), scales applied after;
* ``fp8_linear_scaled_mm``: ``torch._scaled_mm`` (cuBLASLt FP8 on Hopper/Ada) with row-wise
  scales — the activation scale per row of x, the weight scale per column of Wᵀ — applied in its
  epilogue, output in x's dtype; activations quantized by the Triton kernel on CUDA;
* W8A16: the weight widened to x's dtype and scaled, then a 16-bit matmul (no fused kernel yet:
  it saves memory, not time).

``fp8_linear`` picks ``torch._scaled_mm`` on CUDA devices of compute capability 8.9 or more and
the reference elsewhere (and with ``QUANTKIT_KERNELS=reference``).

Fast accumulation (``use_fast_accum``) is on by default: cuBLASLt then keeps the sums in the
tensor cores' accumulator for the whole K loop instead of adding them into float32 every few
steps. On an H100 (torch 2.11) it made the FP8 GEMM alone 1.68-1.91x bf16 from 4,096 tokens
against 1.53-1.66x without, and faster at every M down to 1 (``scripts/gpu/bench_w8a8_gemm.py``).
Its cost grows with K: Hopper's FP8 accumulator keeps about 13 mantissa bits (FP22), and an
emulation of that (``scripts/gpu/check_fp8_fast_accum.py --emulate``, CPU) gives at K = 14,336 a
1.1% relative error in the sums when it truncates (a systematic ~1% shrink) and 0.04% when it
rounds, against the 3.7% that e4m3 rounding of the operands already costs. Measured on the H100
(``check_fp8_fast_accum.py``, ``scripts/results/fp8_fast_accum_h100.json``): 0.42% against 0.30%
with float32 promotion at K = 14,336 (0.32% against 0.29% at 4,096), and the bundled target's
``fp8-dynamic`` wikitext2 perplexity 87.257 against 87.262 — nearer the rounding emulation than the
truncating one. torchao makes the same choice for inference-style forward GEMMs
(``torchao/float8/config.py``: ``gemm_config_output`` uses fast accumulation, the gradient GEMMs
do not). ``QUANTKIT_FP8_FAST_ACCUM=0`` turns it off
(exact float32 promotion, what the reference emulates); ``tests/kernels/test_kernels_w8a8.py``
bounds the error at K = 14,336 on the GPU and ``check_fp8_fast_accum.py`` measures the perplexity
change of the bundled target.
"""

from __future__ import annotations

import functools
import os

import torch

from quantkit.kernels.backend import kernel_mode, use_triton
from quantkit.kernels.w8a8 import W8A8Weight
from quantkit.quant.w8a8 import quantize_activation, w8a8_matmul_reference


def _check(packed: W8A8Weight) -> None:
    if packed.type != "float":
        raise ValueError(f"fp8_linear takes FP8 weights, got {packed.type}")


def fp8_weight_only(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A16: ``x @ (scale · W).T`` in x's dtype."""
    weight = (packed.weight.to(torch.float32) * packed.weight_scale.reshape(-1, 1)).to(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def fp8_linear_reference(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check(packed)
    if packed.activations == "none":
        return fp8_weight_only(x, packed, bias)
    x2 = x.reshape(-1, packed.in_features)
    xq, x_scale = quantize_activation(x2, "float", packed.input_scale)
    y = w8a8_matmul_reference(xq, x_scale, packed.weight, packed.weight_scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], packed.out_features)


def fast_accum_default() -> bool:
    """``QUANTKIT_FP8_FAST_ACCUM``: on unless set to 0 (or off / false / no)."""
    value = os.environ.get("QUANTKIT_FP8_FAST_ACCUM", "1").strip().lower()
    return value not in ("0", "off", "false", "no")


def fp8_linear_scaled_mm(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None,
                         quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
                         use_fast_accum: bool | None = None) -> torch.Tensor:
    """``torch._scaled_mm`` with row-wise scales; ``quantized`` = (codes, scale) when done already."""
    _check(packed)
    if packed.activations == "none":
        return fp8_weight_only(x, packed, bias)
    x2 = x.reshape(-1, packed.in_features)
    if quantized is None:
        if use_triton(x2):
            from quantkit.kernels.act_quant_triton import quantize_activation_triton

            quantized = quantize_activation_triton(x2, "float", packed.input_scale)
        else:
            quantized = quantize_activation(x2, "float", packed.input_scale)
    xq, x_scale = quantized
    m = xq.shape[0]
    if not xq.is_cuda and not _cpu_rowwise_scaled_mm_works():
        # torch 2.11's CPU _scaled_mm takes per-tensor scales only; the exact emulation instead
        y = w8a8_matmul_reference(xq, x_scale, packed.weight, packed.weight_scale, bias, x.dtype)
        return y.reshape(*x.shape[:-1], packed.out_features)
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    # row-wise scaling wants (M, 1) and (1, N) float32 scales
    scale_a = x_scale.reshape(-1, 1).expand(m, 1).contiguous()
    scale_b = packed.weight_scale.reshape(1, -1)
    fast = fast_accum_default() if use_fast_accum is None else use_fast_accum
    y = torch._scaled_mm(xq, packed.weight.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                         bias=None if bias is None else bias.to(out_dtype), use_fast_accum=fast)
    return y.to(x.dtype).reshape(*x.shape[:-1], packed.out_features)


@functools.cache
def _cpu_rowwise_scaled_mm_works() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes row-wise scales (2.13 does; 2.11 asserts
    "only supports per-tensor scaling for CPU backend")."""
    try:
        a = torch.ones(2, 16).to(torch.float8_e4m3fn)
        b = torch.ones(16, 16).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(a, b.t(), scale_a=torch.full((2, 1), 2.0), scale_b=torch.full((1, 16), 0.5),
                             out_dtype=torch.float32)
        return bool((y == 16).all())
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def fp8_supported(device: torch.device) -> bool:
    """CUDA devices with FP8 tensor cores (compute capability 8.9: Ada; 9.0: Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(codes: torch.Tensor, scale: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None,
             out_dtype: torch.dtype) -> torch.Tensor:
    """The GEMM alone, on activations already quantized to e4m3 (codes (M, K), scale (M, 1) or (1,))."""
    _check(packed)
    like = torch.empty(codes.shape, dtype=out_dtype, device="meta")
    if kernel_mode() != "reference" and fp8_supported(codes.device):
        return fp8_linear_scaled_mm(like, packed, bias, quantized=(codes, scale))
    return w8a8_matmul_reference(codes, scale, packed.weight, packed.weight_scale, bias, out_dtype)


def fp8_linear(x: torch.Tensor, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with FP8 weights (and FP8 activations unless weight-only); x's dtype out."""
    if kernel_mode() != "reference" and fp8_supported(x.device):
        return fp8_linear_scaled_mm(x, packed, bias)
    return fp8_linear_reference(x, packed, bias)
