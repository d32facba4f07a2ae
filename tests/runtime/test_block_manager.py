"""BlockManager: slots, reference counts, prefix caching with collision checks, copy-on-write.

The property test drives the manager the way a model runner would, with a fake KV cache whose
slot holds the whole token prefix its keys and values depend on. Reading a sequence's context
back through its block table then proves that prefix hits, copies and frees never hand a sequence
KV that belongs to other tokens.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.runtime import block_manager as bm_module
from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.sequence import Sequence

BS = 4


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_id=f"r{seq_id}", prompt_token_ids=tokens)


class FakeCache:
    """A KV cache of token prefixes, written and read through a BlockManager like a runner does."""

    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.slots: dict[int, tuple[int, ...]] = {}

    def copy(self, copies: list[tuple[int, int]]) -> None:
        bs = self.manager.block_size
        for src, dst in copies:
            for offset in range(bs):
                value = self.slots.get(src * bs + offset)
                if value is None:
                    self.slots.pop(dst * bs + offset, None)
                else:
                    self.slots[dst * bs + offset] = value

    def compute(self, seq: Sequence, count: int) -> bool:
        """Allocate, copy and write the next ``count`` tokens of ``seq``; False when out of blocks."""
        if not self.manager.can_allocate(seq, count):
            return False
        self.copy(self.manager.allocate_for(seq, count))
        tokens = seq.all_token_ids
        start = seq.num_computed_tokens
        for pos, slot in zip(range(start, start + count), self.manager.slots_for(seq, start, count)):
            self.slots[slot] = tuple(tokens[: pos + 1])
        seq.num_computed_tokens += count
        self.manager.mark_computed(seq, seq.num_computed_tokens)
        return True

    def check_context(self, seq: Sequence) -> None:
        tokens = seq.all_token_ids
        n = seq.num_computed_tokens
        for pos, slot in zip(range(n), self.manager.slots_for(seq, 0, n)):
            assert self.slots.get(slot) == tuple(tokens[: pos + 1]), (seq, pos)


def check_invariants(manager: BlockManager, live: list[Sequence], cache: FakeCache) -> None:
    free = manager.free_block_ids()
    assert len(free) == len(set(free)) == manager.num_free_blocks
    holders: dict[int, int] = {}
    for seq in live:
        for block in seq.block_table:
            holders[block] = holders.get(block, 0) + 1
    assert not set(free) & set(holders), "a block is both free and used"
    assert len(free) + len(holders) == manager.num_blocks, "a block leaked"
    for block in range(manager.num_blocks):
        assert manager.ref_count(block) == holders.get(block, 0)
    owner: dict[int, tuple[int, ...]] = {}  # slot -> prefix that any holder expects there
    for seq in live:
        cache.check_context(seq)
        assert seq.num_cached_tokens % manager.block_size == 0
        assert seq.num_cached_tokens <= max(0, seq.num_tokens - 1)
        tokens = seq.all_token_ids
        n = seq.num_computed_tokens
        for pos, slot in zip(range(n), manager.slots_for(seq, 0, n)):
            expected = tuple(tokens[: pos + 1])
            # A slot shared by live sequences is read-only shared prefix: all agree on it.
            assert owner.setdefault(slot, expected) == expected


@contextmanager
def hash_function(fn):
    if fn is None:
        yield
    else:
        with mock.patch.object(bm_module, "hash_block", fn):
            yield


HASHES = {
    "python": None,
    "constant": lambda parent, tokens: 0,
    "weak": lambda parent, tokens: sum(tokens) % 3,
    "ignores_parent": lambda parent, tokens: hash(tokens) % 7,
}

# Prompts are built from a few block-sized words, so equal blocks recur under many prefixes.
WORDS = [[0, 0, 1, 1], [1, 2, 0, 2], [2, 2, 2, 1]]


def random_prompt(seed: int, tail: int) -> list[int]:
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(rng.randrange(6))]
    return [t for word in words for t in word] + [rng.randrange(3) for _ in range(tail)]


ops = st.lists(
    st.tuples(st.sampled_from(["add", "compute", "compute", "compute", "fork", "free"]),
              st.integers(0, 10_000), st.integers(1, 9)),
    min_size=1, max_size=40,
)


@pytest.mark.parametrize("hash_name", list(HASHES))
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(ops=ops, num_blocks=st.integers(6, 20))
def test_random_operations_keep_every_invariant(hash_name, ops, num_blocks):
    with hash_function(HASHES[hash_name]):
        run_operations(ops, num_blocks)


def run_operations(ops, num_blocks):
    manager = BlockManager(num_blocks, block_size=BS)
    cache = FakeCache(manager)
    live: list[Sequence] = []
    next_id = 0
    for op, a, b in ops:
        if op == "add" or not live:
            live.append(make_seq(next_id, random_prompt(a % 50, b)))
            next_id += 1
        elif op == "compute":
            seq = live[a % len(live)]
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(a % 3)  # the token the model sampled
            done = max(seq.num_computed_tokens, manager.lookup_prefix(seq))  # after a prefix hit
            count = min(b, seq.num_tokens - done)
            if not cache.compute(seq, count):
                # Out of blocks is an answer, not a crash; preempt the way the scheduler does.
                manager.free(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = 0
        elif op == "fork":
            parent = live[a % len(live)]
            live.append(parent.fork(next_id, manager, sample_index=1))
            next_id += 1
        else:
            manager.free(live.pop(a % len(live)))
        check_invariants(manager, live, cache)
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == num_blocks
    assert all(manager.ref_count(b) == 0 for b in range(num_blocks))
    assert manager.usage == 0.0


# ----------------------------------------------------------------- unit tests

def filled(manager: BlockManager, seq: Sequence) -> FakeCache:
    cache = FakeCache(manager)
    assert cache.compute(seq, seq.num_tokens)
    return cache


def test_slots_follow_the_block_table():
    manager = BlockManager(8, block_size=BS)
    seq = make_seq(0, list(range(10)))
    assert manager.allocate_for(seq, 10) == []
    assert len(seq.block_table) == 3
    slots = manager.slots_for(seq, 0, 10)
    assert slots == [seq.block_table[p // BS] * BS + p % BS for p in range(10)]
    assert manager.slots_for(seq, 8, 2) == slots[8:]
    with pytest.raises(ValueError):
        manager.slots_for(seq, 10, 3)


def test_prefix_hit_reuses_blocks_and_keeps_the_last_token_to_compute():
    manager = BlockManager(16, block_size=BS)
    first = make_seq(0, list(range(10)))
    cache = filled(manager, first)
    first_blocks = list(first.block_table)
    manager.free(first)
    second = make_seq(1, list(range(10)) + [99])
    assert manager.lookup_prefix(second) == 8
    cache.compute(second, 3)
    assert second.num_cached_tokens == 8 and second.num_computed_tokens == 11
    assert second.block_table[:2] == first_blocks[:2]
    cache.check_context(second)
    assert manager.prefix_cache_hits == 8 and manager.prefix_cache_queries == 10 + 11


def test_a_block_aligned_prompt_never_hits_entirely():
    manager = BlockManager(16, block_size=BS)
    filled(manager, make_seq(0, list(range(8))))
    again = make_seq(1, list(range(8)))
    # The last block holds the last prompt token, which must be computed for its logits.
    assert manager.lookup_prefix(again) == 4


def test_live_blocks_are_shared_and_counted():
    manager = BlockManager(16, block_size=BS)
    first = make_seq(0, list(range(9)))
    filled(manager, first)
    second = make_seq(1, list(range(9)))
    manager.allocate_for(second, 1)
    assert second.block_table[:2] == first.block_table[:2]
    assert [manager.ref_count(b) for b in second.block_table] == [2, 2, 1]


def test_freed_cached_blocks_are_evicted_last_and_oldest_first():
    manager = BlockManager(6, block_size=BS)
    old = make_seq(0, list(range(8)))
    filled(manager, old)
    old_blocks = list(old.block_table)
    manager.free(old)  # two registered blocks, now free but findable
    assert manager.num_free_blocks == 6
    plain = make_seq(1, [50 + i for i in range(16)])
    filled(manager, plain)  # takes the 4 plain blocks first
    assert not set(plain.block_table) & set(old_blocks)
    assert manager.lookup_prefix(make_seq(2, list(range(8)) + [7])) == 8
    one_more = make_seq(3, [90, 91])
    filled(manager, one_more)  # must evict; the tail block was freed first, so goes first
    assert one_more.block_table == [old_blocks[1]]
    assert manager.lookup_prefix(make_seq(4, list(range(8)) + [7])) == 4


def test_out_of_blocks_is_reported_not_raised_by_can_allocate():
    manager = BlockManager(2, block_size=BS)
    seq = make_seq(0, list(range(12)))
    assert not manager.can_allocate(seq, 12)
    with pytest.raises(RuntimeError):
        manager.allocate_for(seq, 12)
    assert manager.can_allocate(seq, 8)
    manager.allocate_for(seq, 8)
    assert manager.num_free_blocks == 0 and manager.usage == 1.0


def test_fork_shares_blocks_and_copy_on_write_copies_the_partial_block():
    manager = BlockManager(8, block_size=BS)
    parent = make_seq(0, list(range(6)))
    cache = filled(manager, parent)
    child = parent.fork(1, manager)
    assert child.block_table == parent.block_table
    assert all(manager.ref_count(b) == 2 for b in parent.block_table)
    parent.output_token_ids.append(40)
    child.output_token_ids.append(41)
    shared_tail = parent.block_table[1]
    copies = manager.allocate_for(parent, 1)
    assert copies == [(shared_tail, parent.block_table[1])]
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    cache.copy(copies)
    assert manager.allocate_for(child, 1) == []  # now the only holder: writes in place
    assert child.block_table[1] == shared_tail
    for seq in (parent, child):
        start = seq.num_computed_tokens
        slot = manager.slots_for(seq, start, 1)[0]
        cache.slots[slot] = tuple(seq.all_token_ids)
        seq.num_computed_tokens += 1
    cache.check_context(parent)
    cache.check_context(child)


def test_fork_at_a_block_boundary_needs_no_copy():
    manager = BlockManager(8, block_size=BS)
    parent = make_seq(0, list(range(8)))
    filled(manager, parent)
    child = parent.fork(1, manager)
    parent.output_token_ids.append(1)
    assert manager.allocate_for(parent, 1) == []
    assert len(parent.block_table) == 3 and parent.block_table[:2] == child.block_table


def test_copy_on_write_counts_toward_can_allocate():
    manager = BlockManager(3, block_size=BS)
    parent = make_seq(0, list(range(6)))
    filled(manager, parent)
    child = parent.fork(1, manager)
    parent.output_token_ids.append(1)
    assert manager.can_allocate(parent, 1)  # one fresh block for the private copy
    manager.allocate_for(parent, 1)
    child.output_token_ids.append(2)
    assert manager.allocate_for(child, 1) == []
    assert manager.num_free_blocks == 0


def test_a_constant_hash_never_reuses_wrong_content():
    with hash_function(lambda parent, tokens: 0):
        manager = BlockManager(16, block_size=BS)
        filled(manager, make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]))
        other = make_seq(1, [9, 9, 9, 9, 5, 6, 7, 8, 9])
        assert manager.lookup_prefix(other) == 0
        same = make_seq(2, [1, 2, 3, 4, 0, 0, 0, 0, 0])
        assert manager.lookup_prefix(same) == 4


def test_a_block_matching_under_another_prefix_is_not_reused():
    """A hash that ignores the parent makes the second blocks of two prompts collide; the
    registration's serial check refuses the one cached under the other prefix."""
    with hash_function(lambda parent, tokens: hash(tokens)):
        manager = BlockManager(8, block_size=BS)
        a = make_seq(0, [1, 1, 1, 1, 7, 7, 7, 7, 0])
        filled(manager, a)
        manager.free(a)
        b = make_seq(1, [2, 2, 2, 2, 7, 7, 7, 7, 0])
        assert manager.lookup_prefix(b) == 0
        cache = filled(manager, b)
        manager.free(b)
        c = make_seq(2, [2, 2, 2, 2, 7, 7, 7, 7, 5])
        assert manager.lookup_prefix(c) == 4  # b's first block only; [7,7,7,7] is a's
        cache.compute(c, c.num_tokens - 4)
        cache.check_context(c)


