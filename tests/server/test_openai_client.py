"""The official openai client against a live server on the bundled target: completions, chat,
streaming, usage, stop sequences, seeds, n, log-probabilities, models, tokenizer routes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantkit.models.bundled import BUNDLED_MODELS
from quantkit.server.chat_template import render_plain

from .conftest import MODEL, engine_is_idle

PROMPT = "The history of the city begins in the"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BUNDLED_MODELS[MODEL]))


def hf_greedy_text(tokenizer, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """transformers' greedy continuation (an independent reference): text and token count."""
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED_MODELS[MODEL]), dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=1)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def stream_text(stream) -> tuple[str, list, object]:
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks, chunks[-1].usage


def test_health_and_models(client, http):
    health = http.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].owned_by == "quantkit" and models[0].model_extra["max_model_len"] == 1024


def test_completion_matches_transformers_greedy(client, tokenizer):
    expected, count = hf_greedy_text(tokenizer, PROMPT, 12)
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    (choice,) = response.choices
    assert choice.text == expected and choice.finish_reason == "length" and choice.index == 0
    usage = response.usage
    assert usage.prompt_tokens == len(tokenizer.encode(PROMPT, add_special_tokens=False))
    assert usage.completion_tokens == count == 12
    assert usage.total_tokens == usage.prompt_tokens + 12


def test_token_id_prompt_equals_text_prompt(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming_with_usage(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, chunks, usage = stream_text(stream)
    assert text == whole.choices[0].text
    assert len(chunks) >= 3  # tokens arrive as they are generated, not in one piece
    assert chunks[-1].choices == [] and usage.completion_tokens == 16
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    finals = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in chunks)


def test_chat_completion_and_default_template(client, http, tokenizer):
    messages = [{"role": "system", "content": "You write about history."},
                {"role": "user", "content": "Tell me about the city."}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    (choice,) = response.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # the bundled tokenizer has no chat template: the plain default renders the prompt
    rendered = render_plain([("system", "You write about history."), ("user", "Tell me about the city.")])
    assert rendered.endswith("User: Tell me about the city.\nAssistant:")
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"] == ids
    assert response.usage.prompt_tokens == len(ids)
    same = client.completions.create(model=MODEL, prompt=rendered, max_tokens=10, temperature=0)
    assert same.choices[0].text == choice.message.content


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Write about rivers."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stop_sequences_stream_and_not(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    stop = " " + words[len(words) // 2]  # a string that first appears mid-way
    cut = full.index(stop)
    assert cut > 0
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert response.choices[0].text == full[:cut] and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 24
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream)
    assert text == full[:cut]  # nothing of the stop string was streamed before it was recognised
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=20, temperature=0, stop=["\n"])
    assert "\n" not in chat.choices[0].message.content


def test_seed_reproducibility(client):
    def sample(seed, **extra):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95,
                                         seed=seed, extra_body={"ignore_eos": True}, **extra)

    first, again, other = sample(1234), sample(1234), sample(99)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text
    streamed = "".join(c.choices[0].text for c in sample(1234, stream=True))
    assert streamed == first.choices[0].text
    chat = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=12, temperature=0.8, seed=7).choices[0].message.content
            for _ in range(2)]
    assert chat[0] == chat[1]


def test_n_samples(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=5,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert len({c.text for c in response.choices}) > 1  # sample i uses seed + i
    assert response.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=5,
                                            stream=True, extra_body={"ignore_eos": True}))
    for index in range(3):
        text = "".join(c.choices[0].text for c in chunks if c.choices[0].index == index)
        assert text == next(c.text for c in response.choices if c.index == index)


def test_logprobs(client):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert all(v <= 0 for v in logprobs.token_logprobs) and logprobs.text_offset[0] == 0
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(item.logprob <= 0 for item in content)
    assert "".join(item.token for item in content) == chat.choices[0].message.content


def test_tokenize_detokenize(http, tokenizer):
    ids = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert ids["tokens"] == tokenizer.encode(PROMPT, add_special_tokens=False) and ids["count"] == len(ids["tokens"])
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}


def test_metrics_text(client, http, shared_engine):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert engine_is_idle(shared_engine)
    text = http.get("/metrics").text
    for name in ("quantkit_num_requests_running", "quantkit_num_requests_waiting", "quantkit_kv_cache_usage_perc",
                 "quantkit_prefix_cache_hit_rate", "quantkit_prompt_tokens_total", "quantkit_generation_tokens_total",
                 "quantkit_time_to_first_token_seconds_bucket", "quantkit_inter_token_latency_seconds_bucket",
                 "quantkit_e2e_request_latency_seconds_bucket", 'quantkit_request_success_total{finished_reason="length"}'):
        assert name in text, name
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["quantkit_num_requests_running"] == 0 and values["quantkit_kv_cache_usage_perc"] == 0
    assert values["quantkit_generation_tokens_total"] >= 4 and values["quantkit_engine_ready"] == 1
    assert values["quantkit_prefix_cache_hits_total"] > 0  # PROMPT was sent many times in this module
