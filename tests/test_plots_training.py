"""qlora_ref.plots.training: the loss and exact-match curves draw what they are given."""

import pytest

from qlora_ref.plots.training import training_curves_figure


def test_curves_draw_every_run_on_both_axes():
    runs = {"QLoRA": ([3.0, 2.0, 1.0], [{"step": 2, "exact_match": 0.5}, {"step": 3, "exact_match": 1.0}]),
            "LoRA": ([3.1, 1.5, 0.9], [{"step": 3, "exact_match": 0.75}])}
    fig = training_curves_figure(runs)
    loss_ax, score_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["QLoRA", "LoRA"]
    assert list(loss_ax.lines[1].get_ydata()) == [3.1, 1.5, 0.9] and list(loss_ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(score_ax.lines[0].get_xdata()) == [2, 3] and list(score_ax.lines[0].get_ydata()) == [0.5, 1.0]
    assert loss_ax.get_yscale() == "log"


def test_no_runs_is_an_error():
    with pytest.raises(ValueError, match="runs is empty"):
        training_curves_figure({})
