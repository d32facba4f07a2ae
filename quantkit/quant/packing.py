"""Exact bit packing of integer codes into int32 words, in the GPTQ layout.

GPTQ packs codes as one little-endian bit stream per column: code ``j`` of a column occupies
bits ``[bits*j, bits*j + bits)`` of the stream, word ``k`` holds stream bits ``[32k, 32k + 32)``,
low bits first. For 2, 4 and 8 bits a word holds exactly ``32 / bits`` codes. For 3 bits, 32 codes
fill 3 words and codes 10 and 21 cross a word boundary; this is the "10 | 1 | 10 | 1 | 10" layout
of AutoGPTQ's ``QuantLinear.pack`` (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py) and
GPTQModel's ``PackableQuantLinear.pack_block`` (gptqmodel/nn_modules/qlinear/__init__.py): code 10
keeps its low 2 bits in bits 30-31 of word 0 and its high bit in bit 0 of word 1, and code 21 keeps
its low bit in bit 31 of word 1 and its high 2 bits in bits 0-1 of word 2. That is the same bit
stream, so one formula serves every width.

``qweight`` packs along the input dimension (``pack_rows`` on codes laid out (in, out));
``qzeros`` packs along the output dimension (``pack_cols`` on zeros laid out (groups, out)).
Words are returned as int32 in two's complement: a word whose top bit is set is negative.
"""

from __future__ import annotations

import math

import torch

PACKABLE_BITS = (2, 3, 4, 8)
_WORD = 32
_WORD_MASK = (1 << _WORD) - 1


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (rows, cols) along dim 0 into int32 (rows * bits / 32, cols)."""
    _check_bits(bits)
    rows = codes.shape[0]
    if codes.dim() != 2 or (rows * bits) % _WORD != 0:
        raise ValueError(
            f"cannot pack {rows} rows of {bits}-bit codes into 32-bit words: the row count "
            f"must be a multiple of {_WORD // math.gcd(bits, _WORD)}"
        )
    values = codes.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() > (1 << bits) - 1):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing"
        )
    n_words = rows * bits // _WORD
    word, shift = _stream_positions(rows, bits, codes.device)
    packed = torch.zeros(
        (n_words, codes.shape[1]), dtype=torch.int64, device=codes.device
    )
    # Bit fields never overlap, so adding them is the same as OR-ing them.
    packed.index_add_(0, word, (values << shift) & _WORD_MASK)
    spill = values >> (
        _WORD - shift
    )  # the high bits of a code that crosses into the next word
    packed.index_add_(0, (word + 1).clamp_(max=n_words - 1), spill)
    return _to_int32(packed)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 (words, cols) to int32 codes (words * 32 / bits, cols)."""
    _check_bits(bits)
    n_words = packed.shape[0]
    if packed.dim() != 2 or (n_words * _WORD) % bits != 0:
        raise ValueError(
            f"{n_words} packed rows do not hold a whole number of {bits}-bit codes"
        )
    words = packed.to(torch.int64) & _WORD_MASK
    rows = n_words * _WORD // bits
    word, shift = _stream_positions(rows, bits, packed.device)
    low = words[word] >> shift
    high = words[(word + 1).clamp_(max=n_words - 1)] << (_WORD - shift)
    return ((low | high) & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (rows, cols) along dim 1 into int32 (rows, cols * bits / 32)."""
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_cols``: int32 (rows, words) to int32 codes (rows, words * 32 / bits)."""
    return unpack_rows(packed.t(), bits).t().contiguous()


def _stream_positions(
    rows: int, bits: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index (rows,) and in-word shift (rows, 1) of each code's lowest bit."""
    start = torch.arange(rows, dtype=torch.int64, device=device) * bits
    return start // _WORD, (start % _WORD).unsqueeze(1)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as two's-complement int32."""
    return torch.where(words >= (1 << 31), words - (1 << _WORD), words).to(torch.int32)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"GPTQ packing supports {PACKABLE_BITS} bits, got {bits}")
