"""The function behind lesson 4's figure and widget: called with the widget's settings, checked on what it returns."""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
from matplotlib.figure import Figure

from qlora_ref import dynamic_map, quantize_4bit
from qlora_ref.double_quant import constants_memory_table
from qlora_ref.plots.double_quant import dynamic_map_figure, overhead_figure, overhead_rows
from qlora_ref.validation import BLOCKSIZES

MODEL_SIZES = (7e9, 13e9, 65e9, 70e9)


def test_overhead_rows_reproduce_the_paper():
    row = overhead_rows(blocksizes=(64,), parameters=65e9)[0]
    assert row["plain_bits"] == 0.5
    assert row["nested_bits"] == pytest.approx(0.127, abs=5e-4)  # QLoRA, section 3
    assert row["saved_bits"] == pytest.approx(0.373, abs=5e-4)
    assert row["saved_gb"] == pytest.approx(3.0, abs=0.05)  # "approximately 3 GB for a 65B model"


@pytest.mark.parametrize("parameters", MODEL_SIZES)
def test_overhead_rows_agree_with_constants_memory_table(parameters):
    for blocksize in BLOCKSIZES:
        (_, plain, nested, saved) = constants_memory_table((parameters,), blocksize)[0]
        row = overhead_rows((blocksize,), parameters)[0]
        assert (row["plain_gb"], row["nested_gb"], row["saved_gb"]) == pytest.approx((plain, nested, saved))


def test_overhead_rows_match_a_real_state():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    for blocksize in (64, 256):
        row = overhead_rows((blocksize,))[0]
        _, plain = quantize_4bit(w, blocksize=blocksize)
        _, nested = quantize_4bit(w, blocksize=blocksize, double_quant=True)
        assert plain.bits_per_parameter() == 4 + row["plain_bits"]
        # the real state also stores the float32 offset: 32 bits over all values
        assert nested.bits_per_parameter() == pytest.approx(4 + row["nested_bits"] + 32 / w.numel())


@pytest.mark.parametrize("highlight", BLOCKSIZES)
@pytest.mark.parametrize("parameters", MODEL_SIZES)
def test_overhead_figure_every_widget_setting(highlight, parameters):
    fig, row = overhead_figure(highlight=highlight, parameters=parameters)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert row["blocksize"] == highlight
    assert row["plain_bits"] == 32 / highlight
    assert row["nested_gb"] < row["plain_gb"]
    assert row["saved_gb"] == pytest.approx(row["plain_gb"] - row["nested_gb"])


def test_overhead_figure_draws():
    fig, _ = overhead_figure(blocksizes=(32, 64, 128), highlight=32, parameters=7e9)
    fig.canvas.draw()


def test_overhead_figure_rejects_a_blocksize_it_does_not_plot():
    with pytest.raises(ValueError, match="highlight"):
        overhead_figure(blocksizes=(64, 128), highlight=32)


def test_dynamic_map_figure_counts_each_decade():
    fig, counts = dynamic_map_figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.axes[1].get_xscale() == "log"
    assert counts == [2**e for e in range(7)]  # 2^e levels in the decade [10^(e-7), 10^(e-6)]
    assert sum(counts) + 1 == int((dynamic_map(signed=True) > 0).sum())  # and the level 1.0 itself
    fig.canvas.draw()
