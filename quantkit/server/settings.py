"""What one server instance allows and serves: names, limits, key."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt the context can hold
DEFAULT_MAX_N = 16
DEFAULT_MAX_QUEUE = 512
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass
class ServerSettings:
    served_names: list[str] = field(default_factory=lambda: ["quantkit-target"])
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_tokens: int | None = None  # None: the context minus one (room for one output token)
    max_n: int = DEFAULT_MAX_N
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting beyond the engine's running batch
    max_num_seqs: int = 256  # the engine's running batch (with max_queue: the in-flight limit)

    @property
    def max_in_flight(self) -> int:
        return self.max_num_seqs + self.max_queue

    def check(self) -> ServerSettings:
        from quantkit.errors import QuantkitError

        if not self.served_names or any(not name for name in self.served_names):
            raise QuantkitError("--served-model-name must be a non-empty name")
        for name in ("max_body_bytes", "max_n", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise QuantkitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise QuantkitError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise QuantkitError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.api_key is not None and not self.api_key.strip():
            raise QuantkitError("--api-key must not be empty")
        return self
