"""The function behind lesson 1's widget: it must work for every setting the sliders offer."""

import pytest
import torch
from matplotlib.figure import Figure

from qlora_ref import quantize_absmax, quantize_zeropoint
from qlora_ref.plots.linear import linear_levels, plot_levels, quantize_with_levels


@pytest.fixture(scope="module")
def normal():
    return torch.randn(4096, generator=torch.Generator().manual_seed(0))


def test_linear_levels_counts_and_spacing():
    symmetric = linear_levels(4, 0.5)
    assert symmetric.numel() == 15 and float(symmetric.min()) == -3.5 and float(symmetric.max()) == 3.5
    asymmetric = linear_levels(3, 0.25, zero=2, symmetric=False)
    assert torch.equal(asymmetric, 0.25 * (torch.arange(8.0) - 2))


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_are_exactly_what_dequantize_produces(normal, scheme, bits):
    quantized, levels = quantize_with_levels(normal, bits, scheme)
    produced = quantized.dequantize().unique()
    assert torch.isin(produced, levels).all()
    assert levels.numel() == (2**bits - 1 if scheme == "absmax" else 2**bits)
    assert (levels == 0).any(), "both schemes represent 0 exactly"


@pytest.mark.parametrize("scheme", ["absmax", "zeropoint"])
@pytest.mark.parametrize("bits", [2, 8])
@pytest.mark.parametrize("outlier", [0.0, -50.0])
def test_plot_levels_every_widget_setting(normal, scheme, bits, outlier):
    fig, info = plot_levels(normal, bits=bits, scheme=scheme, outlier=outlier)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert 0 < info["levels_in_bulk"] <= info["levels"].numel()
    assert info["codes_used"] <= info["levels"].numel()
    assert info["mae"] > 0 and info["rmse"] >= info["mae"]
    if outlier:
        half_step = info["scale"] / 2  # zero-point rounding may shift the grid by up to half a step
        assert float(info["levels"].min()) - half_step <= outlier <= float(info["levels"].max()) + half_step


def test_an_outlier_removes_levels_from_the_bulk_and_raises_the_error(normal):
    _, clean = plot_levels(normal, bits=4, scheme="absmax")
    _, spoiled = plot_levels(normal, bits=4, scheme="absmax", outlier=50.0)
    assert spoiled["levels_in_bulk"] < clean["levels_in_bulk"]
    assert spoiled["mae"] > 2 * clean["mae"]


def test_zeropoint_uses_more_codes_on_skewed_data():
    skewed = torch.nn.functional.gelu(torch.randn(4096, generator=torch.Generator().manual_seed(1)))
    _, absmax = plot_levels(skewed, bits=4, scheme="absmax")
    _, zeropoint = plot_levels(skewed, bits=4, scheme="zeropoint")
    assert zeropoint["codes_used"] > absmax["codes_used"]
    assert zeropoint["mae"] < absmax["mae"]


def test_the_plot_matches_the_library(normal):
    _, info = plot_levels(normal, bits=8, scheme="zeropoint")
    quantized = quantize_zeropoint(normal, bits=8)
    assert info["scale"] == pytest.approx(float(quantized.scale))
    assert info["zero"] == int(quantized.zero)
    _, info = plot_levels(normal, bits=8, scheme="absmax")
    assert info["scale"] == pytest.approx(float(quantize_absmax(normal, bits=8).scale))


def test_unknown_scheme_is_refused(normal):
    with pytest.raises(ValueError, match="scheme must be one of"):
        plot_levels(normal, scheme="minmax")
