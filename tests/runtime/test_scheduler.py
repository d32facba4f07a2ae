"""Scheduler: continuous batching, chunked prefill, preemption, stops, abort, speculation, fork.

A fake model stands in for the runner: it performs the block copies, writes each scheduled
token's whole prefix into its KV slot, reads every context back through the block table (so a
wrong slot, a missing copy or a bad prefix hit fails loudly), and answers with a token that is a
deterministic function of the context. Every request's output must then equal the output it gets
when it runs alone, whatever batching, chunking, preemption or speculation happened.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.runtime.scheduler import Scheduler, SchedulerOutput
from quantkit.runtime.sequence import Sequence, SequenceStatus

VOCAB = 50


def next_token(context: list[int], sample_index: int = 0) -> int:
    """The fake model's deterministic 'argmax' after ``context``."""
    value = len(context) * 31 + sample_index * 977
    for i, token in enumerate(context):
        value = (value * 1_000_003 + (i + 1) * (token + 7)) % 2_147_483_647
    return value % VOCAB


def continuation(context: list[int], n: int, sample_index: int = 0) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(context + out, sample_index))
    return out


class FakeModel:
    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.kv: dict[int, tuple[int, ...]] = {}
        self.copies_done = 0

    def run(self, out: SchedulerOutput, drafts: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
        drafts = drafts or {}
        bs = self.manager.block_size
        for src, dst in out.block_copies:
            self.copies_done += 1
            for offset in range(bs):
                if src * bs + offset in self.kv:
                    self.kv[dst * bs + offset] = self.kv[src * bs + offset]
        contexts = {}
        for sched in out.scheduled:  # write every KV first, as a layer does before attention
            seq = sched.seq
            context = seq.all_token_ids + drafts.get(seq.seq_id, [])[: sched.num_lookahead]
            end = sched.start_position + sched.num_new_tokens
            assert end <= len(context)
            slots = self.manager.slots_for(seq, sched.start_position, sched.num_new_tokens)
            for pos, slot in zip(range(sched.start_position, end), slots):
                self.kv[slot] = tuple(context[: pos + 1])
            contexts[seq.seq_id] = context[:end]
        results = {}
        for sched in out.scheduled:
            seq, context = sched.seq, contexts[sched.seq.seq_id]
            for pos, slot in enumerate(self.manager.slots_for(seq, 0, len(context))):
                assert self.kv[slot] == tuple(context[: pos + 1]), f"wrong KV at {pos} of {seq}"
            if sched.samples:
                results[seq.seq_id] = self._verify(context, sched.num_lookahead, seq.sample_index)
        return results

    @staticmethod
    def _verify(context: list[int], k: int, sample_index: int) -> list[int]:
        """Greedy speculative verification: keep drafts while they match, then one correction."""
        n_real = len(context) - k
        out = []
        for i in range(k + 1):
            target = next_token(context[: n_real + i], sample_index)
            out.append(target)
            if i == k or context[n_real + i] != target:
                break
        return out


def make_scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=16, max_model_len=None,
                   eos=None, prefix_caching=True) -> Scheduler:
    manager = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(manager, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                     max_model_len=max_model_len, eos_token_id=eos)


_ids = iter(range(10**9))


def make_seq(prompt, max_tokens=8, arrival=None, **params) -> Sequence:
    seq_id = next(_ids)
    seq = Sequence(seq_id=seq_id, request_id=f"req-{seq_id}", prompt_token_ids=prompt,
                   params=SamplingParams(max_tokens=max_tokens, **params))
    if arrival is not None:
        seq.arrival_time = arrival
    return seq


