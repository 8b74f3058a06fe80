"""Lesson 9's figures: a training step's memory as stacked bars, against the memory of a GPU.

Both functions build a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left
open in pyplot's figure list: the caller shows it (`display(fig)`, or as a cell's last value) or drops it.
Each also returns the breakdown(s) it drew (qlora_ref.vram.MemoryBreakdown), so that tests and learners
can check them.
"""

from matplotlib.figure import Figure

from ..methods import RECIPES
from ..vram import DEVICE_PARTS, GIB, GPUS, PARTS, estimate, estimate_for, gpu_memory

__all__ = ["budget_figure", "measurements_figure", "methods_figure", "PART_COLORS"]

PART_COLORS = dict(zip(PARTS, (
    "#1f4e79", "#5b9bd5", "#9dc3e6",  # weights: 4-bit codes, constants, 16-bit
    "#c55a11", "#f4b183", "#ffd966",  # trainable weights, gradients, optimizer states
    "#2e75b6",  # gathered layers (FSDP2, lesson 10)
    "#548235", "#a9d18e", "#7030a0", "#b4a7d6", "#d5a6bd", "#e06666",  # activations and transients
    "#7f7f7f", "#bfbfbf",  # DEVICE_PARTS: CUDA context, allocator overhead
)))


def _stack(axis, y, parts: dict, height: float, labelled: set) -> None:
    """Draw parts' non-zero values as one stacked bar at y; label each part the first time it is drawn."""
    left = 0.0
    for part, value in parts.items():
        if value:
            label = None if part in labelled else part + (" (H100 constant)" if part in DEVICE_PARTS else "")
            labelled.add(part)
            axis.barh(y, value / GIB, left=left, height=height, color=PART_COLORS[part],
                      hatch="//" if part in DEVICE_PARTS else None, edgecolor="white", linewidth=0.5, label=label)
            left += value / GIB


def _legend_in_parts_order(fig, axis) -> None:
    """One legend for the figure, its parts in PARTS order (the order the bars stack them)."""
    handles, labels = axis.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: PARTS.index(labels[i].removesuffix(" (H100 constant)")))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right center", fontsize=7,
               frameon=False)


def budget_figure(model="Llama-2-7B", method: str = "qlora_nf4_dq", seq_len: int = 512, batch: int = 1,
                  r: int = 64, gpu: str = "T4 (14.75 GiB)", optimizer: str = "paged_adamw_8bit",
                  gradient_checkpointing: bool = True, optimizer_in_backward: bool = False):
    """One horizontal bar: estimate(...)'s parts stacked, in GiB, and the GPU's memory as a red line.
    The title gives the total and whether it fits. Returns (fig, breakdown)."""
    capacity = gpu_memory(gpu)
    breakdown = estimate(model, method=method, optimizer=optimizer, batch=batch, seq_len=seq_len, r=r,
                         gradient_checkpointing=gradient_checkpointing, optimizer_in_backward=optimizer_in_backward)
    fig = Figure(figsize=(9.0, 2.6), layout="constrained", dpi=80)
    axis = fig.subplots()
    _stack(axis, 0, breakdown.parts, 0.6, set())
    axis.axvline(capacity / GIB, color="red", lw=2, label=f"{gpu}: {capacity / GIB:.0f} GiB")
    axis.set_xlim(0, 1.08 * max(capacity, breakdown.total) / GIB)
    axis.set_yticks([])
    axis.set_xlabel("GiB")
    verdict = "fits" if breakdown.fits(gpu) else "does NOT fit"
    setup = breakdown.setup
    axis.set_title(f"{setup['model']}, {method}, {optimizer}, batch {batch} x {seq_len} tokens"
                   f"{f', r = {r}' if setup['r'] else ''}{', checkpointing' if gradient_checkpointing else ''}"
                   f"{', update in backward' if optimizer_in_backward else ''}: "
                   f"{breakdown.total / GIB:.2f} GiB, {verdict}", fontsize=9)
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return fig, breakdown


def methods_figure(model="Llama-2-7B", seq_len: int = 512, batch: int = 1, r: int = 64,
                   optimizer: str = "paged_adamw_8bit", gradient_checkpointing: bool = True, gpus=tuple(GPUS)):
    """A stacked bar per method (RECIPES) for one model and setup, with a dashed line at each GPU's
    memory (GPUs of equal memory share a line). Returns (fig, {method: breakdown})."""
    breakdowns = {m: estimate(model, method=m, optimizer=optimizer, batch=batch, seq_len=seq_len, r=r,
                              gradient_checkpointing=gradient_checkpointing) for m in RECIPES}
    fig = Figure(figsize=(9.0, 4.0), layout="constrained", dpi=80)
    axis = fig.subplots()
    labelled = set()
    for y, (method, breakdown) in enumerate(breakdowns.items()):
        _stack(axis, y, breakdown.parts, 0.7, labelled)
        axis.text(breakdown.total / GIB, y, f" {breakdown.total / GIB:.1f}", va="center", fontsize=8)
    lines = {}
    for gpu in gpus:
        lines.setdefault(gpu_memory(gpu) / GIB, []).append(gpu)
    for capacity in lines:
        axis.axvline(capacity, color="red", lw=0.8, ls="--")
    top = axis.secondary_xaxis("top")
    top.set_xticks(list(lines), [" / ".join(names) for names in lines.values()], rotation=90, fontsize=6, color="red")
    axis.set_xlim(0, 1.1 * max(b.total for b in breakdowns.values()) / GIB)
    axis.set_yticks(range(len(breakdowns)), list(breakdowns))
    axis.invert_yaxis()
    axis.set_xlabel("GiB")
    axis.set_title(f"{next(iter(breakdowns.values())).setup['model']}, {optimizer}, batch {batch} x {seq_len} "
                   f"tokens, r = {r}{', checkpointing' if gradient_checkpointing else ''}", fontsize=9)
    _legend_in_parts_order(fig, axis)
    return fig, breakdowns


def measurements_figure(runs):
    """Each GPU run (qlora_ref.results.load_measurements) against the estimate of its setting: measured and
    estimated peak allocated as a pair of bars, measured and estimated reserved + context as two markers
    (every paged optimizer state counted on the GPU, as the run's context holds them).
    Returns (fig, [breakdown per run])."""
    breakdowns = [estimate_for(run) for run in runs]
    fig = Figure(figsize=(9.0, 0.45 * len(runs) + 1.2), layout="constrained", dpi=80)
    axis = fig.subplots()
    for y, (run, b) in enumerate(zip(runs, breakdowns)):
        axis.barh(y - 0.18, run["peak_allocated"] / GIB, height=0.34, color="#1f4e79",
                  label="allocated, measured" if y == 0 else None)
        axis.barh(y + 0.18, b.allocated / GIB, height=0.34, color="#9dc3e6",
                  label="allocated, estimated" if y == 0 else None)
        axis.plot((run["peak_reserved"] + run["context_bytes"]) / GIB, y, "kx",
                  label="reserved + context, measured" if y == 0 else None)
        axis.plot(b.resident_total / GIB, y, "o", mfc="none", color="#c55a11",
                  label="reserved + context, estimated" if y == 0 else None)
    axis.set_yticks(range(len(runs)), [f"{run['model']}, {run['seq_len']} tokens, r = {run['r']}" for run in runs],
                    fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("GiB")
    devices = sorted({run.get("device", "?") for run in runs})
    axis.set_title(f"QLoRA training steps measured on {', '.join(devices)} against the estimate", fontsize=9)
    fig.legend(loc="outside right center", fontsize=7, frameon=False)
    return fig, breakdowns
