"""Lesson 8's figure: training loss and held-out exact match of several fine-tuning runs, step by step.

Like the other figure functions, it builds a `matplotlib.figure.Figure` directly (nothing is left open in
pyplot) and returns it; the caller shows it with `display(fig)`.
"""

from matplotlib.figure import Figure

__all__ = ["training_curves_figure"]


def training_curves_figure(runs: dict) -> Figure:
    """runs: {label: (losses per step, evals)} with evals a list of {"step", "exact_match", ...}.

    Left: the training loss of every step (log scale). Right: exact match on the held-out set at each
    evaluation."""
    if not runs:
        raise ValueError("runs is empty: pass {label: (losses, evals)} for at least one run")
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for label, (losses, evals) in runs.items():
        loss_ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
        score_ax.plot([e["step"] for e in evals], [e["exact_match"] for e in evals], marker="o", label=label)
    loss_ax.set(xlabel="step", ylabel="training loss (per answer token)", yscale="log", title="Training loss")
    score_ax.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="Held-out dates answered exactly")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return fig
