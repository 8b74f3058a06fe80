"""Lesson 2's figures and the small computations behind them: where a 4-bit code puts its 16 levels.

- `bin_masses(code, scale)`: the N(0, 1) probability of each level's rounding bin, with the levels placed at
  code * scale (in standard deviations). For NF4, scale = Phi^-1(offset) is the construction's own scaling.
- `code_usage(x, code, blocksize)`: how often each level is chosen when x is quantized blockwise (absmax
  per block, nearest level), the measured counterpart of bin_masses.
- `blockwise_mae(x, code, blocksize)`: the mean absolute error of that quantization, for any 16-level code
  (also one that bitsandbytes does not have, such as NF4 with another offset).
- `plot_equal_mass_slabs(n)`: the N(0, 1) density cut into n slabs of equal probability, the picture
  quantile quantization starts from.
- `plot_codebook_levels(...)` and `plot_bin_masses(...)`: the figures, built on matplotlib's Figure directly
  (not pyplot), each returned with the numbers it drew.
"""

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import norm

from ..blockwise import block_absmax, dequantize_codes, nearest_code, scale_to_unit
from ..codebooks import codebook_4bit
from ..validation import check_blocksize, check_float_tensor

COLORS = {"int4": "C0", "fp4": "C2", "nf4": "C3"}


def resolve_codes(codes) -> dict:
    """{name: 16-entry float32 table} from names ('int4', 'fp4', 'nf4'), (name, table) pairs or a dict."""
    if isinstance(codes, str):
        codes = [codes]
    items = codes.items() if isinstance(codes, dict) else codes
    resolved = {}
    for item in items:
        name, table = (item, codebook_4bit(item)) if isinstance(item, str) else item
        table = torch.as_tensor(table, dtype=torch.float32)
        if table.shape != (16,):
            raise ValueError(f"code {name!r} must have 16 entries, got shape {tuple(table.shape)}")
        resolved[name] = table
    if not resolved:
        raise ValueError("give at least one code")
    return resolved


def levels_of(code: torch.Tensor) -> torch.Tensor:
    """The distinct values of a table, in increasing order (FP4 and INT4 store 0 twice, as +0 and -0)."""
    return torch.unique(code.float())


def bin_masses(code: torch.Tensor, scale: float = 1.0):
    """(levels, masses): each distinct level (times `scale`, in standard deviations) and the N(0, 1)
    probability of its rounding bin, the interval between the midpoints to its neighbours (the outer
    bins reach to -inf and +inf)."""
    levels = levels_of(code).double().numpy() * scale
    edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
    return torch.from_numpy(levels / scale), torch.from_numpy(np.diff(norm.cdf(edges)))


