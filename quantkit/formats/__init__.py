"""Checkpoint layouts that quantkit writes and reads (GPTQ now; AWQ and compressed-tensors later)."""

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
    raise QuantkitError(
        f"quantization method '{method}' of '{path}' is not supported yet: quantkit reads gptq checkpoints"
    )


__all__ = ["load_quantized_model"]
