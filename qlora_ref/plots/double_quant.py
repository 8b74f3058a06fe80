"""Lesson 4's figures: the 8-bit dynamic map that double quantization uses (`dynamic_map_figure`), and what
the quantization constants cost, with and without double quantization (`overhead_figure`).

The function builds a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left open
in pyplot's figure list: the caller shows it (`display(fig)`, or as a cell's last value) or drops it.
It also returns the numbers it drew, so that tests and learners can check them.
"""

import torch
from matplotlib.figure import Figure

from ..codebooks import dynamic_map
from ..double_quant import NESTED_BLOCKSIZE, constant_bits_per_parameter
from ..validation import BLOCKSIZES

__all__ = ["dynamic_map_figure", "overhead_rows", "overhead_figure"]


def dynamic_map_figure(code: torch.Tensor = None, decades: int = 7):
    """The positive levels of the dynamic map (default: the signed 256-level one), once on a linear axis and
    once on a log axis, where each decade [10^-k, 10^-k+1] is shaded and labelled with its number of levels.

    On the linear axis the levels below 0.01 all sit on top of 0; the log axis shows that the map is built
    decade by decade, with more levels in the larger decades.
    Returns (figure, counts): counts[k] is the number of positive levels in the decade (10^(k-decades), 10^(k-decades+1)).
    """
    code = dynamic_map(signed=True) if code is None else code
    positive = code[code > 0].double()
    bounds = [10.0 ** (k - decades) for k in range(decades + 1)]
    counts = [int(((positive > low) & (positive < high)).sum()) for low, high in zip(bounds[:-1], bounds[1:])]

    fig = Figure(figsize=(8, 2.8), layout="constrained")
    linear, log = fig.subplots(2, 1)
    for ax in (linear, log):
        ax.vlines(positive.numpy(), 0, 1, color="tab:blue", linewidth=0.7)
        ax.set_yticks([])
    linear.set_xlim(0, 1.02)
    linear.set_title(f"{positive.numel()} positive levels, linear axis", fontsize=9, loc="left")
    log.set_xscale("log")
    log.set_xlim(bounds[0] * 0.8, 1.25)
    for k, (low, high, count) in enumerate(zip(bounds[:-1], bounds[1:], counts)):
        if k % 2:
            log.axvspan(low, high, color="0.92", zorder=0)
        log.text((low * high) ** 0.5, 1.08, str(count), ha="center", va="bottom", fontsize=8)
    log.set_ylim(0, 1.35)
    log.set_title("log axis: levels per decade", fontsize=9, loc="left")
    log.set_xlabel("|level|")
    return fig, counts


def overhead_rows(blocksizes=BLOCKSIZES, parameters: float = 65e9) -> list:
    """One dict per block size B: bits per parameter of the constants without and with double
    quantization (32/B and 8/B + 32/(256 B)), the bits saved, and the same in GB (1e9 bytes) for a
    model of `parameters` weights, all quantized in blocks of B.
    """
    rows = []
    for blocksize in blocksizes:
        plain = constant_bits_per_parameter(blocksize, double_quant=False)
        nested = constant_bits_per_parameter(blocksize, double_quant=True)
        rows.append(
            {
                "blocksize": blocksize,
                "plain_bits": plain,
                "nested_bits": nested,
                "saved_bits": plain - nested,
                "plain_gb": parameters * plain / 8e9,
                "nested_gb": parameters * nested / 8e9,
                "saved_gb": parameters * (plain - nested) / 8e9,
            }
        )
    return rows


def overhead_figure(blocksizes=BLOCKSIZES, highlight: int = 64, parameters: float = 65e9):
    """Left: constants' bits per parameter against the block size, plain and double-quantized.
    Right: the constants of a `parameters`-weight model in GB at block size `highlight`.

    Returns (fig, row): the overhead_rows(...) entry of `highlight`.
    """
    blocksizes = list(blocksizes)
    if highlight not in blocksizes:
        raise ValueError(f"highlight must be one of {blocksizes}, got {highlight!r}")
    rows = overhead_rows(blocksizes, parameters)
    row = rows[blocksizes.index(highlight)]

    fig = Figure(figsize=(8.0, 3.4), layout="constrained", dpi=80)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    left.plot(blocksizes, [r["plain_bits"] for r in rows], "o-", color="tab:orange", label="float32 absmax: 32/B")
    left.plot(
        blocksizes,
        [r["nested_bits"] for r in rows],
        "o-",
        color="tab:blue",
        label=f"double quantized: 8/B + 32/({NESTED_BLOCKSIZE}B)",
    )
    left.axvline(highlight, color="0.4", lw=0.8, ls="--")
    left.annotate(
        f"B={highlight}: {row['plain_bits']:.3f} -> {row['nested_bits']:.3f}",
        (highlight, row["plain_bits"]),
        textcoords="offset points",
        xytext=(6, 4),
        fontsize=8,
    )
    left.set_xscale("log", base=2)
    left.set_xticks(blocksizes, [str(b) for b in blocksizes], fontsize=8)
    left.set_xlabel("block size B")
    left.set_ylabel("bits per parameter (constants)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    values = [row["plain_gb"], row["nested_gb"]]
    right.bar(["float32\nabsmax", "double\nquantized"], values, color=["tab:orange", "tab:blue"], width=0.6)
    for i, value in enumerate(values):
        right.annotate(f"{value:.2f} GB", (i, value), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=8)
    right.set_ylim(0, max(values) * 1.2)
    right.set_ylabel("GB of constants")
    right.set_title(f"{parameters / 1e9:g}B parameters, B={highlight}: {row['saved_gb']:.2f} GB saved", fontsize=9)
    return fig, row
