"""Lesson 4's figure: what the quantization constants cost, with and without double quantization.

The function builds a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left open
in pyplot's figure list: the caller shows it (`display(fig)`, or as a cell's last value) or drops it.
It also returns the numbers it drew, so that tests and learners can check them.
"""

from matplotlib.figure import Figure

from ..double_quant import NESTED_BLOCKSIZE, constant_bits_per_parameter
from ..validation import BLOCKSIZES

__all__ = ["overhead_rows", "overhead_figure"]


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
