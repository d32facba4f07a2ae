"""Calibration samples, GPTQ-style: random token windows from one concatenated token stream."""

from __future__ import annotations

import torch

from quantkit.data.sources import load_texts
from quantkit.errors import QuantkitError


def calibration_samples(
    tokenizer,
    source: str = "wikipedia",
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
) -> torch.Tensor:
    """A LongTensor (num_samples, seq_len) of windows drawn at distinct random offsets.

    The documents are tokenized without special tokens and concatenated with the tokenizer's EOS
    token between them (nothing between them when the tokenizer has no EOS). Offsets come from a
    `torch.Generator` seeded with `seed`, so the same arguments give the same samples.
    """
    if num_samples < 1:
        raise QuantkitError(f"num_samples must be at least 1 (got {num_samples})")
    if seq_len < 2:
        raise QuantkitError(f"seq_len must be at least 2 (got {seq_len})")
    stream = token_stream(
        tokenizer, load_texts(source, purpose="calibration", text_field=text_field)
    )
    return random_windows(stream, num_samples, seq_len, seed, source)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one 1-D LongTensor, EOS between consecutive documents."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    for i, document in enumerate(encoded):
        if i > 0:
            ids.extend(separator)
        ids.extend(document)
    return torch.tensor(ids, dtype=torch.long)


def random_windows(
    stream: torch.Tensor, num_samples: int, seq_len: int, seed: int, source: str
) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens starting at distinct random offsets."""
    offsets = len(stream) - seq_len + 1
    if offsets < num_samples:
        needed = seq_len + num_samples - 1
        raise QuantkitError(
            f"calibration text {source!r} has {len(stream):,} tokens but "
            f"{num_samples} distinct windows of {seq_len} tokens need at least "
            f"{needed:,}: use fewer samples, a shorter seq_len or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(offsets, generator=generator)[:num_samples]
    return stream[starts.unsqueeze(1) + torch.arange(seq_len)]
