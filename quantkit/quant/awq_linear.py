"""A linear layer whose weight is held in the AutoAWQ GEMM layout (4-bit), with a plain-torch forward.

Buffers, with the names and shapes that AutoAWQ writes and vLLM/transformers read:

* ``qweight`` int32 (in, out / 8): codes packed along the OUTPUT dimension, 8 per word;
* ``qzeros`` int32 (n_groups, out / 8): the zero points (no offset), packed the same way;
* ``scales`` (n_groups, out), float16 in checkpoints;
* ``bias`` (out,) when the layer has one.

Inside a word, nibble ``i`` (bits ``4i .. 4i+3``) holds output column ``8c + AWQ_ORDER[i]`` of word
column ``c``, with ``AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the order AutoAWQ's GEMM kernel
reads); groups are consecutive runs of ``group_size`` input rows. The weight is
``W[o, i] = scales[i // group_size, o] * (q[i, o] - z[i // group_size, o])``.

Sources: AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM``: buffer shapes, the order map
in ``from_linear``) and ``awq/utils/packing_utils.py`` (``AWQ_ORDER``, ``AWQ_REVERSE_ORDER``,
``dequantize_gemm``: unpack with right shifts, undo the order, ``(q - z) * s``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantkit.quant.dequant_linear import (
    DequantLinear,
    UnpackedWeight,
    consecutive_groups,
    dequantize_in_out,
    group_count,
)
from quantkit.quant.packing import pack_cols, unpack_cols

if TYPE_CHECKING:
    from quantkit.quant.rtn import QuantizedWeight

AWQ_BITS = 4
AWQ_PACK = 32 // AWQ_BITS
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# AWQ_REVERSE_ORDER[j] is the nibble that holds column j of a word's 8 columns.
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(column) for column in range(AWQ_PACK))


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """4-bit values (rows, cols) to int32 words (rows, cols / 8) in AWQ's interleaved order."""
    _check_columns(values.shape[-1])
    return pack_cols(_permute_within_words(values, AWQ_ORDER), AWQ_BITS)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_awq``: int32 words (rows, n) to int32 values (rows, n * 8)."""
    return _permute_within_words(unpack_cols(words, AWQ_BITS), AWQ_REVERSE_ORDER)


def check_awq_shape(in_features: int, out_features: int, group_size: int) -> None:
    """Raise ValueError unless the AWQ GEMM layout can hold a layer of this shape."""
    _check_columns(out_features)
    if group_size != -1 and in_features % group_size != 0:
        raise ValueError(
            f"group size {group_size} does not divide the input size {in_features}"
        )


class AwqLinear(DequantLinear):
    """``y = x @ W.T + b`` with ``W`` stored as AutoAWQ GEMM ``qweight``/``qzeros``/``scales``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        *,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        check_awq_shape(in_features, out_features, group_size)
        super().__init__(in_features, out_features, AWQ_BITS, group_size)
        n_groups = group_count(in_features, group_size)
        words = {"dtype": torch.int32, "device": device}
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // AWQ_PACK, **words)
        )
        self.register_buffer(
            "qzeros", torch.zeros(n_groups, out_features // AWQ_PACK, **words)
        )
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device)
        )
        self._init_bias(bias, dtype, device)

    @classmethod
    def _packed(
        cls, qw: QuantizedWeight, *, has_bias: bool, dtype: torch.dtype
    ) -> AwqLinear:
        """4-bit codes only; ``qw.g_idx`` is not stored: the layout's groups are consecutive rows."""
        if qw.bits != AWQ_BITS:
            raise ValueError(
                f"the AWQ GEMM layout holds 4-bit codes, got {qw.bits}-bit"
            )
        layer = cls(
            qw.in_features, qw.out_features, qw.group_size,
            bias=has_bias, dtype=dtype, device=qw.codes.device,
        )  # fmt: skip
        layer.qweight.copy_(pack_awq(qw.codes.t()))
        layer.qzeros.copy_(pack_awq(qw.zeros.t()))
        layer.scales.copy_(qw.scales.t())
        return layer

    def dequantize_weight(self) -> torch.Tensor:
        codes = unpack_awq(self.qweight)  # (in, out)
        zeros = unpack_awq(self.qzeros)  # (n_groups, out)
        groups = consecutive_groups(self.in_features, self.group_size, codes.device)
        return dequantize_in_out(codes, zeros, self.scales, groups.long())

    def unpacked(self) -> UnpackedWeight:
        codes = unpack_awq(self.qweight)
        zeros = unpack_awq(self.qzeros)
        groups = consecutive_groups(self.in_features, self.group_size, codes.device).long()
        return UnpackedWeight(codes.t().to(torch.int32).contiguous(), self.scales.t().contiguous(),
                              zeros.t().to(torch.int32).contiguous(), groups, self.bits, self.group_size)


def _permute_within_words(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Column ``8c + i`` of the result is column ``8c + order[i]`` of ``values``."""
    rows, cols = values.shape
    words = values.reshape(rows, cols // AWQ_PACK, AWQ_PACK)
    index = torch.tensor(order, device=values.device)
    return words.index_select(2, index).reshape(rows, cols)


def _check_columns(columns: int) -> None:
    if columns % AWQ_PACK != 0:
        raise ValueError(
            f"the AWQ layout packs {AWQ_PACK} output channels per int32 word, so the output size "
            f"must be a multiple of {AWQ_PACK}; got {columns}"
        )
