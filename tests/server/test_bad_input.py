"""Raw HTTP: every kind of bad input gets a 4xx with an OpenAI-style error body, and the server
keeps serving; overload beyond the queue limit gets a prompt 429; the API key guards /v1."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from .conftest import MODEL, assert_error_body, engine_is_idle

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
USER = [{"role": "user", "content": "Hi"}]


def body(**fields):
    return {**OK, **fields}


def without(name):
    return {k: v for k, v in OK.items() if k != name}


# (path, JSON body, status, param, code, message fragment)
CASES = [
    (C, without("model"), 400, "model", "missing_required_parameter", "missing required parameter 'model'"),
    (C, without("prompt"), 400, "prompt", "missing_required_parameter", None),
    (C, body(max_tokens="5"), 400, "max_tokens", "invalid_type", "must be an integer"),
    (C, body(max_tokens=2.5), 400, "max_tokens", "invalid_type", None),
    (C, body(max_tokens=True), 400, "max_tokens", "invalid_type", None),
    (C, body(temperature="hot"), 400, "temperature", "invalid_type", "must be a number"),
    (C, body(stream="yes"), 400, "stream", "invalid_type", "true or false"),
    (C, body(n=1.5), 400, "n", "invalid_type", None),
    (C, body(prompt=5), 400, "prompt", "invalid_type", "must be a string or a list of token ids"),
    (C, body(prompt=[1, "a"]), 400, "prompt", "invalid_type", None),
    (C, body(stop=3), 400, "stop", "invalid_type", None),
    (C, body(seed="1"), 400, "seed", "invalid_type", None),
    (C, body(frobnicate=1), 400, "frobnicate", "unknown_parameter", "unrecognized request argument"),
    (C, body(model="gpt-4"), 404, "model", "model_not_found", "'gpt-4' does not exist"),
    (C, body(max_tokens=-1), 400, "max_tokens", None, "at least 1"),
    (C, body(max_tokens=0), 400, "max_tokens", None, "at least 1"),
    (C, body(max_tokens=10**12), 400, "max_tokens", "context_length_exceeded", "context is 1024 tokens"),
    (C, body(prompt=[1] * 2000), 400, "prompt", "context_length_exceeded", "2000 tokens"),
    (C, body(prompt="word " * 1500), 400, "prompt", "context_length_exceeded", None),
    (C, body(prompt=[1] * 1000, max_tokens=100), 400, "max_tokens", "context_length_exceeded", "1100 in all"),
    (C, body(n=17), 400, "n", None, "between 1 and 16"),
    (C, body(n=0), 400, "n", None, None),
    (C, body(prompt=""), 400, "prompt", None, "empty"),
    (C, body(prompt=[]), 400, "prompt", None, "empty"),
    (C, body(prompt=[8192]), 400, "prompt", "invalid_token_id", "outside this model's vocabulary"),
    (C, body(prompt=[-1]), 400, "prompt", "invalid_token_id", None),
    (C, body(prompt=["a", "b"]), 400, "prompt", "unsupported_parameter", "batched prompts"),
    (C, body(temperature=-1), 400, "temperature", None, ">= 0"),
    (C, body(top_p=2), 400, "top_p", None, "(0, 1]"),
    (C, body(top_k=-5), 400, "top_k", None, None),
    (C, body(seed=2**70), 400, "seed", None, "64-bit"),
    (C, body(stop=["x"] * 17), 400, "stop", None, "at most 16"),
    (C, body(stop=[""]), 400, "stop", None, None),
    (C, body(stop_token_ids=[10**6]), 400, "stop_token_ids", "invalid_token_id", None),
    (C, body(logprobs=5), 400, "logprobs", "unsupported_parameter", "logprobs=0"),
    (C, body(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter", None),
    (C, body(echo=True), 400, "echo", "unsupported_parameter", None),
    (C, body(stream_options={"include_usage": True}), 400, "stream_options", None, "only allowed when 'stream'"),
    (C, body(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage", None, None),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter", None),
    (CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", "invalid_type", None),
    (CHAT, {"model": MODEL, "messages": []}, 400, "messages", None, "at least one message"),
    (CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role",
     "invalid_value", None),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "messages.0.content", "invalid_type", "only text is supported"),
    (CHAT, {"model": MODEL, "messages": USER, "tools": [{"type": "function"}]}, 400, "tools",
     "unsupported_parameter", None),
    (CHAT, {"model": MODEL, "messages": USER, "top_logprobs": 3}, 400, "top_logprobs", "unsupported_parameter", None),
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": 2, "max_completion_tokens": 2}, 400,
     "max_completion_tokens", None, "not both"),
    (CHAT, {"model": "nope", "messages": USER}, 404, "model", "model_not_found", None),
    ("/tokenize", {"prompt": "a", "messages": USER}, 400, None, None, "exactly one"),
    ("/detokenize", {"tokens": [99999]}, 400, "tokens", "invalid_token_id", None),
]


@pytest.mark.parametrize("path, payload, status, param, code, fragment", CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(CASES)])
def test_bad_request_body(http, path, payload, status, param, code, fragment):
    response = http.post(path, json=payload)
    assert_error_body(response, status, param=param, code=code, fragment=fragment)


@pytest.mark.parametrize("raw, fragment", [
    (b"{bad json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"", "body is empty"),
    (b'{"model": "quantkit-target", "prompt": "x", "temperature": NaN}', "NaN is not valid JSON"),
    (b"\xff\xfe{}", "not"),
])
def test_malformed_bodies(http, raw, fragment):
    response = http.post(C, content=raw, headers={"content-type": "application/json"})
    assert_error_body(response, 400, code="invalid_json", fragment=fragment)


def test_routes_and_methods(http):
    assert_error_body(http.get(C), 405, code="method_not_allowed")
    assert_error_body(http.post("/v1/embeddings", json={}), 404, code="not_found")
    assert_error_body(http.get("/../../etc/passwd"), 404)


def test_oversized_bodies(make_server):
    live = make_server(max_body_bytes=4096)
    big = json.dumps(body(prompt="x" * 10_000)).encode()
    with httpx.Client(base_url=live.base, timeout=30) as session:
        assert_error_body(session.post(C, content=big), 413, code="request_too_large", fragment="4096 bytes")

        def chunks():  # no Content-Length: the server counts what arrives
            for start in range(0, len(big), 1000):
                yield big[start:start + 1000]

        assert_error_body(session.post(C, content=chunks()), 413, code="request_too_large")
        assert session.post(C, json=OK).status_code == 200  # still serving


def test_server_keeps_serving_after_bad_input(http, shared_engine):
    for path, payload, *_ in CASES[::5]:
        http.post(path, json=payload)
    http.post(C, content=b"{bad")
    response = http.post(C, json=body(max_tokens=3, temperature=0))
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3
    assert engine_is_idle(shared_engine)
    metrics = http.get("/metrics").text
    assert 'quantkit_http_errors_total{status="400"}' in metrics


def test_overload_gets_429_not_a_hang(make_server, shared_engine):
    live = make_server(max_num_seqs=1, max_queue=1)  # at most 2 requests in flight through any server
    long = body(max_tokens=1000, ignore_eos=True, stream=True, temperature=0)
    started = threading.Barrier(3)
    holders = []

    def hold():
        with httpx.Client(base_url=live.base, timeout=30) as session, \
                session.stream("POST", C, json=long) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            started.wait()
            holders.append(response.status_code)
            started.wait()  # keep the request in flight until the check is done

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait(timeout=30)
    t0 = time.perf_counter()
    refused = httpx.post(live.base + C, json=body(max_tokens=2), timeout=30)
    elapsed = time.perf_counter() - t0
    started.wait(timeout=30)
    for thread in threads:
        thread.join(30)
    assert holders == [200, 200]
    assert_error_body(refused, 429, code="queue_full", fragment="limit of 2 requests")
    assert refused.headers["retry-after"] == "1"
    assert elapsed < 5
    assert engine_is_idle(shared_engine)  # the two streams were aborted when their clients left
    assert httpx.post(live.base + C, json=OK, timeout=30).status_code == 200


def test_api_key(make_server, http):
    from openai import AuthenticationError, OpenAI

    live = make_server(api_key="s3cret")
    with httpx.Client(base_url=live.base, timeout=30) as session:
        assert_error_body(session.post(C, json=OK), 401, code="invalid_api_key", fragment="missing API key")
        wrong = session.post(C, json=OK, headers={"Authorization": "Bearer nope"})
        assert_error_body(wrong, 401, code="invalid_api_key", fragment="invalid API key")
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert_error_body(session.get("/v1/models"), 401)
        assert_error_body(session.post("/tokenize", json={"prompt": "a"}), 401)
        good = session.post(C, json=OK, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert session.get("/health").status_code == 200 and session.get("/metrics").status_code == 200
    with OpenAI(base_url=live.url, api_key="s3cret", max_retries=0) as authed:
        assert authed.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with OpenAI(base_url=live.url, api_key="wrong", max_retries=0) as refused, pytest.raises(AuthenticationError):
        refused.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert http.post(C, json=OK).status_code == 200  # the key belongs to that server only
