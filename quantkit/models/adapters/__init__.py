"""One small adapter per architecture family, and the registry that picks one for a model."""

from quantkit.models.adapters.base import LinearGroup, ModelAdapter
from quantkit.models.adapters.linears import (
    in_features,
    is_linear_like,
    is_transposed,
    linear_modules,
    out_features,
)
from quantkit.models.adapters.registry import SUPPORTED_MODEL_TYPES, get_adapter

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LinearGroup",
    "ModelAdapter",
    "get_adapter",
    "in_features",
    "is_linear_like",
    "is_transposed",
    "linear_modules",
    "out_features",
]
