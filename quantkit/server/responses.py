"""Engine outputs in OpenAI's shapes: whole responses, streamed chunks and usage.

Streaming sends each sample's text as it grows, with two holds: a trailing U+FFFD (a character
whose bytes are not all generated yet) waits for the rest of it, and when the request has stop
strings the last ``len(longest stop) - 1`` characters wait until it is clear they do not begin a
stop string (the engine cuts the text before a stop string once it completes). So what a client
has received is always a prefix of the final text.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

from quantkit.runtime.outputs import CompletionOutput, RequestOutput

DONE = "data: [DONE]\n\n"
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
# The streaming path builds its JSON from fragments: a string through the C encoder json uses,
# floats as json writes them (repr, or NaN/Infinity), the finish reasons pre-encoded.
_string = json.encoder.encode_basestring  # the C one when available, as json.dumps(ensure_ascii=False)
_REASONS = {None: "null", "stop": "\"stop\"", "length": "\"length\""}


def _float(value: float) -> str:
    value = float(value)
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


class TokenTexts:
    """Each token id's text (``tokenizer.decode([id])``) and its JSON fragments, decoded once per
    tokenizer and kept: a streamed token's log-probability entry costs a dict lookup, not a
    decode and an encode."""

    _by_tokenizer: ClassVar[weakref.WeakKeyDictionary] = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._entries: dict[int, tuple[str, str, str, str]] = {}

    @classmethod
    def of(cls, tokenizer) -> TokenTexts:
        if tokenizer is None:
            return cls(None)
        try:
            texts = cls._by_tokenizer.get(tokenizer)
            if texts is None:
                texts = cls._by_tokenizer[tokenizer] = cls(tokenizer)
            return texts
        except TypeError:  # not weak-referenceable: a cache for this request only
            return cls(tokenizer)

    def entry(self, token_id: int) -> tuple[str, str, str, str]:
        """(text, text as JSON, and the chat entry's JSON before and after its log-probability)."""
        found = self._entries.get(token_id)
        if found is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            encoded = _string(text)
            found = self._entries[token_id] = (text, encoded, f'{{"token":{encoded},"logprob":',
                                               f',"bytes":{_encode(list(text.encode("utf-8")))},"top_logprobs":[]}}')
        return found


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
        self._texts = TokenTexts.of(self.tokenizer)

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
        completion = self.kind == "completion"
        for sample in output.outputs:
            if sample.index >= self.n:
                continue
            cursor = self._cursors[sample.index]
            if cursor.done:
                continue
            text, reason = self._advance(cursor, sample)
            token_ids = sample.token_ids
            num_tokens = len(token_ids)
            new = self.logprobs and num_tokens > cursor.tokens
            if not text and reason is None and not new:
                continue
            logprobs = "null"
            if new:
                values = (sample.logprobs or [])[cursor.tokens:num_tokens]
                new_tokens = token_ids[cursor.tokens:]
                if completion:
                    logprobs, cursor.token_chars = self._completion_logprobs_json(new_tokens, values,
                                                                                  cursor.token_chars)
                else:
                    logprobs = self._chat_logprobs_json(new_tokens, values)
            cursor.tokens = num_tokens
            if reason is not None:
                cursor.done = True
            if completion:
                content = _string(text)
            else:
                content = f'{{"content":{_string(text)}}}' if text else "{}"
            events.append(f"{self._head}{sample.index}{self._content_key}{content},\"logprobs\":{logprobs},"
                          f"\"finish_reason\":{_REASONS.get(reason) or _encode(reason)}}}{self._tail}")
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
        return self._texts.entry(token_id)[0]

    def _completion_logprobs_json(self, tokens: list[int], values: list[float], offset: int) -> tuple[str, int]:
        """``_completion_logprobs`` as JSON text, and the offset after its tokens."""
        entry = self._texts.entry
        texts, offsets = [], []
        for token in tokens:
            found = entry(token)
            texts.append(found[1])
            offsets.append(str(offset))
            offset += len(found[0])
        encoded = (f'{{"tokens":[{",".join(texts)}],"token_logprobs":[{",".join(map(_float, values))}],'
                   f'"top_logprobs":null,"text_offset":[{",".join(offsets)}]}}')
        return encoded, offset

    def _chat_logprobs_json(self, tokens: list[int], values: list[float]) -> str:
        """``_chat_logprobs`` as JSON text."""
        entry = self._texts.entry
        parts = []
        for token, value in zip(tokens, values):
            found = entry(token)
            parts.append(f"{found[2]}{_float(value)}{found[3]}")
        content = ",".join(parts)
        return f'{{"content":[{content}],"refusal":null}}'

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
