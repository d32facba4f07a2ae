"""The layer-by-layer compression pipeline: capture calibration inputs, rewrite each layer in turn."""

from quantkit.pipeline.context import LayerReport, PipelineResult
from quantkit.pipeline.driver import check_recipe_fits, quantize_model

__all__ = ["LayerReport", "PipelineResult", "check_recipe_fits", "quantize_model"]
