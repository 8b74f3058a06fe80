"""Lesson 7's CPU demonstration: a memory spike on a simulated device, with and without paged optimizer states.

A small MLP trains for a few steps on a device of a fixed budget; one step's batch is much longer (the spike).
Its activations need room that the optimizer's states hold: with PagedAdamW8bit the pager evicts the least
recently used pages and the update brings them back; with AdamW8bit the states stay and the step runs out of
memory (BudgetExceededError, a torch.OutOfMemoryError), as it would on a real GPU.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .optim8bit import AdamW8bit, optimizer_state_bytes, predicted_state_bytes
from .pager import Pager
from .paging import PagedAdamW8bit

__all__ = ["SpikeRun", "TimelinePoint", "simulate_spike", "spike_model"]


@dataclass(frozen=True)
class TimelinePoint:
    """The simulated device's memory at one moment of training."""

    step: int
    phase: str  # "forward": an activation was saved; "backward": activations freed; "update": a page came in
    activation_bytes: int
    state_bytes: int  # optimizer-state bytes on the device
    evictions: int  # pages evicted to make room for this moment


@dataclass
class SpikeRun:
    """What simulate_spike returns: the timeline, the pager's event log, and the trained weights."""

    points: list
    events: list
    budget_bytes: int
    fixed_bytes: int  # weights and gradients, on the device throughout
    page_bytes: dict  # page (parameter) name -> bytes of its optimizer state
    spike_step: int
    parameters: dict  # parameter name -> its value after the last step


def spike_model(seed: int = 0) -> torch.nn.Module:
    """The small MLP of the simulation: 4 Linear layers, 8 parameters (so 8 pages), about 90k weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(64, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 16),
        )


@contextmanager
def _saved_activations(model, on_new):
    """Call on_new(nbytes) for every new storage autograd saves for backward (activations): what a
    forward pass adds to device memory. Parameters are not activations; a storage saved twice (a ReLU's
    output is also the next layer's input) is counted once."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            on_new(storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _batch(step: int, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(rows, 64, generator=generator), torch.randn(rows, 16, generator=generator)


def simulate_spike(steps: int = 5, spike_step: int = 2, rows: int = 16, spike_factor: int = 16,
                   budget_bytes=None, paging: bool = True, lr: float = 1e-2, seed: int = 0) -> SpikeRun:
    """Train spike_model for `steps` steps on a simulated device of `budget_bytes`, with a batch
    `spike_factor` times longer at `spike_step` (the memory spike), and record the device's memory.

    The device holds weights and gradients (reserved throughout), the activations of the current
    forward pass (reserved as autograd saves them, released after backward) and the optimizer's
    states. With paging=True the states are PagedAdamW8bit's pages: during the spike the pager evicts
    the least recently used ones to make room for activations, and the update brings them back.
    With paging=False they are AdamW8bit's, fixed on the device once made, and the spike raises
    BudgetExceededError (out of memory), as it would on a real GPU.

    By default the budget leaves room for the spike's activations and half of the states: ordinary
    steps keep every page resident, the spike must evict about half of them.
    """
    if not 0 <= spike_step < steps:
        raise ValueError(f"spike_step must be one of the steps 0..{steps - 1}, got {spike_step}")
    model = spike_model(seed)
    fixed_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights + gradients
    state_bytes = predicted_state_bytes(model.parameters())
    if budget_bytes is None:
        spike_activations = []
        with _saved_activations(model, spike_activations.append):
            model(_batch(spike_step, rows * spike_factor, seed)[0])
        budget_bytes = fixed_bytes + sum(spike_activations) + state_bytes // 2

    if paging:
        optimizer = PagedAdamW8bit(model.named_parameters(), lr=lr, paging="pager", budget_bytes=budget_bytes)
        pager = optimizer.pager
    else:
        optimizer = AdamW8bit(model.parameters(), lr=lr)
        pager = Pager(budget_bytes)
    pager.reserve(fixed_bytes, "the weights and gradients")

    points, activation, seen_events, fixed_states = [], 0, 0, 0

    def record(step, phase):
        nonlocal seen_events
        evictions = sum(event.direction == "out" for event in pager.events[seen_events:])
        seen_events = len(pager.events)
        states = pager.resident_bytes if paging else fixed_states
        points.append(TimelinePoint(step, phase, activation, states, evictions))

    for step in range(steps):
        pager.step = step
        x, y = _batch(step, rows * (spike_factor if step == spike_step else 1), seed)

        def on_new(nbytes):
            nonlocal activation
            pager.reserve(nbytes, f"an activation of step {step}")
            activation += nbytes
            record(step, "forward")

        with _saved_activations(model, on_new):
            loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        pager.release(activation)
        activation = 0
        record(step, "backward")
        optimizer.step()
        if paging:  # one point per page brought in for an update
            evictions = 0
            for event in pager.events[seen_events:]:
                if event.direction == "out":
                    evictions += 1
                else:
                    points.append(TimelinePoint(step, "update", 0, event.resident_after, evictions))
                    evictions = 0
            seen_events = len(pager.events)
        elif not fixed_states:
            fixed_states = optimizer_state_bytes(optimizer)
            pager.reserve(fixed_states, "the optimizer states")
            record(step, "update")

    page_bytes = pager.pages if paging else {name: predicted_state_bytes([p]) for name, p in model.named_parameters()}
    return SpikeRun(points, list(pager.events), budget_bytes, fixed_bytes, page_bytes, spike_step,
                    {name: p.detach().clone() for name, p in model.named_parameters()})
