"""Recipe steps for activation and KV-cache quantization: SmoothQuant, 8-bit weights and
activations (INT8 or FP8 e4m3), and KV-cache scales. Parsed and validated here; no torch import.

A recipe composes them with the weight-only steps of ``quantkit.recipe``::

    steps:
      - method: smoothquant        # migrate activation outliers into the weights (needs data)
        alpha: 0.5
      - method: w8a8               # 8-bit weights, per output channel, round to nearest
        type: int                  # int (INT8) or float (FP8 e4m3)
        weight_strategy: channel   # channel or tensor
        activations: dynamic       # dynamic (per token, at run time), static (per tensor,
                                   # calibrated) or none (weight-only W8A16, FP8 only)
      - method: kv_cache           # per-head K/V scales calibrated on the data
        type: float                # float (FP8 e4m3) or int (INT8)

Every error names its field (``steps[1].activations: ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.quant.scheme import QuantScheme

QUANT_TYPES = ("int", "float")
WEIGHT_STRATEGIES = ("channel", "tensor")
ACTIVATION_MODES = ("dynamic", "static", "none")
KV_STRATEGIES = ("attn_head", "tensor")
W8A8_METHODS = ("smoothquant", "w8a8", "kv_cache")
WEIGHT_QUANT_METHODS = ("rtn", "gptq", "awq", "w8a8")  # steps that quantize the weights: at most one


def _ignore_scheme(ignore: tuple[str, ...]) -> QuantScheme:
    # QuantScheme checks and matches ignore patterns; its bit fields are unused here.
    return QuantScheme(bits=8, group_size=-1, symmetric=True, ignore=ignore)


@dataclass(frozen=True)
class SmoothQuantStep:
    """Smooth the inputs of every linear group that a norm produces: ``s = max|X|^α / max|W|^(1-α)``."""

    method: str = "smoothquant"
    alpha: float = 0.5
    alpha_search: bool = False  # search α per layer and group on the calibration data
    alpha_grid: int = 20  # α in {0, 1/grid, ..., 1} when searching
    max_tokens: int = 2048  # calibration rows kept per group for the α search

    needs_calibration = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise QuantkitError(f"alpha: must be between 0 and 1 (got {self.alpha!r})")
        if self.alpha_grid < 1:
            raise QuantkitError(f"alpha_grid: must be at least 1 (got {self.alpha_grid!r})")
        if self.max_tokens < 16:
            raise QuantkitError(f"max_tokens: must be at least 16 (got {self.max_tokens!r})")


@dataclass(frozen=True)
class EightBitStep:
    """8-bit weights (symmetric, round to nearest) and, unless ``activations: none``, 8-bit inputs."""

    method: str = "w8a8"
    type: str = "int"
    weight_strategy: str = "channel"
    activations: str = "dynamic"
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        _check_choice(self.type, QUANT_TYPES, "type")
        _check_choice(self.weight_strategy, WEIGHT_STRATEGIES, "weight_strategy")
        _check_choice(self.activations, ACTIVATION_MODES, "activations")
        if self.type == "int" and self.activations == "none":
            raise QuantkitError("activations: 'none' (weight-only) is for FP8 weights; for INT8 weight-only use "
                                "method rtn with scheme w8a16")
        _check_ignore(self.ignore)

    @property
    def needs_calibration(self) -> bool:
        return self.activations == "static"

    @property
    def name(self) -> str:
        """``w8a8-int8-channel-dynamic``, ``w8a16-fp8-channel``, ..."""
        kind = "int8" if self.type == "int" else "fp8"
        if self.activations == "none":
            return f"w8a16-{kind}-{self.weight_strategy}"
        return f"w8a8-{kind}-{self.weight_strategy}-{self.activations}"

    def quant_scheme(self) -> QuantScheme:
        """The ignore list as a ``QuantScheme`` (which layers stay in float)."""
        return _ignore_scheme(self.ignore)


@dataclass(frozen=True)
class KVCacheStep:
    """8-bit keys and values in the KV cache, with scales calibrated per KV head (or per tensor)."""

    method: str = "kv_cache"
    type: str = "float"
    strategy: str = "attn_head"

    needs_calibration = True

    def __post_init__(self) -> None:
        _check_choice(self.type, QUANT_TYPES, "type")
        _check_choice(self.strategy, KV_STRATEGIES, "strategy")

    @property
    def name(self) -> str:
        return f"kv-{'int8' if self.type == 'int' else 'fp8'}-{self.strategy}"


# field name -> (type, default) of each step, for parsing
_FIELDS: dict[str, dict[str, type]] = {
    "smoothquant": {"alpha": float, "alpha_search": bool, "alpha_grid": int, "max_tokens": int},
    "w8a8": {"type": str, "weight_strategy": str, "activations": str, "ignore": list},
    "kv_cache": {"type": str, "strategy": str},
}
_CLASSES = {"smoothquant": SmoothQuantStep, "w8a8": EightBitStep, "kv_cache": KVCacheStep}


def parse_w8a8_step(item: dict, where: str):
    """The step ``item`` (a mapping whose method is one of ``W8A8_METHODS``) describes."""
    method = item["method"]
    allowed = _FIELDS[method]
    for key in item:
        if key != "method" and key not in allowed:
            raise QuantkitError(f"{where}.{key}: unknown field; allowed fields: {', '.join(sorted(['method', *allowed]))}")
    values: dict[str, Any] = {}
    for name, kind in allowed.items():
        if name not in item:
            continue
        value = item[name]
        if kind is list:
            if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise QuantkitError(f"{where}.{name}: must be a list of module names or 're:<regex>' patterns")
            value = tuple(value)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise QuantkitError(f"{where}.{name}: must be a number (got {value!r})")
            value = float(value)
        elif kind is bool:
            if not isinstance(value, bool):
                raise QuantkitError(f"{where}.{name}: must be true or false (got {value!r})")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise QuantkitError(f"{where}.{name}: must be an integer (got {value!r})")
        elif not isinstance(value, str):
            raise QuantkitError(f"{where}.{name}: must be a string (got {value!r})")
        values[name] = value
    try:
        return _CLASSES[method](**values)
    except QuantkitError as exc:
        raise QuantkitError(f"{where}.{exc}") from None


def check_step_order(steps: tuple, fmt: str) -> None:
    """The composition rules: at most one weight step, SmoothQuant right before an 8-bit step that
    quantizes activations, the KV-cache step last, 8-bit and KV-cache steps only in the
    compressed-tensors layout."""
    methods = [step.method for step in steps]
    weight_steps = [i for i, step in enumerate(steps) if step.method in WEIGHT_QUANT_METHODS]
    if len(weight_steps) > 1:
        raise QuantkitError("steps: a recipe quantizes the weights once; give one weight-quantization step "
                            f"(got {', '.join(methods[i] for i in weight_steps)})")
    for i, step in enumerate(steps):
        where = f"steps[{i}]"
        if step.method == "smoothquant":
            following = steps[i + 1] if i + 1 < len(steps) else None
            if not isinstance(following, EightBitStep) or following.activations == "none":
                raise QuantkitError(f"{where}: smoothquant must be followed by a w8a8 step that quantizes "
                                    "activations (activations: dynamic or static)")
        if step.method == "kv_cache" and i != len(steps) - 1:
            raise QuantkitError(f"{where}: the kv_cache step must be the last step")
        if isinstance(step, (EightBitStep, KVCacheStep)) and fmt != "compressed-tensors":
            raise QuantkitError(f"format: {step.method} checkpoints are written in the compressed-tensors layout; "
                                f"set format: compressed-tensors (got {fmt!r})")


def _check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise QuantkitError(f"{name}: must be one of {', '.join(choices)} (got {value!r})")


def _check_ignore(ignore: tuple[str, ...]) -> None:
    try:
        _ignore_scheme(ignore)
    except QuantkitError as exc:
        raise QuantkitError(f"ignore: {exc}") from None
