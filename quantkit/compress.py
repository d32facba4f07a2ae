"""One compression run end to end: load the model, run the recipe layer by layer, write the checkpoint.

This is what ``quantkit quantize`` calls; the CLI only parses options and renders the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.atomic import check_output_dir
from quantkit.pipeline import LayerReport, PipelineResult, check_recipe_fits, quantize_model
from quantkit.recipe import Recipe
from quantkit.sparsity.targets import SparsityReport


@dataclass
class CompressResult:
    output: Path
    model_path: str
    recipe: Recipe
    pipeline: PipelineResult
    seconds: float
    num_layers: int
    calibration_tokens: int  # over all ranks
    sparsity: SparsityReport | None = None  # per-linear zeros, when a step prunes
    rank: int = 0  # this process's rank under torchrun; only rank 0 wrote the output
    world_size: int = 1


def compress(model: str | None, recipe: Recipe, output: str | Path, *, overwrite: bool = False,
             device: str = "cpu", batch_size: int = 4, offload_activations: bool = False,
             low_host_memory: bool | None = None, on_start: Callable[[int], None] | None = None,
             on_layer: Callable[[LayerReport], None] | None = None) -> CompressResult:
    """Quantize ``model`` (a bundled name, folder or hub id; None = bundled target) into ``output``.

    The output folder is checked before any work starts and written atomically at the end, so a
    failure leaves nothing behind. ``on_start`` receives the number of decoder layers.

    Under ``torchrun`` / ``accelerate launch`` (``pipeline/data_parallel.py``) every rank loads the
    model and the same calibration samples, keeps its contiguous share of the samples, and the
    statistics are reduced over the ranks before any method acts, so every rank computes the
    weights one process would; rank 0 alone writes the output (and calls ``on_start`` /
    ``on_layer``) while the others wait for it.

    ``low_host_memory`` (None: wherever it applies) builds the model with its decoder layers on
    the meta device and reads each layer from the safetensors files when the pipeline takes it
    (``models/lazy_loading.py``): a local float safetensors checkpoint of a Llama-family model and
    a recipe that does not prune (pruning reports read every pruned weight after the pipeline).
    True makes it an error where it does not apply; False always loads the whole model.
    """
    from quantkit.pipeline.data_parallel import launch as join_ranks

    output = Path(output)
    check_output_dir(output, overwrite)
    _check_device(device)
    ranks = join_ranks(device)
    device = ranks.device
    if not ranks.is_main:
        on_start = on_layer = None
    started = time.perf_counter()
    with ranks.running():
        loaded = _load(model, recipe, low_host_memory)
        check_recipe_fits(loaded.model, loaded.adapter, recipe)
        samples = _calibration_samples(loaded, recipe) if recipe.needs_calibration else None
        tokens = 0 if samples is None else samples.numel()
        if samples is not None:
            samples = ranks.shard(samples)
        num_layers = len(loaded.adapter.decoder_layers(loaded.model))
        if on_start is not None:
            on_start(num_layers)
        result = quantize_model(loaded.model, loaded.adapter, recipe, device=device, samples=samples,
                                batch_size=batch_size, offload_activations=offload_activations, on_layer=on_layer,
                                data_parallel=ranks.group, layer_weights=loaded.layer_weights,
                                keep_quantized=ranks.is_main)
        sparsity = _record_sparsity(loaded, recipe)
        if ranks.is_main:
            if sparsity is not None:
                _save_pruned(recipe, loaded, result, output, overwrite)
            else:
                _save(recipe, loaded, result, output, overwrite)
        ranks.wait_for_main()
    ranks.close()
    return CompressResult(output=output, model_path=loaded.path, recipe=recipe, pipeline=result,
                          seconds=time.perf_counter() - started, num_layers=num_layers, calibration_tokens=tokens,
                          sparsity=sparsity, rank=ranks.rank, world_size=ranks.world_size)


def _load(model: str | None, recipe: Recipe, low_host_memory: bool | None = None):
    from quantkit.models.loading import load_model, load_model_lazy
    from quantkit.sparsity.step import SparsityStep

    if low_host_memory is not False:
        if any(isinstance(step, SparsityStep) for step in recipe.steps):
            if low_host_memory:
                raise QuantkitError("cannot load layer by layer: a pruning recipe reads every pruned weight "
                                    "after the pipeline; leave out --low-host-memory")
        else:
            loaded = load_model_lazy(model, required=bool(low_host_memory))
            if loaded is not None:
                return loaded
    loaded = load_model(model, dtype="auto", device="cpu")
    if loaded.quantization_config is not None:
        method = loaded.quantization_config.get("quant_method", "?")
        raise QuantkitError(f"'{loaded.path}' is already quantized ({method}); start from a float checkpoint")
    return loaded


def _save_pruned(recipe: Recipe, loaded, result: PipelineResult, output: Path, overwrite: bool) -> None:
    """A pruned model: dense float weights (the source's storage dtype), or, when SparseGPT also
    quantized the survivors, the recipe's quantized layout; config.json carries sparsity_config."""
    from quantkit.formats import save_checkpoint
    from quantkit.sparsity.checkpoint import save_dense_checkpoint, storage_dtype
    from quantkit.sparsity.step import SparsityStep

    step = next(s for s in recipe.steps if isinstance(s, SparsityStep))
    if not step.quantizes:
        save_dense_checkpoint(loaded.model, loaded.tokenizer, output, dtype=storage_dtype(loaded.path),
                              overwrite=overwrite)
        return
    algorithm_config = {"method": step.method, "recipe": recipe.name, "mask_structure": step.mask_structure,
                        "sparsity": step.sparsity, **dict(step.options)}
    save_checkpoint(recipe.format, loaded.model, loaded.tokenizer, result.quantized, step.quant_scheme(), output,
                    overwrite=overwrite, algorithm_config=algorithm_config)


def _record_sparsity(loaded, recipe: Recipe) -> SparsityReport | None:
    """For a pruning step: how sparse each pruned linear came out, also put in the model's config
    (``sparsity_config``) so the checkpoint records it; None when nothing was pruned."""
    from quantkit.sparsity.step import SparsityStep

    step = next((s for s in recipe.steps if isinstance(s, SparsityStep)), None)
    if step is None:
        return None
    from quantkit.sparsity.checkpoint import attach_sparsity_config
    from quantkit.sparsity.targets import sparsity_report

    report = sparsity_report(loaded.model, loaded.adapter, step.structure(), step.sparsity, step.target_scheme())
    attach_sparsity_config(loaded.model, report)
    return report


def _save(recipe: Recipe, loaded, result: PipelineResult, output: Path, overwrite: bool) -> None:
    """Write the checkpoint in the recipe's layout: 8-bit weights (or float weights with a
    quantized KV cache) in compressed-tensors' 8-bit formats, weight-only schemes in theirs."""
    from quantkit.formats import save_checkpoint
    from quantkit.recipe_w8a8 import EightBitStep

    step, kv_cache = recipe.weight_step, recipe.kv_cache_step
    if step is None or isinstance(step, EightBitStep):
        from quantkit.formats.compressed_tensors_8bit import save_8bit_checkpoint

        save_8bit_checkpoint(loaded.model, loaded.tokenizer, result.quantized, step, kv_cache, output,
                             overwrite=overwrite)
        return
    algorithm_config = {"method": step.method, "recipe": recipe.name, **dict(step.options)}
    if kv_cache is not None:
        from quantkit.quant.kv_cache import kv_cache_scheme_args

        algorithm_config["kv_cache_scheme"] = kv_cache_scheme_args(kv_cache.type, kv_cache.strategy)
    save_checkpoint(recipe.format, loaded.model, loaded.tokenizer, result.quantized, step.quant_scheme(), output,
                    overwrite=overwrite, algorithm_config=algorithm_config)


def _calibration_samples(loaded, recipe: Recipe) -> torch.Tensor:
    from quantkit.data import calibration_samples

    cfg = recipe.calibration
    if loaded.tokenizer is None:
        raise QuantkitError(f"'{loaded.path}' has no tokenizer files; calibration needs the model's tokenizer")
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context is not None and cfg.seq_len > context:
        raise QuantkitError(f"calibration.seq_len {cfg.seq_len} is longer than the model's context ({context})")
    return calibration_samples(loaded.tokenizer, cfg.dataset, num_samples=cfg.num_samples, seq_len=cfg.seq_len,
                               seed=cfg.seed, text_field=cfg.text_field)


def _check_device(device: str) -> None:
    try:
        target = torch.device(device)
    except RuntimeError:
        raise QuantkitError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError(f"device '{device}' was asked for but no CUDA GPU is available")
