"""A linear layer held as compressed-tensors ``int-quantized`` (W8A8 INT8) or ``float-quantized``
(FP8 e4m3, W8A8 or W8A16) tensors, computing with 8-bit activations as vLLM does.

Buffers, with the names, dtypes and shapes that vLLM's compressed-tensors schemes create
(``compressed_tensors/schemes/compressed_tensors_w8a8_int8.py``, ``compressed_tensors_w8a8_fp8.py``,
``compressed_tensors_w8a16_fp8.py``: ``create_weights``):

* ``weight`` (out, in): int8, or float8_e4m3fn;
* ``weight_scale`` float32: (out, 1) per channel, (1,) per tensor;
* ``input_scale`` float32 (1,): static activations only;
* ``bias`` (out,) when the layer has one.

The forward pass quantizes x per token (dynamic) or with ``input_scale`` (static), multiplies the
8-bit codes and scales the result (``quantkit.kernels.w8a8.w8a8_linear``: on the CPU an exact
emulation; on the GPU ``torch._int_mm``/Triton for INT8 and ``torch._scaled_mm`` for FP8).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.kernels.w8a8 import W8A8Weight, w8a8_linear
from quantkit.quant.w8a8 import EightBitWeight, dequantize, storage_dtype


class W8A8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, kind: str, strategy: str, activations: str,
                 bias: bool, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.type, self.strategy, self.activations = kind, strategy, activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=storage_dtype(kind), device=device))
        scale_shape = (out_features, 1) if strategy == "channel" else (1,)
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        if activations == "static":
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, record: EightBitWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.float16) -> W8A8Linear:
        """A layer holding ``record`` (and ``bias``, stored in ``dtype``)."""
        layer = cls(record.in_features, record.out_features, kind=record.type, strategy=record.strategy,
                    activations=record.activations, bias=bias is not None, dtype=dtype, device=record.weight.device)
        layer.weight.copy_(record.weight)
        layer.weight_scale.copy_(record.weight_scale.reshape(layer.weight_scale.shape))
        if record.activations == "static":
            if record.input_scale is None:
                raise ValueError("a static-activation layer needs its input scale")
            layer.input_scale.copy_(record.input_scale.reshape(1))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        """The weight (out, in) in float32."""
        return dequantize(self.weight, self.weight_scale.reshape(-1, 1))

    def packed(self) -> W8A8Weight:
        """The weight as the kernels take it (per-channel scales)."""
        return W8A8Weight(self.weight, self.weight_scale.reshape(-1).expand(self.out_features).contiguous(),
                          self.type, self.activations, self.input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return w8a8_linear(x, self.packed(), bias)

    def extra_repr(self) -> str:
        kind = "int8" if self.type == "int" else "fp8_e4m3"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"weights per {self.strategy}, activations {self.activations}, bias={self.bias is not None}")
