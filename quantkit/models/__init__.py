"""Models: load a checkpoint and find its parts through one adapter per architecture family.

Names are imported on first use, so ``import quantkit.models`` stays cheap (no torch, no
transformers) for code such as the recipe parser that only needs to know the package exists.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LinearGroup": "quantkit.models.adapters",
    "ModelAdapter": "quantkit.models.adapters",
    "SUPPORTED_MODEL_TYPES": "quantkit.models.adapters",
    "get_adapter": "quantkit.models.adapters",
    "linear_modules": "quantkit.models.adapters",
    "is_linear_like": "quantkit.models.adapters",
    "fold_input_scales": "quantkit.models.folding",
    "BUNDLED_MODELS": "quantkit.models.bundled",
    "resolve_model_path": "quantkit.models.bundled",
    "LoadedModel": "quantkit.models.loading",
    "load_model": "quantkit.models.loading",
    "load_tokenizer": "quantkit.models.loading",
    "load_config": "quantkit.models.loading",
    "parse_dtype": "quantkit.models.loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantkit.models' has no attribute '{name}'")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
