"""A linear layer as the runtime computes it: a dense weight, or a packed quantized one.

Weights come from quantkit's own loader, so every layout it reads (fp16/bf16, GPTQ, AWQ,
compressed-tensors) arrives as either ``nn.Linear`` or a ``DequantLinear`` whose ``unpacked()``
view is repacked once for the kernels (``quantkit.kernels.pack_quantized_weight``). Linears that
read the same input (q/k/v, gate/up) are fused into one wider layer when their formats agree.
Dense weights that are 2:4 sparse run on PyTorch's semi-structured sparse kernels on a GPU when
``QUANTKIT_SPARSE_24=1`` (off by default: slower than dense where measured; ``runtime/sparse_linear.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels import (
    PackedWeight,
    act_order_perm,
    pack_quantized_weight,
    quantized_linear,
)
from quantkit.kernels.w8a8 import W8A8Weight, pack_w8a8_weights, w8a8_linear
from quantkit.quant.dequant_linear import DequantLinear, UnpackedWeight
from quantkit.quant.w8a8_linear import W8A8Linear
from quantkit.runtime.sparse_linear import (
    SemiStructuredWeight,
    semi_structured_weight,
    sparse_linear,
)


class RuntimeLinear:
    def __init__(self, weight: torch.Tensor | None = None, packed: PackedWeight | None = None,
                 bias: torch.Tensor | None = None, sparse: SemiStructuredWeight | None = None) -> None:
        if sum(w is not None for w in (weight, packed, sparse)) != 1:
            raise ValueError("give exactly one of a dense weight, a packed one or a 2:4 compressed one")
        self.weight, self.packed, self.bias, self.sparse = weight, packed, bias, sparse

    @property
    def quantized(self) -> bool:
        return self.packed is not None

    @property
    def out_features(self) -> int:
        if self.sparse is not None:
            return self.sparse.shape[0]
        return self.packed.out_features if self.packed is not None else self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.packed, W8A8Weight):  # INT8/FP8 weights (and activations): kernels/w8a8.py
            return w8a8_linear(x, self.packed, self.bias)
        if self.packed is not None:
            return quantized_linear(x, self.packed, self.bias)
        if self.sparse is not None:
            return sparse_linear(x, self.sparse, self.bias)
        return F.linear(x, self.weight, self.bias)


def runtime_linears(modules: list[nn.Module], dtype: torch.dtype, device: torch.device) -> RuntimeLinear:
    """One ``RuntimeLinear`` computing ``torch.cat([m(x) for m in modules], -1)``; raises
    ``ValueError`` when the modules cannot be fused (mixed or incompatible formats)."""
    biases = [_bias(m, dtype, device) for m in modules]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(_out(m), dtype=dtype, device=device) for b, m in zip(biases, modules)])
    if all(isinstance(m, nn.Linear) for m in modules):
        weight = torch.cat([m.weight.detach().to(device, dtype) for m in modules])
        sparse = semi_structured_weight(weight)  # 2:4 weights on a GPU, QUANTKIT_SPARSE_24=1: the sparse kernels
        return RuntimeLinear(bias=bias, **({"sparse": sparse} if sparse is not None else {"weight": weight}))
    if all(isinstance(m, W8A8Linear) for m in modules):
        kinds = {(m.type, m.activations) for m in modules}
        if len(kinds) != 1:
            raise ValueError("8-bit linears with different types or activation schemes do not fuse")
        ((kind, activations),) = kinds
        return RuntimeLinear(packed=pack_w8a8_weights([m.weight for m in modules], [m.weight_scale for m in modules],
                                                      [m.input_scale for m in modules], kind, activations, device),
                             bias=bias)
    if all(isinstance(m, DequantLinear) for m in modules):
        views = [m.unpacked() for m in modules]
        return RuntimeLinear(packed=_pack(views, dtype, device), bias=bias)
    raise ValueError("cannot fuse dense and quantized linears")


def split_linears(modules: list[nn.Module], dtype: torch.dtype, device: torch.device) -> list[RuntimeLinear]:
    return [runtime_linears([m], dtype, device) for m in modules]


def _pack(views: list[UnpackedWeight], dtype: torch.dtype, device: torch.device) -> PackedWeight:
    first = views[0]
    if any(v.bits != first.bits or v.group_size != first.group_size or not torch.equal(v.g_idx, first.g_idx)
           for v in views):
        raise ValueError("quantized linears with different bits, groups or column orders do not fuse")
    codes = torch.cat([v.codes for v in views]).to(device)
    scales = torch.cat([v.scales for v in views]).to(device, dtype)
    zeros = torch.cat([v.zeros for v in views]).to(device)
    g_idx = first.g_idx.to(device)
    perm = None
    if not torch.equal(g_idx, torch.sort(g_idx, stable=True).values):  # act-order: make groups consecutive
        perm = act_order_perm(g_idx)
        codes = codes[:, perm]
    return pack_quantized_weight(codes, scales, zeros, first.group_size, first.bits, perm=perm)


def _bias(module: nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().to(device, dtype)


def _out(module: nn.Module) -> int:
    return module.out_features
