"""Which linears a pruning step rewrites, whether it can, and how sparse they came out.

The targets are the linears of the decoder layers that the step does not ignore, found through
the model's adapter exactly as the pipeline finds them; the report is read back from the
weights themselves, so it states what the checkpoint holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter
from quantkit.quant.scheme import QuantScheme, check_group_size
from quantkit.quant.weights import weight_out_in
from quantkit.sparsity.masks import follows_nm
from quantkit.sparsity.structure import MaskStructure


def decoder_linears(model: nn.Module, adapter: ModelAdapter, scheme: QuantScheme) -> list[tuple[str, int, nn.Module]]:
    """(full name, layer index, module) of every decoder-layer linear that ``scheme`` does not ignore."""
    prefix = adapter.layer_prefix(model)
    found = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.linear_groups(layer):
            for relative in group.linears:
                name = f"{prefix}.{index}.{relative}"
                if not scheme.is_ignored(name):
                    found.append((name, index, layer.get_submodule(relative)))
    return found


def check_sparsity_fits(model: nn.Module, adapter: ModelAdapter, step) -> None:
    """Fail before any work when a step cannot apply to some layer (N:M or a group size that does not divide it)."""
    structure: MaskStructure = step.structure()
    scheme = step.quant_scheme()
    targets = decoder_linears(model, adapter, step.target_scheme())
    if not targets:
        raise QuantkitError("the recipe's ignore list leaves no decoder linear to prune")
    for name, _index, module in targets:
        in_features = weight_out_in(module).shape[1]
        if structure.is_nm and in_features % structure.m:
            raise QuantkitError(f"{structure.name} sparsity needs every pruned layer's input size to be divisible by "
                                f"{structure.m}, but '{name}' has {in_features} inputs; add it to ignore")
        if scheme is not None:
            check_group_size(in_features, scheme.group_size, name)


@dataclass
class LinearSparsity:
    name: str
    layer: int
    zeros: int
    total: int
    follows_structure: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.total, 1)


@dataclass
class SparsityReport:
    """Per-linear zeros of the pruned linears, and the sparsity of the whole model."""

    structure: str
    target_sparsity: float
    linears: list[LinearSparsity] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # linears of the model left dense (lm_head, ignore list)
    model_zeros: int = 0
    model_parameters: int = 0

    @property
    def targets_sparsity(self) -> float:
        """Sparsity of the pruned linears together."""
        return sum(r.zeros for r in self.linears) / max(sum(r.total for r in self.linears), 1)

    @property
    def global_sparsity(self) -> float:
        """Share of zeros among all of the model's parameters (compressed-tensors' global_sparsity)."""
        return self.model_zeros / max(self.model_parameters, 1)

    @property
    def follows_structure(self) -> bool:
        return all(r.follows_structure for r in self.linears)

    def per_layer(self) -> dict[int, dict[str, float]]:
        """{layer index: {linear name inside the layer: sparsity}}."""
        table: dict[int, dict[str, float]] = {}
        for row in self.linears:
            table.setdefault(row.layer, {})[_short(row.name)] = row.sparsity
        return table

    def to_dict(self) -> dict:
        return {"structure": self.structure, "target_sparsity": self.target_sparsity,
                "targets_sparsity": self.targets_sparsity, "global_sparsity": self.global_sparsity,
                "follows_structure": self.follows_structure, "ignored": self.ignored,
                "linears": [{**asdict(r), "sparsity": r.sparsity} for r in self.linears]}


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def sparsity_report(model: nn.Module, adapter: ModelAdapter, structure: MaskStructure, target_sparsity: float,
                    scheme: QuantScheme) -> SparsityReport:
    """Zeros of every pruned linear as the model now holds it (quantized layers: the weights they represent)."""
    report = SparsityReport(structure=structure.name, target_sparsity=target_sparsity)
    pruned = set()
    for name, index, module in decoder_linears(model, adapter, scheme):
        weight = weight_out_in(module)
        ok = follows_nm(weight, structure.n, structure.m) if structure.is_nm else True
        report.linears.append(LinearSparsity(name, index, int((weight == 0).sum()), weight.numel(), ok))
        pruned.add(name)
    report.ignored = [name for name, module in model.named_modules()
                      if isinstance(module, nn.Linear) and name not in pruned]
    seen = set()
    for tensor in model.parameters():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        report.model_zeros += int((tensor.detach() == 0).sum())
        report.model_parameters += tensor.numel()
    return report


def sparse_masks(model: nn.Module, adapter: ModelAdapter, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Keep masks (weight != 0) of the decoder linears, by full name: what distillation holds fixed."""
    return {name: weight_out_in(module) != 0 for name, _index, module in decoder_linears(model, adapter, scheme)}
