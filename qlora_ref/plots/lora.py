"""Lesson 6's figures: LoRA's layer as a picture (W0 plus the product B A, drawn to scale), and the singular
values of a fine-tuning update, which say how much of it a rank-r product can hold.

The figure functions build a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left open
in pyplot's figure list: the caller shows it (`display(fig)`) or drops it. Each also returns the numbers it drew.
"""

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

__all__ = ["energy_share", "lora_diagram", "spectrum_figure"]


def lora_diagram(out_features: int = 64, in_features: int = 64, r: int = 8):
    """(Figure, boxes): W0 [out, in] + B [out, r] · A [r, in], each matrix a rectangle to scale.

    boxes maps each name to (x, y, width, height) in the figure's units (one unit per row or column); the frozen
    W0 is grey, the trained B and A are coloured, and B starts at zero (drawn hatched)."""
    if min(out_features, in_features, r) < 1 or r > min(out_features, in_features):
        raise ValueError(f"need 1 <= r <= min(out, in), got out={out_features}, in={in_features}, r={r}")
    gap = max(in_features, out_features) / 4
    boxes = {"W0": (0.0, 0.0, in_features, out_features)}
    boxes["B"] = (in_features + 1.5 * gap, 0.0, r, out_features)
    boxes["A"] = (boxes["B"][0] + r + gap, out_features - r, in_features, r)
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    style = {"W0": dict(facecolor="0.8", edgecolor="0.3"),
             "B": dict(facecolor="tab:orange", edgecolor="tab:orange", alpha=0.5, hatch="//"),
             "A": dict(facecolor="tab:blue", edgecolor="tab:blue", alpha=0.5)}
    labels = {"W0": f"W0 (frozen, 4-bit in QLoRA)\n[{out_features} x {in_features}]",
              "B": f"B [{out_features} x {r}]\nstarts at 0", "A": f"A  [{r} x {in_features}]"}
    for name, (x, y, w, h) in boxes.items():
        ax.add_patch(Rectangle((x, y), w, h, **style[name]))
        below = name in ("A", "B")
        ax.text(x + w / 2, y - 0.08 * out_features if below else y + h / 2, labels[name], ha="center",
                va="top" if below else "center", fontsize=9)
    ax.text(in_features + 0.75 * gap, out_features / 2, "+", ha="center", va="center", fontsize=20)
    ax.text(boxes["B"][0] + r + gap / 2, out_features / 2, "·", ha="center", va="center", fontsize=20)
    ax.set_xlim(-2, boxes["A"][0] + in_features + 2)
    ax.set_ylim(-0.35 * out_features, out_features + 2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"W = W0 + (alpha/r) B A: {out_features * in_features:,} frozen numbers, "
                 f"{r * (in_features + out_features):,} trained (r = {r})", fontsize=10)
    return fig, boxes


def energy_share(matrix: torch.Tensor) -> torch.Tensor:
    """Cumulative share of the squared Frobenius norm held by the top k singular values, for k = 1, 2, ...

    A rank-k matrix can hold at most share[k - 1] of `matrix`'s energy (Eckart-Young): the best rank-k
    approximation is the truncated SVD, and its error is the rest."""
    if matrix.dim() != 2:
        raise ValueError(f"need a 2-D matrix, got shape {tuple(matrix.shape)}")
    squared = torch.linalg.svdvals(matrix.double()) ** 2
    return squared.cumsum(0) / squared.sum()


def spectrum_figure(matrices: dict, ks=(1, 4, 8, 16, 32)):
    """(Figure, shares): each matrix's energy_share against the rank, one curve per name; shares[name][k] is the
    share of the top k singular values for each k in ks."""
    fig = Figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    shares = {}
    for name, matrix in matrices.items():
        share = energy_share(matrix)
        ax.plot(range(1, share.numel() + 1), share.numpy(), label=name)
        shares[name] = {k: float(share[k - 1]) for k in ks if k <= share.numel()}
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r (top r singular values)")
    ax.set_ylabel("share of the energy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, shares
