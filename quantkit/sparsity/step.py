"""The recipe step that prunes: magnitude, Wanda or SparseGPT, optionally quantizing the survivors.

A recipe step such as::

    - method: sparsegpt
      mask_structure: "2:4"        # or unstructured (the default) with sparsity: 0.5
      block_size: 128
      damp_percent: 0.01
      scheme: w4a16                # optional, SparseGPT only: quantize the survivors in the same pass
      group_size: 128
      ignore: [lm_head]

Errors name the field (``steps[0].mask_structure: ...``). No torch here, as in ``recipe.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.quant.scheme import QuantScheme, parse_scheme
from quantkit.sparsity.structure import (
    MaskStructure,
    check_sparsity_value,
    parse_mask_structure,
)

SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
COMPARISONS = ("row", "layer")
DEFAULT_COMPARISON = {"magnitude": "layer", "wanda": "row"}
# options each pruning method takes, with their types and defaults
METHOD_OPTIONS: dict[str, dict[str, tuple[type, Any]]] = {
    "magnitude": {"comparison": (str, "layer")},
    "wanda": {"comparison": (str, "row"), "true_sequential": (bool, False)},
    "sparsegpt": {"block_size": (int, 128), "damp_percent": (float, 0.01), "true_sequential": (bool, True),
                  "nm_selection": (str, "joint"), "clip_search": (bool, True), "clip_grid": (int, 20),
                  "clip_max_shrink": (float, 0.5)},
}
QUANT_FIELDS = ("scheme", "group_size", "symmetric")
COMMON_FIELDS = ("method", "sparsity", "mask_structure", "ignore")


@dataclass(frozen=True)
class SparsityStep:
    """Prune every linear of the decoder layers (except ``ignore``) to ``sparsity`` in ``mask_structure``."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    mask_structure: str = "unstructured"
    ignore: tuple[str, ...] = ("lm_head",)
    scheme: str | None = None  # SparseGPT only: quantize the survivors with this scheme
    group_size: int = 128
    symmetric: bool = True
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    @property
    def name(self) -> str:
        """``sparsegpt 2:4 + w4a16-g128-sym``, ``wanda 50% unstructured``."""
        structure = self.mask_structure if self.mask_structure != "unstructured" else f"{self.sparsity:.0%} unstructured"
        scheme = self.quant_scheme()
        return f"{self.method} {structure}" + (f" + {scheme.name}" if scheme else "")

    @property
    def quantizes(self) -> bool:
        return self.scheme is not None

    def to_dict(self) -> dict[str, Any]:
        """The step as a recipe writes it (``recipe_from_dict`` reads it back)."""
        out: dict[str, Any] = {"method": self.method, "sparsity": self.sparsity, "mask_structure": self.mask_structure,
                               "ignore": list(self.ignore)}
        if self.structure().is_nm:
            del out["sparsity"]  # fixed by the structure
        if self.scheme is not None:
            out.update(scheme=self.scheme, group_size=self.group_size, symmetric=self.symmetric)
        out.update(dict(self.options))
        return out

    def structure(self) -> MaskStructure:
        return parse_mask_structure(self.mask_structure)

    def option(self, name: str) -> Any:
        return dict(self.options).get(name, METHOD_OPTIONS[self.method][name][1])

    def quant_scheme(self) -> QuantScheme | None:
        """The scheme the survivors are quantized with, or None for a dense float checkpoint."""
        if self.scheme is None:
            return None
        return parse_scheme(self.scheme, group_size=self.group_size, symmetric=self.symmetric, ignore=self.ignore)

    def target_scheme(self) -> QuantScheme:
        """What the pipeline matches layer names against: the quantization scheme when there is
        one, else a scheme that only carries ``ignore`` (its bits are never used)."""
        return self.quant_scheme() or QuantScheme(ignore=self.ignore)

    def sparsegpt_config(self):
        from quantkit.sparsity.sparsegpt import SparseGPTConfig

        options = {name: self.option(name) for name in ("block_size", "damp_percent", "clip_search", "clip_grid",
                                                          "clip_max_shrink", "nm_selection")}
        return SparseGPTConfig(**options)


