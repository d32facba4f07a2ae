"""CUDA graphs of the decode step, one per batch-size bucket.

A decode step (one new token per sequence) launches a few hundred small kernels; replaying them
as one captured graph removes the per-kernel launch cost that otherwise dominates batch-1 decode.
Inputs live in static buffers: a step copies its batch into the first B rows (two host-to-device
copies from pinned staging buffers), pads to the next captured size with rows that write no
KV-cache slot (slot -1) and attend to one key, replays, and returns the first B rows of logits.

Every graph is captured with the same block-table width and ``max_seq_len`` (the cache capacity a
sequence can reach), so the attention kernel's launch does not depend on the batch's lengths.
``capture=False`` runs the same padded static-buffer path eagerly (the CPU tests use it to check
the padding; the GPU tests check that replay equals eager).
"""

from __future__ import annotations

import torch

from quantkit.runtime.forward_batch import ForwardBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model, kv_cache, *, max_batch: int, max_blocks_per_seq: int, block_size: int,
                 capture: bool = True) -> None:
        self.model, self.kv_cache = model, kv_cache
        self.sizes = [b for b in BUCKETS if b <= max(1, max_batch)]
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.max_seq_len = max_blocks_per_seq * block_size
        self.capture = capture
        device, n = model.device, self.max_batch
        self._ids64 = torch.zeros(3, n, dtype=torch.int64, device=device)  # input_ids, positions, slots
        # kernels read seq_lens and block-table rows as contiguous arrays: separate buffers
        self._seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self._tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        # two sets of pinned staging buffers, used in turn: with asynchronous scheduling a step is
        # staged while the previous one (whose copies may not have run yet) is still queued
        self._staging = [(torch.zeros(3, n, dtype=torch.int64, pin_memory=pin),
                          torch.zeros(n, dtype=torch.int32, pin_memory=pin),
                          torch.zeros(n, self.max_blocks, dtype=torch.int32, pin_memory=pin)) for _ in range(2)]
        self._turn = 0
        self._query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self._logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    def fits(self, num_seqs: int, table_width: int) -> bool:
        return 0 < num_seqs <= self.max_batch and table_width <= self.max_blocks

    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Logits (B, vocab) float32 of one decode token per sequence.

        ``token_ids`` may be a (B,) tensor on the device (the previous step's sampled tokens, for
        asynchronous scheduling): it is copied into the input buffer on the device, no host round trip."""
        count = len(positions)
        size = next(b for b in self.sizes if b >= count)
        on_device = isinstance(token_ids, torch.Tensor)
        self._stage([0] * count if on_device else token_ids, positions, slots, seq_lens, block_tables, size)
        if on_device:
            self._ids64[0, :count].copy_(token_ids, non_blocking=True)
        if not self.capture:
            return self.model.forward(self._batch(size), self.kv_cache)[:count]
        graph, logits = self._graphs[size]
        graph.replay()
        return logits[:count].clone()  # the next replay overwrites the static output

    # ------------------------------------------------------------------ internals
    def _stage(self, token_ids, positions, slots, seq_lens, block_tables, size: int) -> None:
        count = len(token_ids)
        host64, lens, tables = self._staging[self._turn]
        self._turn ^= 1
        host64[:, :size] = 0
        host64[2, :size] = -1  # padding rows write no cache slot
        host64[0, :count] = torch.tensor(token_ids, dtype=torch.int64)
        host64[1, :count] = torch.tensor(positions, dtype=torch.int64)
        host64[2, :count] = torch.tensor(slots, dtype=torch.int64)
        lens[:size] = 1  # padding rows attend to one key
        lens[:count] = torch.tensor(seq_lens, dtype=torch.int32)
        width = max(len(table) for table in block_tables)
        tables[:size, :width] = 0
        for row, table in enumerate(block_tables):
            tables[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
        self._ids64[:, :size].copy_(host64[:, :size], non_blocking=True)
        self._seq_lens[:size].copy_(lens[:size], non_blocking=True)
        # only the first `width` columns can be read (seq_lens bound them); older columns are stale but unread
        self._tables[:size, :width].copy_(tables[:size, :width], non_blocking=True)

    def _batch(self, size: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self._ids64[0, :size], positions=self._ids64[1, :size], slot_mapping=self._ids64[2, :size],
            block_tables=self._tables[:size], query_start_loc=self._query_start_loc[:size + 1],
            seq_lens=self._seq_lens[:size], max_seq_len=self.max_seq_len,
            logits_indices=self._logits_indices[:size])

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.model.device)
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            self._stage([0] * size, [0] * size, [-1] * size, [1] * size, [[0]] * size, size)
            batch = self._batch(size)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.model.forward(batch, self.kv_cache)  # compiles the kernels outside capture
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize(self.model.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.forward(batch, self.kv_cache)
            self._graphs[size] = (graph, logits)
        torch.cuda.synchronize(self.model.device)
