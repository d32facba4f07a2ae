"""Checkpoint layouts that quantkit writes and reads: GPTQ, AWQ (GEMM) and compressed-tensors."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_quantization_config

if TYPE_CHECKING:
    from quantkit.formats.layout import QuantizedLayout

# Layout name (``quant_method`` in config.json, ``--format`` on the command line) to the module
# that defines it; each is imported only when used.
LAYOUT_MODULES = {
    "gptq": "quantkit.formats.gptq",
    "awq": "quantkit.formats.awq",
    "compressed-tensors": "quantkit.formats.compressed_tensors",
}


def load_quantized_model(
    path: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a quantized checkpoint folder by its config.json ``quantization_config.quant_method``."""
    method = str(read_quantization_config(path).get("quant_method", "")).lower()
    if method not in LAYOUT_MODULES:
        raise QuantkitError(
            f"quantization method '{method}' of '{path}' is not supported: quantkit reads gptq, awq "
            "and compressed-tensors checkpoints"
        )
    return _layout(method).load(path, dtype=dtype, device=device)


def save_checkpoint(fmt: str, model, tokenizer, quantized, scheme, out_dir: Path | str, *, overwrite: bool = False,
                    algorithm_config: dict | None = None) -> Path:
    """Write a quantized model in the named layout: ``gptq``, ``awq`` or ``compressed-tensors``."""
    if fmt not in LAYOUT_MODULES:
        raise QuantkitError(f"unknown checkpoint format '{fmt}': expected gptq, awq or compressed-tensors")
    return _layout(fmt).save(model, tokenizer, quantized, scheme, out_dir, overwrite=overwrite,
                             algorithm_config=algorithm_config)


def _layout(name: str) -> QuantizedLayout:
    return importlib.import_module(LAYOUT_MODULES[name]).LAYOUT


__all__ = ["load_quantized_model", "save_checkpoint"]
