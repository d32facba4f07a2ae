"""One generation request, from a validated body to a response: prompt tokens, sampling
parameters and limits, then the engine, then a JSON response or an SSE stream.

Everything that can be wrong with a request is found here, before it reaches the engine, and
answered with a 4xx: an unknown model, a prompt that is empty or longer than the limit, token
ids outside the vocabulary, ``max_tokens`` that the context cannot hold, ``n`` over the limit,
out-of-range sampling values. A client that disconnects (while queued, while generating, or
mid-stream) has its request aborted on the engine thread, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from quantkit.errors import QuantkitError
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.server import chat_template
from quantkit.server.async_engine import AsyncEngine, OutputStream
from quantkit.server.errors import APIError, bad_request
from quantkit.server.protocol import ChatCompletionRequest, CompletionRequest
from quantkit.server.responses import DONE, Formatter, sse
from quantkit.server.settings import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    ServerSettings,
)

INT64 = (-(2**63), 2**63 - 1)
_ID_PREFIX = uuid.uuid4().hex[:12]  # request ids: one random prefix per process, then a counter
_ids = itertools.count()
LONG_TEXT_CHARS = 16384  # tokenize longer prompts off the event loop
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class ServerContext:
    engine: AsyncEngine
    settings: ServerSettings

    def check_model(self, name: str | None) -> str:
        if name is None:
            return self.settings.served_names[0]
        if name not in self.settings.served_names:
            served = ", ".join(f"'{n}'" for n in self.settings.served_names)
            raise APIError(404, f"the model '{name}' does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return name


@dataclass
class Prepared:
    request_id: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    formatter: Formatter


# ---------------------------------------------------------------------- prompts
async def encode_text(ctx: ServerContext, text: str) -> list[int]:
    tokenizer = ctx.engine.tokenizer
    if tokenizer is None:
        raise bad_request("this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
    if len(text) > LONG_TEXT_CHARS:
        return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
    return tokenizer.encode(text, add_special_tokens=False)


def check_token_ids(ctx: ServerContext, ids: list[int], param: str) -> list[int]:
    vocab = ctx.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"'{param}' holds token id {bad}, outside this model's vocabulary of {vocab} ids "
                          f"(0..{vocab - 1})", param=param, code="invalid_token_id")
    return ids


async def completion_prompt(ctx: ServerContext, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"'prompt' holds {len(prompt)} prompts; batched prompts are not supported, send one "
                              "prompt per request", param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    ids = await encode_text(ctx, prompt) if isinstance(prompt, str) else check_token_ids(ctx, prompt, "prompt")
    if not ids:
        raise bad_request("'prompt' is empty; send at least one token", param="prompt")
    return ids


async def chat_prompt(ctx: ServerContext, messages) -> list[int]:
    text = chat_template.render(ctx.engine.tokenizer, [(m.role, m.text()) for m in messages])
    ids = await encode_text(ctx, text)
    if not ids:
        raise bad_request("'messages' render to an empty prompt", param="messages")
    return ids


def check_prompt_length(ctx: ServerContext, num_tokens: int) -> None:
    context = ctx.engine.max_model_len
    limit = min(ctx.settings.max_prompt_tokens or context - 1, context - 1)
    if num_tokens > limit:
        raise bad_request(f"the prompt has {num_tokens} tokens, more than this server's limit of {limit} "
                          f"(the model's context is {context} tokens, and the output needs at least one)",
                          param="prompt", code="context_length_exceeded")


# ---------------------------------------------------------------------- sampling parameters
def sampling_params(ctx: ServerContext, req, num_prompt: int, max_tokens: int | None, logprobs: bool,
                    default_max_tokens: int | None) -> SamplingParams:
    context = ctx.engine.max_model_len
    room = context - num_prompt
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens < 1:
        raise bad_request(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    elif max_tokens > room:
        raise bad_request(f"this model's context is {context} tokens; the prompt has {num_prompt} and "
                          f"max_tokens asks for {max_tokens} more ({num_prompt + max_tokens} in all): lower "
                          "max_tokens or shorten the prompt", param="max_tokens", code="context_length_exceeded")
    if not 1 <= req.n <= ctx.settings.max_n:
        raise bad_request(f"'n' must be between 1 and {ctx.settings.max_n}, got {req.n}", param="n")
    if req.seed is not None and not INT64[0] <= req.seed <= INT64[1]:
        raise bad_request(f"'seed' must be a 64-bit integer, got {req.seed}", param="seed")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} non-empty strings of at most "
                          f"{MAX_STOP_CHARS} characters", param="stop")
    stop_ids = list(req.stop_token_ids or [])
    if len(stop_ids) > MAX_STOP_TOKEN_IDS:
        raise bad_request(f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids", param="stop_token_ids")
    check_token_ids(ctx, stop_ids, "stop_token_ids")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k in (None, 0) else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed, max_tokens=max_tokens, stop=stops, stop_token_ids=stop_ids, ignore_eos=req.ignore_eos,
        n=req.n, logprobs=logprobs)
    try:
        return params.validate(context)
    except QuantkitError as error:
        found = re.search(r"parameter '(\w+)'", str(error))
        name = found.group(1) if found else None
        raise bad_request(str(error).replace("sampling parameter ", ""), param=name) from None


def _stream_options(req) -> bool:
    if req.stream_options is not None and not req.stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def _holdback(params: SamplingParams) -> int:
    return max((len(s) for s in params.stop), default=1) - 1


# ---------------------------------------------------------------------- the two endpoints
async def prepare_completion(ctx: ServerContext, req: CompletionRequest) -> Prepared:
    model = ctx.check_model(req.model)
    ctx.engine.check_serving()
    ids = await completion_prompt(ctx, req.prompt)
    check_prompt_length(ctx, len(ids))
    params = sampling_params(ctx, req, len(ids), req.max_tokens, req.logprobs is not None,
                             DEFAULT_COMPLETION_TOKENS)
    request_id = f"cmpl-{_ID_PREFIX}{next(_ids):012d}"
    formatter = Formatter("completion", request_id, model, len(ids), params.n, ctx.engine.tokenizer,
                          logprobs=req.logprobs is not None, include_usage=_stream_options(req),
                          holdback=_holdback(params))
    return Prepared(request_id, model, ids, params, req.stream, formatter)


async def prepare_chat(ctx: ServerContext, req: ChatCompletionRequest) -> Prepared:
    model = ctx.check_model(req.model)
    ctx.engine.check_serving()
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_request("give 'max_tokens' or 'max_completion_tokens', not both", param="max_completion_tokens")
    ids = await chat_prompt(ctx, req.messages)
    check_prompt_length(ctx, len(ids))
    wanted = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(ctx, req, len(ids), wanted, req.logprobs, None)
    request_id = f"chatcmpl-{_ID_PREFIX}{next(_ids):012d}"
    formatter = Formatter("chat", request_id, model, len(ids), params.n, ctx.engine.tokenizer,
                          logprobs=req.logprobs, include_usage=_stream_options(req), holdback=_holdback(params))
    return Prepared(request_id, model, ids, params, req.stream, formatter)


async def run(request: Request, ctx: ServerContext, prepared: Prepared) -> Response:
    """Submit, then answer with the final output (JSON) or a stream of chunks (SSE)."""
    engine = ctx.engine
    stream = engine.submit(prepared.request_id, prepared.prompt_ids, prepared.params, prepared.stream,
                           limit=ctx.settings.max_in_flight)
    try:
        first = await _unless_disconnected(request, stream)  # an APIError here is answered with its status
    except asyncio.CancelledError:  # the server is cancelling this handler
        engine.abort(prepared.request_id)
        raise
    if first is None:
        engine.abort(prepared.request_id)
        return Response(status_code=499)  # nobody is there to read it
    if not prepared.stream:
        return JSONResponse(prepared.formatter.full(first))
    return _EngineStream(_events(engine, stream, prepared, first), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                         on_close=lambda: None if stream.ended else engine.abort(prepared.request_id))


class _EngineStream(StreamingResponse):
    """A streaming response that aborts its request if it ends (or never starts) before the
    request does: a client gone before the first chunk is sent never runs the generator."""

    def __init__(self, content, *, on_close, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(engine: AsyncEngine, stream: OutputStream, prepared: Prepared, first):
    formatter = prepared.formatter
    ended = False
    try:
        opening = "".join(formatter.opening())  # the events of one step go out in one write
        output = first
        while True:
            events = opening + "".join(formatter.chunks(output))
            opening = ""
            if events:
                yield events
            if output.finished:
                break
            output = await stream.next()
        ended = True
        if formatter.include_usage:
            yield formatter.usage_chunk(output)
    except APIError as error:  # the engine failed this request, or the server is shutting down
        ended = True
        yield sse(error.body())
    finally:
        if not ended:  # the client went away (the response was cancelled)
            engine.abort(prepared.request_id)
    yield DONE


async def _unless_disconnected(request: Request, stream: OutputStream):
    """The first output (for a non-streaming request: the final one), or None if the client
    disconnects first."""
    result = asyncio.ensure_future(stream.next())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        result.cancel()
        raise
    finally:
        watcher.cancel()
    if result in done:
        return result.result()
    result.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
