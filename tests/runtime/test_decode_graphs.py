"""The decode-graph path (static buffers, padding to a captured batch size) gives exactly the
eager engine's tokens. On the CPU it runs eagerly ("eager-static"); tests/runtime/test_engine_gpu.py
replays real CUDA graphs."""

import pytest
import torch
from test_engine import run_staggered

from quantkit.runtime.decode_graphs import BUCKETS
from quantkit.runtime.engine import Engine
from quantkit.runtime.sampling_params import SamplingParams

PROMPTS = [
    "The history of the city begins in the",
    "In 1990, the band released their second album, which",
    "Photosynthesis is",
    "The river flows through the valley and into the sea near the old harbour, where ships from",
    "A short",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def staggered_tokens(engine, params, start_steps):
    return [o.outputs[0].token_ids for o in run_staggered(engine, PROMPTS, params, start_steps)]


@pytest.fixture(scope="module")
def eager_tokens():
    return staggered_tokens(Engine(kv_cache_tokens=2048, cuda_graphs=False), GREEDY, [0, 1, 1, 4, 9])


def test_static_decode_path_is_taken_and_matches_eager(eager_tokens, monkeypatch):
    engine = Engine(kv_cache_tokens=2048, cuda_graphs="eager-static", max_num_seqs=8)
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.sizes == [1, 2, 4, 8]
    sizes_run = []
    original = graphs.run
    monkeypatch.setattr(graphs, "run", lambda *a: sizes_run.append(len(a[0])) or original(*a))
    assert staggered_tokens(engine, GREEDY, [0, 1, 1, 4, 9]) == eager_tokens
    assert {3, 5} & set(sizes_run)  # batches that are padded to 4 and 8 rows
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_padding_rows_never_write_the_cache():
    engine = Engine(kv_cache_tokens=256, cuda_graphs="eager-static", max_num_seqs=4)
    before = [(k.clone(), v.clone()) for k, v in engine.runner.kv_cache]
    # one sequence at position 0 padded to... a batch of 1 is not padded; use 3 -> 4 rows
    engine.runner.graphs.run([5, 6, 7], [0, 0, 0], [0, 16, 32], [1, 1, 1], [[0], [1], [2]])
    for (k0, v0), (k1, v1) in zip(before, engine.runner.kv_cache):
        changed = (k0 != k1).flatten(1).any(1) | (v0 != v1).flatten(1).any(1)
        assert changed.nonzero().flatten().tolist() == [0, 1, 2]  # blocks 0-2 only: slots 0, 16, 32


def test_speculative_engine_with_static_decode_keeps_greedy_output(eager_tokens):
    engine = Engine(kv_cache_tokens=2048, draft="quantkit-draft", cuda_graphs="eager-static", max_num_seqs=8)
    assert engine.speculator.proposer.runner.graphs is not None
    assert staggered_tokens(engine, GREEDY, [0, 1, 1, 4, 9]) == eager_tokens


def test_buckets_are_sorted_and_start_at_one():
    assert BUCKETS[0] == 1 and list(BUCKETS) == sorted(set(BUCKETS))
    assert torch.tensor(BUCKETS).diff().min() > 0
