"""Bit packing into int32 words in the GPTQ layout: hand-computed words and exact round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.quant.packing import pack_cols, pack_rows, unpack_cols, unpack_rows


def test_four_bit_codes_zero_to_seven_make_0x76543210():
    codes = torch.arange(8).reshape(8, 1)
    packed = pack_rows(codes, 4)
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0x76543210]]


def test_top_nibble_makes_negative_words():
    assert pack_rows(torch.full((8, 1), 15), 4).tolist() == [[-1]]
    assert pack_rows(
        torch.tensor([[0], [0], [0], [0], [0], [0], [0], [8]]), 4
    ).tolist() == [[-(2**31)]]
    # 8-bit: bytes 0x01 0x02 0x03 0xFF -> 0xFF030201 as a signed int32
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).tolist() == [
        [0xFF030201 - 2**32]
    ]


def test_two_bit_example():
    # codes 3, 0, 1, 2 in bits 0-7 and code 3 in bits 30-31: 0xC0000093
    codes = torch.tensor([3, 0, 1, 2] + [0] * 11 + [3]).reshape(16, 1)
    assert pack_rows(codes, 2).tolist() == [[0xC0000093 - 2**32]]


def test_three_bit_gptq_words():
    # 32 codes j % 8 fill three words; codes 10 and 21 straddle word boundaries
    # (values computed with AutoGPTQ's 10|1|10|1|10 packing loop).
    codes = (torch.arange(32) % 8).reshape(32, 1)
    assert pack_rows(codes, 3).flatten().tolist() == [
        0x88FAC688 - 2**32,
        0xC688FAC6 - 2**32,
        0xFAC688FA - 2**32,
    ]
    assert pack_rows(torch.full((32, 1), 7), 3).flatten().tolist() == [-1, -1, -1]


def test_pack_cols_packs_along_the_output_dimension():
    zeros = torch.arange(16).reshape(2, 8) % 16
    packed = pack_cols(zeros, 4)
    assert packed.tolist() == [[0x76543210], [0xFEDCBA98 - 2**32]]
    assert torch.equal(unpack_cols(packed, 4), zeros.to(torch.int32))


def _autogptq_three_bit_column(values: list[int]) -> list[int]:
    """AutoGPTQ's explicit 3-bit layout, written out as a reference (unsigned words)."""
    words = [0, 0, 0]
    for j in range(10):
        words[0] |= values[j] << (3 * j)
    words[0] |= (values[10] << 30) & 0xFFFFFFFF
    words[1] |= (values[10] >> 2) & 1
    for j in range(10):
        words[1] |= values[11 + j] << (3 * j + 1)
    words[1] |= (values[21] << 31) & 0xFFFFFFFF
    words[2] |= (values[21] >> 1) & 3
    for j in range(10):
        words[2] |= values[22 + j] << (3 * j + 2)
    return words


def test_three_bit_matches_autogptq_loop_on_random_codes():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 8, (64, 5), generator=generator)
    packed = pack_rows(codes, 3).to(torch.int64) & 0xFFFFFFFF
    for col in range(codes.shape[1]):
        for block in range(2):
            expected = _autogptq_three_bit_column(
                codes[32 * block : 32 * block + 32, col].tolist()
            )
            assert packed[3 * block : 3 * block + 3, col].tolist() == expected


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    blocks=st.integers(min_value=1, max_value=4),
    cols=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_round_trip_rows_and_cols(bits, blocks, cols, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = blocks * 32
    codes = torch.randint(
        0, 2**bits, (rows, cols), generator=generator, dtype=torch.int32
    )
    packed = pack_rows(codes, bits)
    assert packed.shape == (rows * bits // 32, cols)
    assert torch.equal(unpack_rows(packed, bits), codes)
    packed_cols = pack_cols(codes.t(), bits)
    assert packed_cols.shape == (cols, rows * bits // 32)
    assert torch.equal(unpack_cols(packed_cols, bits), codes.t())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_smallest_row_count_for_whole_words(bits):
    rows = 32 // bits
    codes = torch.full((rows, 3), 2**bits - 1)
    assert pack_rows(codes, bits).tolist() == [[-1, -1, -1]]


def test_rejects_row_counts_that_do_not_fill_words():
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_rows(torch.zeros(16, 2, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_rows(torch.zeros(12, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="whole number"):
        unpack_rows(torch.zeros(2, 2, dtype=torch.int32), 3)


def test_rejects_out_of_range_codes_and_bits():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.full((8, 1), -1), 4)
    with pytest.raises(ValueError, match="supports"):
        pack_rows(torch.zeros(32, 1, dtype=torch.int32), 5)
