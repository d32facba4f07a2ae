"""A linear layer held in the compressed-tensors ``pack-quantized`` layout, with a plain-torch forward.

compressed-tensors quantizes integers as signed values ``s`` in ``[-2**(b-1), 2**(b-1) - 1]``
(symmetric schemes have zero point 0) and ``pack-quantized`` stores ``s + 2**(b-1)`` as unsigned
``b``-bit fields: quantkit's unsigned code ``q`` with zero point ``z`` is the signed value
``q - 2**(b-1)`` with zero point ``z - 2**(b-1)``, so the stored fields are exactly ``q`` and
``z`` and the weight is ``scale * (q - z)`` either way (symmetric: ``z = 2**(b-1)``).

Buffers, with the names and shapes compressed-tensors writes and vLLM reads:

* ``weight_packed`` int32 (out, ceil(in * b / 32)): codes packed along the INPUT dimension as one
  dense little-endian bit stream per row (element ``j`` at bits ``[b*j, b*j + b)``; a 3-bit
  code may cross a word boundary), zero padding at the end;
* ``weight_scale`` (out, n_groups), the model's 16-bit dtype;
* ``weight_shape`` int64 ``[out, in]``;
* ``weight_zero_point`` int32 (ceil(out * b / 32), n_groups), asymmetric schemes only: zero points
  packed the same way along the OUTPUT dimension;
* ``weight_g_idx`` int32 (in,), only in checkpoints written with the removed ``actorder: group``;
* ``bias`` (out,) when the layer has one.

Sources: compressed-tensors ``compressors/pack_quantized/base.py`` (``PackedQuantizationCompressor``:
the tensor names, zero points packed with ``packed_dim=0`` for group and channel strategies and
dropped for symmetric schemes), ``compressors/pack_quantized/helpers.py`` (``pack_to_int32``: the
``+ 2**(b-1)`` offset and the dense cross-word packing), ``quantization/utils/helpers.py``
(``calculate_range``: the signed range); vLLM
``compressed_tensors/schemes/compressed_tensors_wNa16.py`` (the same shapes; ``uint4b8``/
``uint8b128`` for symmetric and ``uint4``/``uint8`` with zero points for asymmetric weights).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from quantkit.quant.dequant_linear import (
    DequantLinear,
    UnpackedWeight,
    consecutive_groups,
    group_count,
)
from quantkit.quant.packing import pack_cols, unpack_cols

if TYPE_CHECKING:
    from quantkit.quant.rtn import QuantizedWeight

_WORD = 32


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values (rows, cols) to int32 (rows, ceil(cols * bits / 32)), packed along dim 1."""
    cols = values.shape[1]
    padded = F.pad(values, (0, _padded(cols) - cols))
    return pack_cols(padded, bits)[:, : packed_width(cols, bits)].contiguous()


def unpack_dense(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_dense``: int32 (rows, ceil(cols * bits / 32)) to int32 (rows, cols)."""
    if words.shape[1] != packed_width(cols, bits):
        raise ValueError(
            f"{words.shape[1]} packed words do not hold {cols} {bits}-bit values"
        )
    full = _padded(cols) * bits // _WORD
    return unpack_cols(F.pad(words, (0, full - words.shape[1])), bits)[:, :cols]


def packed_width(cols: int, bits: int) -> int:
    """Number of int32 words that hold ``cols`` densely packed ``bits``-bit values."""
    return math.ceil(cols * bits / _WORD)


def _padded(cols: int) -> int:
    # 32 values of any width fill whole words; pad to that and cut the unused words off after.
    return math.ceil(cols / _WORD) * _WORD


class PackQuantizedLinear(DequantLinear):
    """``y = x @ W.T + b`` with ``W`` stored as compressed-tensors ``pack-quantized`` tensors."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        *,
        symmetric: bool,
        bias: bool,
        g_idx: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bits, group_size)
        self.symmetric = symmetric
        n_groups = group_count(in_features, group_size)
        words = {"dtype": torch.int32, "device": device}
        self.register_buffer(
            "weight_packed",
            torch.zeros(out_features, packed_width(in_features, bits), **words),
        )
        self.register_buffer(
            "weight_scale",
            torch.zeros(out_features, n_groups, dtype=dtype, device=device),
        )
        shape = torch.tensor(
            [out_features, in_features], dtype=torch.int64, device=device
        )
        self.register_buffer("weight_shape", shape)
        if not symmetric:
            self.register_buffer(
                "weight_zero_point",
                torch.zeros(packed_width(out_features, bits), n_groups, **words),
            )
        if g_idx:
            self.register_buffer(
                "weight_g_idx", consecutive_groups(in_features, group_size, device)
            )
        self._init_bias(bias, dtype, device)

    @classmethod
    def _packed(
        cls, qw: QuantizedWeight, *, has_bias: bool, dtype: torch.dtype
    ) -> PackQuantizedLinear:
        """``weight_g_idx`` is stored only when ``qw``'s groups are not consecutive columns."""
        permuted = not torch.equal(
            qw.g_idx, consecutive_groups(qw.in_features, qw.group_size, qw.g_idx.device)
        )
        layer = cls(
            qw.in_features, qw.out_features, qw.bits, qw.group_size, symmetric=qw.symmetric,
            bias=has_bias, g_idx=permuted, dtype=dtype, device=qw.codes.device,
        )  # fmt: skip
        layer.weight_packed.copy_(pack_dense(qw.codes, qw.bits))
        layer.weight_scale.copy_(qw.scales)
        if not qw.symmetric:
            layer.weight_zero_point.copy_(pack_dense(qw.zeros.t(), qw.bits).t())
        if permuted:
            layer.weight_g_idx.copy_(qw.g_idx)
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        codes = unpack_dense(self.weight_packed, self.bits, self.in_features)
        groups = self._column_groups()
        shifted = (codes - self._zero_points()[:, groups]).to(torch.float32)
        return self.weight_scale[:, groups].to(torch.float32) * shifted

    def unpacked(self) -> UnpackedWeight:
        codes = unpack_dense(self.weight_packed, self.bits, self.in_features)
        return UnpackedWeight(codes.to(torch.int32), self.weight_scale, self._zero_points().to(torch.int32),
                              self._column_groups(), self.bits, self.group_size)

    def _zero_points(self) -> torch.Tensor:
        """Unsigned zero points (out, n_groups)."""
        if self.symmetric:
            middle = 1 << (self.bits - 1)
            return torch.full_like(self.weight_scale, middle, dtype=torch.int32)
        packed = self.weight_zero_point.t()
        return unpack_dense(packed, self.bits, self.out_features).t()

    def _column_groups(self) -> torch.Tensor:
        if hasattr(self, "weight_g_idx"):
            return self.weight_g_idx.long()
        device = self.weight_packed.device
        return consecutive_groups(self.in_features, self.group_size, device).long()
