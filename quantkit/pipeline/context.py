"""What one layer's quantization works with, and what it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from quantkit.models.adapters import LinearGroup, ModelAdapter
from quantkit.pipeline.capture import LayerBatch, run_layer
from quantkit.pipeline.data_parallel import DataParallel
from quantkit.pipeline.replay import ReplayCache
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import set_weight_out_in, weight_out_in


@dataclass
class LayerReport:
    """One decoder layer's result: each linear's relative weight error and, with calibration
    data, the relative error of the layer's output on the first calibration batch."""

    index: int
    errors: dict[str, float] = field(default_factory=dict)
    output_error: float | None = None
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


@dataclass
class PipelineResult:
    quantized: dict[str, QuantizedWeight]
    layers: list[LayerReport]
    skipped: list[str]
    peak_device_bytes: int | None = None
    # False on data-parallel ranks that write nothing: names are kept (None values), not the
    # weights, which would cost every rank the whole quantized model in host memory
    keep_quantized: bool = True

    def keep(self, name: str, record_on_device) -> None:
        """Record a quantized linear, moved to host memory where it is kept."""
        self.quantized[name] = record_on_device() if self.keep_quantized else None


@dataclass
class LayerContext:
    layer: nn.Module
    index: int
    prefix: str
    adapter: ModelAdapter
    device: torch.device
    scheme: QuantScheme
    batches: list[LayerBatch] | None
    result: PipelineResult
    report: LayerReport
    replay_budget_bytes: int = 0
    data_parallel: DataParallel | None = None  # sum statistics over ranks before acting on them
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run once the layer is done
    _finished: set[str] = field(default_factory=set)

    def full_name(self, relative: str) -> str:
        return f"{self.prefix}.{self.index}.{relative}"

    def groups(self) -> list[LinearGroup]:
        return self.adapter.linear_groups(self.layer)

    def targets(self, group: LinearGroup) -> list[tuple[str, nn.Module]]:
        """The group's linears that the scheme quantizes, as (full name, module)."""
        found = []
        for relative in group.linears:
            name = self.full_name(relative)
            if self.scheme.is_ignored(name):
                if name not in self.result.skipped:
                    self.result.skipped.append(name)
            else:
                found.append((name, self.layer.get_submodule(relative)))
        return found

    def record(self, name: str, module: nn.Module, qweight: QuantizedWeight,
               reference: torch.Tensor | None = None) -> None:
        """Keep the quantized weight and put the weight it represents into the float model."""
        original = weight_out_in(module) if reference is None else reference
        represented = qweight.dequantize()
        diff = torch.linalg.norm(original.float() - represented)
        self.report.errors[name] = (diff / torch.linalg.norm(original.float()).clamp_min(1e-12)).item()
        set_weight_out_in(module, represented.to(original.dtype))
        self.result.keep(name, lambda: _to_cpu(qweight))

    @cached_property
    def replay(self) -> ReplayCache:
        groups = self.groups()
        return ReplayCache(self.layer, [group.linears for group in groups], self.replay_budget_bytes)

    def collect_group_inputs(self, groups: list[LinearGroup], new_accumulator) -> dict:
        """One pass over the calibration batches feeding each group's input to an accumulator
        (``new_accumulator(in_features, device)``, anything with ``add_batch`` and ``all_reduce``):
        each batch stops once every group's first linear has seen its input; the accumulators
        are then summed over data-parallel ranks. Returns them by group name."""
        accumulators, handles, observed = {}, [], []
        for group in groups:
            _name, first = self.targets(group)[0]
            accumulator = new_accumulator(weight_out_in(first).shape[1], self.device)
            accumulators[group.name] = accumulator
            handles.append(first.register_forward_pre_hook(
                lambda _module, inputs, acc=accumulator: acc.add_batch(inputs[0].detach())))
            observed.append(first)
        try:
            self.forward_all(stop_before=observed)
        finally:
            for handle in handles:
                handle.remove()
        self.reduce(accumulators.values())
        return accumulators

    def reduce(self, statistics) -> None:
        """All-reduce (sum) accumulators (``HessianAccumulator``/``ActivationStats``) over the
        data-parallel ranks; nothing when running alone."""
        if self.data_parallel is not None:
            for accumulator in statistics:
                accumulator.all_reduce(self.data_parallel)

    def finish(self, group: LinearGroup) -> None:
        """Declare the group's linears final, so later passes may replay what depends only on them."""
        self._finished.add(group.name)
        groups = self.groups()
        done = 0
        while done < len(groups) and (groups[done].name in self._finished or not self.targets(groups[done])):
            done += 1
        self.replay.finished_groups = done

    def forward_all(self, stop_before: list[nn.Module] | tuple = ()) -> None:
        """Run the layer over every calibration batch, discarding the outputs (hooks observe).

        Each batch stops as soon as every module of ``stop_before`` has been reached: observe
        them with forward pre-hooks (registered before this call)."""
        self.replay.run(self.batches or [], lambda batch: run_layer(self.layer, batch, self.device),
                        stop_before=stop_before)

    def advance(self) -> None:
        """Replace each batch's hidden states by the (quantized) layer's output, in place."""
        batches = self.batches or []
        outputs = self.replay.run(batches, lambda batch: run_layer(self.layer, batch, self.device), record=False)
        for batch, output in zip(batches, outputs):
            batch.hidden = output


def _to_cpu(qweight: QuantizedWeight) -> QuantizedWeight:
    # codes fit a byte (bits <= 8): a quarter of the int32 memory while the model waits to be written
    return QuantizedWeight(codes=qweight.codes.to(torch.uint8).cpu(), scales=qweight.scales.cpu(), zeros=qweight.zeros.cpu(),
                           g_idx=qweight.g_idx.cpu(), bits=qweight.bits, group_size=qweight.group_size,
                           symmetric=qweight.symmetric)
