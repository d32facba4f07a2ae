"""A linear layer whose weight is held in the GPTQ v1 layout, with a plain-torch forward.

Buffers, with the names and shapes that AutoGPTQ/GPTQModel write and vLLM/transformers read:

* ``qweight`` int32 (in * bits / 32, out): codes packed along the input dimension;
* ``qzeros`` int32 (n_groups, out * bits / 32): ``zero - 1`` packed along the output dimension
  (GPTQ v1 stores the zero point minus one; readers add the one back);
* ``scales`` (n_groups, out), float16 in checkpoints;
* ``g_idx`` int32 (in,): the group of each input column (a permutation under act-order);
* ``bias`` (out,) when the layer has one.

The forward pass (``DequantLinear``) dequantizes
``W[:, i] = scales[g_idx[i]] * (q[i] - (qzeros[g_idx[i]] + 1))`` and runs ``x @ W.T + b``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from quantkit.quant.dequant_linear import (
    DequantLinear,
    UnpackedWeight,
    consecutive_groups,
    dequantize_in_out,
    group_count,
)
from quantkit.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows

if TYPE_CHECKING:
    from quantkit.quant.rtn import QuantizedWeight


class QuantLinear(DequantLinear):
    """``y = x @ W.T + b`` with ``W`` stored as GPTQ ``qweight``/``qzeros``/``scales``/``g_idx``."""

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
        check_packable(in_features, out_features, bits)
        super().__init__(in_features, out_features, bits, group_size)
        n_groups = group_count(in_features, group_size)
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
        self.register_buffer(
            "g_idx", consecutive_groups(in_features, group_size, device)
        )
        self._init_bias(bias, dtype, device)

    @classmethod
    def _packed(
        cls, qw: QuantizedWeight, *, has_bias: bool, dtype: torch.dtype
    ) -> QuantLinear:
        if qw.zeros.numel() and int(qw.zeros.min()) < 1:
            raise ValueError(
                "a zero point of 0 cannot be stored in the GPTQ v1 layout (it writes zero - 1); "
                "quantize with min_zero=1"
            )
        layer = cls(
            qw.in_features, qw.out_features, qw.bits, qw.group_size,
            bias=has_bias, dtype=dtype, device=qw.codes.device,
        )  # fmt: skip
        layer.qweight.copy_(pack_rows(qw.codes.t(), qw.bits))
        layer.qzeros.copy_(pack_cols(qw.zeros.t() - 1, qw.bits))
        layer.scales.copy_(qw.scales.t())
        layer.g_idx.copy_(qw.g_idx)
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        codes = unpack_rows(self.qweight, self.bits)  # (in, out)
        zeros = unpack_cols(self.qzeros, self.bits) + 1  # GPTQ v1 stores zero - 1
        return dequantize_in_out(codes, zeros, self.scales, self.g_idx.long())

    def unpacked(self) -> UnpackedWeight:
        codes = unpack_rows(self.qweight, self.bits)
        zeros = unpack_cols(self.qzeros, self.bits) + 1
        return UnpackedWeight(codes.t().to(torch.int32).contiguous(), self.scales.t().contiguous(),
                              zeros.t().to(torch.int32).contiguous(), self.g_idx.long(), self.bits, self.group_size)


def check_packable(in_features: int, out_features: int, bits: int) -> None:
    """Raise ValueError unless both sizes fill whole int32 words at ``bits`` bits per code."""
    multiple = 32 // math.gcd(bits, 32)
    for label, size in (("input", in_features), ("output", out_features)):
        if size % multiple != 0:
            raise ValueError(
                f"the GPTQ layout packs {bits}-bit codes into int32 words, so the {label} size must "
                f"be a multiple of {multiple}; got {size}"
            )
