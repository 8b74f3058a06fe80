"""The functions behind lesson 7's paging figures, checked on what they return."""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
from matplotlib.figure import Figure

from qlora_ref.pager import PageEvent, Pager
from qlora_ref.spike import simulate_spike
from qlora_ref.plots.paging import page_residency, page_traffic_figure, spike_series, spike_timeline_figure


@pytest.fixture(scope="module")
def run():
    return simulate_spike()


def _random_pager() -> Pager:
    """Five pages of odd sizes, a budget for about two of them, fetched in a fixed shuffled order."""
    generator = torch.Generator().manual_seed(0)
    pager = Pager(budget_bytes=2_500)
    for i, n in enumerate((301, 977, 123, 1_111, 640)):
        pager.add(f"p{i}", {"m": torch.zeros(n, dtype=torch.uint8)})
    for step, i in enumerate(torch.randint(0, 5, (40,), generator=generator).tolist()):
        pager.step = step // 8
        pager.fetch(f"p{i}")
    return pager


def test_residency_reproduces_the_event_log():
    pager = _random_pager()
    residency = page_residency(pager.events, pager.pages)
    sizes = torch.tensor(list(pager.pages.values()))
    assert residency.shape == (5, len(pager.events))
    assert (residency.long() * sizes[:, None]).sum(0).tolist() == [e.resident_after for e in pager.events]
    for t, event in enumerate(pager.events):  # the moved page's row changes at its event
        row = list(pager.pages).index(event.page)
        assert bool(residency[row, t]) == (event.direction == "in")
        if t:
            assert bool(residency[row, t - 1]) != bool(residency[row, t])


def test_page_traffic_figure_draws():
    pager = _random_pager()
    fig, residency = page_traffic_figure(pager.events, pager.pages)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert torch.equal(residency, page_residency(pager.events, pager.pages))
    fig.canvas.draw()


def test_page_traffic_of_the_spike(run):
    fig, residency = page_traffic_figure(run.events, run.page_bytes)
    assert residency.shape == (len(run.page_bytes), len(run.events))
    assert bool(residency[:, -1].all())  # every page is back on the device at the end
    fig.canvas.draw()


def test_residency_rejects_unknown_pages_and_directions():
    with pytest.raises(ValueError, match="page 'x'"):
        page_residency([PageEvent(0, "x", "in", 8, 8)], {"a": 8})
    with pytest.raises(ValueError, match="direction 'sideways'"):
        page_residency([PageEvent(0, "a", "sideways", 8, 8)], {"a": 8})


def test_spike_series_stays_under_the_budget_and_shows_the_spike(run):
    series = spike_series(run)
    n = len(run.points)
    assert all(len(series[key]) == n for key in ("fixed", "states", "activations", "total", "evictions"))
    assert max(series["total"]) <= series["budget"] == run.budget_bytes
    first, last = series["spike"]
    assert all(run.points[i].step == run.spike_step for i in range(first, last + 1))
    inside = range(first, last + 1)
    assert sum(series["evictions"][i] for i in inside) == sum(series["evictions"]) > 0
    peak = max(range(n), key=lambda i: series["activations"][i])
    assert first <= peak <= last
    assert series["states"][peak] < series["states"][first]  # states made room for the activations


def test_spike_timeline_figure_draws(run):
    fig, series = spike_timeline_figure(run)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert series == spike_series(run)
    fig.canvas.draw()
