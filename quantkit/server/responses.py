"""Engine outputs in OpenAI's shapes: whole responses, streamed chunks and usage.

Streaming sends each sample's text as it grows, with two holds: a trailing U+FFFD (a character
whose bytes are not all generated yet) waits for the rest of it, and when the request has stop
strings the last ``len(longest stop) - 1`` characters wait until it is clear they do not begin a
stop string (the engine cuts the text before a stop string once it completes). So what a client
has received is always a prefix of the final text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from quantkit.runtime.outputs import CompletionOutput, RequestOutput

DONE = "data: [DONE]\n\n"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(payload: dict) -> str:
    return f"data: {_encode(payload)}\n\n"


@dataclass
class _Cursor:
    """How much of one sample a streaming client has received."""

    chars: int = 0
    tokens: int = 0
    token_chars: int = 0  # text length of the tokens sent (log-probability offsets)
    done: bool = False


@dataclass
class Formatter:
    """Builds one request's response (``full``) or its stream (``opening``, ``chunks``, ``usage_chunk``)."""

    kind: str  # "completion" or "chat"
    request_id: str
    model: str
    prompt_tokens: int
    n: int
    tokenizer: object
    logprobs: bool = False
    include_usage: bool = False
    holdback: int = 0  # characters held back while a stop string may be forming
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._cursors = [_Cursor() for _ in range(self.n)]
        self._object = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        # Every chunk of this stream shares all but its one choice: serialize the rest once.
        head = _encode({"id": self.request_id, "object": self._object, "created": self.created, "model": self.model})
        self._head = f"data: {head[:-1]},\"choices\":[{{\"index\":"
        self._tail = "]" + (",\"usage\":null" if self.include_usage else "") + "}\n\n"
        self._content_key = ",\"text\":" if self.kind == "completion" else ",\"delta\":"

    # ------------------------------------------------------------------ whole response
    def full(self, output: RequestOutput) -> dict:
        choices = []
        for sample in sorted(output.outputs, key=lambda s: s.index):
            tokens, logprobs = sample.token_ids, _logprobs_of(sample)
            reason = _finish_reason(sample)
            if self.kind == "completion":
                choice = {"index": sample.index, "text": sample.text,
                          "logprobs": self._completion_logprobs(tokens, logprobs, 0) if self.logprobs else None,
                          "finish_reason": reason}
            else:
                choice = {"index": sample.index, "message": {"role": "assistant", "content": sample.text},
                          "logprobs": self._chat_logprobs(tokens, logprobs) if self.logprobs else None,
                          "finish_reason": reason}
            choices.append(choice)
        return {"id": self.request_id, "object": "text_completion" if self.kind == "completion" else "chat.completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(output)}

    def usage(self, output: RequestOutput) -> dict:
        completion = sum(len(sample.token_ids) for sample in output.outputs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    # ------------------------------------------------------------------ stream
    def opening(self) -> list[str]:
        """Chat streams start with the assistant role for every choice."""
        if self.kind != "chat":
            return []
        return [self._chunk(i, {"role": "assistant", "content": ""}, None, None) for i in range(self.n)]

    def chunks(self, output: RequestOutput) -> list[str]:
        """SSE events for what ``output`` adds to what was sent."""
        events = []
        for sample in output.outputs:
            if sample.index >= self.n:
                continue
            cursor = self._cursors[sample.index]
            if cursor.done:
                continue
            text, reason = self._advance(cursor, sample)
            new_tokens = sample.token_ids[cursor.tokens:]
            if not text and reason is None and not (self.logprobs and new_tokens):
                continue
            logprobs = None
            if self.logprobs and new_tokens:
                values = _logprobs_of(sample)[cursor.tokens:len(sample.token_ids)]
                if self.kind == "completion":
                    logprobs = self._completion_logprobs(new_tokens, values, cursor.token_chars)
                    cursor.token_chars += sum(len(t) for t in logprobs["tokens"])
                else:
                    logprobs = self._chat_logprobs(new_tokens, values)
            cursor.tokens = len(sample.token_ids)
            if reason is not None:
                cursor.done = True
            if self.kind == "completion":
                events.append(self._chunk(sample.index, text, logprobs, reason))
            else:
                events.append(self._chunk(sample.index, {"content": text} if text else {}, logprobs, reason))
        return events

    def usage_chunk(self, output: RequestOutput) -> str:
        return sse({"id": self.request_id, "object": self._object, "created": self.created, "model": self.model,
                    "choices": [], "usage": self.usage(output)})

    def _advance(self, cursor: _Cursor, sample: CompletionOutput) -> tuple[str, str | None]:
        text = sample.text
        reason = _finish_reason(sample)
        end = len(text)
        if reason is None:
            while end > cursor.chars and text[end - 1] == "\ufffd":
                end -= 1
            end -= self.holdback
        if end <= cursor.chars:
            return "", reason
        delta = text[cursor.chars:end]
        cursor.chars = end
        return delta, reason

    def _chunk(self, index: int, content, logprobs, reason: str | None) -> str:
        """One SSE event: ``{id, object, created, model, choices: [{index, text|delta, logprobs,
        finish_reason}], usage?}``, the constant parts pre-serialized."""
        return (f"{self._head}{index}{self._content_key}{_encode(content)},\"logprobs\":{_encode(logprobs)},"
                f"\"finish_reason\":{_encode(reason)}}}{self._tail}")

    # ------------------------------------------------------------------ log-probabilities
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""

    def _completion_logprobs(self, tokens: list[int], values: list[float], offset: int) -> dict:
        texts = [self._token_text(t) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [float(v) for v in values], "top_logprobs": None,
                "text_offset": offsets}

    def _chat_logprobs(self, tokens: list[int], values: list[float]) -> dict:
        content = []
        for token, value in zip(tokens, values):
            text = self._token_text(token)
            content.append({"token": text, "logprob": float(value), "bytes": list(text.encode("utf-8")),
                            "top_logprobs": []})
        return {"content": content, "refusal": None}


def _logprobs_of(sample: CompletionOutput) -> list[float]:
    return list(sample.logprobs or [])[: len(sample.token_ids)]


def _finish_reason(sample: CompletionOutput) -> str | None:
    if sample.finish_reason is None:
        return None
    return "length" if sample.finish_reason == "length" else "stop"
