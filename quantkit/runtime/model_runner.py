"""Runs one scheduled step: copies shared blocks, packs the flat batch, runs the model.

It owns the paged KV cache (one pool of blocks per layer, sized from ``--kv-cache-tokens`` on
the CPU or from free accelerator memory and ``gpu_memory_utilization``) and returns, for each
sequence that samples in this step, the logits of its last ``1 + num_lookahead`` positions.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.decode_graphs import DecodeGraphs
from quantkit.runtime.forward_batch import build_forward_batch
from quantkit.runtime.paged_llama import PagedLlama
from quantkit.runtime.scheduler import SchedulerOutput


def plan_num_blocks(model: PagedLlama, block_size: int, *, kv_cache_tokens: int | None,
                    gpu_memory_utilization: float) -> int:
    """KV blocks to allocate: from a token count, or from free accelerator memory."""
    if kv_cache_tokens is not None:
        if kv_cache_tokens < block_size:
            raise QuantkitError(f"--kv-cache-tokens must be at least the block size ({block_size}), "
                                f"got {kv_cache_tokens}")
        return kv_cache_tokens // block_size
    if model.device.type != "cuda":
        return max(1, 65536 // block_size)  # CPU default: 64k tokens
    if not 0 < gpu_memory_utilization <= 1:
        raise QuantkitError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    free, total = torch.cuda.mem_get_info(model.device)
    budget = free - (1 - gpu_memory_utilization) * total
    blocks = int(budget // (model.kv_bytes_per_token() * block_size))
    if blocks < 1:
        raise QuantkitError("no accelerator memory left for the KV cache; lower the model size or raise "
                            "--gpu-memory-utilization")
    return blocks


class ModelRunner:
    """``decode_graphs``: capture CUDA graphs for decode batches up to ``max_num_seqs`` (CUDA only;
    ``"eager-static"`` runs the graphs' padded static-buffer path without capturing, for tests)."""

    def __init__(self, model: PagedLlama, block_manager: BlockManager, *, decode_graphs: bool | str = False,
                 max_num_seqs: int = 256, max_model_len: int | None = None) -> None:
        self.model = model
        self.block_manager = block_manager
        self.kv_cache = model.new_kv_cache(block_manager.num_blocks, block_manager.block_size)
        self.graphs = None
        if decode_graphs:
            size = block_manager.block_size
            max_len = min(max_model_len or block_manager.num_blocks * size, block_manager.num_blocks * size)
            self.graphs = DecodeGraphs(model, self.kv_cache, max_batch=max_num_seqs,
                                       max_blocks_per_seq=-(-max_len // size), block_size=size,
                                       capture=decode_graphs is True)

    def run(self, out: SchedulerOutput, drafts: dict[int, list[int]] | None = None) -> dict[int, torch.Tensor]:
        """Logits (num_logits, vocab) per sampling sequence id; ``drafts`` are the draft tokens
        appended to each decode with ``num_lookahead > 0``."""
        self._copy_blocks(out.block_copies)
        drafts = drafts or {}
        if self._is_graph_decode(out):
            return self._run_graph_decode(out)
        token_ids, starts, slots, tables, logits_per_seq = [], [], [], [], []
        for sched in out.scheduled:
            seq, n = sched.seq, sched.num_new_tokens
            real = n - sched.num_lookahead
            ids = seq.token_ids_between(sched.start_position, sched.start_position + real)
            ids += drafts.get(seq.seq_id, [])[: sched.num_lookahead]
            token_ids.append(ids)
            starts.append(sched.start_position)
            slots.append(self.block_manager.slots_for(seq, sched.start_position, n))
            tables.append(seq.block_table)
            logits_per_seq.append(sched.num_logits)
        batch = build_forward_batch(token_ids, starts, slots, tables, logits_per_seq, self.model.device)
        logits = self.model.forward(batch, self.kv_cache)
        result, row = {}, 0
        for sched, count in zip(out.scheduled, logits_per_seq):
            if count:
                result[sched.seq.seq_id] = logits[row:row + count]
                row += count
        return result

    def _is_graph_decode(self, out: SchedulerOutput) -> bool:
        if self.graphs is None or not out.scheduled:
            return False
        if any(s.num_new_tokens != 1 or s.num_lookahead or s.num_logits != 1 for s in out.scheduled):
            return False
        return self.graphs.fits(len(out.scheduled), max(len(s.seq.block_table) for s in out.scheduled))

    def _run_graph_decode(self, out: SchedulerOutput) -> dict[int, torch.Tensor]:
        ids, positions, slots, lens, tables = [], [], [], [], []
        for sched in out.scheduled:
            seq, pos = sched.seq, sched.start_position
            ids.append(seq.token_ids_between(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(self.block_manager.slots_for(seq, pos, 1)[0])
            lens.append(pos + 1)
            tables.append(seq.block_table)
        logits = self.graphs.run(ids, positions, slots, lens, tables)
        return {sched.seq.seq_id: logits[row:row + 1] for row, sched in enumerate(out.scheduled)}

    def run_decode(self, seqs: list, positions: list[int], input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) of one decode token per sequence at ``positions``, whose input tokens are
        already on the device (``input_ids`` (B,) int64: the previous step's samples, not yet known to
        the host). Used by asynchronous scheduling; the blocks must already be allocated."""
        slots = [self.block_manager.slots_for(seq, pos, 1)[0] for seq, pos in zip(seqs, positions)]
        lens = [pos + 1 for pos in positions]
        tables = [seq.block_table for seq in seqs]
        if self.graphs is not None and self.graphs.fits(len(seqs), max(len(t) for t in tables)):
            return self.graphs.run(input_ids, positions, slots, lens, tables)
        batch = build_forward_batch([[0]] * len(seqs), positions, [[s] for s in slots], tables,
                                    [1] * len(seqs), self.model.device)
        batch.input_ids = input_ids.to(torch.int64)
        return self.model.forward(batch, self.kv_cache)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.model.device)
        dst = torch.tensor([d for _, d in copies], device=self.model.device)
        for k_cache, v_cache in self.kv_cache:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
