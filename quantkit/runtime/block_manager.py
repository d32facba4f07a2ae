"""The pool of paged-KV blocks: who holds which block, and which full blocks can be reused.

The KV cache is one preallocated tensor of ``num_blocks * block_size`` slots per layer; this class
only hands out block ids. Token ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

Three ideas, as in vLLM:

* **Reference counts.** A block may sit in several block tables (a shared prompt prefix, or the
  parent and child of ``fork``); it returns to the free pool when the last holder lets go.
* **Prefix caching.** When a block becomes full and its KV computed (``mark_computed``), it is
  registered under ``hash_block(parent_hash, tokens)``, a hash chained on its predecessor's so that
  it names the whole prefix. A later sequence whose prompt starts with the same blocks takes them
  instead of computing them. A freed registered block stays findable until its id is needed again;
  free blocks are reused plain ones first, then registered ones least-recently-freed first.
  Hashes can collide, so each registered block also keeps its tokens and the serial number of the
  registration it extends; a hit needs both to match, so a collision costs a miss, never wrong KV.
* **Copy-on-write.** Shared blocks are read-only. Before a sequence writes into a block it shares
  (the partly filled last block after ``fork``), ``allocate_for`` gives it a fresh block and
  returns ``(src, dst)``: the model runner must copy block ``src`` into ``dst`` (all layers, K and
  V) before the step's forward pass writes anything.

Running out of blocks is not an error: ``can_allocate`` says no and the scheduler preempts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from quantkit.errors import QuantkitError

if TYPE_CHECKING:
    from quantkit.runtime.sequence import Sequence

BlockCopy = tuple[int, int]  # (src_block, dst_block)


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained on the hash of the block before it (None for the first)."""
    return hash((parent_hash, token_ids))


class _Link(NamedTuple):
    """Identity of a registered prefix: its chained hash and the registration's serial number."""

    hash: int
    serial: int


