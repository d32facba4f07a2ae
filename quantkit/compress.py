"""One compression run end to end: load the model, run the recipe layer by layer, write the checkpoint.

This is what ``quantkit quantize`` calls; the CLI only parses options and renders the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantkit.formats.atomic import check_output_dir
from quantkit.pipeline import LayerReport, PipelineResult, check_recipe_fits, quantize_model
from quantkit.recipe import Recipe


@dataclass
class CompressResult:
    output: Path
    model_path: str
    recipe: Recipe
    pipeline: PipelineResult
    seconds: float
    num_layers: int


def compress(model: str | None, recipe: Recipe, output: str | Path, *, overwrite: bool = False,
             device: str = "cpu", on_start: Callable[[int], None] | None = None,
             on_layer: Callable[[LayerReport], None] | None = None) -> CompressResult:
    """Quantize ``model`` (a bundled name, folder or hub id; None = bundled target) into ``output``.

    The output folder is checked before any work starts and written atomically at the end, so a
    failure leaves nothing behind. ``on_start`` receives the number of decoder layers.
    """
    from quantkit.formats.gptq import save_gptq
    from quantkit.models.loading import load_model

    output = Path(output)
    check_output_dir(output, overwrite)
    started = time.perf_counter()
    loaded = load_model(model, dtype="auto", device="cpu")
    if loaded.quantization_config is not None:
        from quantkit.errors import QuantkitError

        method = loaded.quantization_config.get("quant_method", "?")
        raise QuantkitError(f"'{loaded.path}' is already quantized ({method}); start from a float checkpoint")
    check_recipe_fits(loaded.model, loaded.adapter, recipe)
    num_layers = len(loaded.adapter.decoder_layers(loaded.model))
    if on_start is not None:
        on_start(num_layers)
    result = quantize_model(loaded.model, loaded.adapter, recipe, device=device, on_layer=on_layer)
    (step,) = recipe.steps
    save_gptq(loaded.model, loaded.tokenizer, result.quantized, step.quant_scheme(), output,
              overwrite=overwrite, algorithm_config={"method": step.method, "recipe": recipe.name})
    return CompressResult(output=output, model_path=loaded.path, recipe=recipe, pipeline=result,
                          seconds=time.perf_counter() - started, num_layers=num_layers)
