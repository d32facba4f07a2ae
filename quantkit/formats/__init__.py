"""Checkpoint layouts that quantkit writes and reads: GPTQ, AWQ (GEMM) and compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_quantization_config


def load_quantized_model(
    path: Path | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a quantized checkpoint folder by its config.json ``quantization_config.quant_method``."""
    method = str(read_quantization_config(path).get("quant_method", "")).lower()
    if method == "gptq":
        from quantkit.formats.gptq import load_gptq_model

        return load_gptq_model(path, dtype=dtype, device=device)
    if method == "awq":
        from quantkit.formats.awq import load_awq_model

        return load_awq_model(path, dtype=dtype, device=device)
    if method == "compressed-tensors":
        from quantkit.formats.compressed_tensors import load_compressed_tensors_model

        return load_compressed_tensors_model(path, dtype=dtype, device=device)
    raise QuantkitError(
        f"quantization method '{method}' of '{path}' is not supported: quantkit reads gptq, awq "
        "and compressed-tensors checkpoints"
    )


def save_checkpoint(fmt: str, model, tokenizer, quantized, scheme, out_dir: Path | str, *, overwrite: bool = False,
                    algorithm_config: dict | None = None) -> Path:
    """Write a quantized model in the named layout: ``gptq``, ``awq`` or ``compressed-tensors``."""
    if fmt == "gptq":
        from quantkit.formats.gptq import save_gptq as save
    elif fmt == "awq":
        from quantkit.formats.awq import save_awq as save
    elif fmt == "compressed-tensors":
        from quantkit.formats.compressed_tensors import save_compressed_tensors as save
    else:
        raise QuantkitError(f"unknown checkpoint format '{fmt}': expected gptq, awq or compressed-tensors")
    return save(model, tokenizer, quantized, scheme, out_dir, overwrite=overwrite, algorithm_config=algorithm_config)


__all__ = ["load_quantized_model", "save_checkpoint"]