def parse_sparsity_step(item: dict, where: str) -> SparsityStep:
    """A recipe step mapping whose ``method`` is a pruning method, checked field by field."""
    method = item["method"]
    allowed = set(COMMON_FIELDS) | set(METHOD_OPTIONS[method]) | (set(QUANT_FIELDS) if method == "sparsegpt" else set())
    for key in item:
        if key not in allowed:
            hint = ""
            if key in QUANT_FIELDS:
                hint = " (only sparsegpt quantizes the survivors, in the same pass)"
            raise QuantkitError(f"{where}.{key}: unknown field for method {method}{hint}; allowed fields: "
                                f"{', '.join(sorted(allowed))}")
    try:
        structure = parse_mask_structure(item.get("mask_structure", "unstructured"))
    except QuantkitError as error:
        raise QuantkitError(f"{where}.mask_structure: {error}") from None
    try:
        sparsity = check_sparsity_value(item.get("sparsity"), structure)
    except QuantkitError as error:
        raise QuantkitError(f"{where}.sparsity: {error}") from None
    ignore = item.get("ignore", ["lm_head"])
    if isinstance(ignore, str) or not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise QuantkitError(f"{where}.ignore: must be a list of module names or 're:<regex>' patterns")
    options = []
    for name, (kind, _default) in METHOD_OPTIONS[method].items():
        if name in item:
            options.append((name, _typed(item[name], kind, f"{where}.{name}")))
    values = dict(options)
    if "comparison" in values and values["comparison"] not in COMPARISONS:
        raise QuantkitError(f"{where}.comparison: must be one of {', '.join(COMPARISONS)} (got {values['comparison']!r})")
    if "comparison" in values and structure.is_nm:
        raise QuantkitError(f"{where}.comparison: applies to unstructured sparsity only; {structure.name} compares "
                            f"each run of {structure.m} inputs")
    step = SparsityStep(method=method, sparsity=sparsity, mask_structure=structure.name, ignore=tuple(ignore),
                        options=tuple(options), **_quant_fields(item, where))
    try:
        step.target_scheme()
        if method == "sparsegpt":
            config = step.sparsegpt_config()
            from_scheme = step.quant_scheme()
            if structure.is_nm:
                _check_alignment(structure, config.block_size, from_scheme.group_size if from_scheme else -1)
    except QuantkitError as error:
        raise QuantkitError(f"{where}: {error}") from None
    return step


def _quant_fields(item: dict, where: str) -> dict:
    if "scheme" not in item:
        for name in ("group_size", "symmetric"):
            if name in item:
                raise QuantkitError(f"{where}.{name}: applies only with a scheme (the survivors' quantization)")
        return {}
    scheme = item["scheme"]
    try:
        parse_scheme(scheme)
    except QuantkitError as error:
        raise QuantkitError(f"{where}.scheme: {error}") from None
    group_size = item.get("group_size", 128)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise QuantkitError(f"{where}.group_size: must be a positive integer (32, 64, 128, ...) "
                            f"or -1 for per-channel (got {group_size!r})")
    symmetric = item.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise QuantkitError(f"{where}.symmetric: must be true or false (got {symmetric!r})")
    return {"scheme": str(scheme).lower(), "group_size": group_size, "symmetric": symmetric}


def _check_alignment(structure: MaskStructure, block_size: int, group_size: int) -> None:
    if block_size % structure.m:
        raise QuantkitError(f"block_size {block_size} must be a multiple of {structure.m} for {structure.name} sparsity")
    if group_size != -1 and group_size % structure.m:
        raise QuantkitError(f"group_size {group_size} must be a multiple of {structure.m} for {structure.name} sparsity")


def _typed(value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (kind is not bool and isinstance(value, bool)) or not isinstance(value, kind):
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise QuantkitError(f"{where}: must be {names[kind]} (got {value!r})")
    return value