@pytest.mark.parametrize("hash_fn", [None, lambda parent, tokens: hash(tokens)])
def test_a_block_whose_prefix_was_evicted_is_replaced(hash_fn):
    """x's second block is registered on top of a's first block (x's own first block is a
    duplicate). Once a's block is evicted, x's second block is unreachable; a new sequence with
    the same prefix registers its own blocks instead and later ones hit them."""
    with hash_function(hash_fn):
        manager = BlockManager(10, block_size=BS)
        cache = FakeCache(manager)
        a = make_seq(0, [1, 1, 1, 1, 0])
        x = make_seq(1, [1, 1, 1, 1, 7, 7, 7, 7, 9])
        assert cache.compute(x, 2)  # x starts before a's block exists: no hit
        assert cache.compute(a, 5)
        assert cache.compute(x, 7)
        manager.free(a)
        filler = make_seq(2, list(range(100, 100 + 4 * manager.num_free_blocks)))
        assert cache.compute(filler, filler.num_tokens)  # evicts a's block
        manager.free(filler)
        z = make_seq(3, [1, 1, 1, 1, 7, 7, 7, 7, 5])
        assert manager.lookup_prefix(z) == 0
        assert cache.compute(z, z.num_tokens)
        w = make_seq(4, [1, 1, 1, 1, 7, 7, 7, 7, 6])
        assert manager.lookup_prefix(w) == 8
        assert cache.compute(w, 1)
        assert w.block_table[:2] == z.block_table[:2]
        for seq in (x, z, w):
            cache.check_context(seq)


def test_prefix_caching_can_be_turned_off():
    manager = BlockManager(8, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(0, list(range(9)))
    filled(manager, seq)
    manager.free(seq)
    assert manager.lookup_prefix(make_seq(1, list(range(9)))) == 0
    assert manager.prefix_cache_queries == 0


def test_constructor_refuses_an_empty_pool():
    with pytest.raises(QuantkitError, match="num_blocks"):
        BlockManager(0)
    with pytest.raises(QuantkitError, match="block_size"):
        BlockManager(4, block_size=0)
