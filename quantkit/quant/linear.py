"""A linear layer whose weight is held in the GPTQ v1 layout, with a plain-torch forward.

Buffers, with the names and shapes that AutoGPTQ/GPTQModel write and vLLM/transformers read:

* ``qweight`` int32 (in * bits / 32, out): codes packed along the input dimension;
* ``qzeros`` int32 (n_groups, out * bits / 32): ``zero - 1`` packed along the output dimension
  (GPTQ v1 stores the zero point minus one; readers add the one back);
* ``scales`` (n_groups, out), float16 in checkpoints;
* ``g_idx`` int32 (in,): the group of each input column (a permutation under act-order);
* ``bias`` (out,) when the layer has one.

The forward pass dequantizes ``W[:, i] = scales[g_idx[i]] * (q[i] - (qzeros[g_idx[i]] + 1))``
and runs ``x @ W.T + b``: the reference path that GPU kernels are checked against.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

if TYPE_CHECKING:
    from quantkit.quant.rtn import QuantizedWeight


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as packed integer codes, scales and zero points."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_packable(in_features, out_features, bits)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        n_groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
        words = {"dtype": torch.int32, "device": device}
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // 32, out_features, **words)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features * bits // 32, **words)
        )
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device)
        )
        span = in_features if group_size == -1 else group_size
        column_group = torch.arange(in_features, device=device) // span
        self.register_buffer("g_idx", column_group.to(torch.int32))
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=dtype, device=device)
            )
        else:
            self.bias = None
        self._cached_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> QuantLinear:
        """Pack a ``QuantizedWeight`` (and optional bias) into a new layer on the weight's device."""
        if qw.zeros.numel() and int(qw.zeros.min()) < 1:
            raise ValueError(
                "a zero point of 0 cannot be stored in the GPTQ v1 layout (it writes zero - 1); "
                "quantize with min_zero=1"
            )
        layer = cls(
            qw.in_features, qw.out_features, qw.bits, qw.group_size,
            bias=bias is not None, dtype=dtype, device=qw.codes.device,
        )  # fmt: skip
        layer.qweight.copy_(pack_rows(qw.codes.t(), qw.bits))
        layer.qzeros.copy_(pack_cols(qw.zeros.t() - 1, qw.bits))
        layer.scales.copy_(qw.scales.t())
        layer.g_idx.copy_(qw.g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        """The weight (out, in) in float32, unpacked from the buffers (reference path)."""
        codes = unpack_rows(self.qweight, self.bits)  # (in, out)
        # (n_groups, out); GPTQ v1 stores zero - 1
        zeros = unpack_cols(self.qzeros, self.bits) + 1
        groups = self.g_idx.long()
        shifted = (codes - zeros[groups]).to(torch.float32)
        return (self.scales[groups].to(torch.float32) * shifted).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight_like(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (needed after editing the buffers in place)."""
        self._cached_weight = None
        self._cache_key = None

    def _weight_like(self, x: torch.Tensor) -> torch.Tensor:
        # On the CPU the unpacking costs far more than the matmul for small batches, so the
        # dequantized weight is kept after first use: the CPU path is the slow reference path,
        # where memory is plentiful. On accelerators it is rebuilt every call so the layer keeps
        # its small footprint until a fused kernel replaces this path.
        if x.device.type != "cpu":
            return self.dequantize_weight().to(device=x.device, dtype=x.dtype)
        buffers = (self.qweight, self.qzeros, self.scales, self.g_idx)
        key = (x.dtype, *(buffer.data_ptr() for buffer in buffers))
        if self._cache_key != key:
            self._cached_weight = self.dequantize_weight().to(x.dtype)
            self._cache_key = key
        return self._cached_weight

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Loading copies into the buffers in place (same data pointers): the cache goes stale.
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def check_packable(in_features: int, out_features: int, bits: int) -> None:
    """Raise ValueError unless both sizes fill whole int32 words at ``bits`` bits per code."""
    multiple = 32 // math.gcd(bits, 32)
    for label, size in (("input", in_features), ("output", out_features)):
        if size % multiple != 0:
            raise ValueError(
                f"the GPTQ layout packs {bits}-bit codes into int32 words, so the {label} size must "
                f"be a multiple of {multiple}; got {size}"
            )