def _codes(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    check_float_tensor(x)
    check_blocksize(blocksize)
    flat = x.detach().reshape(-1).float().cpu()
    absmax = block_absmax(flat, blocksize)
    return flat, absmax, nearest_code(scale_to_unit(flat, absmax, blocksize), code)


def code_usage(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64):
    """(levels, frequencies): how often each distinct level is chosen when x is quantized blockwise."""
    _, _, indices = _codes(x, code, blocksize)
    per_entry = torch.bincount(indices.reshape(-1), minlength=code.numel()).double()
    levels = levels_of(code)
    position = torch.searchsorted(levels, code.float())  # the level each table entry stands for (+0 and -0 alike)
    counts = torch.zeros(levels.numel(), dtype=torch.float64).index_add_(0, position, per_entry)
    return levels, counts / counts.sum()


def blockwise_mae(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> float:
    """Mean |x - x^| of blockwise absmax quantization with `code` (the same steps as qlora_ref.quantize_4bit)."""
    flat, absmax, indices = _codes(x, code, blocksize)
    restored = dequantize_codes(indices, code, absmax, blocksize)
    return (flat.double() - restored.double()).abs().mean().item()


def unit_values(x: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """x / (its block's absmax): the values in [-1, 1] that the code's levels are compared with."""
    check_float_tensor(x)
    check_blocksize(blocksize)
    flat = x.detach().reshape(-1).float().cpu()
    return scale_to_unit(flat, block_absmax(flat, blocksize), blocksize)


def plot_codebook_levels(codes=("int4", "fp4", "nf4"), data=None, blocksize: int = 64, sigma: float = None, bins: int = 80):
    """One row per code: its distinct levels (vertical lines) over what they will quantize.

    data None: the normal density N(0, sigma^2) on [-1, 1]; by default sigma = 1 / Phi^-1(0.9677083), the
    scaling NF4 is built for (its outermost quantile lands on 1). data a tensor: the histogram of
    data / block absmax (blocks of `blocksize`), which is exactly what the levels are compared with, and
    each code's blockwise mean absolute error on the data.

    Returns (figure, info): info["levels"][name] is each code's distinct levels; with data,
    info["mae"][name] is its error and info["unit"] the values that were histogrammed.
    """
    resolved = resolve_codes(codes)
    info = {"levels": {name: levels_of(table) for name, table in resolved.items()}}
    if data is not None:
        unit = unit_values(data, blocksize)
        info["unit"] = unit
        info["mae"] = {name: blockwise_mae(data, table, blocksize) for name, table in resolved.items()}
    else:
        sigma = 1 / norm.ppf(0.9677083) if sigma is None else sigma
        info["sigma"] = sigma

    fig = Figure(figsize=(8, 0.4 + 1.1 * len(resolved)), layout="constrained")
    axes = fig.subplots(len(resolved), 1, sharex=True, squeeze=False)[:, 0]
    grid = np.linspace(-1, 1, 401)
    for ax, (name, levels) in zip(axes, info["levels"].items()):
        if data is None:
            ax.fill_between(grid, norm.pdf(grid, scale=sigma), color="0.8")
            label = f"{name}: {levels.numel()} levels"
        else:
            ax.hist(info["unit"].numpy(), bins=bins, range=(-1, 1), color="0.75")
            label = f"{name}: {levels.numel()} levels, MAE {info['mae'][name]:.4g}"
        ax.vlines(levels.numpy(), 0, 1, transform=ax.get_xaxis_transform(), colors=COLORS.get(name, "C1"), linewidth=1.2)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
        ax.set_title(label, fontsize=8, loc="left")
    axes[-1].set_xlim(-1.05, 1.05)
    axes[-1].set_xlabel("value / block absmax" if data is not None else f"value (density: N(0, {sigma:.3f}²))")
    return fig, info


def plot_bin_masses(code: torch.Tensor, scale: float, usage=None, name: str = "nf4"):
    """Bars: each level's N(0, 1) bin mass with the levels at code * scale; dots: measured usage (optional,
    as returned by code_usage); a dashed line at 1/16, the mass of equal-probability bins.

    Returns (figure, masses) with masses as bin_masses returns it (levels, masses).
    """
    levels, masses = bin_masses(code, scale)
    fig = Figure(figsize=(8, 2.4), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(levels.numel())
    ax.bar(positions, masses.numpy(), color="0.7", label=f"N(0,1) mass, levels × {scale:.4g}")
    if usage is not None:
        used_levels, frequencies = usage
        if not torch.equal(used_levels.float(), levels.float()):
            raise ValueError("usage must be for the same code (its levels differ)")
        ax.plot(positions, frequencies.numpy(), "o", color=COLORS.get(name, "C1"), label="measured usage")
    ax.axhline(1 / 16, color="k", linestyle="--", linewidth=0.8, label="1/16")
    ax.set_xticks(positions, [f"{v:.2f}" for v in levels.tolist()], fontsize=7)
    ax.set_xlabel(f"{name} level")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    return fig, (levels, masses)


def plot_equal_mass_slabs(n: int = 16, span: float = 3.5):
    """The N(0, 1) density on [-span, span], cut into n slabs that each hold probability 1/n.

    The slab edges are the quantiles Phi^-1(i/n), i = 0..n: narrow slabs in the crowded centre, wide ones in
    the tails (the two outer slabs reach to -inf and +inf; the plot cuts them at +-span).
    Returns (figure, edges) with edges the n + 1 quantiles, infinite at both ends.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    edges = norm.ppf(np.arange(n + 1) / n)
    fig = Figure(figsize=(8, 2.4), layout="constrained")
    ax = fig.subplots()
    for i, (left, right) in enumerate(zip(edges[:-1], edges[1:])):
        grid = np.linspace(max(left, -span), min(right, span), 50)
        ax.fill_between(grid, norm.pdf(grid), color="C3" if i % 2 else "C0", alpha=0.45, linewidth=0)
    ax.plot(np.linspace(-span, span, 401), norm.pdf(np.linspace(-span, span, 401)), color="k", linewidth=1)
    ax.set_xlim(-span, span)
    ax.set_ylim(0, None)
    ax.set_yticks([])
    ax.set_xlabel("value, in standard deviations")
    ax.set_title(f"N(0, 1) cut into {n} slabs, each holding probability 1/{n}", fontsize=9)
    return fig, edges
