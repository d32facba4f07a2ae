"""The requests the server accepts, as strict pydantic models, and their checks.

Fields follow OpenAI's completions and chat completions APIs, plus the extensions vLLM also
accepts (``top_k``, ``min_p``, ``ignore_eos``, ``stop_token_ids``). Types are strict: ``"5"`` is
not a number and ``true`` is not an integer. An unknown field is refused, as OpenAI's API does;
a known OpenAI field that quantkit does not implement is refused when set to anything but its
neutral value, so a client never silently gets something other than what it asked for.
``parse_body`` turns bytes into a model or an ``APIError`` with a message that names the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from quantkit.server.errors import APIError, bad_request

Prompt = str | list[int] | list[str] | list[list[int]]
Stop = str | list[str] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted and ignored: quantkit never pads chunks


class _Sampling(_Strict):
    """Fields shared by both endpoints."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    # OpenAI fields quantkit does not implement: accepted only at their neutral values.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for every unimplemented option set to a non-neutral value."""
        found = []
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                found.append((name, "penalties are not implemented; leave it unset or 0"))
        if self.logit_bias:
            found.append(("logit_bias", "logit bias is not implemented; leave it unset"))
        return found


class CompletionRequest(_Sampling):
    prompt: Prompt
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echo is not implemented; leave it unset or false"))
        if self.best_of is not None and self.best_of != self.n:
            found.append(("best_of", "best_of is not implemented; leave it unset or equal to n"))
        if self.suffix:
            found.append(("suffix", "suffix (insertion) is not implemented"))
        if self.logprobs is not None and self.logprobs > 0:
            found.append(("logprobs", "only the chosen tokens' log-probabilities are available: use logprobs=0"))
        return found


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted and ignored (no tools)
    metadata: dict[str, Any] | None = None  # accepted and ignored
    store: bool | None = None  # accepted and ignored
    service_tier: str | None = None  # accepted and ignored

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.tools:
            found.append(("tools", "tool calling is not implemented"))
        if self.tool_choice not in (None, "none"):
            found.append(("tool_choice", "tool calling is not implemented"))
        if self.response_format and self.response_format.get("type") != "text":
            found.append(("response_format", "only plain text responses are implemented"))
        if self.top_logprobs:
            found.append(("top_logprobs", ("only the chosen tokens' log-probabilities are available: use "
                                           "logprobs=true without top_logprobs")))
        return found


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------- parsing
_HINTS = {
    "prompt": "must be a string or a list of token ids (or a list holding one of those)",
    "stop": "must be a string or a list of strings",
    "messages": "must be a list of {role, content} objects",
    "logit_bias": "must be an object mapping token ids to numbers",
}
_TYPE_WORDS = {
    "int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
    "list_type": "a list", "dict_type": "an object", "model_type": "an object", "int_from_float": "an integer",
}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def load_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not UTF-8 text", code="invalid_json") from None
    except ValueError as error:
        raise bad_request(f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def parse_body(model_type: type[BaseModel], raw: bytes):
    """Bytes to a validated request model; a 400 naming the first bad field otherwise."""
    body = load_json(raw)
    try:
        request = model_type.model_validate(body)
    except ValidationError as error:
        raise validation_error(error) from None
    unsupported = getattr(request, "unsupported", list)()
    if unsupported:
        name, why = unsupported[0]
        raise bad_request(f"'{name}': {why}", param=name, code="unsupported_parameter")
    return request


def validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    loc = [part for part in first["loc"] if isinstance(part, int) or not _is_type_tag(part)]
    param = ".".join(str(part) for part in loc) or None
    top = loc[0] if loc else None
    kind = first["type"]
    if kind == "missing":
        return bad_request(f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: '{param}'", param=param,
                           code="unknown_parameter")
    if kind == "literal_error":
        return bad_request(f"'{param}': {first['msg']}", param=param, code="invalid_value")
    hint = _HINTS.get(top) if len(loc) <= 2 else None
    if top == "messages" and "content" in loc:
        hint = 'must be a string or a list of {"type": "text", "text": ...} parts (only text is supported)'
    if hint is None:
        wanted = _TYPE_WORDS.get(kind)
        hint = f"must be {wanted}" if wanted else first["msg"]
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f", got {json.dumps(got)[:40]}"
    return bad_request(f"'{param}' {hint}{shown}", param=param, code="invalid_type")


def _is_type_tag(part: str) -> bool:
    """pydantic puts the union member it tried into the error location ('str', 'list[int]', ...)."""
    return any(mark in part for mark in ("[", "]")) or part in ("str", "int", "float", "bool", "none",
                                                                "TextPart", "StreamOptions", "ChatMessage")

