"""Give a small model the activation outliers of large ones, without changing what it computes.

Language models past about 6B parameters carry a few hidden channels whose activations are
tens to hundreds of times larger than the rest, in the same channels layer after layer; they are
why W8A8 needs SmoothQuant. Small models lack them, so a test of SmoothQuant on a small model
proves little. ``inject_activation_outliers`` builds them: in every decoder layer it multiplies
channels ``c`` of each norm that feeds linears (the attention and MLP input norms) by ``factor``
and divides the matching input columns of those linears by it. ``norm(x)[c] · W[:, c]`` is
unchanged, so the float model computes the same function (up to float rounding), while the
linears' inputs now have outlier channels ``factor`` times their usual size.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.models.adapters import ModelAdapter
from quantkit.models.folding import fold_input_scales


def outlier_channels(hidden_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` distinct channels, drawn once (the same in every layer, as in large models)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(hidden_size, generator=generator)[:count].sort().values


@torch.no_grad()
def inject_activation_outliers(model: nn.Module, adapter: ModelAdapter, *, channels: int = 4,
                               factor: float = 64.0, seed: int = 0) -> torch.Tensor:
    """Scale ``channels`` channels of every linear-feeding norm by ``factor`` (in place); returns them."""
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    chosen = None
    for layer in adapter.decoder_layers(model):
        for group in adapter.linear_groups(layer):
            if group.prev_kind != "norm":
                continue
            width = layer.get_submodule(group.prev).weight.numel()
            if chosen is None:
                chosen = outlier_channels(width, channels, seed)
            scales = torch.ones(width, dtype=torch.float32)
            scales[chosen] = 1.0 / factor  # fold divides the norm by s and multiplies the linears by s
            fold_input_scales(layer, group, scales, adapter)
    if chosen is None:
        raise ValueError("the model has no norm-fed linear group to give outliers to")
    return chosen
