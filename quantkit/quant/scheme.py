"""Weight-only integer quantization schemes: how many bits, which groups, which layers to skip.

A scheme is a small frozen value (``QuantScheme``) that the algorithms (RTN, GPTQ, AWQ) and the
checkpoint writers share. Activations stay 16-bit in these schemes (the ``a16`` in ``w4a16``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from quantkit.errors import QuantkitError

SUPPORTED_BITS = (8, 4, 3, 2)
SCHEME_NAMES = tuple(f"w{bits}a16" for bits in SUPPORTED_BITS)
_ALIASES = {"int8": "w8a16", "int4": "w4a16"}
_REGEX_PREFIX = "re:"


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantization: ``bits`` per weight, one scale (and zero) per group.

    ``group_size`` consecutive input columns of a layer share one scale per output row; -1 means
    one group spanning the whole input (per output channel). ``ignore`` lists layers left in
    16-bit: an exact module name, a name suffix after a '.' (``"lm_head"`` matches
    ``"model.lm_head"``), or ``"re:<regex>"`` matched with ``re.match`` against the full name.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    ignore: tuple[str, ...] = field(default=("lm_head",))

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group_size_value(self.group_size)
        if not isinstance(self.symmetric, bool):
            raise QuantkitError(
                f"symmetric must be true or false, got {self.symmetric!r}"
            )
        ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
        for pattern in ignore:
            _check_ignore_pattern(pattern)
        object.__setattr__(self, "ignore", ignore)

    def is_ignored(self, module_name: str) -> bool:
        """True when ``module_name`` matches one of the ``ignore`` patterns."""
        return any(_matches(pattern, module_name) for pattern in self.ignore)

    @property
    def name(self) -> str:
        """Short label such as ``w4a16-g128-sym`` or ``w8a16-channel-asym``."""
        groups = "channel" if self.group_size == -1 else f"g{self.group_size}"
        symmetry = "sym" if self.symmetric else "asym"
        return f"w{self.bits}a16-{groups}-{symmetry}"


def parse_scheme(
    text: str,
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
    ignore: Sequence[str] | None = None,
) -> QuantScheme:
    """Build a scheme from a name like ``"w4a16"`` (or ``"int4"``); unset options keep defaults."""
    key = text.strip().lower() if isinstance(text, str) else ""
    key = _ALIASES.get(key, key)
    if key not in SCHEME_NAMES:
        raise QuantkitError(
            f"unknown scheme '{text}': expected one of {', '.join(SCHEME_NAMES)}"
        )
    options: dict = {"bits": int(key[1])}
    if group_size is not None:
        options["group_size"] = group_size
    if symmetric is not None:
        options["symmetric"] = symmetric
    if ignore is not None:
        options["ignore"] = tuple(ignore)
    return QuantScheme(**options)


def check_group_size(in_features: int, group_size: int, module_name: str) -> None:
    """Raise a ``QuantkitError`` when ``group_size`` does not split the layer's input evenly."""
    _check_group_size_value(group_size)
    if group_size != -1 and in_features % group_size != 0:
        raise QuantkitError(
            f"group size {group_size} does not divide the input size {in_features} of layer "
            f"'{module_name}'; choose a group size that divides it or -1 for per-channel"
        )


def _check_bits(bits: object) -> None:
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        expected = ", ".join(str(b) for b in SUPPORTED_BITS)
        raise QuantkitError(
            f"unsupported weight bits {bits!r}: expected one of {expected}"
        )


def _check_group_size_value(group_size: object) -> None:
    valid = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid or (group_size != -1 and group_size <= 0):
        raise QuantkitError(
            f"invalid group size {group_size!r}: expected a positive integer (32, 64, 128, ...) "
            "or -1 for per-channel"
        )


def _check_ignore_pattern(pattern: object) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise QuantkitError(
            f"invalid ignore entry {pattern!r}: expected a module name or 're:<regex>'"
        )
    if pattern.startswith(_REGEX_PREFIX):
        try:
            re.compile(pattern[len(_REGEX_PREFIX) :])
        except re.error as exc:
            raise QuantkitError(
                f"ignore pattern '{pattern}' is not a valid regular expression: {exc}"
            ) from None


def _matches(pattern: str, module_name: str) -> bool:
    if pattern.startswith(_REGEX_PREFIX):
        return re.match(pattern[len(_REGEX_PREFIX) :], module_name) is not None
    return module_name == pattern or module_name.endswith("." + pattern)
