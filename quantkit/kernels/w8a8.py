"""8-bit linear layers for the runtime: the weight as the kernels take it, and the one dispatch point.

``W8A8Weight`` holds an INT8 or FP8 (e4m3) weight (N, K) row-major — its transpose (K, N) is the
column-major operand ``torch._int_mm`` / ``torch._scaled_mm`` want — with one float32 scale per
output channel (a per-tensor scale is expanded, so fused q/k/v or gate/up layers share one form),
and, for static activations, the calibrated per-tensor input scale.

``w8a8_linear`` runs ``y = x @ W.T (+ bias)``: INT8 through ``int8_linear``, FP8 through
``fp8_linear`` (``kernels/int8_linear.py``, ``kernels/fp8_linear.py``), each choosing the GPU
path or its plain-torch reference by the rule in ``kernels/backend.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class W8A8Weight:
    weight: torch.Tensor  # (N, K) int8 or float8_e4m3fn, contiguous
    weight_scale: torch.Tensor  # (N,) float32
    type: str  # "int" or "float"
    activations: str  # "dynamic" (per token), "static" (per tensor) or "none" (weight-only)
    input_scale: torch.Tensor | None = None  # (1,) float32 for static activations

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def to(self, device: torch.device | str) -> W8A8Weight:
        return W8A8Weight(self.weight.to(device), self.weight_scale.to(device), self.type, self.activations,
                          None if self.input_scale is None else self.input_scale.to(device))


def pack_w8a8_weights(weights: list[torch.Tensor], weight_scales: list[torch.Tensor],
                      input_scales: list[torch.Tensor | None], kind: str, activations: str,
                      device: torch.device | str | None = None) -> W8A8Weight:
    """One ``W8A8Weight`` for linears that read the same input (concatenated along N).

    Per-tensor weight scales become per-channel; static input scales of fused layers are merged
    by their maximum, as vLLM does (``compressed_tensors_w8a8_int8.py``,
    ``process_weights_after_loading``).
    """
    if activations == "static" and any(scale is None for scale in input_scales):
        raise ValueError("static activations need an input scale for every fused layer")
    scales = [s.to(torch.float32).reshape(-1).expand(w.shape[0]) for w, s in zip(weights, weight_scales)]
    input_scale = None
    if activations == "static":
        input_scale = torch.stack([s.to(torch.float32).reshape(()) for s in input_scales]).amax().reshape(1)
    packed = W8A8Weight(torch.cat(weights).contiguous(), torch.cat(scales).contiguous(), kind, activations,
                        input_scale)
    return packed.to(device) if device is not None else packed


def w8a8_linear(x, packed: W8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x (..., K) in x's dtype, activations quantized as ``packed`` says.

    ``x`` may also be a ``quant_fused.QuantizedInput``: activations its producer already quantized
    (they must be what ``packed`` would have made: its type, and its static scale if it has one)."""
    from quantkit.kernels.quant_fused import QuantizedInput

    if isinstance(x, QuantizedInput):
        return _gemm_of_codes(x, packed, bias)
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {packed.in_features}")
    if packed.type == "int":
        from quantkit.kernels.int8_linear import int8_linear

        return int8_linear(x, packed, bias)
    from quantkit.kernels.fp8_linear import fp8_linear

    return fp8_linear(x, packed, bias)


def _gemm_of_codes(x, packed: W8A8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    if x.codes.dim() != 2 or x.codes.shape[1] != packed.in_features:
        raise ValueError(f"quantized input {tuple(x.codes.shape)} does not fit a weight taking {packed.in_features}")
    if packed.activations == "none":
        raise ValueError("a weight-only (W8A16) layer takes 16-bit activations, not quantized ones")
    if packed.type == "int":
        from quantkit.kernels.int8_linear import int8_gemm

        return int8_gemm(x.codes, x.scale, packed, bias, x.dtype)
    from quantkit.kernels.fp8_linear import fp8_gemm

    return fp8_gemm(x.codes, x.scale, packed, bias, x.dtype)
