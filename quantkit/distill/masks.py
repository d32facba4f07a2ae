"""Keep a pruned student's zeros where they are while it trains.

Two guards, both cheap: each masked weight's gradient is multiplied by its mask (a tensor hook),
so the optimizer never sees a gradient there, and after every optimizer step the weight itself is
multiplied by its mask, so nothing else (weight decay, mixed-precision rounding, a future
optimizer with momentum from elsewhere) can move a pruned weight off zero either.
"""

from __future__ import annotations

import torch
from torch import nn


class FixedMasks:
    """``(parameter, keep mask)`` pairs: the mask is True where the weight may change."""

    def __init__(self, pairs: dict[str, tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.pairs = pairs
        self._handles = []

    @classmethod
    def of(cls, model: nn.Module, names: list[str], parameter_of) -> FixedMasks:
        """Masks (weight != 0) of the linears ``names``; ``parameter_of(module)`` is the parameter
        that trains (the weight, or the raw weight under a fake-quantization parametrization)."""
        pairs = {}
        for name in names:
            param = parameter_of(model.get_submodule(name))
            pairs[name] = (param, (param.detach() != 0))
        return cls(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def sparsity(self) -> float:
        zeros = sum(int((~mask).sum()) for _param, mask in self.pairs.values())
        return zeros / max(sum(mask.numel() for _param, mask in self.pairs.values()), 1)

    def attach(self) -> None:
        """Mask the gradients from now on (and move the masks to their parameters' devices)."""
        for name, (param, mask) in self.pairs.items():
            mask = mask.to(param.device)
            self.pairs[name] = (param, mask)
            self._handles.append(param.register_hook(lambda grad, mask=mask: grad * mask))

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight (after an optimizer step)."""
        for param, mask in self.pairs.values():
            param.mul_(mask)

    def violations(self) -> int:
        """Pruned positions that hold a non-zero weight (0 when the masks held)."""
        return sum(int((param.detach()[~mask] != 0).sum()) for param, mask in self.pairs.values())

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
