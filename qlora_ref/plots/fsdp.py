"""Lesson 10's figure: what each GPU holds under FSDP2, for several models and numbers of GPUs, against cards.

Built as a `matplotlib.figure.Figure` (not through pyplot), like lesson 9's; returns the breakdowns it drew.
"""

from matplotlib.figure import Figure

from ..vram import GIB, estimate
from .vram import _legend_in_parts_order, _stack

MODELS = ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B")
N_GPUS = (1, 2, 4, 8)
CARDS_GB = (24, 48, 80)


def per_gpu_figure(seq_len: int = 2048, r: int = 16, optimizer: str = "adamw_8bit", batch: int = 1,
                   models=MODELS, n_gpus=N_GPUS, cards_gb=CARDS_GB):
    """One stacked bar per (model, number of GPUs): estimate(..., n_gpus=n)'s parts on one GPU, in GiB, with a
    dashed line at each card's memory (24 / 48 / 80 GiB). Returns (fig, {(model, n): breakdown})."""
    breakdowns = {(m, n): estimate(m, optimizer=optimizer, batch=batch, seq_len=seq_len, r=r, n_gpus=n)
                  for m in models for n in n_gpus}
    fig = Figure(figsize=(9.0, 0.32 * len(breakdowns) + 1.4), layout="constrained", dpi=80)
    axis = fig.subplots()
    labelled = set()
    for y, ((model, n), breakdown) in enumerate(breakdowns.items()):
        _stack(axis, y, breakdown.parts, 0.7, labelled)
        axis.text(breakdown.total / GIB, y, f" {breakdown.total / GIB:.1f}", va="center", fontsize=7)
    for card in cards_gb:
        axis.axvline(card, color="red", lw=0.8, ls="--")
    top = axis.secondary_xaxis("top")
    top.set_xticks(list(cards_gb), [f"{card} GiB" for card in cards_gb], fontsize=7, color="red")
    axis.set_yticks(range(len(breakdowns)), [f"{m} x{n}" for m, n in breakdowns], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.1 * max(max(b.total for b in breakdowns.values()) / GIB, max(cards_gb)))
    axis.set_xlabel("GiB per GPU")
    axis.set_title(f"per GPU under FSDP2 (x1: one GPU, no FSDP), {optimizer}, batch {batch} x {seq_len} tokens "
                   f"per GPU, r = {r}", fontsize=9)
    _legend_in_parts_order(fig, axis)
    return fig, breakdowns