def check_step(scheduler: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    ids = [s.seq.seq_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    for sched in out.scheduled:
        assert sched.seq.status is SequenceStatus.RUNNING and sched.num_new_tokens >= 1
        assert sched.start_position == sched.seq.num_computed_tokens
        assert sched.start_position + sched.num_new_tokens <= scheduler.max_model_len
    for seq in out.preempted:
        assert seq.status is SequenceStatus.PREEMPTED and not seq.block_table
    assert [s.seq_id for s in scheduler.running] == [
        s.seq_id for s in sorted(scheduler.running, key=lambda s: (s.arrival_time, s.seq_id))]


def run(scheduler: Scheduler, model: FakeModel | None = None, lookahead: int = 0,
        proposer=None, max_steps: int = 5000) -> list[SchedulerOutput]:
    model = model or FakeModel(scheduler.block_manager)
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished:
            return outputs
        drafts = {s.seq_id: proposer(s, lookahead) for s in scheduler.running} if proposer else {}
        out = scheduler.schedule(num_lookahead={k: len(v) for k, v in drafts.items()}
                                 if proposer else lookahead)
        check_step(scheduler, out)
        scheduler.update(model.run(out, drafts))
        outputs.append(out)
    raise AssertionError("the scheduler did not finish every request")


def solo_output(seq: Sequence, max_model_len: int, eos=None) -> tuple[list[int], str]:
    alone = Sequence(seq_id=-1, request_id="solo", prompt_token_ids=seq.prompt_token_ids,
                     params=seq.params, sample_index=seq.sample_index)
    scheduler = make_scheduler(num_blocks=512, budget=4096, max_model_len=max_model_len, eos=eos)
    scheduler.add(alone)
    run(scheduler)
    return alone.output_token_ids, alone.finish_reason


def assert_all_match_solo(scheduler: Scheduler, seqs: list[Sequence], eos=None) -> None:
    for seq in seqs:
        assert seq.is_finished
        assert (seq.output_token_ids, seq.finish_reason) == solo_output(
            seq, scheduler.max_model_len, eos)
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


# --------------------------------------------------------------------- batching

def test_first_come_first_served_under_max_num_seqs():
    scheduler = make_scheduler(max_seqs=2)
    seqs = [make_seq([1, 2, 3], max_tokens=2 + i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]
    model = FakeModel(scheduler.block_manager)
    scheduler.update(model.run(out))
    admitted = []
    while scheduler.has_unfinished:
        out = scheduler.schedule()
        admitted += [s.seq for s in out.scheduled if s.start_position == 0]
        scheduler.update(model.run(out))
    assert admitted == seqs[2:]  # the third joins before the fourth
    assert_all_match_solo(scheduler, seqs)


def test_new_requests_join_at_the_next_step_and_finished_leave_at_once():
    scheduler = make_scheduler()
    model = FakeModel(scheduler.block_manager)
    first = make_seq([5, 6, 7], max_tokens=2)
    scheduler.add(first)
    scheduler.update(model.run(scheduler.schedule()))
    second = make_seq([8, 9], max_tokens=3)
    scheduler.add(second)
    out = scheduler.schedule()
    assert [s.seq for s in out.scheduled] == [first, second]
    finished = scheduler.update(model.run(out))
    assert finished == [first] and first.finish_reason == "length"
    assert scheduler.running == [second]
    run(scheduler, model)
    assert_all_match_solo(scheduler, [first, second])


def test_chunked_prefill_keeps_the_budget_and_never_stalls_decodes():
    scheduler = make_scheduler(num_blocks=128, budget=16)
    model = FakeModel(scheduler.block_manager)
    decoders = [make_seq([1, 2, 3], max_tokens=40), make_seq([4, 5], max_tokens=40)]
    for seq in decoders:
        scheduler.add(seq)
    scheduler.update(model.run(scheduler.schedule()))
    long = make_seq(list(range(10, 110)), max_tokens=3)
    scheduler.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        before = [len(s.output_token_ids) for s in decoders]
        out = scheduler.schedule()
        assert out.num_batched_tokens <= 16
        by_seq = {s.seq.seq_id: s for s in out.scheduled}
        assert all(by_seq[s.seq_id].num_new_tokens == 1 for s in decoders)
        chunks.append(by_seq[long.seq_id].num_new_tokens)
        scheduler.update(model.run(out))
        assert [len(s.output_token_ids) for s in decoders] == [b + 1 for b in before]
    assert sum(chunks) == 100 and max(chunks) == 14 and len(chunks) == 8
    run(scheduler, model)
    assert_all_match_solo(scheduler, decoders + [long])


def test_an_over_long_prompt_is_refused_naming_both_lengths():
    scheduler = make_scheduler(max_model_len=32)
    with pytest.raises(QuantkitError, match=r"40 tokens.*max_model_len = 32"):
        scheduler.add(make_seq(list(range(40))))
    with pytest.raises(QuantkitError, match="empty"):
        scheduler.add(make_seq([]))
    assert not scheduler.has_unfinished


def test_a_context_longer_than_the_cache_is_refused():
    with pytest.raises(QuantkitError, match="max_model_len"):
        Scheduler(BlockManager(4, 4), max_model_len=32)


# ------------------------------------------------------------------- preemption

def test_preemption_by_recompute_completes_every_request():
    scheduler = make_scheduler(num_blocks=12, block_size=4, budget=32, max_model_len=40)
    rng = random.Random(1)
    seqs = [make_seq([rng.randrange(VOCAB) for _ in range(rng.randrange(3, 16))], max_tokens=20)
            for _ in range(6)]
    for seq in seqs:
        scheduler.add(seq)
    steps = run(scheduler)
    assert scheduler.num_preemptions > 0
    assert any(out.preempted for out in steps)
    assert_all_match_solo(scheduler, seqs)


def test_the_most_recent_arrival_is_preempted_and_goes_to_the_front():
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=64, max_model_len=24)
    model = FakeModel(scheduler.block_manager)
    old = make_seq([1] * 7, max_tokens=16, arrival=1.0)
    young = make_seq([2] * 7, max_tokens=16, arrival=2.0)
    late = make_seq([3] * 9, max_tokens=2, arrival=3.0)
    for seq in (old, young):
        scheduler.add(seq)
    scheduler.update(model.run(scheduler.schedule()))  # two blocks each
    scheduler.add(late)  # needs three blocks: waits
    for _ in range(10):
        out = scheduler.schedule()
        scheduler.update(model.run(out))
        if out.preempted:
            break
    assert out.preempted == [young] and old.status is SequenceStatus.RUNNING
    assert list(scheduler.waiting) == [young, late]
    assert young.output_token_ids and young.num_computed_tokens == 0  # outputs kept
    run(scheduler, model)
    assert_all_match_solo(scheduler, [old, young, late])


def test_a_sequence_that_cannot_fit_preempts_itself_rather_than_crash():
    scheduler = make_scheduler(num_blocks=4, block_size=4, budget=64, max_model_len=16)
    a = make_seq([1, 2, 3, 4, 5, 6, 7], max_tokens=9, arrival=1.0)
    b = make_seq([7, 6, 5, 4, 3, 2, 1], max_tokens=9, arrival=2.0)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler)
    assert scheduler.num_preemptions > 0
    assert_all_match_solo(scheduler, [a, b])


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    seed=st.integers(0, 10**6),
    num_seqs=st.integers(2, 8),
    num_blocks=st.integers(10, 16),
    budget=st.integers(1, 40),
    max_seqs=st.integers(1, 8),
    lookahead=st.integers(0, 3),
)
def test_any_mix_of_requests_finishes_with_the_solo_outputs(seed, num_seqs, num_blocks, budget,
                                                            max_seqs, lookahead):
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=num_blocks, block_size=4, budget=budget,
                               max_seqs=max_seqs, max_model_len=40, eos=0)
    shared = [rng.randrange(1, VOCAB) for _ in range(12)]
    seqs = []
    for _ in range(num_seqs):
        prompt = shared[: rng.randrange(0, 13)] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 10))]
        seqs.append(make_seq(prompt, max_tokens=rng.randrange(1, 30), ignore_eos=rng.random() < 0.5))
    late = seqs[num_seqs // 2:]
    for seq in seqs[: num_seqs // 2]:
        scheduler.add(seq)
    model = FakeModel(scheduler.block_manager)
    proposer = DraftProposer(rng) if lookahead else None
    for step in range(3000):
        if late and step % 3 == 0:
            scheduler.add(late.pop(0))
        if not scheduler.has_unfinished and not late:
            break
        drafts = {s.seq_id: proposer(s, lookahead) for s in scheduler.running} if proposer else {}
        out = scheduler.schedule({k: len(v) for k, v in drafts.items()})
        check_step(scheduler, out)
        scheduler.update(model.run(out, drafts))
    assert not scheduler.has_unfinished
    assert_all_match_solo(scheduler, seqs, eos=0)


# ---------------------------------------------------------------- stops, abort

def test_eos_stop_ids_max_tokens_and_context_end_a_sequence():
    prompt = [3, 1, 4, 1, 5]
    natural = continuation(prompt, 12)
    eos = natural[4]
    cases = [
        ({"max_tokens": 12}, "stop", natural[: natural.index(eos) + 1]),
        ({"max_tokens": 12, "ignore_eos": True}, "length", natural[:12]),
        ({"max_tokens": 12, "ignore_eos": True, "stop_token_ids": [natural[2]]}, "stop",
         natural[: natural.index(natural[2]) + 1]),
        ({"max_tokens": 3, "ignore_eos": True}, "length", natural[:3]),
    ]
    for params, reason, expected in cases:
        scheduler = make_scheduler(eos=eos, max_model_len=64)
        seq = make_seq(prompt, **params)
        scheduler.add(seq)
        run(scheduler)
        assert (seq.finish_reason, seq.output_token_ids) == (reason, expected), params
        assert seq.status is {"stop": SequenceStatus.FINISHED_STOPPED,
                              "length": SequenceStatus.FINISHED_LENGTH}[reason]
    scheduler = make_scheduler(max_model_len=9)
    seq = make_seq(prompt, max_tokens=50)
    scheduler.add(seq)
    run(scheduler)
    assert seq.finish_reason == "length" and seq.num_tokens == 9


def test_abort_frees_blocks_at_once_wherever_the_request_is():
    scheduler = make_scheduler(num_blocks=16, max_seqs=1)
    model = FakeModel(scheduler.block_manager)
    running, queued = make_seq(list(range(9))), make_seq(list(range(5)))
    scheduler.add(running)
    scheduler.add(queued)
    scheduler.update(model.run(scheduler.schedule()))
    assert scheduler.block_manager.num_free_blocks < 16
    assert scheduler.abort(queued.request_id) == [queued]
    assert queued.status is SequenceStatus.FINISHED_ABORTED and queued.finish_reason == "abort"
    out = scheduler.schedule()
    tokens = model.run(out)
    assert scheduler.abort(running.request_id) == [running]  # between schedule and update
    assert scheduler.block_manager.num_free_blocks == 16
    assert scheduler.update(tokens) == []
    assert not scheduler.has_unfinished and scheduler.abort("unknown") == []


def test_finish_lets_the_engine_stop_on_a_stop_string():
    scheduler = make_scheduler()
    seq = make_seq([1, 2, 3], max_tokens=20)
    scheduler.add(seq)
    model = FakeModel(scheduler.block_manager)
    scheduler.update(model.run(scheduler.schedule()))
    scheduler.finish(seq, "stop")
    assert seq.status is SequenceStatus.FINISHED_STOPPED and not scheduler.has_unfinished
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_blocks


def test_update_refuses_tokens_the_schedule_did_not_ask_for():
    scheduler = make_scheduler(budget=4)
    seq = make_seq(list(range(10)))
    scheduler.add(seq)
    scheduler.schedule()
    with pytest.raises(ValueError, match="no token"):
        scheduler.update({seq.seq_id: [1]})
    scheduler.schedule()
    with pytest.raises(ValueError, match="not scheduled"):
        scheduler.update({12345: [1]})
    out = scheduler.schedule()
    with pytest.raises(RuntimeError, match="update"):
        scheduler.schedule()
    assert out.scheduled


# ----------------------------------------------------------------- prefix reuse

def test_a_repeated_prompt_starts_after_its_cached_prefix():
    scheduler = make_scheduler(block_size=4)
    model = FakeModel(scheduler.block_manager)
    first = make_seq(list(range(1, 12)), max_tokens=2)
    scheduler.add(first)
    run(scheduler, model)
    again = make_seq(list(range(1, 12)), max_tokens=2)
    scheduler.add(again)
    out = scheduler.schedule()
    assert out.scheduled[0].start_position == 8 and out.scheduled[0].num_new_tokens == 3
    assert again.num_cached_tokens == 8
    assert scheduler.block_manager.prefix_cache_hits == 8
    scheduler.update(model.run(out))
    run(scheduler, model)
    assert again.output_token_ids == first.output_token_ids


# ------------------------------------------------------------------ speculation

class DraftProposer:
    """Drafts that follow the true continuation for a random while, then go wrong."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self, seq: Sequence, k: int) -> list[int]:
        k = self.rng.randrange(k + 1)
        truth = continuation(seq.all_token_ids, k, seq.sample_index)
        right = self.rng.randrange(k + 1)
        return truth[:right] + [(t + 1) % VOCAB for t in truth[right:]]


def test_speculative_lookahead_gives_the_same_output_as_plain_decoding():
    scheduler = make_scheduler(num_blocks=64, budget=64, max_model_len=60)
    seqs = [make_seq([i, i + 1, i + 2], max_tokens=30) for i in range(1, 5)]
    for seq in seqs:
        scheduler.add(seq)
    steps = run(scheduler, lookahead=3, proposer=DraftProposer(random.Random(0)))
    drafted = [s for out in steps for s in out.scheduled if s.num_lookahead]
    assert drafted and all(s.num_new_tokens == 1 + s.num_lookahead for s in drafted)
    assert len(steps) < 30  # accepted drafts saved steps
    assert_all_match_solo(scheduler, seqs)


def test_lookahead_is_clipped_to_the_context_and_max_tokens():
    scheduler = make_scheduler(max_model_len=12)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=3)
    scheduler.add(seq)
    run(scheduler, lookahead=5, proposer=lambda s, k: continuation(s.all_token_ids, k))
    assert seq.output_token_ids == continuation([1, 2, 3, 4, 5, 6, 7, 8], 3)
    scheduler = make_scheduler(max_model_len=10)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8], max_tokens=30)
    scheduler.add(seq)
    run(scheduler, lookahead=5, proposer=lambda s, k: continuation(s.all_token_ids, k))
    assert seq.num_tokens == 10 and seq.finish_reason == "length"


# ------------------------------------------------------------------------ fork

def test_fork_makes_parallel_samples_with_copy_on_write():
    scheduler = make_scheduler(num_blocks=32, block_size=4)
    model = FakeModel(scheduler.block_manager)
    parent = make_seq([9, 8, 7, 6, 5, 4], max_tokens=10)
    scheduler.add(parent)
    out = scheduler.schedule()
    assert out.scheduled[0].samples
    children = [scheduler.fork(parent, next(_ids), sample_index=i) for i in (1, 2)]
    tokens = model.run(out)
    for child in children:  # the engine samples each child's token from the parent's logits
        tokens[child.seq_id] = [next_token(child.all_token_ids, child.sample_index)]
    scheduler.update(tokens)
    run(scheduler, model)
    assert model.copies_done >= 2  # the shared partial block was copied for two writers
    outputs = {tuple(s.output_token_ids) for s in [parent, *children]}
    assert len(outputs) == 3
    assert_all_match_solo(scheduler, [parent, *children])
    assert scheduler.abort(parent.request_id) == []


def test_abort_ends_every_sample_of_a_request():
    scheduler = make_scheduler()
    parent = make_seq([1, 2, 3], max_tokens=10)
    scheduler.add(parent)
    child = scheduler.fork(parent, next(_ids), sample_index=1)
    assert list(scheduler.waiting) == [parent, child]
    assert set(scheduler.abort(parent.request_id)) == {parent, child}
    assert not scheduler.has_unfinished
