"""How one request wants its tokens chosen and when it wants to stop.

``SamplingParams`` is plain data: the server builds it from an OpenAI request, the scheduler reads
the stop rules (``max_tokens``, ``stop_token_ids``, ``ignore_eos``) and the sampler reads the rest.
``validate`` turns a bad value into a ``QuantkitError`` that names the field, so the server can
answer with a 400 instead of failing deep inside a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingParams:
    """Sampling and stopping rules of one request.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens; -1 or 0 turns it off.
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p; 1 turns it off.
    min_p: drop tokens whose probability is below min_p times the most likely one's; 0 is off.
    seed: makes the request's samples reproducible (see ``make_generator``).
    max_tokens: most output tokens.
    stop: strings that end the output (matched by the engine on detokenized text).
    stop_token_ids: token ids that end the output (the stopping token is kept in the output ids).
    ignore_eos: keep going past the model's end-of-sequence token.
    n: parallel samples for the same prompt.
    logprobs: True (or an int >= 1) asks for the log-probability of each chosen token.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool | int = False

    def __post_init__(self) -> None:
        # OpenAI allows a single stop string; keep one shape inside.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def validate(self, max_model_len: int | None = None) -> SamplingParams:
        """Raise ``QuantkitError`` naming the first bad field; return self when all are fine."""
        _check_number("temperature", self.temperature)
        if self.temperature < 0:
            _bad("temperature", self.temperature, "must be >= 0 (0 means greedy)")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            _bad("top_k", self.top_k, "must be -1 or 0 (off) or a positive integer")
        _check_number("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            _bad("top_p", self.top_p, "must be in (0, 1]")
        _check_number("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            _bad("min_p", self.min_p, "must be in [0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed)
        _check_int("max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            _bad("max_tokens", self.max_tokens, "must be >= 1")
        if max_model_len is not None and self.max_tokens > max_model_len:
            _bad("max_tokens", self.max_tokens, f"exceeds the model's context of {max_model_len} tokens")
        _check_int("n", self.n)
        if self.n < 1:
            _bad("n", self.n, "must be >= 1")
        self._validate_stops()
        if not isinstance(self.ignore_eos, bool):
            _bad("ignore_eos", self.ignore_eos, "must be true or false")
        if not isinstance(self.logprobs, (bool, int)) or self.logprobs < 0:
            _bad("logprobs", self.logprobs, "must be true/false or an integer >= 0")
        return self

    def _validate_stops(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop", self.stop, "must be a list of non-empty strings")
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            _bad("stop_token_ids", ids, "must be a list of token ids >= 0")

    def make_generator(self, device: torch.device | str = "cpu", sample_index: int = 0):
        """A ``torch.Generator`` for this request, or None when it has no seed.

        Sample ``i`` of an ``n > 1`` request gets seed + i, so parallel samples differ but each is
        reproducible on its own.
        """
        if self.seed is None:
            return None
        import torch

        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed + sample_index)
        return generator


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object) -> None:
    if not _is_int(value):
        _bad(name, value, "must be an integer")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _bad(name, value, "must be a finite number")


def _bad(name: str, value: object, why: str) -> None:
    raise QuantkitError(f"sampling parameter '{name}' = {value!r} {why}")
