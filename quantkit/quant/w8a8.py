"""8-bit quantization math shared by W8A8 INT8, FP8 (e4m3) and the KV cache: scales, quantize,
dequantize, and the exact plain-torch emulation of an 8-bit GEMM.

Conventions (those of vLLM's kernels and compressed-tensors' checkpoints):

* symmetric only: ``x ≈ scale * q``; INT8 codes are in [-128, 127] and a scale is ``absmax / 127``;
  FP8 values are ``float8_e4m3fn`` (largest finite 448) and a scale is ``absmax / 448``;
* weights: one scale per output channel (``weight_scale`` (out, 1)) or per tensor ((1,));
* activations: dynamic per token (one scale per row, computed at run time) or static per tensor
  (one ``input_scale`` (1,) calibrated on data); rows that are all zero get a tiny positive
  scale, so no scale is ever 0;
* INT8 GEMM: ``y = (Σ_k qx[m, k] · qw[n, k]) · sx[m] · sw[n]`` with the sum in int32 (exact),
  then float32; FP8 GEMM: the same with the products summed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
# Smallest scale: keeps all-zero rows from dividing by 0 and keeps 1/scale finite in float32.
MIN_SCALE = 1e-12


def qmax(kind: str) -> float:
    """Largest representable magnitude: 127 for ``"int"``, 448 for ``"float"`` (e4m3)."""
    if kind == "int":
        return INT8_MAX
    if kind == "float":
        return FP8_MAX
    raise ValueError(f"unknown 8-bit type {kind!r}: expected 'int' or 'float'")


def storage_dtype(kind: str) -> torch.dtype:
    qmax(kind)
    return torch.int8 if kind == "int" else FP8_DTYPE


def scale_from_absmax(absmax: torch.Tensor, kind: str) -> torch.Tensor:
    """float32 scales that map ``absmax`` onto the largest code: ``absmax / qmax`` correctly rounded
    on every device.

    Divided by a tensor, not a Python number: on CUDA torch turns ``t / number`` into
    ``t * (1 / number)`` (``div_true_kernel_cuda``), a rounding step off ``absmax / qmax`` for some
    values, so GPU scales differed from the CPU's and from the Triton kernels' (which divide with
    ``tl.math.div_rn``) by one ulp (1 row in 64 for INT8, half the rows for FP8 on the H100)."""
    absmax = absmax.to(torch.float32)
    return torch.div(absmax, torch.full_like(absmax, qmax(kind))).clamp_min(MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """``x / scale`` rounded onto the 8-bit grid (int8 or float8_e4m3fn); ``scale`` broadcasts."""
    scaled = torch.div(x.to(torch.float32), scale.to(torch.float32))
    if kind == "int":
        return torch.round(scaled).clamp_(-128, 127).to(torch.int8)
    return scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale``."""
    return q.to(torch.float32) * scale.to(torch.float32)


def weight_scale(weight: torch.Tensor, kind: str, strategy: str) -> torch.Tensor:
    """Scales of a weight (out, in): (out, 1) for ``"channel"``, (1,) for ``"tensor"``."""
    absmax = weight.detach().abs().to(torch.float32)
    if strategy == "channel":
        return scale_from_absmax(absmax.amax(dim=1, keepdim=True), kind)
    if strategy == "tensor":
        return scale_from_absmax(absmax.amax().reshape(1), kind)
    raise ValueError(f"unknown weight strategy {strategy!r}: expected 'channel' or 'tensor'")


def per_token_scale(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Dynamic per-token scales (..., 1) of activations (..., in)."""
    return scale_from_absmax(x.detach().abs().amax(dim=-1, keepdim=True), kind)


def quantize_activation(x: torch.Tensor, kind: str, input_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of activations (..., in): per token when ``input_scale`` is None (dynamic),
    else with the static per-tensor ``input_scale``; the scale broadcasts against the codes."""
    scale = per_token_scale(x, kind) if input_scale is None else input_scale.to(torch.float32).reshape(1)
    return quantize(x, scale, kind), scale


def fake_quantize_activation(x: torch.Tensor, kind: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded through its 8-bit codes and back, in x's dtype."""
    codes, scale = quantize_activation(x, kind, input_scale)
    return dequantize(codes, scale).to(x.dtype)


def w8a8_matmul_reference(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact plain-torch emulation of an 8-bit GEMM with the scales applied after it.

    ``xq`` (M, K) and ``wq`` (N, K) int8 (products summed exactly: float64 holds every int32 sum)
    or float8_e4m3fn (products summed in float32, as the hardware does); ``x_scale`` (M, 1) or (1,),
    ``w_scale`` (N, 1) or (1,) float32. Returns (M, N) in ``out_dtype``.
    """
    if xq.dtype == torch.int8:
        acc = (xq.to(torch.float64) @ wq.to(torch.float64).t()).to(torch.float32)
    else:
        acc = xq.to(torch.float32) @ wq.to(torch.float32).t()
    out = acc * x_scale.to(torch.float32).reshape(-1, 1) * w_scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


@dataclass
class EightBitWeight:
    """A linear layer's 8-bit weight and, for static activations, its calibrated input scale.

    ``weight`` (out, in) int8 or float8_e4m3fn; ``weight_scale`` (out, 1) or (1,) float32;
    ``input_scale`` (1,) float32 when ``activations == "static"``; ``activations`` is
    ``"dynamic"``, ``"static"`` or ``"none"`` (weight-only).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    type: str
    strategy: str
    activations: str
    input_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The represented weight (out, in) float32."""
        return dequantize(self.weight, self.weight_scale.reshape(-1, 1))

    def cpu(self) -> EightBitWeight:
        return EightBitWeight(self.weight.cpu(), self.weight_scale.cpu(), self.type, self.strategy, self.activations,
                              None if self.input_scale is None else self.input_scale.cpu())


def quantize_weight(weight: torch.Tensor, kind: str, strategy: str, activations: str,
                    input_scale: torch.Tensor | None = None) -> EightBitWeight:
    """Round a weight (out, in) to the nearest 8-bit value under its per-channel or per-tensor scale."""
    scale = weight_scale(weight, kind, strategy)
    codes = quantize(weight, scale if strategy == "channel" else scale.reshape(1, 1), kind)
    return EightBitWeight(codes, scale, kind, strategy, activations, input_scale)
