"""64 simultaneous streaming requests: all complete, they really ran batched, and each output
equals the same request run alone (greedy decoding)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from .conftest import MODEL, engine_is_idle

SUBJECTS = ["The city", "The river", "A small village", "The old harbour", "The band", "The museum", "The army",
            "The university"]
VERBS = ["was founded in", "lies near", "is known for", "grew during", "was rebuilt after", "became famous for",
         "was named after", "declined after"]


def prompts() -> list[str]:
    """64 different prompts of different lengths."""
    return [f"{s} {v}" + " the" * (i % 5) for i, (s, v) in
            enumerate((s, v) for s in SUBJECTS for v in VERBS)]


def payload(prompt: str, stream: bool) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def stream_one(client: httpx.AsyncClient, prompt: str) -> tuple[str, int]:
    import json

    text, usage = "", None
    body = {**payload(prompt, True), "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                usage = chunk.get("usage") or usage
    return text, usage["completion_tokens"]


async def all_at_once(base: str, texts: list[str]) -> list[tuple[str, int]]:
    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(stream_one(client, t) for t in texts))


def test_64_concurrent_streams_equal_their_solo_runs(server, http, shared_engine):
    texts = prompts()
    assert len(set(texts)) == 64
    peak, done = [0], threading.Event()

    def watch():  # the largest number of requests the engine ran in one batch
        while not done.is_set():
            peak[0] = max(peak[0], shared_engine.metrics.snapshot.get("running", 0))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        together = asyncio.run(all_at_once(server.base, texts))
    finally:
        done.set()
        watcher.join()
    assert peak[0] >= 16  # they were batched, not served one after another
    assert engine_is_idle(shared_engine)
    for prompt, (text, count) in zip(texts, together):
        alone = http.post("/v1/completions", json=payload(prompt, False)).json()
        assert count == alone["usage"]["completion_tokens"] == 8
        assert text == alone["choices"][0]["text"], prompt
