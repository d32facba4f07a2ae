"""Whether speculating pays at the current batch size, decided by measured speed.

The cost model of ``AdaptiveK`` picks k, but only the clock can tell whether a step that drafts and
verifies beats a plain decode step on this machine: a draft forward may cost far more than its
weight bytes suggest (kernel launches, a verification pass that cannot replay a CUDA graph), and
at large batches verification stops being free. The gate times pure decode steps in both modes,
per batch-size bucket (powers of two), as seconds per emitted token over a window of recent steps
(the median, so one slow step such as a kernel compile does not decide), and runs the faster
mode. The slower one is probed for one step every ``probe_every`` steps, so the choice follows the
acceptance rate as the text changes.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

MODES = ("spec", "plain")


@dataclass
class _Bucket:
    samples: dict[str, deque] = field(default_factory=dict)
    steps: int = 0

    def median(self, mode: str) -> float | None:
        window = self.samples.get(mode)
        return statistics.median(window) if window else None


class SpeedGate:
    def __init__(self, *, warmup: int = 3, window: int = 8, probe_every: int = 32) -> None:
        self.warmup, self.window, self.probe_every = warmup, window, probe_every
        self._buckets: dict[int, _Bucket] = {}

    @staticmethod
    def bucket_of(batch: int) -> int:
        return 1 << max(0, batch - 1).bit_length()

    def speculate(self, batch: int) -> bool:
        """Whether the next step with ``batch`` decoding sequences should speculate."""
        bucket = self._buckets.setdefault(self.bucket_of(batch), _Bucket())
        for mode in MODES:  # measure both modes first, speculation first
            if len(bucket.samples.get(mode, ())) < self.warmup:
                return mode == "spec"
        bucket.steps += 1
        faster_is_spec = bucket.median("spec") <= bucket.median("plain")
        if bucket.steps % self.probe_every == 0:
            return not faster_is_spec
        return faster_is_spec

    def observe(self, mode: str, batch: int, seconds: float, tokens: int) -> None:
        """One pure decode step of ``batch`` sequences that took ``seconds`` and emitted ``tokens``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tokens <= 0:
            return
        bucket = self._buckets.setdefault(self.bucket_of(batch), _Bucket())
        bucket.samples.setdefault(mode, deque(maxlen=self.window)).append(seconds / tokens)

    def summary(self) -> dict[int, dict[str, float | None]]:
        """Median seconds per token by bucket and mode (for metrics and reports)."""
        return {size: {mode: bucket.median(mode) for mode in MODES} for size, bucket in sorted(self._buckets.items())}
