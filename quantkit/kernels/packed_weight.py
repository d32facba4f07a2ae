"""The kernel-friendly layout of a group-wise quantized weight, and its plain-torch reference GEMM.

A quantized weight arrives as codes (out, in), unsigned ``bits``-bit integers, with scales and
integer zero points (out, n_groups): ``W[o, i] = scales[o, g] * (codes[o, i] - zeros[o, g])``,
``g = i // group_size`` (``group_size == -1``: one group). ``PackedWeight`` holds it as:

* ``qweight`` int32 (ceil(in / pack), out), ``pack = 32 // bits`` codes per word: word ``w`` of
  column ``o`` holds the codes of input columns ``w * pack + j`` in bits ``[bits*j, bits*j + bits)``
  (the GPTQ ``qweight`` layout, transposed relative to ``codes``); columns past ``in`` are 0;
* ``scales`` and ``zeros`` (n_groups, out), ``zeros`` as integer values in the scales' dtype, so
  one output column's parameters of a group are adjacent to its neighbours';
* ``group_size`` as a column count (``in_features`` for a single group);
* ``perm`` (in,) int64 or None, for act-order checkpoints: the columns are stored in the order
  ``perm`` (packed column ``j`` is input feature ``perm[j]``), which makes groups consecutive;
  a GEMM reads ``x[..., perm]``.

The reference ``quantized_linear_reference`` dequantizes to float32 and multiplies; the GPU
kernels (``w4a16_triton``) read the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from quantkit.quant.packing import pack_rows, unpack_rows

SUPPORTED_BITS = (2, 4, 8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class PackedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int
    perm: torch.Tensor | None = None
    keep_dense: bool = (
        False  # keep the dequantized weight of the large-batch path after first use
    )
    _dense: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pack(self) -> int:
        """Codes per int32 word."""
        return 32 // self.bits

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def nbytes(self) -> int:
        """Bytes a GEMM must read for the weight: packed codes, scales, zeros (and perm)."""
        tensors = [self.qweight, self.scales, self.zeros] + (
            [self.perm] if self.perm is not None else []
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> PackedWeight:
        """A copy on ``device`` (no dense cache)."""
        perm = None if self.perm is None else self.perm.to(device)
        return PackedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            self.zeros.to(device),
            self.bits,
            self.group_size,
            self.in_features,
            self.out_features,
            perm,
            self.keep_dense,
        )

    def codes(self) -> torch.Tensor:
        """int32 codes (in, out) in packed column order."""
        return unpack_rows(self.qweight, self.bits)[: self.in_features]

    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) in float32, in the original input order."""
        groups = torch.arange(self.in_features, device=self.device) // self.group_size
        shifted = self.codes().float() - self.zeros[groups].float()
        weight = (shifted * self.scales[groups].float()).t()
        if self.perm is None:
            return weight.contiguous()
        original = torch.empty_like(weight)
        original[:, self.perm] = weight
        return original

    def cached_dense(self, key: tuple, build) -> torch.Tensor:
        """``build()``, kept under ``key`` when ``keep_dense`` is set."""
        if not self.keep_dense:
            return build()
        if key not in self._dense:
            self._dense[key] = build()
        return self._dense[key]


def pack_quantized_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int,
    perm: torch.Tensor | None = None,
) -> PackedWeight:
    """Pack a quantized weight (see the module docstring) on its current device.

    With ``perm``, ``codes``/``scales``/``zeros`` describe the weight with its columns already in
    the order ``perm`` (column ``j`` is input feature ``perm[j]``), groups consecutive in that order.
    """
    out_features, in_features = _check_pack_args(
        codes, scales, zeros, group_size, bits, perm
    )
    pack = 32 // bits
    padded = F.pad(codes.t().to(torch.int32), (0, 0, 0, -in_features % pack))
    return PackedWeight(
        qweight=pack_rows(padded, bits),
        scales=scales.t().contiguous(),
        zeros=zeros.t().to(scales.dtype).contiguous(),
        bits=bits,
        group_size=in_features if group_size == -1 else group_size,
        in_features=in_features,
        out_features=out_features,
        perm=None if perm is None else perm.to(device=codes.device, dtype=torch.int64),
    )


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor:
    """The column order that makes an act-order checkpoint's groups consecutive (stable argsort of g_idx)."""
    return torch.sort(g_idx.to(torch.int64), stable=True).indices


def quantized_linear_reference(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x (..., in), computed in float32, returned in x's dtype."""
    check_linear_input(x, packed)
    weight = packed.cached_dense(("reference", x.device), packed.dequantize)
    y = x.float() @ weight.to(x.device).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_linear_input(x: torch.Tensor, packed: PackedWeight) -> None:
    if x.shape[-1] != packed.in_features:
        raise ValueError(
            f"x has {x.shape[-1]} features; the weight takes {packed.in_features}"
        )


def _check_pack_args(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bits: int,
    perm: torch.Tensor | None,
) -> tuple[int, int]:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the GEMM kernels support {SUPPORTED_BITS} bits, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be (out, in), got {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (out_features, n_groups):
            raise ValueError(
                f"{name} must be ({out_features}, {n_groups}), got {tuple(t.shape)}"
            )
    if scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"scales must be float16, bfloat16 or float32, got {scales.dtype}"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    if perm is not None:
        expected = torch.arange(in_features, device=perm.device)
        if perm.shape != (in_features,) or not torch.equal(
            perm.sort().values.to(expected.dtype), expected
        ):
            raise ValueError(f"perm must be a permutation of range({in_features})")
    return out_features, in_features
