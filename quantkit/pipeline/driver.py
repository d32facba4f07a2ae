"""The sequential, layer-by-layer driver that applies a recipe's weight step to a model.

With calibration samples: capture the inputs of the first decoder layer, then for each layer in
turn move it to the working device, let the method observe its inputs and rewrite its linears
(the float weights are replaced by the weights the quantized layers represent), run the
rewritten layer to produce the next layer's inputs, and move it back. Only the working layer and
the calibration activations live on the working device, so peak accelerator memory is about one
layer plus activations, whatever the model's size; activations stay on the CPU when asked to
(or when they would not fit).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from quantkit.models.adapters import ModelAdapter
from quantkit.pipeline.capture import LayerBatch, capture_first_layer_inputs, run_layer
from quantkit.pipeline.context import LayerContext, LayerReport, PipelineResult
from quantkit.pipeline.data_parallel import DataParallel
from quantkit.quant.scheme import QuantScheme, check_group_size
from quantkit.quant.weights import weight_out_in
from quantkit.recipe import Recipe, WeightQuantStep
from quantkit.recipe_w8a8 import EightBitStep, KVCacheStep, SmoothQuantStep
from quantkit.sparsity.step import SparsityStep
from quantkit.sparsity.targets import check_sparsity_fits


def check_recipe_fits(model: nn.Module, adapter: ModelAdapter, recipe: Recipe) -> None:
    """Fail before any work when a step cannot apply to some layer (a group size that does not divide it)."""
    for sparsity_step in (s for s in recipe.steps if isinstance(s, SparsityStep)):
        check_sparsity_fits(model, adapter, sparsity_step)  # N:M and, when it quantizes, its group size
    step = recipe.weight_step
    if not isinstance(step, WeightQuantStep):
        return  # 8-bit weights have no groups; a KV-cache-only recipe has no weight step
    scheme = step.quant_scheme()
    prefix = adapter.layer_prefix(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.linear_groups(layer):
            for relative in group.linears:
                name = f"{prefix}.{index}.{relative}"
                if not scheme.is_ignored(name):
                    check_group_size(weight_out_in(layer.get_submodule(relative)).shape[1], scheme.group_size, name)


def quantize_model(model: nn.Module, adapter: ModelAdapter, recipe: Recipe, *, device: str | torch.device = "cpu",
                   samples: torch.Tensor | None = None, batch_size: int = 4, offload_activations: bool = False,
                   replay_budget_bytes: int | None = None, data_parallel: DataParallel | None = None,
                   layer_weights=None, on_layer: Callable[[LayerReport], None] | None = None,
                   keep_quantized: bool = True) -> PipelineResult:
    """Apply the recipe's weight step to every decoder layer, one layer at a time.

    ``samples`` (N, L) token ids are required by calibration methods (GPTQ, AWQ) and ignored by
    RTN. ``on_layer`` is called after each layer (progress bars hang on it).
    ``replay_budget_bytes`` bounds the memory kept for replaying finished sub-modules' outputs
    (``pipeline/replay.py``); by default it is spent only where activations live in CPU memory.
    With ``data_parallel`` (``DataParallel.current()`` under torchrun), ``samples`` are this rank's
    share and the statistics are summed over ranks, so every rank computes the same weights.
    ``layer_weights`` (``models.lazy_loading.LazyLayers``) reads each layer's float tensors just
    before the layer is worked on (the model was built with its layers on the meta device) and
    drops its quantized linears' float weights once it is done. ``keep_quantized=False`` (a
    data-parallel rank that writes nothing) records which linears were quantized, not their weights.
    """
    step = recipe.weight_step
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method = _layer_methods(recipe)
    layers = adapter.decoder_layers(model)
    batches = None
    if recipe.needs_calibration:
        if samples is None:
            needing = [s.method for s in recipe.steps if s.needs_calibration]
            raise ValueError(f"method '{needing[0]}' needs calibration samples")
        storage = torch.device("cpu") if offload_activations else device
        batches = capture_first_layer_inputs(model, layers, samples, device=device, batch_size=batch_size,
                                             storage=storage)
        if replay_budget_bytes is None:
            replay_budget_bytes = default_replay_budget(batches, device)
    result = PipelineResult(quantized={}, layers=[], skipped=[], keep_quantized=keep_quantized)
    prefix = adapter.layer_prefix(model)
    scheme = step.quant_scheme() if step is not None else QuantScheme()
    sparsity_step = next((s for s in recipe.steps if isinstance(s, SparsityStep)), None)
    if sparsity_step is not None:
        scheme = sparsity_step.target_scheme()  # the layers it prunes (and quantizes, with a scheme)
    for index, layer in enumerate(layers):
        started = time.perf_counter()
        if layer_weights is not None:
            layer_weights.load(index, layer)
        home = _device_of(layer)
        layer.to(device)
        report = LayerReport(index)
        reference = run_layer(layer, batches[0], device) if batches else None
        ctx = LayerContext(layer, index, prefix, adapter, device, scheme, batches, result, report,
                           replay_budget_bytes=replay_budget_bytes or 0, data_parallel=data_parallel)
        method(ctx)
        if batches:
            ctx.advance()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # offloaded outputs are copied asynchronously
            report.output_error = _relative(batches[0].hidden, reference)
        for cleanup in ctx.cleanups:
            cleanup()
        layer.to(home)
        if layer_weights is not None:
            layer_weights.release(index, layer, result.quantized)
        report.seconds = time.perf_counter() - started
        result.layers.append(report)
        if on_layer is not None:
            on_layer(report)
    if device.type == "cuda":
        result.peak_device_bytes = torch.cuda.max_memory_allocated(device)
    return result


def _layer_methods(recipe: Recipe) -> Callable[[LayerContext], None]:
    """One function running every step of the recipe on a layer, in the recipe's order."""
    methods = [_layer_method(step, recipe.steps[i + 1] if i + 1 < len(recipe.steps) else None)
               for i, step in enumerate(recipe.steps)]

    def run(ctx: LayerContext) -> None:
        for method in methods:
            method(ctx)

    return run


