"""quantize_4bit / dequantize_4bit against bitsandbytes 0.50.2 on the CPU: equal bytes, everywhere."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import assert_4bit_matches_bitsandbytes

import qlora_ref as Q
from qlora_ref.validation import BLOCKSIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Lengths that are not multiples of the block size, odd lengths, a single value, several dimensions.
SHAPES = [(1,), (3,), (63, 65), (2, 3, 333), (4097,)]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_every_blocksize_dtype_and_type(blocksize, dtype, quant_type, double_quant):
    generator = torch.Generator().manual_seed(blocksize)
    for shape in SHAPES:
        x = (torch.randn(shape, generator=generator) * 3).to(dtype)
        assert_4bit_matches_bitsandbytes(x, blocksize, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_large_llama_like_matrix(quant_type, double_quant):
    x = torch.randn(1024, 4100, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16) * 0.02
    assert_4bit_matches_bitsandbytes(x, 64, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_all_zero_blocks_between_ordinary_ones(quant_type):
    x = torch.randn(64 * 5 + 7)
    x[64:128] = 0
    x[-7:] = 0
    for double_quant in (False, True):
        assert_4bit_matches_bitsandbytes(x, 64, quant_type, double_quant)
    packed, state = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    assert state.absmax[1] == 0 and bool((Q.dequantize_4bit(packed, state)[64:128] == 0).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_exactly_on_midpoints_go_to_the_lower_level(quant_type, dtype):
    levels = Q.codebook_4bit(quant_type).sort().values
    midpoints = (levels[:-1] + levels[1:]) / 2
    # A 1.0 in every block fixes absmax at 1, so the scaled values are the midpoints themselves
    # (where the dtype can hold them exactly; bf16/fp16 round them first, then they are near-ties).
    x = torch.cat([torch.ones(1), midpoints, torch.ones(1), midpoints.flip(0)]).to(dtype)
    assert_4bit_matches_bitsandbytes(x, 32, quant_type, False)
    if dtype == torch.float32:
        packed, state = Q.quantize_4bit(x, blocksize=32, quant_type=quant_type)
        values = Q.dequantize_4bit(packed, state)
        assert torch.equal(values[1:16], levels[:-1]), "a tie must go to the lower level"


MAGNITUDES = [
    (torch.float32, 3e38),
    (torch.float32, 1e-30),
    (torch.float32, 1e-42),  # subnormal
    (torch.float16, 6e4),
    (torch.float16, 1e-7),  # fp16 subnormal
    (torch.bfloat16, 3e38),
    (torch.bfloat16, 1e-38),
]
# Near 3.4e38 the mean of the absmax overflows float32, so double quantization is refused there
# (test_bad_input.test_double_quantization_that_would_overflow_says_so).
MAGNITUDE_CASES = [(d, m, False) for d, m in MAGNITUDES] + [(d, m, True) for d, m in MAGNITUDES if m < 1e38]


@pytest.mark.parametrize("dtype,magnitude,double_quant", MAGNITUDE_CASES)
def test_very_large_and_very_small_magnitudes(dtype, magnitude, double_quant):
    x = (torch.rand(1000, generator=torch.Generator().manual_seed(2)) * 2 - 1) * magnitude
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    for quant_type in ("nf4", "fp4"):
        assert_4bit_matches_bitsandbytes(x, 64, quant_type, double_quant)


def test_blocks_of_wildly_different_scales():
    scales = torch.logspace(-20, 20, 41).repeat_interleave(64)
    x = torch.randn(scales.numel()) * scales
    for double_quant in (False, True):
        assert_4bit_matches_bitsandbytes(x, 64, "nf4", double_quant)


@pytest.mark.parametrize("view", ["transpose", "strided", "expanded"])
def test_non_contiguous_input(view):
    base = torch.randn(96, 130)
    x = {"transpose": base.t(), "strided": base[::3, 1::2], "expanded": base[:1].expand(5, -1)}[view]
    assert not x.is_contiguous()
    assert_4bit_matches_bitsandbytes(x, 64, "nf4", True)
    packed, state = Q.quantize_4bit(x)
    assert torch.equal(packed, Q.quantize_4bit(x.contiguous())[0])


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=700),
    exponent=st.integers(-30, 30),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
)
def test_property_any_finite_input_matches_bitsandbytes(values, exponent, blocksize, dtype, quant_type, double_quant):
    x = (torch.tensor(values, dtype=torch.float32) * 2.0**exponent).to(dtype)
    if not torch.isfinite(x).all():  # the scaling overflowed fp16: not a finite input
        return
    assert_4bit_matches_bitsandbytes(x, blocksize, quant_type, double_quant)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_error_is_at_most_half_the_widest_gap_times_absmax(n, blocksize, quant_type, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    packed, state = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    x_hat = Q.dequantize_4bit(packed, state)
    levels = state.code.sort().values
    half_gap = ((levels[1:] - levels[:-1]).max() / 2).item()
    bound = state.absmax.repeat_interleave(blocksize)[:n] * half_gap
    assert bool(((x - x_hat).abs() <= bound * (1 + 1e-6)).all())
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8


def test_int4_is_ours_alone_and_round_trips():
    x = torch.randn(1000)
    packed, state = Q.quantize_4bit(x, quant_type="int4")
    assert state.quant_type == "int4"
    x_hat = Q.dequantize_4bit(packed, state)
    assert set((x_hat / state.absmax.repeat_interleave(64)[:1000] * 7).round().tolist()) <= set(range(-7, 8))


def test_odd_length_pads_the_last_low_nibble_with_the_code_of_zero():
    packed, _ = Q.quantize_4bit(torch.tensor([1.0, -1.0, 0.5]), quant_type="nf4")
    assert packed[-1, 0] & 0x0F == 7  # NF4's zero is level 7


def test_bits_per_parameter():
    x = torch.randn(1024, 1024)
    assert Q.quantize_4bit(x, blocksize=64)[1].bits_per_parameter() == 4.5
    assert round(Q.quantize_4bit(x, blocksize=64, double_quant=True)[1].bits_per_parameter(), 3) == 4.127
    for blocksize, double_quant in itertools.product(BLOCKSIZES, (False, True)):
        measured = Q.quantize_4bit(x, blocksize=blocksize, double_quant=double_quant)[1].bits_per_parameter()
        formula = 4 + Q.constant_bits_per_parameter(blocksize, double_quant)
        assert measured == pytest.approx(formula, abs=1e-4)  # the offset and the last nested block: 32/n each
