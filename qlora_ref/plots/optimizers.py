"""Lesson 7's figures on the 8-bit maps: how finely each map resolves a value, and what that does to
Adam's moments, decade by decade.

The figure functions build a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is
left open in pyplot's figure list: the caller shows it (`display(fig)`) or drops it. Each also returns
the numbers it drew, so that tests and learners can check them. (The paging figures are in
qlora_ref.plots.paging.)
"""

import torch
from matplotlib.figure import Figure

__all__ = ["error_by_decade", "error_by_decade_figure", "linear_code", "relative_spacing", "resolution_figure"]


def linear_code(signed: bool = True) -> torch.Tensor:
    """A linear 8-bit map as a sorted 256-level code, to compare with the dynamic map on equal terms:
    signed, lesson 1's int8 absmax levels k / 127 for k = -128..127 (k = -128 lies below -1 and is never
    the nearest level of a value in [-1, 1]); unsigned, k / 255 for k = 0..255.
    """
    if signed:
        return torch.arange(-128, 128, dtype=torch.float32) / 127
    return torch.arange(256, dtype=torch.float32) / 255


def _check_code(code) -> None:
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not code.is_floating_point() or code.numel() < 2:
        raise ValueError("a code must be a 1-D float tensor of at least 2 levels (e.g. qlora_ref.dynamic_map())")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("a code's levels must be sorted in ascending order")


def relative_spacing(code: torch.Tensor):
    """(levels, spacing): the positive levels of `code` except the largest, and for each the relative
    gap to the next level up, (next - level) / level. A value between two levels is rounded to the
    nearer one, so its relative error is at most about half the spacing; values below half the
    smallest positive level round to 0 (relative error 1).
    """
    _check_code(code)
    positive = code[code > 0].double()
    if positive.numel() < 2:
        raise ValueError("the code has fewer than 2 positive levels: no spacing to measure")
    return positive[:-1], (positive[1:] - positive[:-1]) / positive[:-1]


def resolution_figure(codes: dict):
    """The relative spacing of each code's positive levels against the level, both axes logarithmic.

    Returns (fig, spacings): {name: relative_spacing(code)}.
    """
    if not codes:
        raise ValueError("give at least one code, as {name: code}")
    spacings = {name: relative_spacing(code) for name, code in codes.items()}
    fig = Figure(figsize=(7.5, 3.4), layout="constrained", dpi=80)
    axis = fig.subplots()
    for name, (levels, spacing) in spacings.items():
        axis.loglog(levels.numpy(), spacing.numpy(), ".-", ms=3, lw=0.8, label=name)
    axis.set_xlabel("level (a value in [0, 1] after dividing by the block's absmax)")
    axis.set_ylabel("gap to the next level / level")
    axis.set_title("resolution of the 8-bit maps: relative gap between neighbouring levels", fontsize=9)
    axis.grid(True, which="major", lw=0.4, alpha=0.5)
    axis.legend(fontsize=8)
    return fig, spacings


def error_by_decade(x: torch.Tensor, x_hat: torch.Tensor, decades: int = 8) -> dict:
    """The relative error |x_hat - x| / |x| of a reconstruction, by decade of |x| below the largest:
    decade k holds the values with max|x| 10^-(k+1) < |x| <= max|x| 10^-k, k = 0..decades-1.

    Returns {"upper": [10^-k], "count": [...], "mean_relative_error": [...], "zeroed": [...]}, one entry
    per decade: how many values lie in it, their mean relative error (nan for an empty decade), and
    the fraction of them reconstructed as exactly 0. Zeros of x are left out (no relative error).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(x_hat, torch.Tensor):
        raise TypeError("x and x_hat must be tensors")
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if isinstance(decades, bool) or not isinstance(decades, int) or decades < 1:
        raise ValueError(f"decades must be a positive int, got {decades!r}")
    x, x_hat = x.double().reshape(-1), x_hat.double().reshape(-1)
    if not bool(torch.isfinite(x).all() and torch.isfinite(x_hat).all()):
        raise ValueError("x and x_hat must be finite")
    keep = x != 0
    x, x_hat = x[keep], x_hat[keep]
    if x.numel() == 0:
        raise ValueError("x has no nonzero values")
    relative = x.abs() / x.abs().max()
    error = (x_hat - x).abs() / x.abs()
    table = {"upper": [], "count": [], "mean_relative_error": [], "zeroed": []}
    for k in range(decades):
        upper = 10.0**-k
        inside = (relative <= upper) & (relative > upper / 10)
        n = int(inside.sum())
        table["upper"].append(upper)
        table["count"].append(n)
        table["mean_relative_error"].append(float(error[inside].mean()) if n else float("nan"))
        table["zeroed"].append(float((x_hat[inside] == 0).double().mean()) if n else float("nan"))
    return table


def error_by_decade_figure(x: torch.Tensor, reconstructions: dict, decades: int = 8, title: str = ""):
    """Mean relative error per decade of |x| below its maximum (error_by_decade), one line per
    reconstruction, on a logarithmic error axis; errors of 1 mean the values were rounded to 0.

    Returns (fig, tables): {name: error_by_decade(x, x_hat, decades)}.
    """
    if not reconstructions:
        raise ValueError("give at least one reconstruction, as {name: x_hat}")
    tables = {name: error_by_decade(x, x_hat, decades) for name, x_hat in reconstructions.items()}
    fig = Figure(figsize=(7.5, 3.4), layout="constrained", dpi=80)
    axis = fig.subplots()
    ks = list(range(decades))
    for name, table in tables.items():
        axis.semilogy(ks, table["mean_relative_error"], "o-", ms=4, label=name)
    axis.set_xticks(ks, [f"1e-{k + 1}..1e-{k}" if k else "0.1..1" for k in ks], fontsize=7)
    axis.set_xlabel("|value| / largest |value| of the tensor")
    axis.set_ylabel("mean relative error")
    axis.axhline(1.0, color="0.5", lw=0.8, ls="--")
    axis.set_title(title or "relative error of the reconstruction, by decade", fontsize=9)
    axis.grid(True, which="major", lw=0.4, alpha=0.5)
    axis.legend(fontsize=8)
    return fig, tables
