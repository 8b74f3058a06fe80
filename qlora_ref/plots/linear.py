"""Lesson 1's figures: where a linear quantizer puts its levels, drawn over the data it quantizes.

`plot_levels(x, bits, scheme, outlier)` is the function behind the lesson's widget. It builds a
matplotlib Figure directly (not through pyplot, so nothing is left open and nothing is shown twice) and
returns it with a dict of the numbers it drew, which the tests and the notebook check.
"""

import torch
from matplotlib.figure import Figure

from ..linear import quantization_error, quantize_absmax, quantize_zeropoint

SCHEMES = {"absmax": quantize_absmax, "zeropoint": quantize_zeropoint}


def linear_levels(bits: int, scale: float, zero: float = 0.0, symmetric: bool = True) -> torch.Tensor:
    """Every value a linear quantizer can output, x^ = s (q - z), in increasing order.

    symmetric (absmax): q in -(2^(b-1) - 1) .. 2^(b-1) - 1, z = 0   ->  2^b - 1 levels
    asymmetric (zero-point): q in 0 .. 2^b - 1                      ->  2^b levels
    """
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        codes = torch.arange(-qmax, qmax + 1, dtype=torch.float32)
    else:
        codes = torch.arange(0, 2**bits, dtype=torch.float32)
    return float(scale) * (codes - float(zero))


def quantize_with_levels(x: torch.Tensor, bits: int, scheme: str):
    """(LinearQuantized, levels) for a per-tensor quantization of x with 'absmax' or 'zeropoint'."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    quantized = SCHEMES[scheme](x, bits=bits, granularity="tensor")
    levels = linear_levels(bits, float(quantized.scale), float(quantized.zero), symmetric=scheme == "absmax")
    return quantized, levels


def plot_levels(x: torch.Tensor, bits: int = 4, scheme: str = "absmax", outlier: float = 0.0, bins: int = 80):
    """Histogram of x (plus one outlier value if `outlier` != 0) with the quantizer's levels drawn over it.

    Left panel: the whole range, outlier included. Right panel: zoomed on the bulk of the data (x's own
    min..max), where nearly all values live: how many levels land there is what the outlier costs.

    Returns (figure, info) with info = {levels, scale, zero, mae, rmse, levels_in_bulk, codes_used}; mae and
    rmse are measured on x without the outlier, so that the outlier's effect on everyone else shows.
    """
    flat = x.detach().reshape(-1).float().cpu()
    data = torch.cat([flat, torch.tensor([float(outlier)])]) if outlier != 0 else flat
    quantized, levels = quantize_with_levels(data, bits, scheme)
    restored = quantized.dequantize()
    error = quantization_error(flat, restored[: flat.numel()])
    low, high = float(flat.min()), float(flat.max())
    in_bulk = (levels >= low) & (levels <= high)
    info = {
        "levels": levels,
        "scale": float(quantized.scale),
        "zero": int(quantized.zero),
        "mae": error["mae"],
        "rmse": error["rmse"],
        "levels_in_bulk": int(in_bulk.sum()),
        "codes_used": int(quantized.q.unique().numel()),
    }

    fig = Figure(figsize=(9, 2.8), layout="constrained")
    full, zoom = fig.subplots(1, 2)
    values = data.numpy()
    for ax, (left, right) in ((full, (min(low, float(levels.min())), max(high, float(levels.max())))), (zoom, (low, high))):
        ax.hist(values, bins=bins, range=(left, right), color="0.7")
        shown = levels[(levels >= left) & (levels <= right)].numpy()
        ax.vlines(shown, 0, 1, transform=ax.get_xaxis_transform(), colors="C3", linewidth=0.6 if bits > 5 else 1.0)
        ax.set_xlim(left, right)
        ax.set_yticks([])
    full.set_title(f"{scheme}, {bits} bits: all {levels.numel()} levels", fontsize=9)
    zoom.set_title(f"the bulk [{low:.2f}, {high:.2f}]: {info['levels_in_bulk']} levels, MAE {info['mae']:.3g}", fontsize=9)
    if outlier != 0:
        full.annotate(
            f"outlier {outlier:g}", xy=(float(outlier), 0.02), xytext=(float(outlier), 0.45), xycoords=("data", "axes fraction"),
            fontsize=8, ha="right" if outlier > 0 else "left", arrowprops={"arrowstyle": "->", "color": "C0"},
        )
    return fig, info
