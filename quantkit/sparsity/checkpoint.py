"""Pruned checkpoints: dense weights with zeros, and the sparsity pattern recorded in config.json.

Engines load dense weights (vLLM dropped its 2:4 sparse kernels in 2026), so a pruned model is
written as an ordinary Hugging Face folder whose pruned weights are zeros. config.json gains a
top-level ``sparsity_config`` with the fields of compressed-tensors' ``SparsityCompressionConfig``
(``compressed_tensors/config/base.py``, as its ``dense`` format dumps them)::

    "sparsity_config": {"format": "dense", "sparsity_structure": "2:4", "global_sparsity": 0.41,
                        "targets": ["Linear"], "ignore": ["lm_head"],
                        "registry_requires_subclass": false}

``global_sparsity`` is the share of zeros among all of the model's parameters, ``ignore`` names
the linears left dense. llm-compressor nests the same object inside a compressed-tensors
``quantization_config``; quantkit keeps it at the top level so that a pruned float checkpoint
has no ``quantization_config`` at all and loads in transformers, vLLM and quantkit as the plain
float model it is, with no compressed-tensors package needed. Quantized pruned checkpoints
(SparseGPT with a scheme) carry the same top-level entry beside their ``quantization_config``.
``read_sparsity_config`` also finds the nested form that llm-compressor writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.atomic import atomic_output_dir
from quantkit.sparsity.targets import SparsityReport

CONFIG_KEY = "sparsity_config"


def sparsity_config(report: SparsityReport) -> dict:
    """The ``sparsity_config`` entry for a pruned model."""
    return {
        "format": "dense",
        "sparsity_structure": report.structure,
        "global_sparsity": round(report.global_sparsity, 6),
        "targets": ["Linear"],
        "ignore": list(report.ignored),
        "registry_requires_subclass": False,
    }


def attach_sparsity_config(model, report: SparsityReport) -> dict:
    """Set ``model.config.sparsity_config``, so every writer that saves the config records it."""
    entry = sparsity_config(report)
    model.config.sparsity_config = entry
    return entry


def read_sparsity_config(source) -> dict | None:
    """The sparsity entry of a config (a folder, a config.json dict or a ``PretrainedConfig``):
    top level (quantkit) or inside ``quantization_config`` (llm-compressor); None when absent or empty."""
    if isinstance(source, (str, Path)):
        path = Path(source) / "config.json"
        if not path.is_file():
            return None
        source = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(source, dict):
        source = source.to_dict() if hasattr(source, "to_dict") else vars(source)
    entry = source.get(CONFIG_KEY)
    if not entry:
        entry = (source.get("quantization_config") or {}).get(CONFIG_KEY)
    return entry or None


def save_dense_checkpoint(model, tokenizer, out_dir: Path | str, *, dtype: torch.dtype | None = None,
                          overwrite: bool = False) -> Path:
    """Write ``model`` as a float folder (``dtype``: the source checkpoint's storage dtype), atomically."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as staging:
        original = next(model.parameters()).dtype
        if dtype is not None and dtype != original:
            model.to(dtype)
        try:
            model.save_pretrained(staging, safe_serialization=True)
        finally:
            model.to(original)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for path in staging.iterdir():  # transformers may write through 0600 temporary files
            if path.is_file():
                path.chmod(0o644)
    return out_dir


def storage_dtype(path: str) -> torch.dtype | None:
    """The dtype a checkpoint stores its float weights in (config.json's ``dtype``/``torch_dtype``)."""
    from quantkit.models.loading import load_config

    try:
        config = load_config(path)
    except QuantkitError:
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
