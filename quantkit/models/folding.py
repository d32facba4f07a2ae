"""Fold a per-input-channel scale of a linear group into the module that produces its input.

AWQ and SmoothQuant multiply a group's input channels by ``s`` (making them easier to quantize)
and must divide the group's input by ``s`` at no cost: by rewriting ``group.prev``. The adapter's
``LinearGroup`` says which module that is and which of its output channels feed the group.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.models.adapters.base import LinearGroup, ModelAdapter
from quantkit.models.adapters.linears import in_features, is_transposed, out_features


def fold_input_scales(
    layer: nn.Module, group: LinearGroup, scales: torch.Tensor, adapter: ModelAdapter
) -> None:
    """Multiply the group's input channels by ``scales`` and divide ``group.prev``'s output by them.

    The decoder layer computes the same function afterwards, up to rounding. ``scales`` must be
    positive (a ReLU between producer and group commutes only with positive scales).
    """
    if group.prev is None:
        raise ValueError(f"group '{group.name}' has no module to fold a scale into")
    if scales.ndim != 1 or not bool((scales > 0).all()):
        raise ValueError("scales must be a 1-D tensor of positive values")
    linears = [layer.get_submodule(name) for name in group.linears]
    for name, linear in zip(group.linears, linears):
        if in_features(linear) != scales.numel():
            raise ValueError(f"{name} has {in_features(linear)} input channels, scales has {scales.numel()}")
    producer = layer.get_submodule(group.prev)
    with torch.no_grad():
        if group.prev_kind == "norm":
            _divide_norm(producer, scales, adapter.norm_weight_offset)
        else:
            start, stop = group.prev_slice or (0, out_features(producer))
            _divide_output_channels(producer, scales, start, stop)
        for linear in linears:
            _multiply_input_channels(linear, scales)


def _divide_norm(norm: nn.Module, scales: torch.Tensor, offset: float) -> None:
    if getattr(norm, "weight", None) is None:
        raise ValueError(f"{type(norm).__name__} has no weight to fold a scale into")
    weight = _wide(norm.weight)
    scales = scales.to(weight.device, weight.dtype)
    norm.weight.copy_((offset + weight) / scales - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(_wide(norm.bias) / scales)


def _divide_output_channels(linear: nn.Module, scales: torch.Tensor, start: int, stop: int) -> None:
    if stop - start != scales.numel():
        raise ValueError(f"{stop - start} producer channels cannot take {scales.numel()} scales")
    scales = scales.to(linear.weight.device, _wide(linear.weight).dtype)
    if is_transposed(linear):
        block = linear.weight[:, start:stop]
        block.copy_(_wide(block) / scales)
    else:
        block = linear.weight[start:stop]
        block.copy_(_wide(block) / scales[:, None])
    if linear.bias is not None:
        linear.bias[start:stop].copy_(_wide(linear.bias[start:stop]) / scales)


def _multiply_input_channels(linear: nn.Module, scales: torch.Tensor) -> None:
    scales = scales.to(linear.weight.device, _wide(linear.weight).dtype)
    if is_transposed(linear):
        linear.weight.copy_(_wide(linear.weight) * scales[:, None])
    else:
        linear.weight.copy_(_wide(linear.weight) * scales)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 at least, so half-precision weights are rescaled without extra rounding."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
