"""8-bit blockwise quantization with the dynamic map against bitsandbytes 0.50.2 on the CPU."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import assert_8bit_matches_bitsandbytes

import qlora_ref as Q
from qlora_ref.validation import BLOCKSIZES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_blocksize_and_dtype(blocksize, dtype):
    generator = torch.Generator().manual_seed(blocksize)
    for shape in [(1,), (255,), (17, 301), (5000,)]:
        assert_8bit_matches_bitsandbytes((torch.randn(shape, generator=generator) * 5).to(dtype), blocksize)


def test_unsigned_map_on_nonnegative_data():
    x = torch.rand(10_000) ** 4
    assert_8bit_matches_bitsandbytes(x, 256, code=Q.dynamic_map(signed=False))


@pytest.mark.parametrize("magnitude", [1e-40, 1e-20, 1.0, 1e20, 3e38])
def test_magnitudes_and_zero_blocks(magnitude):
    x = (torch.rand(256 * 6 + 3, generator=torch.Generator().manual_seed(3)) * 2 - 1) * magnitude
    x[256:512] = 0
    assert_8bit_matches_bitsandbytes(x, 256)


@pytest.mark.parametrize("values", [[0.0, 1.401298464324817e-44], [1.401298464324817e-44, -1.4e-44, 0.0, 5e-45],
                                    [1e-39, 0.0, -3e-40]])
def test_a_denormal_absmax_whose_inverse_overflows(values):
    """1/absmax is inf: zeros become NaN (code 0 in bitsandbytes), the rest +-inf (found by hypothesis)."""
    assert_8bit_matches_bitsandbytes(torch.tensor(values), 32)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=1200),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
)
def test_property_any_finite_input_matches_bitsandbytes(values, blocksize, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    if torch.isfinite(x).all():
        assert_8bit_matches_bitsandbytes(x, blocksize)


def test_the_lookup_table_can_pick_the_farther_level():
    # Found by comparing with bitsandbytes: u = 0.11406880617... lies nearer to level 192 (0.12109)
    # than to 191 (0.10703), yet the CPU kernel's 65536-point grid sends it to 191.
    x = torch.tensor([1.0, 0.11406880617141724])
    lut, _ = Q.quantize_blockwise(x, rounding="lut")
    nearest, _ = Q.quantize_blockwise(x, rounding="nearest")
    assert (lut[1].item(), nearest[1].item()) == (191, 192)
    assert_8bit_matches_bitsandbytes(x, 256)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 2000))
def test_property_nearest_rounding_is_the_nearest_level(seed, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    q, state = Q.quantize_blockwise(x, rounding="nearest")
    unit = x / state.absmax.repeat_interleave(256)[:n]
    distance_chosen = (unit - state.code[q.long()]).abs()
    distance_best = (unit[:, None] - state.code[None, :]).abs().amin(dim=1)
    assert bool((distance_chosen <= distance_best + 1e-7).all())


def test_lut_and_nearest_rarely_disagree_and_never_by_more_than_one_level():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    lut, _ = Q.quantize_blockwise(x, rounding="lut")
    nearest, _ = Q.quantize_blockwise(x, rounding="nearest")
    differ = lut != nearest
    assert 0 < int(differ.sum()) < 0.01 * x.numel()
    assert int((lut.int() - nearest.int()).abs().max()) == 1


def test_bits_per_parameter_of_an_8bit_state():
    _, state = Q.quantize_blockwise(torch.randn(256 * 100))
    assert state.bits_per_parameter() == 8 + 32 / 256
