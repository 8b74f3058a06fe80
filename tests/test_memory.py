"""qlora_ref.memory: counted tensor bytes and the measured peak of a block, against sizes worked out by hand."""

import pytest
import torch
from torch import nn

from qlora_ref.memory import PeakMemory, tensor_bytes


def test_tensor_bytes_counts_each_storage_once():
    a = torch.zeros(100)                      # 400 bytes
    view = a[10:20]                           # the same storage
    model = nn.Linear(8, 4)                   # 32 + 4 floats = 144 bytes
    model.weight.grad = torch.ones(4, 8)      # + 128
    model.register_buffer("scale", torch.zeros(3, dtype=torch.float64))  # + 24
    assert tensor_bytes(a, view, [a, {"x": view}]) == 400
    assert tensor_bytes(model) == 144 + 128 + 24


def test_peak_counts_new_storages_until_they_are_freed_and_not_views_or_in_place_results():
    a = torch.ones(1000)
    with PeakMemory("cpu", baseline=tensor_bytes(a)) as memory:
        b = a + 1                 # +4000
        c = b * 2                 # +4000: 12000 at this moment
        del b, c                  # back to 4000
        a.add_(1)                 # in place: no new storage
        view = a.view(10, 100)    # a view: none either
        d = torch.empty(250)      # +1000
    assert memory.peak == 12000 and memory.current == 5000
    assert view.shape == (10, 100) and d.numel() == 250


def test_peak_sees_the_backward_pass():
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, 16, requires_grad=True)
    with PeakMemory("cpu") as memory:
        loss = (x @ w).relu().sum()
        loss.backward()
    # what remains: the two gradients (64*32 + 32*16 floats) and the 0-d loss
    assert memory.current == x.grad.nbytes + w.grad.nbytes + 4
    # at least the product and relu's output (both [64, 16]) were alive together before the backward
    assert memory.peak >= 2 * 64 * 16 * 4 + 4


def test_bad_baseline():
    with pytest.raises(ValueError, match="baseline must be a number of bytes"):
        PeakMemory("cpu", baseline=-1)
