"""Lesson 3's figures: what the block size does to the error, and how far one outlier reaches.

Both functions build a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left
open in pyplot's figure list: the caller shows it (`display(fig)`, or as a cell's last value) or drops it.
Each also returns the numbers it drew, so that tests and learners can check them.
"""

from math import ceil

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..fourbit import dequantize_4bit, quantize_4bit
from ..linear import quantization_error
from ..validation import BLOCKSIZES

__all__ = ["blocksize_rows", "blocksize_figure", "outlier_figure", "outlier_sample"]


def blocksize_rows(x: torch.Tensor, blocksizes=BLOCKSIZES, quant_type: str = "nf4") -> list:
    """For each block size B: the 4-bit error of `x` and what the absmax constants cost.

    One dict per B with keys blocksize, mae, rmse, max (errors of the dequantized values), mean_absmax
    (the average block absmax: it grows with B, which is why the error does) and bits (stored bits per
    value, from QuantState.bits_per_parameter(): 4 + 32/B).
    """
    rows = []
    for blocksize in blocksizes:
        packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
        error = quantization_error(x, dequantize_4bit(packed, state))
        rows.append(
            {
                "blocksize": blocksize,
                **error,
                "mean_absmax": state.absmax.mean().item(),
                "bits": state.bits_per_parameter(),
            }
        )
    return rows


def blocksize_figure(rows: list, highlight: int = 64) -> Figure:
    """Mean absolute error against stored bits per value, one point per block size (from blocksize_rows)."""
    bits = [row["bits"] for row in rows]
    mae = [row["mae"] for row in rows]
    fig = Figure(figsize=(6.4, 3.6), layout="constrained", dpi=80)
    ax = fig.subplots()
    ax.plot(bits, mae, "o-", color="tab:blue")
    for row in rows:
        chosen = row["blocksize"] == highlight
        ax.annotate(
            f"B={row['blocksize']}",
            (row["bits"], row["mae"]),
            textcoords="offset points",
            xytext=(6, -4 if chosen else 4),
            fontsize=8,
            fontweight="bold" if chosen else "normal",
        )
        if chosen:
            ax.plot([row["bits"]], [row["mae"]], "o", color="tab:red", zorder=3)
    ax.set_xlabel("stored bits per value (4 + 32/B)")
    ax.set_ylabel("mean |x - x^|")
    ax.set_title("Smaller blocks: lower error, more constants", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def outlier_sample(n: int = 1024, outlier: float = 0.0, outlier_index: int = 300, seed: int = 0) -> torch.Tensor:
    """n values of N(0, 1) from a seeded generator, with x[outlier_index] replaced by `outlier` if it is not 0."""
    if not 0 <= outlier_index < n:
        raise ValueError(f"outlier_index must be in [0, {n}), got {outlier_index}")
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if outlier != 0:
        x[outlier_index] = outlier
    return x


def outlier_figure(
    blocksize: int = 64,
    outlier: float = 20.0,
    outlier_index: int = 300,
    n: int = 1024,
    quant_type: str = "nf4",
    seed: int = 0,
    window: int = 128,
):
    """Quantize outlier_sample(...) in blocks of `blocksize`; draw the error per block and a close-up.

    Top: `window` values around the outlier (x and its reconstruction x^), block edges dashed.
    Bottom: mean |x - x^| of every block, the outlier's block in red.
    Returns (fig, info): info has x, x_hat, absmax, block_mae (one per block), outlier_block (None when
    outlier == 0) and window (start, stop).
    """
    x = outlier_sample(n, outlier, outlier_index, seed)
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    x_hat = dequantize_4bit(packed, state)
    blocks = ceil(n / blocksize)
    err = (x - x_hat).abs()
    block_mae = torch.stack([err[b * blocksize : (b + 1) * blocksize].mean() for b in range(blocks)])
    outlier_block = outlier_index // blocksize if outlier != 0 else None

    window = min(window, n)
    start = min(max(outlier_index - window // 2, 0), n - window)
    stop = start + window
    index = torch.arange(start, stop)

    fig = Figure(figsize=(7.5, 4.6), layout="constrained", dpi=80)
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
    top.plot(index, x[start:stop], ".", color="0.6", markersize=4, label="x")
    top.plot(index, x_hat[start:stop], "_", color="tab:blue", markersize=6, label="x^ (dequantized)")
    for edge in range(ceil(start / blocksize) * blocksize, stop, blocksize):
        top.axvline(edge - 0.5, color="0.3", lw=0.6, ls="--")
    limit = 4.0
    top.set_ylim(-limit, limit)
    if outlier != 0 and start <= outlier_index < stop and abs(outlier) > limit:
        edge, marker = (limit, "^") if outlier > 0 else (-limit, "v")
        top.plot([outlier_index], [0.93 * edge], marker, color="tab:red", markersize=7)
        top.annotate(
            f"outlier {outlier:g} (off scale)",
            (outlier_index, 0.93 * edge),
            textcoords="offset points",
            xytext=(8, -3),
            color="tab:red",
            fontsize=8,
        )
    top.set_title(f"{quant_type.upper()}, blocks of {blocksize}: values {start}..{stop - 1}", fontsize=10)
    top.legend(loc="lower right", fontsize=8)

    colors = ["tab:red" if b == outlier_block else "tab:blue" for b in range(blocks)]
    bottom.bar(range(blocks), block_mae.tolist(), color=colors, width=0.8)
    if blocks <= 16:
        bottom.set_xticks(range(blocks))
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("block")
    bottom.set_ylabel("mean |x - x^|")
    bottom.set_ylim(0, max(0.5, float(block_mae.max()) * 1.1))

    info = {
        "x": x,
        "x_hat": x_hat,
        "absmax": state.absmax,
        "block_mae": block_mae,
        "outlier_block": outlier_block,
        "window": (start, stop),
    }
    return fig, info
