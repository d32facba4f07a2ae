"""One sequence of tokens being generated: its prompt, its output so far, and its KV bookkeeping.

A request with ``n > 1`` becomes several sequences that share a ``request_id``; each has its own
``seq_id``. Positions count from 0 at the first prompt token; token ``p`` of ``all_token_ids`` has
its keys and values at ``slot = block_table[p // block_size] * block_size + p % block_size``.
``num_computed_tokens`` says how many leading tokens have their KV written; the rest are still to
be run through the model (a prompt chunk, or the last sampled token).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantkit.runtime.sampling_params import SamplingParams

if TYPE_CHECKING:
    from quantkit.runtime.block_manager import BlockManager


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # blocks taken back; waits at the front of the queue to be recomputed
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED,
    SequenceStatus.FINISHED_LENGTH,
    SequenceStatus.FINISHED_ABORTED,
}

FINISH_STATUS = {
    "stop": SequenceStatus.FINISHED_STOPPED,
    "length": SequenceStatus.FINISHED_LENGTH,
    "abort": SequenceStatus.FINISHED_ABORTED,
}


@dataclass(eq=False)  # identity semantics: sequences live in sets and dicts
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # leading tokens whose KV came from the prefix cache
    arrival_time: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    sample_index: int = 0  # which of the request's n samples this is (seeds the generator)
    output_logprobs: list[float] = field(default_factory=list)  # filled by the engine if asked

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """Tokens at positions start..end-1, without building the whole token list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    def fork(self, new_id: int, block_manager: BlockManager | None = None,
             sample_index: int | None = None) -> Sequence:
        """A copy of this sequence under ``new_id`` (for ``n > 1``).

        With a block manager the child shares every KV block of the parent (reference counts go
        up); the first of the two to write into a shared block gets a private copy (copy-on-write).
        """
        child = Sequence(
            seq_id=new_id,
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            params=self.params,
            output_token_ids=self.output_token_ids,
            status=self.status,
            num_computed_tokens=self.num_computed_tokens,
            num_cached_tokens=self.num_cached_tokens,
            arrival_time=self.arrival_time,
            sample_index=self.sample_index if sample_index is None else sample_index,
            output_logprobs=list(self.output_logprobs),
        )
        if block_manager is not None:
            block_manager.fork(self, child)
        return child

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.name}, "
                f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
