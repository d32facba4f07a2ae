"""The sequential, layer-by-layer driver that applies a recipe's steps to a model.

For each decoder layer in turn: move the layer to the working device, let the recipe's step
rewrite every linear layer it covers (in the adapter's true-sequential order: attention inputs,
attention output, MLP inputs, MLP output), write the represented (dequantized) weight back into
the float model, and move the layer back. Only the working layer lives on the working device, so
the peak accelerator memory is about one layer whatever the model's size.

Calibration-driven methods (GPTQ, AWQ) extend this loop by capturing each layer's inputs; RTN
needs the weights alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.models.adapters import ModelAdapter
from quantkit.quant.rtn import QuantizedWeight, rtn_quantize
from quantkit.quant.scheme import check_group_size
from quantkit.quant.weights import set_weight_out_in, weight_out_in
from quantkit.recipe import Recipe, WeightQuantStep


@dataclass
class LayerReport:
    """What quantizing one decoder layer did: each linear's relative weight error."""

    index: int
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


@dataclass
class PipelineResult:
    quantized: dict[str, QuantizedWeight]
    layers: list[LayerReport]
    skipped: list[str]


def check_recipe_fits(model: nn.Module, adapter: ModelAdapter, recipe: Recipe) -> None:
    """Fail before any work when a step cannot apply to some layer (a group size that does not divide it)."""
    (step,) = recipe.steps
    scheme = step.quant_scheme()
    prefix = adapter.layer_prefix(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.linear_groups(layer):
            for relative in group.linears:
                name = f"{prefix}.{index}.{relative}"
                if not scheme.is_ignored(name):
                    check_group_size(weight_out_in(layer.get_submodule(relative)).shape[1], scheme.group_size, name)


def quantize_model(model: nn.Module, adapter: ModelAdapter, recipe: Recipe, *, device: str | torch.device = "cpu",
                   on_layer: Callable[[LayerReport], None] | None = None) -> PipelineResult:
    """Apply the recipe's weight-quantization step to every decoder layer, one layer at a time.

    The model's float weights are replaced by the weights the quantized layers represent, so the
    model computes what the written checkpoint will compute. ``on_layer`` is called after each
    layer (progress bars hang on it).
    """
    (step,) = recipe.steps
    layers = adapter.decoder_layers(model)
    prefix = adapter.layer_prefix(model)
    result = PipelineResult(quantized={}, layers=[], skipped=[])
    for index, layer in enumerate(layers):
        home = _device_of(layer)
        layer.to(device)
        report = LayerReport(index)
        for group in adapter.linear_groups(layer):
            for relative in group.linears:
                name = f"{prefix}.{index}.{relative}"
                _quantize_linear(layer.get_submodule(relative), name, step, result, report)
        layer.to(home)
        result.layers.append(report)
        if on_layer is not None:
            on_layer(report)
    return result


def _quantize_linear(module: nn.Module, name: str, step: WeightQuantStep, result: PipelineResult,
                     report: LayerReport) -> None:
    scheme = step.quant_scheme()
    if scheme.is_ignored(name):
        result.skipped.append(name)
        return
    weight = weight_out_in(module)
    qweight = rtn_quantize(weight.float(), scheme, module_name=name)
    represented = qweight.dequantize()
    report.errors[name] = _relative_error(weight.float(), represented)
    set_weight_out_in(module, represented.to(weight.dtype))
    result.quantized[name] = _to_cpu(qweight)


def _relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (torch.linalg.norm(reference - approx) / torch.linalg.norm(reference).clamp_min(1e-12)).item()


def _to_cpu(qweight: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(codes=qweight.codes.cpu(), scales=qweight.scales.cpu(), zeros=qweight.zeros.cpu(),
                           g_idx=qweight.g_idx.cpu(), bits=qweight.bits, group_size=qweight.group_size,
                           symmetric=qweight.symmetric)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
