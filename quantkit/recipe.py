"""Recipes: an ordered list of typed compression steps, read from YAML and validated.

A recipe file looks like::

    name: w4a16-rtn
    description: 4-bit weights in groups of 128, round-to-nearest
    format: gptq
    calibration: {dataset: wikipedia, num_samples: 128, seq_len: 512, seed: 0}
    steps:
      - method: rtn
        scheme: w4a16
        group_size: 128
        symmetric: true
        ignore: [lm_head]

Every error names the field it is about (``steps[0].group_size: ...``). This module imports no
torch: parsing a recipe is cheap and can happen before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError
from quantkit.quant.scheme import QuantScheme, parse_scheme
from quantkit.recipe_w8a8 import (
    W8A8_METHODS,
    EightBitStep,
    KVCacheStep,
    SmoothQuantStep,
    check_step_order,
    parse_w8a8_step,
)
from quantkit.sparsity.step import SPARSITY_METHODS, SparsityStep, parse_sparsity_step

FORMATS = ("gptq", "awq", "compressed-tensors")
DENSE_FORMAT = "dense"  # float weights: a pruning step that quantizes nothing
# Options each method accepts in a recipe step, with their types; ranges are checked by the
# method's own config class when the recipe is loaded.
METHOD_OPTIONS: dict[str, dict[str, type]] = {
    "rtn": {},
    "gptq": {"damp_percent": float, "block_size": int, "act_order": bool, "static_groups": bool,
             "true_sequential": bool, "clip_search": bool, "clip_grid": int, "clip_max_shrink": float},
    "awq": {"grid": int, "clip": bool, "clip_grid": int, "clip_max_shrink": float, "max_tokens": int,
            "duo_scaling": bool, "clip_in_scale_search": bool},
}
WEIGHT_METHODS = tuple(METHOD_OPTIONS)
COMMON_STEP_FIELDS = ("method", "scheme", "group_size", "symmetric", "ignore")


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "wikipedia"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"


@dataclass(frozen=True)
class WeightQuantStep:
    """Quantize the weights of every linear layer in the decoder layers (weights only, a16)."""

    method: str = "rtn"
    scheme: str = "w4a16"
    group_size: int = 128
    symmetric: bool = True
    ignore: tuple[str, ...] = ("lm_head",)
    options: tuple[tuple[str, Any], ...] = ()  # method options (damp_percent, act_order, ...)

    @property
    def needs_calibration(self) -> bool:
        return self.method != "rtn"

    def quant_scheme(self) -> QuantScheme:
        return parse_scheme(self.scheme, group_size=self.group_size, symmetric=self.symmetric,
                            ignore=self.ignore)

    def gptq_config(self):
        """(GPTQConfig, true_sequential) from this step's options."""
        from quantkit.quant.gptq import GPTQConfig

        options = dict(self.options)
        true_sequential = options.pop("true_sequential", True)
        return GPTQConfig(**options), true_sequential

    def awq_config(self):
        from quantkit.quant.awq import AWQConfig

        return AWQConfig(**dict(self.options))

    def check_options(self) -> None:
        """Build the method's config once so out-of-range values fail at load time."""
        if self.method == "gptq":
            self.gptq_config()
        elif self.method == "awq":
            self.awq_config()


@dataclass(frozen=True)
class Recipe:
    steps: tuple[WeightQuantStep | SparsityStep | SmoothQuantStep | EightBitStep | KVCacheStep, ...]
    name: str = "custom"
    description: str = ""
    format: str = "gptq"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.steps)

    @property
    def quantizes(self) -> bool:
        """False for a pruning-only recipe, whose checkpoint holds dense float weights."""
        return any(getattr(step, "quantizes", True) for step in self.steps)

    @property
    def weight_step(self) -> WeightQuantStep | EightBitStep | None:
        """The step that quantizes the weights (rtn, gptq, awq or w8a8), if any."""
        return next((step for step in self.steps if isinstance(step, (WeightQuantStep, EightBitStep))), None)

    @property
    def kv_cache_step(self) -> KVCacheStep | None:
        return next((step for step in self.steps if isinstance(step, KVCacheStep)), None)

    @property
    def summary(self) -> str:
        """One line naming each step: ``smoothquant α=0.5 + w8a8-int8-channel-dynamic + kv-fp8-attn_head``."""
        parts = []
        for step in self.steps:
            if isinstance(step, WeightQuantStep):
                parts.append(f"{step.method} {step.quant_scheme().name}")
            elif isinstance(step, SmoothQuantStep):
                parts.append("smoothquant " + ("α searched" if step.alpha_search else f"α={step.alpha:g}"))
            else:
                parts.append(step.name)
        return " + ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "format": self.format,
            "calibration": _as_dict(self.calibration),
            "steps": [_step_dict(step) for step in self.steps],
        }


def _as_dict(obj) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _step_dict(step: WeightQuantStep) -> dict[str, Any]:
    if hasattr(step, "to_dict"):
        return step.to_dict()
    out = {name: value for name, value in _as_dict(step).items() if name != "options"}
    out.update(dict(getattr(step, "options", ())))
    return out


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; a missing file or bad YAML is a QuantkitError."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantkitError(f"recipe '{path}' is not valid YAML: {first}") from None
    try:
        return recipe_from_dict(data)
    except QuantkitError as exc:
        raise QuantkitError(f"recipe '{path}': {exc}") from None


