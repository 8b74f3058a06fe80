"""Lesson 7's figures: where each optimizer-state page is over time, and the device's memory in a spike.

Both functions build a `matplotlib.figure.Figure` directly (not through pyplot), so nothing is left
open in pyplot's figure list: the caller shows it (`display(fig)`, or as a cell's last value) or drops it.
Each also returns the numbers it drew, so that tests and learners can check them.
"""

import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

__all__ = ["page_residency", "page_traffic_figure", "spike_series", "spike_timeline_figure"]

KIB = 1024


def page_residency(events, pages: dict) -> torch.Tensor:
    """Bool [pages, events]: entry (i, t) is True when page i is on the device after event t.

    `events` is a pager's event log (PageEvent: step, page, direction "in"/"out", ...), `pages` its
    `pages` (name -> bytes), whose order gives the rows. Every page starts in host memory.
    """
    row = {name: i for i, name in enumerate(pages)}
    residency = torch.zeros(len(pages), len(events), dtype=torch.bool)
    where = torch.zeros(len(pages), dtype=torch.bool)
    for t, event in enumerate(events):
        if event.page not in row:
            raise ValueError(f"event {t} moves page {event.page!r}, which is not among the pages {list(pages)}")
        if event.direction not in ("in", "out"):
            raise ValueError(f"event {t} has direction {event.direction!r}; a page moves 'in' or 'out'")
        where[row[event.page]] = event.direction == "in"
        residency[:, t] = where
    return residency


def page_traffic_figure(events, pages: dict):
    """Which page is where, event by event: a row per page, dark where it is on the device; a
    green triangle where it comes in (fetch), a red one where it goes out (eviction); thin lines
    between optimizer steps. Below: the resident bytes after each event, against the budget-free sum.

    Returns (fig, residency): page_residency(events, pages).
    """
    residency = page_residency(events, pages)
    sizes = torch.tensor(list(pages.values()), dtype=torch.float64)
    resident_bytes = (residency.double() * sizes[:, None]).sum(0)

    fig = Figure(figsize=(9.0, 1.6 + 0.28 * len(pages)), layout="constrained", dpi=80)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [max(len(pages), 2), 2]})
    top.imshow(residency.numpy(), aspect="auto", interpolation="nearest", cmap=ListedColormap(["#e8eef6", "#2b5d9c"]),
               vmin=0, vmax=1, extent=(-0.5, len(events) - 0.5, len(pages) - 0.5, -0.5))
    row = {name: i for i, name in enumerate(pages)}
    for direction, marker, color in (("in", "^", "tab:green"), ("out", "v", "tab:red")):
        xs = [t for t, e in enumerate(events) if e.direction == direction]
        ys = [row[e.page] for e in events if e.direction == direction]
        top.scatter(xs, ys, marker=marker, color=color, s=22, zorder=3, label=f"{direction}: {len(xs)} moves")
    boundaries = [t - 0.5 for t in range(1, len(events)) if events[t].step != events[t - 1].step]
    for axis in (top, bottom):
        for x in boundaries:
            axis.axvline(x, color="0.5", lw=0.6, ls=":")
    top.set_yticks(range(len(pages)), [f"{name} ({size / KIB:.1f} KiB)" for name, size in pages.items()], fontsize=7)
    top.set_title("optimizer-state pages: on the device (dark) or in host memory (light)", fontsize=9)
    top.legend(fontsize=7, loc="upper right", framealpha=0.9)
    bottom.step(range(len(events)), (resident_bytes / KIB).numpy(), where="post", color="tab:blue")
    bottom.axhline(sum(pages.values()) / KIB, color="0.4", lw=0.8, ls="--", label="all pages")
    bottom.set_ylabel("resident KiB", fontsize=8)
    bottom.set_xlabel("page move (event) number; dotted lines separate optimizer steps", fontsize=8)
    bottom.legend(fontsize=7, loc="lower right")
    return fig, residency


def spike_series(run) -> dict:
    """The simulated device's memory at each point of a SpikeRun (qlora_ref.spike.simulate_spike),
    in bytes: fixed (weights + gradients), states, activations, their total; evictions per point;
    the budget; and the index range of the spike step's points."""
    fixed = [run.fixed_bytes] * len(run.points)
    states = [p.state_bytes for p in run.points]
    activations = [p.activation_bytes for p in run.points]
    spike = [i for i, p in enumerate(run.points) if p.step == run.spike_step]
    return {
        "fixed": fixed,
        "states": states,
        "activations": activations,
        "total": [f + s + a for f, s, a in zip(fixed, states, activations)],
        "evictions": [p.evictions for p in run.points],
        "budget": run.budget_bytes,
        "spike": (spike[0], spike[-1]) if spike else None,
    }


def spike_timeline_figure(run):
    """The device's memory through a SpikeRun: weights and gradients, optimizer states and
    activations stacked, the budget as a line, the spike step shaded, and a red mark (with a count)
    where pages were evicted to make room.

    Returns (fig, spike_series(run)).
    """
    series = spike_series(run)
    x = list(range(len(run.points)))
    fig = Figure(figsize=(9.0, 3.6), layout="constrained", dpi=80)
    axis = fig.subplots()
    layers = [[v / KIB for v in series[key]] for key in ("fixed", "states", "activations")]
    axis.stackplot(x, *layers, step="post", colors=["0.75", "tab:blue", "tab:orange"],
                   labels=["weights + gradients", "optimizer states (resident)", "activations"])
    axis.axhline(series["budget"] / KIB, color="black", lw=1.0, ls="--", label="device budget")
    if series["spike"] is not None:
        first, last = series["spike"]
        axis.axvspan(first - 0.5, last + 0.5, color="tab:red", alpha=0.07, label=f"spike (step {run.spike_step})")
    for i, count in enumerate(series["evictions"]):
        if count:
            total = series["total"][i] / KIB
            axis.scatter([i], [total], marker="v", color="tab:red", zorder=3)
            axis.annotate(f"{count} out", (i, total), textcoords="offset points", xytext=(4, 4), fontsize=7,
                          color="tab:red")
    axis.set_ylim(0, series["budget"] / KIB * 1.15)
    axis.set_xlabel("moment (an activation saved, activations freed, or a page fetched for an update)", fontsize=8)
    axis.set_ylabel("KiB on the device")
    axis.legend(fontsize=7, loc="upper left", ncols=3)
    return fig, series
