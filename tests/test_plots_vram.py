"""The functions behind lesson 9's figures and widget, checked on what they return and draw."""

import os
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
from matplotlib.figure import Figure

from qlora_ref.plots.vram import budget_figure, methods_figure
from qlora_ref.optim8bit import OPTIMIZERS
from qlora_ref.methods import RECIPES
from qlora_ref.model_shapes import PRESETS
from qlora_ref.vram import GIB, GPUS, estimate


def _bar_widths(axis) -> list:
    return [patch.get_width() for patch in axis.patches]


@pytest.mark.parametrize("model, method, seq_len, batch, r, gpu, optimizer, checkpointing", [
    ("Llama-2-7B", "qlora_nf4_dq", 512, 1, 64, "T4 (14.75 GiB)", "paged_adamw_8bit", True),
    ("Llama-2-70B", "qlora_nf4", 4096, 3, 8, "A100 (40 GiB)", "adamw", False),
    ("Llama-3-8B", "full_bf16", 1000, 2, 16, "H100 (80 GiB)", "adamw_8bit", True),
    ("Llama-2-13B", "lora_bf16", 256, 16, 128, "RTX 3060 (12 GiB)", "paged_adamw_8bit", False),
    ("Llama-3-70B", "full_fp32", 8192, 1, 64, "RTX 4090 (24 GiB)", "adamw", True),
])
def test_budget_figure_draws_the_estimate(model, method, seq_len, batch, r, gpu, optimizer, checkpointing):
    fig, breakdown = budget_figure(model, method, seq_len, batch, r, gpu, optimizer, checkpointing)
    assert isinstance(fig, Figure)
    assert breakdown == estimate(model, method=method, optimizer=optimizer, batch=batch, seq_len=seq_len, r=r,
                                 gradient_checkpointing=checkpointing)
    (axis,) = fig.axes
    widths = _bar_widths(axis)
    assert widths == pytest.approx([v / GIB for v in breakdown.parts.values() if v])  # one segment per part
    assert sum(widths) == pytest.approx(breakdown.total / GIB)
    verdict = "fits" if breakdown.fits(gpu) else "does NOT fit"
    assert axis.get_title().endswith(f"{breakdown.total / GIB:.2f} GiB, {verdict}")
    line = [l for l in axis.get_lines() if l.get_color() == "red"]
    assert len(line) == 1 and line[0].get_xdata()[0] == GPUS[gpu] / GIB


def test_every_widget_choice_draws():
    """Each value of each widget control, with the others at their defaults."""
    for model in PRESETS:
        budget_figure(model=model)
    for method in RECIPES:
        budget_figure(method=method)
    for optimizer in OPTIMIZERS:
        budget_figure(optimizer=optimizer)
    for gpu in GPUS:
        assert budget_figure(gpu=gpu)[1].fits(gpu) == (estimate().total <= GPUS[gpu])


def test_methods_figure_has_a_bar_per_method():
    fig, breakdowns = methods_figure("Llama-2-13B", seq_len=768, batch=2, r=32, optimizer="adamw")
    assert list(breakdowns) == list(RECIPES)
    (axis,) = fig.axes
    assert [t.get_text() for t in axis.get_yticklabels()] == list(RECIPES)
    assert sum(_bar_widths(axis)) == pytest.approx(sum(b.total for b in breakdowns.values()) / GIB)
    assert breakdowns["full_fp32"].total > breakdowns["lora_bf16"].total > breakdowns["qlora_nf4"].total \
        > breakdowns["qlora_nf4_dq"].total
    labels = fig.legends[0].get_texts()
    assert "4-bit weights" in [t.get_text() for t in labels]  # every part drawn is in the legend once
    assert len(labels) == len({t.get_text() for t in labels})


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        budget_figure(gpu="V100")
    with pytest.raises(ValueError, match="method must be one of"):
        budget_figure(method="int8")
    with pytest.raises(ValueError, match="unknown GPU"):
        methods_figure(gpus=("T4 (14.75 GiB)", "TPU"))


def test_measurements_figure_draws_every_run_and_its_estimate():
    from qlora_ref.plots.vram import measurements_figure
    from qlora_ref.results import load_measurements

    runs = load_measurements(Path(__file__).resolve().parent.parent / "bench" / "results")
    fig, breakdowns = measurements_figure(runs)
    (axis,) = fig.axes
    widths = _bar_widths(axis)
    assert widths[0::2] == pytest.approx([run["peak_allocated"] / GIB for run in runs])
    assert widths[1::2] == pytest.approx([b.allocated / GIB for b in breakdowns])
    measured = [line.get_xdata()[0] for line in axis.get_lines()][0::2]
    assert measured == pytest.approx([(run["peak_reserved"] + run["context_bytes"]) / GIB for run in runs])
    assert len(axis.get_yticklabels()) == len(runs)