_ROOT = _Link(hash=None, serial=-1)  # the empty prefix every first block extends


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set while registered in the prefix cache
    token_ids: tuple[int, ...] | None = None
    serial: int = -1  # unique per registration, never reused
    parent_serial: int = -1  # serial of the registered block this one extends


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise QuantkitError(f"num_blocks = {num_blocks}: the KV cache needs at least one block")
        if block_size < 1:
            raise QuantkitError(f"block_size = {block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # oldest freed first
        self._cached: dict[int, int] = {}  # chained hash -> block id
        self._live_serials: set[int] = {_ROOT.serial}
        self._next_serial = 0
        # Per sequence: the link of each of its full, computed blocks (None ends a broken chain).
        self._chains: dict[int, list[_Link | None]] = {}
        self.prefix_cache_queries = 0  # tokens looked up on first allocations
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    # ----------------------------------------------------------------- state
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some sequence (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def free_block_ids(self) -> list[int]:
        return [*self._free_plain, *self._free_cached]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ allocation
    def lookup_prefix(self, seq: Sequence) -> int:
        """Tokens a first allocation of ``seq`` would take from the cache (no side effects).

        Always a whole number of blocks and at most ``num_tokens - 1``: the last token is computed
        so the model yields logits for it.
        """
        if seq.block_table or not self.enable_prefix_caching:
            return 0
        return len(self._find_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether ``allocate_for(seq, num_new_tokens)`` would find enough free blocks."""
        return self._fits(*self._plan(seq, num_new_tokens))

    def allocate_for(self, seq: Sequence, num_new_tokens: int) -> list[BlockCopy]:
        """Give ``seq`` slots for its next ``num_new_tokens`` tokens; return copies to perform.

        The tokens to be written are positions ``num_computed_tokens .. +num_new_tokens`` where
        ``num_computed_tokens`` is read *after* this call: on a sequence's first allocation the
        longest cached prefix is taken and ``num_cached_tokens`` / ``num_computed_tokens`` move
        past it. Call ``can_allocate`` first; running out here is a bug of the caller.
        """
        hits, num_fresh = self._plan(seq, num_new_tokens)
        if not self._fits(hits, num_fresh):
            raise RuntimeError(f"out of KV blocks for seq {seq.seq_id}; call can_allocate first")
        if not seq.block_table:
            self._take_hits(seq, hits)
        start = seq.num_computed_tokens
        copies = self._copy_on_write(seq, start, start + num_new_tokens)
        while len(seq.block_table) < self.blocks_for(start + num_new_tokens):
            seq.block_table.append(self._take_fresh())
        return copies

    def slots_for(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Slot ids of positions ``start .. start+count-1`` of ``seq``."""
        bs, table = self.block_size, seq.block_table
        if self.blocks_for(start + count) > len(table):
            raise ValueError(f"seq {seq.seq_id} has no blocks for positions up to {start + count - 1}")
        return [table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def free(self, seq: Sequence) -> None:
        """Let go of every block of ``seq``; registered blocks stay findable until reused."""
        # Tail first, so the least shareable blocks are the first to be evicted.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        self._chains.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make ``child`` share every block of ``parent`` (copy-on-write on the next write)."""
        if child.block_table:
            raise ValueError(f"fork target seq {child.seq_id} already holds blocks")
        for block_id in parent.block_table:
            self._blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        if parent.seq_id in self._chains:
            self._chains[child.seq_id] = list(self._chains[parent.seq_id])

    def mark_computed(self, seq: Sequence, upto: int) -> None:
        """Register the blocks of ``seq`` that are full and computed within its first ``upto`` tokens."""
        if not self.enable_prefix_caching:
            return
        chain = self._chains.setdefault(seq.seq_id, [])
        full = min(upto, seq.num_tokens, len(seq.block_table) * self.block_size) // self.block_size
        bs = self.block_size
        for i in range(len(chain), full):
            if chain and chain[-1] is None:
                return
            parent = chain[-1] if chain else _ROOT
            tokens = tuple(seq.token_ids_between(i * bs, (i + 1) * bs))
            chain.append(self._register(seq.block_table[i], parent, tokens))

    # ------------------------------------------------------------- internals
    def _plan(self, seq: Sequence, num_new_tokens: int) -> tuple[list[tuple[int, _Link]], int]:
        """(prefix hits to take, number of fresh blocks needed) for an allocation."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens = {num_new_tokens} must be >= 0")
        table = seq.block_table
        if table:
            hits, computed, held = [], seq.num_computed_tokens, len(table)
        else:
            if seq.num_computed_tokens:
                raise RuntimeError(f"seq {seq.seq_id} has computed tokens but no blocks")
            hits = self._find_prefix(seq) if self.enable_prefix_caching else []
            computed = held = len(hits)
            computed *= self.block_size
        end = computed + num_new_tokens
        num_fresh = max(0, self.blocks_for(end) - held)
        if table:  # copy-on-write needs a fresh block per shared block written into
            num_fresh += sum(1 for i in self._write_range(computed, end, held)
                             if self._blocks[table[i]].ref_count > 1)
        return hits, num_fresh

    def _fits(self, hits: list[tuple[int, _Link]], num_fresh: int) -> bool:
        # A hit on a free cached block takes that block out of the free pool too.
        free_hits = sum(1 for block_id, _ in hits if self._blocks[block_id].ref_count == 0)
        return free_hits + num_fresh <= self.num_free_blocks

    def _write_range(self, start: int, end: int, held: int) -> range:
        """Indices of already-held blocks that positions start..end-1 write into."""
        if end <= start:
            return range(0)
        return range(start // self.block_size, min(held, (end - 1) // self.block_size + 1))

    def _find_prefix(self, seq: Sequence) -> list[tuple[int, _Link]]:
        bs = self.block_size
        hits: list[tuple[int, _Link]] = []
        parent = _ROOT
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids_between(i * bs, (i + 1) * bs))
            block_id = self._cached.get(hash_block(parent.hash, tokens))
            if block_id is None:
                break
            block = self._blocks[block_id]
            if block.token_ids != tokens or block.parent_serial != parent.serial:
                break  # a hash collision, or a block left from an evicted prefix
            parent = _Link(block.hash, block.serial)
            hits.append((block_id, parent))
        return hits

    def _take_hits(self, seq: Sequence, hits: list[tuple[int, _Link]]) -> None:
        for block_id, _ in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self._chains[seq.seq_id] = [link for _, link in hits]
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached_tokens

    def _copy_on_write(self, seq: Sequence, start: int, end: int) -> list[BlockCopy]:
        copies = []
        table = seq.block_table
        for i in self._write_range(start, end, len(table)):
            old = table[i]
            if self._blocks[old].ref_count <= 1:
                continue
            table[i] = self._take_fresh()
            self._blocks[old].ref_count -= 1  # still >= 1: someone else keeps it
            if i * self.block_size < start:  # it holds tokens this sequence still needs
                copies.append((old, table[i]))
        return copies

    def _take_fresh(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)
            self._unregister(self._blocks[block_id])
        self._blocks[block_id].ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is None:
                self._free_plain.append(block_id)
            else:
                self._free_cached[block_id] = None

    def _register(self, block_id: int, parent: _Link, tokens: tuple[int, ...]) -> _Link | None:
        """Register a full computed block; return its prefix's link, or None on a collision."""
        key = hash_block(parent.hash, tokens)
        owner_id = self._cached.get(key)
        if owner_id is not None:
            owner = self._blocks[owner_id]
            if owner.token_ids == tokens and owner.parent_serial == parent.serial:
                return _Link(key, owner.serial)  # same prefix already cached (maybe this block)
            if owner.parent_serial in self._live_serials:
                return None  # a true collision: leave this block out of the cache
            self._unregister(owner)  # stale: its prefix was evicted, so nothing can reach it
        block = self._blocks[block_id]
        if block.hash is not None:
            return None  # registered under another prefix; cannot happen with one hash function
        block.hash, block.token_ids, block.parent_serial = key, tokens, parent.serial
        block.serial = self._next_serial
        self._next_serial += 1
        self._live_serials.add(block.serial)
        self._cached[key] = block_id
        return _Link(key, block.serial)

    def _unregister(self, block: _Block) -> None:
        if self._cached.get(block.hash) == block.block_id:
            del self._cached[block.hash]
        self._live_serials.discard(block.serial)
        if block.ref_count == 0 and block.block_id in self._free_cached:
            del self._free_cached[block.block_id]
            self._free_plain.append(block.block_id)
        block.hash = block.token_ids = None
        block.serial = block.parent_serial = -1
