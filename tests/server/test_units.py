"""Pieces without a server: streamed text never takes back what it sent (stop-string and partial
character holds), the plain chat template, the request checks' messages, replay comparison."""

from __future__ import annotations

import pytest

from quantkit.runtime.outputs import CompletionOutput, RequestOutput
from quantkit.server.async_engine import _compare_replay
from quantkit.server.chat_template import render, render_plain
from quantkit.server.errors import APIError
from quantkit.server.protocol import CompletionRequest, parse_body
from quantkit.server.responses import Formatter


def out(text: str, tokens: list[int], reason: str | None = None, finished: bool = False, index: int = 0):
    return RequestOutput("r", [1], [CompletionOutput(index, tokens, text, reason)], finished)


def streamed(formatter: Formatter, outputs) -> str:
    import json

    text = ""
    for output in outputs:
        for event in formatter.chunks(output):
            text += json.loads(event[6:])["choices"][0]["text"]
    return text


def test_stream_holds_back_a_possible_stop_string_and_partial_characters():
    formatter = Formatter("completion", "r", "m", 1, 1, None, holdback=len("END") - 1)
    steps = [out("Hello E", [1, 2]), out("Hello EN", [1, 2, 3]), out("Hello ca\ufffd", [1, 2, 3, 4]),
             out("Hello caf\u00e9 ", [1, 2, 3, 4, 5]), out("Hello caf\u00e9 ", [1, 2, 3, 4, 5, 6], "stop", True)]
    seen = []
    for step in steps:
        seen.append(streamed(formatter, [step]))
    assert "".join(seen) == "Hello caf\u00e9 "
    assert seen[0] == "Hello"  # " E" might begin "END": held
    assert "\ufffd" not in "".join(seen)