def recipe_from_dict(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise QuantkitError("a recipe must be a mapping with a 'steps' list")
    _reject_unknown(data, {"name", "description", "format", "calibration", "steps"}, "")
    steps_data = data.get("steps")
    if not isinstance(steps_data, list) or not steps_data:
        raise QuantkitError("steps: must be a non-empty list of steps")
    steps = tuple(_parse_step(item, f"steps[{i}]") for i, item in enumerate(steps_data))
    quantizes = any(getattr(step, "quantizes", True) for step in steps)
    fmt = _choice(data.get("format", "gptq" if quantizes else DENSE_FORMAT), FORMATS + (DENSE_FORMAT,), "format")
    if quantizes == (fmt == DENSE_FORMAT):
        raise QuantkitError("format: dense holds float weights, but the recipe quantizes; choose gptq, awq or "
                            "compressed-tensors" if quantizes else
                            f"format: the recipe prunes without quantizing, so its checkpoint holds dense float "
                            f"weights; use format: dense (or give the sparsegpt step a scheme), not {fmt}")
    check_step_order(steps, fmt)
    calibration = _parse_calibration(data.get("calibration", {}) or {})
    return Recipe(steps=steps, name=str(data.get("name", "custom")),
                  description=str(data.get("description", "")), format=fmt, calibration=calibration)


def weight_quant_recipe(scheme: str, *, group_size: int = 128, symmetric: bool = True,
                        method: str = "rtn", ignore: tuple[str, ...] = ("lm_head",),
                        fmt: str = "gptq", options: dict[str, Any] | None = None,
                        calibration: dict[str, Any] | None = None) -> Recipe:
    """The recipe that command-line options describe (``--scheme w4a16 --group-size 128``)."""
    step = {"method": method, "scheme": scheme, "group_size": group_size, "symmetric": symmetric,
            "ignore": list(ignore), **(options or {})}
    data = {"name": f"{scheme}-{method}", "format": fmt, "steps": [step]}
    if calibration:
        data["calibration"] = calibration
    return recipe_from_dict(data)


def _parse_step(item: Any, where: str) -> WeightQuantStep | SmoothQuantStep | EightBitStep | KVCacheStep:
    if not isinstance(item, dict):
        raise QuantkitError(f"{where}: must be a mapping with a 'method' field")
    if item.get("method") in SPARSITY_METHODS:
        return parse_sparsity_step(item, where)
    if item.get("method") in W8A8_METHODS:
        return parse_w8a8_step(item, where)
    method = _choice(item.get("method"), WEIGHT_METHODS + W8A8_METHODS + SPARSITY_METHODS, f"{where}.method")
    allowed_options = METHOD_OPTIONS[method]
    _reject_unknown(item, set(COMMON_STEP_FIELDS) | set(allowed_options), where)
    scheme = item.get("scheme", "w4a16")
    try:
        parse_scheme(scheme)
    except QuantkitError as exc:
        raise QuantkitError(f"{where}.scheme: {exc}") from None
    group_size = item.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise QuantkitError(f"{where}.group_size: must be a positive integer (32, 64, 128, ...) "
                            f"or -1 for per-channel (got {group_size!r})")
    symmetric = item.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise QuantkitError(f"{where}.symmetric: must be true or false (got {symmetric!r})")
    ignore = item.get("ignore", ["lm_head"])
    if isinstance(ignore, str) or not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise QuantkitError(f"{where}.ignore: must be a list of module names or 're:<regex>' patterns")
    options = tuple((name, _typed(item[name], kind, f"{where}.{name}"))
                    for name, kind in allowed_options.items() if name in item)
    step = WeightQuantStep(method=method, scheme=str(scheme).lower(), group_size=group_size,
                           symmetric=symmetric, ignore=tuple(ignore), options=options)
    try:
        step.check_options()
    except QuantkitError as exc:
        raise QuantkitError(f"{where}: {exc}") from None
    return step


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
        names = {bool: "true or false", int: "an integer", float: "a number"}
        raise QuantkitError(f"{where}: must be {names[kind]} (got {value!r})")
    return value


def _parse_calibration(data: Any) -> CalibrationConfig:
    if not isinstance(data, dict):
        raise QuantkitError("calibration: must be a mapping (dataset, num_samples, seq_len, seed)")
    _reject_unknown(data, {f.name for f in fields(CalibrationConfig)}, "calibration")
    values = {}
    for name in ("num_samples", "seq_len", "seed"):
        if name in data:
            value = data[name]
            minimum = 0 if name == "seed" else (2 if name == "seq_len" else 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise QuantkitError(f"calibration.{name}: must be an integer >= {minimum} (got {value!r})")
            values[name] = value
    for name in ("dataset", "text_field"):
        if name in data:
            if not isinstance(data[name], str) or not data[name]:
                raise QuantkitError(f"calibration.{name}: must be a non-empty string")
            values[name] = data[name]
    return CalibrationConfig(**values)


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise QuantkitError(f"{prefix}{key}: unknown field; allowed fields: {', '.join(sorted(allowed))}")


def _choice(value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise QuantkitError(f"{where}: must be one of {', '.join(choices)} (got {value!r})")
    return value
