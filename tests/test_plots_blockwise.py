"""The functions behind lesson 3's figures and widget: called with the widget's settings, checked on what they return."""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
from matplotlib.figure import Figure

from qlora_ref import dequantize_4bit, quantize_4bit
from qlora_ref.plots.blockwise import blocksize_figure, blocksize_rows, outlier_figure, outlier_sample

WIDGET_BLOCKSIZES = (32, 64, 128, 256, 512, 1024)


@pytest.mark.parametrize("blocksize", WIDGET_BLOCKSIZES)
@pytest.mark.parametrize("outlier", [0.0, 8.0, 20.0, -50.0])
def test_outlier_figure_every_widget_setting(blocksize, outlier):
    fig, info = outlier_figure(blocksize=blocksize, outlier=outlier)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    n = info["x"].numel()
    assert info["block_mae"].shape == (-(-n // blocksize),)
    assert info["absmax"].numel() == info["block_mae"].numel()
    packed, state = quantize_4bit(info["x"], blocksize=blocksize)
    assert torch.equal(info["x_hat"], dequantize_4bit(packed, state))
    start, stop = info["window"]
    assert 0 <= start < stop <= n and stop - start == 128
    if outlier == 0:
        assert info["outlier_block"] is None
    else:
        assert info["outlier_block"] == 300 // blocksize
        assert int(info["block_mae"].argmax()) == info["outlier_block"]
    fig.canvas.draw()  # the drawing itself must not fail either


@pytest.mark.parametrize("blocksize", WIDGET_BLOCKSIZES)
def test_outlier_stays_in_its_block(blocksize):
    _, clean = outlier_figure(blocksize=blocksize, outlier=0.0)
    _, spoiled = outlier_figure(blocksize=blocksize, outlier=30.0)
    others = torch.ones_like(clean["block_mae"], dtype=torch.bool)
    others[spoiled["outlier_block"]] = False
    assert torch.equal(clean["block_mae"][others], spoiled["block_mae"][others])
    assert spoiled["block_mae"][spoiled["outlier_block"]] > clean["block_mae"][spoiled["outlier_block"]]


def test_outlier_figure_edges():
    # outlier at either end of the sample, a window wider than the sample, a short odd sample, FP4
    fig, info = outlier_figure(blocksize=64, outlier=10.0, outlier_index=0, n=200)
    assert info["window"] == (0, 128) and info["outlier_block"] == 0
    _, info = outlier_figure(blocksize=64, outlier=-10.0, outlier_index=199, n=200)
    assert info["window"] == (72, 200) and info["outlier_block"] == 3
    _, info = outlier_figure(blocksize=32, outlier=5.0, outlier_index=10, n=41, window=128, quant_type="fp4")
    assert info["window"] == (0, 41) and info["block_mae"].numel() == 2


def test_outlier_figure_rejects_bad_settings():
    with pytest.raises(ValueError, match="blocksize"):
        outlier_figure(blocksize=100)
    with pytest.raises(ValueError, match="outlier_index"):
        outlier_figure(outlier_index=5000)


def test_outlier_sample_is_seeded():
    assert torch.equal(outlier_sample(seed=3), outlier_sample(seed=3))
    x = outlier_sample(n=10, outlier=7.0, outlier_index=4)
    assert x[4] == 7.0


def test_blocksize_rows_and_figure():
    x = torch.randn(2**14, generator=torch.Generator().manual_seed(0))
    rows = blocksize_rows(x, blocksizes=(32, 64, 4096))
    assert [row["blocksize"] for row in rows] == [32, 64, 4096]
    assert [row["bits"] for row in rows] == [5.0, 4.5, 4 + 32 / 4096]
    # on normal data a larger block has a larger absmax and so a larger error
    assert rows[0]["mae"] < rows[1]["mae"] < rows[2]["mae"]
    assert rows[0]["mean_absmax"] < rows[1]["mean_absmax"] < rows[2]["mean_absmax"]
    for highlight in (32, 64, 999):
        fig = blocksize_figure(rows, highlight=highlight)
        assert isinstance(fig, Figure) and len(fig.axes) == 1
        fig.canvas.draw()
