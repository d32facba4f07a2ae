"""The speed gate runs whichever mode its clock says is faster, per batch-size bucket."""

import pytest

from quantkit.runtime.spec.speed_gate import SpeedGate


def drive(gate, batch, spec_seconds, plain_seconds, steps, tokens_spec=3, tokens_plain=1):
    """Run ``steps`` steps, feeding back the given per-step times; return the modes chosen."""
    chosen = []
    for _ in range(steps):
        mode = "spec" if gate.speculate(batch) else "plain"
        seconds = spec_seconds if mode == "spec" else plain_seconds
        gate.observe(mode, batch, seconds, (tokens_spec if mode == "spec" else tokens_plain) * batch)
        chosen.append(mode)
    return chosen


def test_measures_both_modes_then_keeps_the_faster():
    gate = SpeedGate(warmup=3, probe_every=10)
    # spec emits 3 tokens in 4 ms (1.33 ms/token), plain 1 token in 1 ms: plain is faster
    chosen = drive(gate, 1, 0.004, 0.001, 40)
    assert chosen[:6] == ["spec"] * 3 + ["plain"] * 3
    later = chosen[6:]
    assert later.count("plain") > 0.85 * len(later) and "spec" in later  # probes now and then


def test_speculation_wins_when_it_is_faster():
    gate = SpeedGate(warmup=3, probe_every=10)
    chosen = drive(gate, 1, 0.002, 0.001, 40)  # 0.67 ms/token against 1 ms
    assert chosen[6:].count("spec") > 0.85 * len(chosen[6:])


def test_buckets_decide_separately():
    gate = SpeedGate(warmup=2, probe_every=100)
    drive(gate, 1, 0.002, 0.001, 10)  # batch 1: speculation faster
    drive(gate, 40, 0.050, 0.010, 10, tokens_spec=2)  # batch 40 (bucket 64): plain faster
    assert gate.speculate(1) and not gate.speculate(33)
    assert set(gate.summary()) == {1, 64}


def test_one_slow_step_does_not_decide():
    gate = SpeedGate(warmup=3, window=8, probe_every=1000)
    gate.observe("spec", 1, 5.0, 3)  # a kernel compile
    for _ in range(4):
        gate.observe("spec", 1, 0.002, 3)
    for _ in range(4):
        gate.observe("plain", 1, 0.001, 1)
    assert gate.speculate(1)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        SpeedGate().observe("fast", 1, 0.1, 1)


def test_engine_stops_speculating_when_drafting_is_slow(monkeypatch):
    import time

    from quantkit.runtime.engine import Engine
    from quantkit.runtime.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = Engine(kv_cache_tokens=1024).generate(["The history of the city"], params)[0]
    engine = Engine(kv_cache_tokens=1024, speculative_method="ngram")
    proposer = engine.speculator.proposer
    slow = proposer.propose
    monkeypatch.setattr(proposer, "propose", lambda requests: time.sleep(0.05) or slow(requests))
    out = engine.generate(["The history of the city"], params)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    metrics = engine.spec_metrics
    assert metrics.steps_off > 2 * metrics.steps_on  # after measuring both, it keeps to plain decoding
