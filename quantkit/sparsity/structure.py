"""Which weights a pruning step may zero: anywhere (unstructured) or N of every M (semi-structured).

``"N:M"`` follows NVIDIA's convention: in every run of ``M`` consecutive weights along a row's
input dimension at most ``N`` are non-zero, so ``"2:4"`` and ``"4:8"`` are both 50% sparse and
``"2:4"`` is the pattern sparse tensor cores run. (The SparseGPT and Wanda reference code and
llm-compressor's ``mask_structure`` write the number *pruned* first; for 2:4 and 4:8 the two
readings agree.)

No torch here: recipes parse structures before anything heavy is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.errors import QuantkitError

UNSTRUCTURED = "unstructured"
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class MaskStructure:
    """``n``/``m`` set for N:M; both None for unstructured."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else UNSTRUCTURED

    @property
    def nm_sparsity(self) -> float:
        """The sparsity an N:M pattern fixes: ``1 - N/M``."""
        if not self.is_nm:
            raise ValueError("an unstructured mask has no fixed sparsity")
        return 1.0 - self.n / self.m


def parse_mask_structure(value: object) -> MaskStructure:
    """``"unstructured"`` (or ``"0:0"``, llm-compressor's spelling) or ``"N:M"`` with 0 < N < M."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise QuantkitError(
            f"mask structure {value!r} is a number: write N:M in quotes (\"2:4\"); YAML reads an "
            "unquoted 2:4 as the base-60 number 124"
        )
    if not isinstance(value, str):
        raise QuantkitError(f"mask structure must be \"unstructured\" or \"N:M\" such as \"2:4\" (got {value!r})")
    text = value.strip().lower()
    if text in (UNSTRUCTURED, "0:0"):
        return MaskStructure()
    match = _NM.match(text)
    if match is None:
        raise QuantkitError(f"mask structure must be \"unstructured\" or \"N:M\" such as \"2:4\" (got {value!r})")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise QuantkitError(f"mask structure {value!r}: N:M needs 0 < N < M (at most N non-zero weights in every M)")
    return MaskStructure(n, m)


def check_sparsity_value(sparsity: object, structure: MaskStructure) -> float:
    """The step's sparsity: for N:M it must be left out or equal ``1 - N/M``."""
    if structure.is_nm:
        if sparsity is None:
            return structure.nm_sparsity
        if not _is_number(sparsity) or abs(float(sparsity) - structure.nm_sparsity) > 1e-9:
            raise QuantkitError(
                f"sparsity {sparsity!r} does not match mask structure {structure.name}, which fixes it at "
                f"{structure.nm_sparsity:g}; leave sparsity out"
            )
        return structure.nm_sparsity
    if sparsity is None:
        return 0.5
    if not _is_number(sparsity) or not 0 < float(sparsity) < 1:
        raise QuantkitError(f"sparsity must be a number between 0 and 1 (exclusive), got {sparsity!r}; 0.5 is usual")
    return float(sparsity)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
