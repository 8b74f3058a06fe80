"""Lesson 10's per-GPU figure draws the estimates it returns."""

import pytest
from matplotlib.figure import Figure

from qlora_ref.plots.fsdp import per_gpu_figure
from qlora_ref.vram import GIB, estimate


@pytest.mark.parametrize("seq_len, r, optimizer", [(2048, 16, "adamw_8bit"), (512, 64, "adamw")])
def test_per_gpu_figure_draws_one_bar_per_model_and_gpu_count(seq_len, r, optimizer):
    fig, breakdowns = per_gpu_figure(seq_len, r, optimizer)
    assert isinstance(fig, Figure) and len(breakdowns) == 12
    (axis,) = [a for a in fig.axes if a.get_xlabel() == "GiB per GPU"]
    widths = [patch.get_width() for patch in axis.patches]
    expected = [v / GIB for b in breakdowns.values() for v in b.parts.values() if v]
    assert widths == pytest.approx(expected)
    assert breakdowns[("Llama-2-70B", 2)] == estimate("Llama-2-70B", optimizer=optimizer, seq_len=seq_len, r=r,
                                                      n_gpus=2)
    assert [tick.get_text() for tick in axis.get_yticklabels()][:4] == [f"Llama-2-7B x{n}" for n in (1, 2, 4, 8)]
    assert sorted(l.get_xdata()[0] for l in axis.get_lines()) == [24, 48, 80]
