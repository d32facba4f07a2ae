"""A restart-free soak: 300 mixed requests (completions and chat, streamed and not, stops, n > 1,
bad ones, clients that leave early) through one server, 16 at a time. Every valid request
completes with the right shape, every bad one gets its 4xx, and afterwards nothing is left in
the engine: no request in flight, every KV block free, counters that add up, no thread leaked."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx

from .conftest import MODEL, engine_is_idle

NUM_REQUESTS = 300
CONCURRENCY = 16
WORDS = ["the", "city", "river", "valley", "history", "band", "album", "music", "science", "harbour", "village", "army", "king", "war"]


def make_request(rng: random.Random, index: int) -> tuple[str, dict, str]:
    """(path, body, kind) where kind says what the answer must look like."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
    kind = rng.choices(["complete", "stream", "chat", "chat_stream", "bad", "leave"], [30, 25, 15, 10, 12, 8])[0]
    sampling = {"max_tokens": rng.randint(1, 6), "temperature": rng.choice([0, 0.7]), "seed": index}
    if rng.random() < 0.2:
        sampling["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.1:
        sampling["n"] = 2
    if kind in ("chat", "chat_stream"):
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **sampling,
                "stream": kind == "chat_stream"}
        return "/v1/chat/completions", body, kind
    if kind == "bad":
        body = rng.choice([{"model": MODEL, "prompt": prompt, "max_tokens": -3},
                           {"model": "other", "prompt": prompt},
                           {"model": MODEL, "prompt": [1] * 1500},
                           {"model": MODEL, "prompt": prompt, "n": 99}])
        return "/v1/completions", body, kind
    if kind == "leave":
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 500, "ignore_eos": True,
                                   "stream": True}, kind
    return "/v1/completions", {"model": MODEL, "prompt": prompt, **sampling, "stream": kind == "stream"}, kind


async def run_one(client: httpx.AsyncClient, path: str, body: dict, kind: str) -> str:
    if kind == "bad":
        response = await client.post(path, json=body)
        assert response.status_code in (400, 404), response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        return "refused"
    if not body.get("stream"):
        response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        data = response.json()
        assert len(data["choices"]) == body.get("n", 1)
        assert data["usage"]["completion_tokens"] <= body["max_tokens"] * body.get("n", 1)
        assert all(c["finish_reason"] in ("stop", "length") for c in data["choices"])
        return "completed"
    finished, events = 0, 0
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            events += 1
            finished += sum(1 for c in chunk["choices"] if c["finish_reason"] is not None)
            if kind == "leave" and events >= 2:
                return "left"  # closing the stream here disconnects mid-generation
    assert finished == body.get("n", 1) and line == "data: [DONE]"
    return "completed"


async def soak(base: str) -> dict[str, int]:
    rng = random.Random(0)
    requests = [make_request(rng, i) for i in range(NUM_REQUESTS)]
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=120,
                                 limits=httpx.Limits(max_connections=CONCURRENCY + 4)) as client:

        async def limited(request):
            async with limit:
                return await run_one(client, *request)

        outcomes = await asyncio.gather(*(limited(r) for r in requests))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def counter(http, name: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_soak_of_300_mixed_requests(server, http, shared_engine):
    threads_before = threading.active_count()
    finished_before = counter(http, "quantkit_request_success_total")
    counts = asyncio.run(soak(server.base))
    assert sum(counts.values()) == NUM_REQUESTS
    assert counts["completed"] > 150 and counts["refused"] > 15 and counts["left"] > 10
    assert engine_is_idle(shared_engine, timeout=10)
    # every accepted request ended exactly once: completed, or aborted when its client left
    assert counter(http, "quantkit_request_success_total") - finished_before == counts["completed"] + counts["left"]
    assert counter(http, "quantkit_num_requests_running") == 0 and counter(http, "quantkit_num_requests_waiting") == 0
    assert threading.active_count() <= threads_before + 1
    assert http.get("/health").status_code == 200