def _layer_method(step, following=None) -> Callable[[LayerContext], None]:
    if isinstance(step, SparsityStep):
        return _pruning_method(step)
    if isinstance(step, SmoothQuantStep):
        from quantkit.pipeline.w8a8_step import smooth_layer

        return lambda ctx: smooth_layer(ctx, step, following)
    if isinstance(step, EightBitStep):
        from quantkit.pipeline.w8a8_step import quantize_layer_w8a8

        return lambda ctx: quantize_layer_w8a8(ctx, step)
    if isinstance(step, KVCacheStep):
        from quantkit.pipeline.kv_cache_step import calibrate_layer_kv

        return lambda ctx: calibrate_layer_kv(ctx, step)
    if step.method == "rtn":
        from quantkit.pipeline.rtn_step import quantize_layer_rtn

        return quantize_layer_rtn
    if step.method == "gptq":
        from quantkit.pipeline.gptq_step import quantize_layer_gptq

        config, true_sequential = step.gptq_config()
        return lambda ctx: quantize_layer_gptq(ctx, config, true_sequential)
    if step.method == "awq":
        from quantkit.pipeline.awq_step import quantize_layer_awq

        config = step.awq_config()
        return lambda ctx: quantize_layer_awq(ctx, config)
    raise ValueError(f"unknown method {step.method!r}")


def _pruning_method(step: SparsityStep) -> Callable[[LayerContext], None]:
    if step.method == "magnitude":
        from quantkit.pipeline.magnitude_step import prune_layer_magnitude

        return lambda ctx: prune_layer_magnitude(ctx, step)
    if step.method == "wanda":
        from quantkit.pipeline.wanda_step import prune_layer_wanda

        return lambda ctx: prune_layer_wanda(ctx, step)
    from quantkit.pipeline.sparsegpt_step import prune_layer_sparsegpt

    return lambda ctx: prune_layer_sparsegpt(ctx, step)


def default_replay_budget(batches: list[LayerBatch], device: torch.device) -> int:
    """Replay memory when not asked: none on an accelerator (its peak memory is what the pipeline
    keeps low); in CPU memory, four times the activations (at least 1 GiB) but at most a quarter
    of the memory available now."""
    if device.type != "cpu":
        return 0
    activations = sum(batch.hidden.numel() * batch.hidden.element_size() for batch in batches)
    return min(max(4 * activations, 1 << 30), _available_memory() // 4)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return (torch.linalg.norm(got.float() - want) / torch.linalg.norm(want).clamp_min(1e-12)).item()


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
