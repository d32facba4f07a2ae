"""The flat batch one forward pass computes, and the attention metadata that travels with it.

The new tokens of every scheduled sequence are packed into one row per token (no padding):
sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b + 1]``, which are its last
tokens, so attention needs only each sequence's total length (``seq_lens``) and block table to
find the keys. Layers receive this one object instead of a growing list of arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, absolute position of each token in its sequence
    slot_mapping: torch.Tensor  # (T,) int64, KV-cache slot each token's K/V is written to
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    query_start_loc: torch.Tensor  # (B + 1,) int32
    seq_lens: torch.Tensor  # (B,) int32, total length of each sequence including its new tokens
    max_seq_len: int
    logits_indices: torch.Tensor  # (N,) int64, rows whose logits the sampler needs

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_forward_batch(token_ids: list[list[int]], starts: list[int], slots: list[list[int]],
                        block_tables: list[list[int]], logits_per_seq: list[int],
                        device: torch.device) -> ForwardBatch:
    """Pack per-sequence new tokens (starting at absolute position ``starts[b]``) into one batch.

    ``logits_per_seq[b]`` rows at the end of sequence ``b``'s tokens produce logits."""
    lengths = [len(ids) for ids in token_ids]
    flat = [token for ids in token_ids for token in ids]
    positions = [start + i for start, n in zip(starts, lengths) for i in range(n)]
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    logits_rows = [offsets[b + 1] - k + i for b, k in enumerate(logits_per_seq) for i in range(k)]
    width = max((len(table) for table in block_tables), default=0) or 1
    tables = [table + [0] * (width - len(table)) for table in block_tables]
    seq_lens = [start + n for start, n in zip(starts, lengths)]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=tensor(flat, torch.int64),
        positions=tensor(positions, torch.int64),
        slot_mapping=tensor([slot for seq_slots in slots for slot in seq_slots], torch.int64),
        block_tables=tensor(tables, torch.int32),
        query_start_loc=tensor(offsets, torch.int32),
        seq_lens=tensor(seq_lens, torch.int32),
        max_seq_len=max(seq_lens, default=0),
        logits_indices=tensor(logits_rows, torch.int64),
    )
