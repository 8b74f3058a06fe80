import bitsandbytes.functional as bnb
import pytest
import torch

import qlora_ref as Q


def test_nf4_equals_bitsandbytes_table_bit_for_bit():
    assert torch.equal(Q.nf4_codebook(), bnb.get_4bit_type("nf4", device="cpu"))


def test_nf4_equals_the_nonzero_part_of_create_normal_map():
    full = bnb.create_normal_map()
    expected = torch.cat([full[:7], torch.zeros(1), full[-8:]])
    assert torch.equal(Q.nf4_codebook(), expected)


def test_nf4_shape_is_8_positive_7_negative_and_an_exact_zero():
    table = Q.nf4_codebook()
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert int((table > 0).sum()) == 8 and int((table < 0).sum()) == 7 and int((table == 0).sum()) == 1
    assert table[0] == -1 and table[-1] == 1 and bool((table[1:] > table[:-1]).all())


def test_another_offset_gives_another_codebook():
    assert not torch.equal(Q.nf4_codebook(offset=0.99), Q.nf4_codebook())


def test_fp4_equals_bitsandbytes_table_but_for_the_sign_of_zero():
    ours, theirs = Q.fp4_codebook(), bnb.get_4bit_type("fp4", device="cpu")
    assert torch.equal(ours, theirs)  # values (torch.equal counts -0.0 == 0.0)
    same_bits = ours.view(torch.int32) == theirs.view(torch.int32)
    assert same_bits.sum() == 15 and not same_bits[8]
    assert str(ours[8].item()) == "-0.0" and str(theirs[8].item()) == "0.0"


def test_bitsandbytes_dequantizes_fp4_code_8_to_negative_zero_as_we_do():
    x = torch.tensor([1.0, 1e-6, -1e-6, 0.5])  # a tiny positive value gets code 8 (-0), a tiny negative code 0
    packed, state = bnb.quantize_4bit(x, blocksize=64, quant_type="fp4")
    ours_packed, ours_state = Q.quantize_4bit(x, blocksize=64, quant_type="fp4")
    assert torch.equal(packed, ours_packed) and packed[0, 0] & 0x0F == 8 and packed[1, 0] >> 4 == 0
    theirs = bnb.dequantize_4bit(packed, state).reshape(-1)
    ours = Q.dequantize_4bit(ours_packed, ours_state)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), "same bytes, signs of zero included"


def test_fp4_e3m0_is_signed_powers_of_two_as_create_fp8_map_builds_them():
    table = Q.fp4_e3m0_codebook()
    assert table.dtype == torch.float32 and table.shape == (16,)
    magnitudes = sorted(set(table.abs().tolist()))
    assert magnitudes == [0.0] + [2.0**-k for k in range(6, -1, -1)]
    theirs = bnb.create_fp8_map(signed=True, exponent_bits=3, precision_bits=0, total_bits=4)
    nonzero = theirs[theirs != 0]
    assert torch.equal(table[table != 0].sort().values, nonzero)


def test_fp4_e3m0_round_trips_through_quantize_4bit():
    x = torch.tensor([1.0, -0.5, 0.3, 0.01, -0.0001] + [0.0] * 59)
    packed, state = Q.quantize_4bit(x, blocksize=64, quant_type="fp4_e3m0")
    expected = torch.tensor([1.0, -0.5, 0.25, 0.015625, -0.0] + [0.0] * 59)
    assert torch.equal(Q.dequantize_4bit(packed, state), expected)


def test_int4_is_the_symmetric_absmax_grid():
    levels = torch.tensor(sorted(set(Q.int4_codebook().tolist())))
    assert torch.equal(levels, torch.arange(-7, 8, dtype=torch.float32) / 7)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_create_dynamic_map(signed):
    assert torch.equal(Q.dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


def test_dynamic_map_ranges():
    signed, unsigned = Q.dynamic_map(True), Q.dynamic_map(False)
    assert signed.shape == unsigned.shape == (256,)
    assert signed[0].item() == pytest.approx(-0.99297, abs=1e-5) and signed[-1] == 1
    assert unsigned[0] == 0 and unsigned[-1] == 1
    assert bool((signed[1:] >= signed[:-1]).all()) and bool((unsigned[1:] >= unsigned[:-1]).all())


def test_unknown_codebook_name_is_named_in_the_error():
    with pytest.raises(ValueError, match="quant_type must be one of .* got 'nf5'"):
        Q.codebook_4bit("nf5")