def test_chat_stream_opens_with_the_role_and_ends_with_the_reason():
    import json

    formatter = Formatter("chat", "c", "m", 3, 2, None, include_usage=True)
    opening = [json.loads(e[6:]) for e in formatter.opening()]
    assert [o["choices"][0]["delta"] for o in opening] == [{"role": "assistant", "content": ""}] * 2
    assert all(o["usage"] is None for o in opening)
    final = RequestOutput("c", [1, 2, 3], [CompletionOutput(0, [5], "a", "length"),
                                           CompletionOutput(1, [6, 7], "bc", "stop")], True)
    events = [json.loads(e[6:]) for e in formatter.chunks(final)]
    assert [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events] == [(0, "length"), (1, "stop")]
    usage = json.loads(formatter.usage_chunk(final)[6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_plain_chat_template():
    assert render_plain([("system", "Be brief."), ("user", "Hi")]) == "System: Be brief.\nUser: Hi\nAssistant:"
    with pytest.raises(APIError) as error:
        render(None, [])
    assert error.value.status == 400


def test_parse_body_messages():
    request = parse_body(CompletionRequest, b'{"model": "m", "prompt": [1, 2], "stop": "x"}')
    assert request.prompt == [1, 2] and request.stop == "x"
    with pytest.raises(APIError, match="'n' must be an integer, got true"):
        parse_body(CompletionRequest, b'{"model": "m", "prompt": "x", "n": true}')
    with pytest.raises(APIError, match="not valid JSON"):
        parse_body(CompletionRequest, b'{"model": "m", "prompt": "x", "top_p": Infinity}')


def test_replay_comparison():
    sent = out("ab", [1, 2])
    assert _compare_replay(sent, out("a", [1])) == "behind"
    assert _compare_replay(sent, out("abc", [1, 2, 3])) == "caught_up"
    assert _compare_replay(sent, out("ax", [1, 9])) == "diverged"
    assert _compare_replay(sent, out("a", [1], "stop", True)) == "diverged"


def test_the_tokenizers_own_chat_template_is_used():
    from transformers import AutoTokenizer

    from quantkit.models.bundled import BUNDLED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render(tokenizer, [("system", "Be brief."), ("user", "Hi")]) == \
        "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"


def test_metrics_text_has_every_family_and_speculation_when_on():
    from quantkit.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.snapshot = {"ready": True, "running": 3, "waiting": 2, "kv_usage": 0.25, "kv_blocks": 64,
                        "prefix_hit_rate": 0.5, "prefix_queries": 100, "prefix_hits": 50, "preemptions": 1,
                        "step_failures": 0, "spec": {"num_proposed": 40, "num_accepted": 30, "num_emitted": 40,
                                                     "acceptance_rate": 0.75, "mean_accepted_length": 3.0}}
    metrics.record_ttft(0.05)
    metrics.record_itl(0.01)
    metrics.record_finish("stop", 0.4)
    metrics.prompt_tokens.inc(7)
    metrics.generation_tokens.inc(9)
    text = metrics.render().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["quantkit_num_requests_running"] == 3 and values["quantkit_num_requests_waiting"] == 2
    assert values["quantkit_kv_cache_usage_perc"] == 0.25 and values["quantkit_prefix_cache_hit_rate"] == 0.5
    assert values["quantkit_prompt_tokens_total"] == 7 and values["quantkit_generation_tokens_total"] == 9
    assert values["quantkit_time_to_first_token_seconds_count"] == 1
    assert values['quantkit_time_to_first_token_seconds_bucket{le="0.06"}'] == 1
    assert values["quantkit_inter_token_latency_seconds_count"] == 1
    assert values['quantkit_request_success_total{finished_reason="stop"}'] == 1
    assert values["quantkit_e2e_request_latency_seconds_sum"] == 0.4
    assert values["quantkit_spec_decode_acceptance_rate"] == 0.75
    assert values["quantkit_spec_decode_num_accepted_tokens_total"] == 30
    metrics.snapshot = {k: v for k, v in metrics.snapshot.items() if k != "spec"}
    assert "spec_decode" not in metrics.render().decode()


class _Pieces:
    """A stand-in tokenizer: token id i decodes to PIECES[i]."""

    PIECES = ("He", "llo", " caf", "\u00e9", " \"q\"", "\\n", "\u4e16", "")

    def decode(self, ids, **_):
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_streamed_chunks_are_exactly_the_json_of_openais_shapes(kind):
    """The stream's chunks are built from pre-encoded fragments: byte for byte what encoding the
    dicts gives (key order included), log-probabilities of every token, -inf included."""
    import json

    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    tokenizer = _Pieces()
    formatter = Formatter(kind, "id-1", "m", 4, 1, tokenizer, logprobs=True, include_usage=True, created=7)
    tokens, values, sent, offset = [], [], "", 0
    steps = [([0], [-0.5]), ([1, 2], [-1e-9, float("-inf")]), ([3], [-2.0]), ([4, 5, 6, 7], [-0.25, -3.0, -1.5, 0.0])]
    for number, (new, new_values) in enumerate(steps):
        tokens += new
        values += new_values
        last = number == len(steps) - 1
        text = tokenizer.decode(tokens)
        output = RequestOutput("id-1", [1], [CompletionOutput(0, list(tokens), text, "length" if last else None,
                                                              list(values))], last)
        (event,) = formatter.chunks(output)
        delta, sent = text[len(sent):], text
        pieces = [tokenizer.decode([t]) for t in new]
        if kind == "completion":
            offsets = []
            for piece in pieces:
                offsets.append(offset)
                offset += len(piece)
            logprobs = {"tokens": pieces, "token_logprobs": new_values, "top_logprobs": None, "text_offset": offsets}
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": "length" if last else None}
        else:
            logprobs = {"content": [{"token": p, "logprob": v, "bytes": list(p.encode()), "top_logprobs": []}
                                    for p, v in zip(pieces, new_values)], "refusal": None}
            choice = {"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": logprobs,
                      "finish_reason": "length" if last else None}
        expected = {"id": "id-1", "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
                    "created": 7, "model": "m", "choices": [choice], "usage": None}
        assert event == f"data: {encode(expected)}\n\n"
