"""The functions behind lesson 7's figures on the 8-bit maps, checked on what they return."""

import math
import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from qlora_ref import dequantize_blockwise, dynamic_map, quantize_absmax, quantize_blockwise
from qlora_ref.plots.optimizers import (
    error_by_decade,
    error_by_decade_figure,
    linear_code,
    relative_spacing,
    resolution_figure,
)


def test_linear_codes_are_evenly_spaced_256_levels():
    signed, unsigned = linear_code(signed=True), linear_code(signed=False)
    for code in (signed, unsigned):
        assert code.dtype == torch.float32 and code.shape == (256,)
        assert bool((code[1:] > code[:-1]).all())
    assert float(signed[0]) == pytest.approx(-128 / 127, rel=1e-7)  # float32: within half an ulp
    assert (float(signed[128]), float(signed[-1])) == (0.0, 1.0)
    assert (float(unsigned[0]), float(unsigned[-1])) == (0.0, 1.0)


def test_signed_linear_code_is_lesson_1s_int8_absmax():
    """The same codes as quantize_absmax(bits=8) per block of 256 (code index = k + 128); the
    dequantized values differ by float32 rounding only: (k / 127) * absmax against k * (absmax / 127)."""
    x = torch.randn(256 * 37 + 5, generator=torch.Generator().manual_seed(0))
    linear = quantize_absmax(x, bits=8, granularity="block", blocksize=256)
    codes, state = quantize_blockwise(x, linear_code(signed=True), 256, rounding="nearest")
    assert torch.equal(linear.q.long() + 128, codes.long())
    torch.testing.assert_close(dequantize_blockwise(codes, state), linear.dequantize(), rtol=0, atol=4e-7)


def test_relative_spacing_of_the_linear_map_is_one_over_k():
    levels, spacing = relative_spacing(linear_code(signed=False))
    k = torch.arange(1, 255, dtype=torch.float64)
    torch.testing.assert_close(levels, (k / 255).float().double())
    # The levels are float32, each within half an ulp (6e-8 relative) of k / 255; the gap 1/255 is k times
    # smaller than the level, so the spacing's relative error is at most 2 * 6e-8 * k < 3.1e-5.
    torch.testing.assert_close(spacing, 1 / k, rtol=3.1e-5, atol=0)


def test_unsigned_dynamic_map_is_twice_as_fine_as_the_signed_one():
    """Per decade the unsigned map has 2^(e+1) positive levels, the signed one 2^e: in the top decade
    [0.1, 1] their gaps are 0.9/64 and 0.9/128 (linspace steps of the construction), and the last
    level of the decade is half a gap below the extra level 1.0."""
    for signed, top_levels in ((True, 64), (False, 128)):
        levels, spacing = relative_spacing(dynamic_map(signed=signed))
        top = levels >= 0.1
        assert int(top.sum()) == top_levels  # 1.0, the largest level, has no gap above it
        gaps = spacing[top] * levels[top]
        step = 0.9 / top_levels
        # float32 levels (half an ulp: up to 6e-8 near 1) make a gap of 0.007 uncertain by 1.7e-5, relative
        torch.testing.assert_close(gaps[:-1], torch.full_like(gaps[:-1], step), rtol=4e-5, atol=0)
        assert float(gaps[-1]) == pytest.approx(step / 2, rel=4e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=3, max_size=40))
def test_relative_spacing_steps_from_each_level_to_the_next(values):
    code = torch.tensor(sorted(values), dtype=torch.float32)
    positive = code[code > 0].double()
    if positive.numel() < 2:
        with pytest.raises(ValueError, match="fewer than 2 positive levels"):
            relative_spacing(code)
        return
    levels, spacing = relative_spacing(code)
    torch.testing.assert_close(levels * (1 + spacing), positive[1:])


def test_relative_spacing_rejects_bad_codes():
    with pytest.raises(ValueError, match="sorted"):
        relative_spacing(torch.tensor([0.5, 0.1, 1.0]))
    with pytest.raises(ValueError, match="1-D float tensor"):
        relative_spacing(torch.arange(5))
    with pytest.raises(ValueError, match="1-D float tensor"):
        relative_spacing([0.1, 0.5])


def test_error_by_decade_by_hand():
    x = torch.tensor([1.0, -0.5, 0.05, 0.002, 0.0])
    x_hat = torch.tensor([1.0, -0.4, 0.0, 0.003, 7.0])
    table = error_by_decade(x, x_hat, decades=4)
    assert table["upper"] == [1.0, 0.1, 0.01, 0.001]
    assert table["count"] == [2, 1, 1, 0]  # the zero of x is left out
    assert table["mean_relative_error"][:3] == pytest.approx([0.1, 1.0, 0.5])
    assert math.isnan(table["mean_relative_error"][3]) and math.isnan(table["zeroed"][3])
    assert table["zeroed"][:3] == [0.0, 1.0, 0.0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), decades=st.integers(1, 12), n=st.integers(1, 3000))
def test_error_by_decade_counts_every_value_in_range(seed, decades, n):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=generator) * 10 ** (-6 * torch.rand(n, generator=generator))
    x_hat = x * (1 + 0.01 * torch.randn(n, generator=generator))
    table = error_by_decade(x, x_hat, decades)
    relative = x.abs().double() / x.abs().max()
    assert sum(table["count"]) == int((relative > 10.0**-decades).sum())
    exact = error_by_decade(x, x.clone(), decades)
    assert all(e == 0 or math.isnan(e) for e in exact["mean_relative_error"])


def test_error_by_decade_rejects_bad_input():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="same shape"):
        error_by_decade(x, torch.ones(5))
    with pytest.raises(ValueError, match="decades must be a positive int"):
        error_by_decade(x, x, decades=0)
    with pytest.raises(ValueError, match="finite"):
        error_by_decade(x, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="no nonzero values"):
        error_by_decade(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match="tensors"):
        error_by_decade([1.0], [1.0])


def test_figures_draw_and_return_what_they_drew():
    codes = {"dynamic": dynamic_map(signed=False), "linear": linear_code(signed=False)}
    fig, spacings = resolution_figure(codes)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    for name, code in codes.items():
        for got, expected in zip(spacings[name], relative_spacing(code)):
            assert torch.equal(got, expected)
    fig.canvas.draw()

    v = torch.rand(4096, generator=torch.Generator().manual_seed(1)) ** 6
    reconstructions = {}
    for name, code in codes.items():
        q, state = quantize_blockwise(v, code, 256)
        reconstructions[name] = dequantize_blockwise(q, state)
    fig, tables = error_by_decade_figure(v, reconstructions, decades=6)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert tables == {name: error_by_decade(v, x_hat, 6) for name, x_hat in reconstructions.items()}
    # below 1/510 of its block's absmax the linear map rounds to 0; the dynamic map never does here
    assert tables["linear"]["zeroed"][3] > 0.5 and tables["dynamic"]["zeroed"][3] == 0.0
    fig.canvas.draw()
    with pytest.raises(ValueError, match="at least one"):
        resolution_figure({})
    with pytest.raises(ValueError, match="at least one"):
        error_by_decade_figure(v, {})
