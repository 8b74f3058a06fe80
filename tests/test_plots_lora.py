"""Lesson 6's figures: the W0 + B A diagram to scale, and the energy shares of a matrix's singular values."""

import pytest
import torch
from matplotlib.figure import Figure

from qlora_ref.plots.lora import energy_share, lora_diagram, spectrum_figure


def test_diagram_draws_each_matrix_to_scale():
    fig, boxes = lora_diagram(out_features=48, in_features=64, r=4)
    assert isinstance(fig, Figure)
    assert [box[2:] for box in boxes.values()] == [(64, 48), (4, 48), (64, 4)]
    assert boxes["W0"][0] + 64 < boxes["B"][0] < boxes["B"][0] + 4 < boxes["A"][0], "W0, then B, then A"
    assert len(fig.axes[0].patches) == 3


@pytest.mark.parametrize("r", [0, 65])
def test_diagram_refuses_a_rank_outside_the_matrix(r):
    with pytest.raises(ValueError, match="r <= min"):
        lora_diagram(64, 64, r)


def test_energy_share_of_a_rank_two_matrix():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(30, 2, generator=g) @ torch.randn(2, 20, generator=g)
    share = energy_share(low)
    assert share.numel() == 20 and share[1].item() == pytest.approx(1.0, abs=1e-12)
    assert bool((share[1:] >= share[:-1] - 1e-15).all()) and share[0].item() < 1
    with pytest.raises(ValueError, match="2-D"):
        energy_share(torch.ones(3))


def test_spectrum_figure_returns_the_shares_it_drew():
    g = torch.Generator().manual_seed(1)
    matrices = {"random": torch.randn(16, 16, generator=g), "rank 1": torch.ones(16, 1) @ torch.ones(1, 16)}
    fig, shares = spectrum_figure(matrices, ks=(1, 4, 32))
    assert len(fig.axes[0].lines) == 2
    assert set(shares["random"]) == {1, 4} and shares["rank 1"][1] == pytest.approx(1.0)
    assert shares["random"][4] == pytest.approx(energy_share(matrices["random"])[3].item())
