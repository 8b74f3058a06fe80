"""Lesson 1's linear quantizers: ranges, error bounds, and what an outlier does."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref as Q
from qlora_ref.linear import to_groups


def group_scale(result, x):
    """The scale each element of x was quantized with, in x's flattened order."""
    groups = to_groups(x, result.granularity, result.blocksize)
    return result.scale.expand_as(groups).reshape(-1)[: x.numel()]


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "block"]),
    rows=st.integers(1, 9),
    cols=st.integers(1, 70),
    blocksize=st.sampled_from([1, 3, 16, 64]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_codes_in_range_and_error_at_most_half_a_step(bits, granularity, rows, cols, blocksize, symmetric, seed):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3 + (0 if symmetric else 1.5)
    quantize = Q.quantize_absmax if symmetric else Q.quantize_zeropoint
    result = quantize(x, bits=bits, granularity=granularity, blocksize=blocksize)
    low, high = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(result.q.min()) >= low and int(result.q.max()) <= high
    error = (x - result.dequantize()).abs().reshape(-1)
    assert bool((error <= group_scale(result, x) / 2 * (1 + 1e-5) + 1e-6).all())


@pytest.mark.parametrize("quantize", [Q.quantize_absmax, Q.quantize_zeropoint])
def test_zero_is_exact(quantize):
    x = torch.tensor([[-1.3, 0.0, 2.7, 0.4]])
    assert quantize(x, bits=4).dequantize()[0, 1] == 0


def test_worked_example_by_hand():
    x = torch.tensor([-1.0, 0.25, 0.5, 2.0])
    result = Q.quantize_zeropoint(x, bits=2)  # s = 3 / 3 = 1, z = round(1 / 1) = 1
    assert result.scale.item() == 1.0 and result.zero.item() == 1.0
    assert result.q.tolist() == [0, 1, 1, 3]  # round(0.5) is 0 (half to even), plus z
    symmetric = Q.quantize_absmax(x, bits=3)  # s = 2 / 3, q = round(x / s)
    assert symmetric.q.tolist() == [-2, 0, 1, 3]


def test_more_bits_less_error():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    errors = [Q.quantization_error(x, Q.quantize_absmax(x, bits=b).dequantize())["rmse"] for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True)


def test_zeropoint_beats_absmax_on_skewed_data():
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(0))  # all positive
    absmax = Q.quantization_error(x, Q.quantize_absmax(x, bits=4).dequantize())["rmse"]
    zeropoint = Q.quantization_error(x, Q.quantize_zeropoint(x, bits=4).dequantize())["rmse"]
    assert zeropoint < 0.6 * absmax


def test_an_outlier_ruins_a_per_tensor_scale_but_not_per_block():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 100.0
    per_tensor = Q.quantization_error(x, Q.quantize_absmax(x, bits=8).dequantize())["mae"]
    per_block = Q.quantization_error(x, Q.quantize_absmax(x, bits=8, granularity="block").dequantize())["mae"]
    clean = x.clone()
    clean[0, 0] = 0
    without = Q.quantization_error(clean, Q.quantize_absmax(clean, bits=8).dequantize())["mae"]
    assert per_tensor > 10 * without and per_block < 1.5 * without


def test_int4_absmax_levels_are_the_int4_codebook():
    x = torch.linspace(-1, 1, 1001)
    levels = sorted(set(Q.quantize_absmax(x, bits=4).dequantize().tolist()))
    assert torch.allclose(torch.tensor(levels), torch.tensor(sorted(set(Q.int4_codebook().tolist()))))


def test_one_scale_per_channel_and_per_block():
    x = torch.randn(5, 70)
    assert Q.quantize_absmax(x, granularity="channel").scale.shape == (5, 1)
    assert Q.quantize_absmax(x, granularity="block", blocksize=64).scale.shape == (6, 1)  # 350 = 5 * 64 + 30


def test_all_zero_input_stays_zero():
    for quantize in (Q.quantize_absmax, Q.quantize_zeropoint):
        assert bool((quantize(torch.zeros(3, 4), granularity="channel").dequantize() == 0).all())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"bits": 1}, "bits must be an integer from 2 to 8, got 1"),
        ({"bits": 9}, "got 9"),
        ({"bits": 4.0}, "got 4.0"),
        ({"granularity": "row"}, "granularity must be one of"),
        ({"granularity": "block", "blocksize": 0}, "blocksize must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Q.quantize_absmax(torch.randn(4, 4), **kwargs)


def test_bad_tensors():
    with pytest.raises(TypeError, match="floating-point tensor, got torch.int64"):
        Q.quantize_absmax(torch.arange(4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.quantize_zeropoint(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        Q.quantize_absmax(torch.randn(8), granularity="channel")
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_absmax(torch.empty(0))
