"""The pager (lesson 7) on a CPU against a simulated device budget, and PagedAdamW8bit with it.

Paging moves bytes, never changes them: PagedAdamW8bit must give torch.equal parameters and states
to AdamW8bit. The pager's invariant (resident + reserved bytes <= budget) is checked after every
operation of random operation sequences.
"""

import os

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_ref.optim8bit import AdamW8bit, optimizer_state_bytes, predicted_state_bytes
from qlora_ref.optimizer_state import load_optimizer_state_tensors, optimizer_state_tensors
from qlora_ref.managed_memory import cuda_runtime_version, managed_empty, prefetch
from qlora_ref.pager import BudgetExceededError, Pager, resident_bounds
from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.spike import simulate_spike


def _page(nbytes: int, seed: int) -> dict:
    """A page of two tensors of awkward sizes that together hold `nbytes` bytes, plus a non-tensor."""
    generator = torch.Generator().manual_seed(seed)
    floats = nbytes // 8
    codes = nbytes - 4 * floats
    return {
        "m": torch.randn(floats, generator=generator),
        "codes": torch.randint(0, 256, (codes,), dtype=torch.uint8, generator=generator),
        "step": seed,
    }


def _check_invariants(pager: Pager, sizes: dict) -> None:
    resident = [name for name in sizes if pager.is_resident(name)]
    assert pager.resident_bytes == sum(sizes[name] for name in resident)
    assert pager.resident_bytes + pager.reserved_bytes <= pager.budget_bytes
    assert pager.peak_resident_bytes <= pager.budget_bytes
    if pager.events:
        assert pager.events[-1].resident_after == pager.resident_bytes
        assert pager.peak_resident_bytes == max(event.resident_after for event in pager.events)


# -- the pager alone ------------------------------------------------------------------------------


def test_fetch_evict_round_trip_keeps_the_bytes():
    pager = Pager(budget_bytes=1000)
    page = _page(600, seed=1)
    original = {key: value.clone() for key, value in page.items() if isinstance(value, torch.Tensor)}
    pager.add("a", page)
    assert not pager.is_resident("a") and pager.resident_bytes == 0
    fetched = pager.fetch("a")
    assert fetched is page  # the caller's own mapping, now holding the device copies
    assert pager.is_resident("a") and pager.resident_bytes == 600
    page["m"].add_(1.0)  # an update on the device
    page["codes"][::7] += 3
    pager.evict("a")
    assert torch.equal(page["m"], original["m"] + 1.0)
    expected_codes = original["codes"].clone()
    expected_codes[::7] += 3
    assert torch.equal(page["codes"], expected_codes)
    assert page["step"] == 1
    assert [(e.page, e.direction, e.nbytes, e.resident_after) for e in pager.events] == [
        ("a", "in", 600, 600),
        ("a", "out", 600, 0),
    ]


def test_device_copy_is_a_separate_buffer_on_a_cpu():
    """On a CPU the 'device' copy must still be a different buffer, or nothing would really move."""
    pager = Pager(budget_bytes=1000)
    page = _page(400, seed=2)
    home = page["m"]
    pager.add("a", page)
    pager.fetch("a")
    assert page["m"].data_ptr() != home.data_ptr()
    page["m"].zero_()
    assert not torch.equal(home, page["m"])  # home is stale until eviction writes back
    pager.evict("a")
    assert page["m"] is home and bool((home == 0).all())


def test_least_recently_used_goes_first():
    pager = Pager(budget_bytes=1000)
    for i, name in enumerate("abc"):
        pager.add(name, _page(400, seed=i))
    pager.fetch("a")
    pager.fetch("b")
    pager.fetch("a")  # a is now the most recently used
    pager.step = 7
    pager.fetch("c")  # needs 400 more: b goes
    assert (pager.is_resident("a"), pager.is_resident("b"), pager.is_resident("c")) == (True, False, True)
    out = [e for e in pager.events if e.direction == "out"]
    assert [(e.step, e.page) for e in out] == [(7, "b")]


def test_reservations_evict_pages_and_pages_come_back():
    pager = Pager(budget_bytes=1000)
    pager.add("a", _page(400, seed=0))
    pager.add("b", _page(400, seed=1))
    pager.fetch("a")
    pager.fetch("b")
    pager.reserve(500, "activations")  # 800 + 500 > 1000: a (least recent) goes
    assert not pager.is_resident("a") and pager.is_resident("b")
    with pytest.raises(BudgetExceededError, match="activations needs 600 bytes"):
        pager.reserve(600, "activations")  # 500 + 600 > 1000 even with every page out
    assert pager.reserved_bytes == 500 and pager.resident_bytes == 0
    pager.reserve(200, "activations")
    with pytest.raises(torch.OutOfMemoryError, match="page 'a' needs 400 bytes"):  # what a real GPU raises
        pager.fetch("a")
    pager.release(700)
    pager.fetch("a")
    assert pager.resident_bytes == 400 and pager.reserved_bytes == 0


def test_a_page_larger_than_the_budget_is_refused():
    pager = Pager(budget_bytes=500)
    with pytest.raises(ValueError, match="page 'big' needs 800 bytes but the whole budget is 500"):
        pager.add("big", _page(800, seed=0))
    assert pager.pages == {}


@pytest.mark.parametrize(
    "budget, error, match",
    [(0, ValueError, "positive"), (-5, ValueError, "positive"), (10.5, TypeError, "int"), (True, TypeError, "int")],
)
def test_bad_budgets(budget, error, match):
    with pytest.raises(error, match=match):
        Pager(budget_bytes=budget)


def test_bad_calls_name_the_problem():
    pager = Pager(budget_bytes=1000)
    pager.add("a", _page(400, seed=0))
    with pytest.raises(ValueError, match="already exists"):
        pager.add("a", _page(400, seed=1))
    with pytest.raises(KeyError, match="no page named 'b'"):
        pager.fetch("b")
    with pytest.raises(ValueError, match="negative"):
        pager.reserve(-1)
    with pytest.raises(ValueError, match="cannot release 10 bytes: 0 are reserved"):
        pager.release(10)
    page = pager.fetch("a")
    page["m"] = torch.zeros(3)
    with pytest.raises(ValueError, match="tensor 'm' changed"):
        pager.evict("a")


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("fetch"), st.integers(0, 5)),
        st.tuples(st.just("evict"), st.integers(0, 5)),
        st.tuples(st.just("reserve"), st.integers(0, 2_000)),
        st.tuples(st.just("release"), st.integers(0, 2_000)),
        st.tuples(st.just("write"), st.integers(0, 5)),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 1_500), min_size=1, max_size=6),
    budget=st.integers(1, 3_000),
    operations=OPERATIONS,
)
def test_random_sequences_keep_the_budget_and_the_bytes(sizes, budget, operations):
    """Any sequence of fetches, evictions, reservations and in-place writes: the budget holds after
    every operation, LRU picks the victims, and after evicting everything each page holds exactly the
    bytes written to it."""
    pager = Pager(budget_bytes=budget)
    names, expected, page_bytes = [], {}, {}
    for i, nbytes in enumerate(sizes):
        page = _page(nbytes, seed=i)
        if nbytes > budget:
            with pytest.raises(ValueError, match="whole budget"):
                pager.add(f"p{i}", page)
            continue
        pager.add(f"p{i}", page)
        names.append(f"p{i}")
        page_bytes[f"p{i}"] = sum(v.numel() * v.element_size() for v in page.values() if isinstance(v, torch.Tensor))
        expected[f"p{i}"] = (page, {k: v.clone() for k, v in page.items() if isinstance(v, torch.Tensor)})
    assert pager.pages == page_bytes
    recency = []  # our own model of LRU order among resident pages
    for operation, value in operations:
        if operation in ("fetch", "evict", "write") and not names:
            continue
        if operation in ("fetch", "write"):
            name = names[value % len(names)]
            before = [n for n in recency]
            try:
                page = pager.fetch(name)
            except BudgetExceededError:
                assert page_bytes[name] + pager.reserved_bytes > budget
                recency = [n for n in recency if pager.is_resident(n)]
                _check_invariants(pager, page_bytes)
                continue
            evicted = [n for n in before if not pager.is_resident(n)]
            assert evicted == before[: len(evicted)]  # victims are the least recently used
            recency = [n for n in before if n != name and pager.is_resident(n)] + [name]
            if operation == "write":
                page["m"].add_(0.5)
                page["codes"].add_(1)
                expected[name][1]["m"].add_(0.5)
                expected[name][1]["codes"].add_(1)
        elif operation == "evict":
            name = names[value % len(names)]
            pager.evict(name)
            recency = [n for n in recency if n != name]
        elif operation == "reserve":
            before = list(recency)
            try:
                pager.reserve(value)
            except BudgetExceededError:
                assert value + pager.reserved_bytes > budget
            evicted = [n for n in before if not pager.is_resident(n)]
            assert evicted == before[: len(evicted)]
            recency = [n for n in before if pager.is_resident(n)]
        else:
            amount = min(value, pager.reserved_bytes)
            pager.release(amount)
        _check_invariants(pager, page_bytes)
    pager.evict_all()
    assert pager.resident_bytes == 0
    for name in names:
        page, want = expected[name]
        for key, tensor in want.items():
            assert torch.equal(page[key], tensor), (name, key)
    ins = sum(e.nbytes for e in pager.events if e.direction == "in")
    outs = sum(e.nbytes for e in pager.events if e.direction == "out")
    assert ins == outs  # everything that came in went out again


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=7),
    budget=st.integers(700, 3_000),
    order=st.lists(st.integers(0, 6), min_size=1, max_size=30),
)
def test_measured_peak_lies_within_the_predicted_bounds(sizes, budget, order):
    """Fetch every page once, then in any order: the peak of resident bytes is what resident_bounds
    predicts from the page sizes and the budget alone."""
    pager = Pager(budget_bytes=budget)
    for i, nbytes in enumerate(sizes):
        pager.add(f"p{i}", _page(nbytes, seed=i))
    for i in list(range(len(sizes))) + [j % len(sizes) for j in order]:
        pager.fetch(f"p{i}")
    low, high = resident_bounds(pager.pages.values(), budget)
    assert low <= pager.peak_resident_bytes <= high


def test_resident_bounds():
    assert resident_bounds([100, 200], 1000) == (300, 300)
    assert resident_bounds([400, 400, 300], 1000) == (601, 1000)


# -- managed memory is CUDA only -------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_managed_memory_needs_cuda():
    with pytest.raises(ValueError, match="CUDA device"):
        managed_empty((3,), device="cpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        cuda_runtime_version()
    with pytest.raises(ValueError, match="made by managed_empty"):
        prefetch(torch.zeros(3))


# -- PagedAdamW8bit with the pager on a CPU ---------------------------------------------------------


def _model(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # 37 x 129 = 4773 weights (>= 4096: 8-bit states, 19 blocks of 256 with a short last one);
        # 129 x 5 = 645 (float32 states); odd bias sizes.
        return torch.nn.Sequential(torch.nn.Linear(129, 37), torch.nn.Tanh(), torch.nn.Linear(37, 129),
                                   torch.nn.Tanh(), torch.nn.Linear(129, 5))


def _batches(steps: int, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(11, 129, generator=generator), torch.randn(11, 5, generator=generator)) for _ in range(steps)]


def _train(model, optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _states(optimizer) -> list:
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("budget_pages", [1.0, 2.5, 100.0])
def test_paged_equals_unpaged_bit_for_bit(budget_pages):
    """Budget: room for the largest page only (every update evicts), for two and a half, for all."""
    plain_model, paged_model = _model(0), _model(0)
    page_sizes = [predicted_state_bytes([p]) for p in paged_model.parameters()]
    budget = int(max(page_sizes) * budget_pages)
    plain = AdamW8bit(plain_model.parameters(), lr=3e-2, weight_decay=0.1)
    paged = PagedAdamW8bit(paged_model.named_parameters(), lr=3e-2, weight_decay=0.1, paging="pager",
                           budget_bytes=budget)
    _train(plain_model, plain, _batches(5))
    _train(paged_model, paged, _batches(5))
    for a, b in zip(plain_model.parameters(), paged_model.parameters()):
        assert torch.equal(a, b)
    for plain_state, paged_state in zip(_states(plain), _states(paged)):
        assert plain_state.keys() == paged_state.keys()
        for key in plain_state:
            if isinstance(plain_state[key], torch.Tensor):
                assert torch.equal(plain_state[key], paged_state[key]), key
            else:
                assert plain_state[key] == paged_state[key], key

    pager = paged.pager
    names = [name for name, _ in paged_model.named_parameters()]
    assert pager.pages == dict(zip(names, page_sizes))  # measured page sizes = the formula's
    low, high = resident_bounds(page_sizes, budget)
    assert low <= pager.peak_resident_bytes <= high <= budget
    outs = [e for e in pager.events if e.direction == "out"]
    if budget < sum(page_sizes):
        assert outs, "a budget smaller than the states must evict"
        assert {e.step for e in pager.events} == set(range(5))
    else:
        assert not outs and len(pager.events) == len(names)  # each page came in once and stayed


@pytest.mark.parametrize("how", ["state_dict", "state_tensors"])
def test_paged_save_and_load_continues_identically(how):
    """Stop after 2 of 4 steps, save, load into a new paged optimizer, go on: the same weights as
    4 uninterrupted steps (both of AdamW8bit's ways to save: state_dict and safetensors-ready tensors)."""
    reference_model, model = _model(3), _model(3)
    budget = 2 * max(predicted_state_bytes([p]) for p in model.parameters())
    batches = _batches(4)
    reference = PagedAdamW8bit(reference_model.parameters(), lr=1e-2, paging="pager", budget_bytes=budget)
    _train(reference_model, reference, batches)
    optimizer = PagedAdamW8bit(model.parameters(), lr=1e-2, paging="pager", budget_bytes=budget)
    _train(model, optimizer, batches[:2])
    restored = PagedAdamW8bit(model.parameters(), lr=1e-2, paging="pager", budget_bytes=budget)
    if how == "state_dict":
        restored.load_state_dict(optimizer.state_dict())
    else:
        saved = {name: t.clone() for name, t in optimizer_state_tensors(optimizer).items()}
        load_optimizer_state_tensors(restored, saved)
        load_optimizer_state_tensors(restored, saved)  # loading twice replaces pages, it does not add
    _train(model, restored, batches[2:])
    for a, b in zip(reference_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert 0 < restored.pager.peak_resident_bytes <= budget
    assert sum(restored.pager.pages.values()) == optimizer_state_bytes(restored)


def test_paged_optimizer_names_its_pages():
    model = _model(0)
    optimizer = PagedAdamW8bit(model.parameters(), paging="pager", budget_bytes=10**6)
    _train(model, optimizer, _batches(1))
    assert list(optimizer.pager.pages) == [f"param{i}" for i in range(6)]


def test_paged_optimizer_refuses_bad_settings():
    model = _model(0)
    with pytest.raises(ValueError, match="paging must be one of"):
        PagedAdamW8bit(model.parameters(), paging="disk")
    with pytest.raises(ValueError, match="needs budget_bytes"):
        PagedAdamW8bit(model.parameters(), paging="pager")
    with pytest.raises(ValueError, match="no budget"):
        PagedAdamW8bit(model.parameters(), paging="managed", budget_bytes=1000)
    with pytest.raises(ValueError, match="needs CUDA parameters.*paging='pager'"):
        PagedAdamW8bit(model.parameters(), paging="managed")
    largest = max(predicted_state_bytes([p]) for p in model.parameters())
    optimizer = PagedAdamW8bit(model.named_parameters(), paging="pager", budget_bytes=largest - 1)
    with pytest.raises(ValueError, match=r"page '0\.weight' needs"):
        _train(model, optimizer, _batches(1))


# -- the spike, simulated ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spike():
    return simulate_spike()


def test_spike_evicts_pages_and_brings_them_back(spike):
    total_states = sum(spike.page_bytes.values())
    for point in spike.points:
        assert spike.fixed_bytes + point.activation_bytes + point.state_bytes <= spike.budget_bytes
    at_spike = [p for p in spike.points if p.step == spike.spike_step]
    before = [p for p in spike.points if p.step < spike.spike_step]
    after = [p for p in spike.points if p.step > spike.spike_step]
    assert sum(p.evictions for p in before + after) == 0  # ordinary steps keep every page resident
    assert sum(p.evictions for p in at_spike) >= 2
    lowest = min(p.state_bytes for p in at_spike)
    assert lowest < total_states / 2  # the spike pushed more than half of the states out
    assert max(p.activation_bytes for p in at_spike) > 4 * max(p.activation_bytes for p in before)
    updates = [p for p in at_spike if p.phase == "update"]
    assert updates and updates[-1].state_bytes == total_states  # all back by the end of the spike step
    assert all(p.state_bytes == total_states for p in after)
    spike_events = [e for e in spike.events if e.step == spike.spike_step]
    first_in = next(i for i, e in enumerate(spike_events) if e.direction == "in")
    assert all(e.direction == "out" for e in spike_events[:first_in])  # out during forward, in at update
    assert {e.page for e in spike_events if e.direction == "in"} == {e.page for e in spike_events[:first_in]}


def test_spike_without_paging_runs_out_of_memory(spike):
    with pytest.raises(torch.OutOfMemoryError, match=f"activation of step {spike.spike_step}"):
        simulate_spike(paging=False, budget_bytes=spike.budget_bytes)


def test_spike_paged_weights_equal_unpaged_weights(spike):
    unlimited = simulate_spike(paging=False, budget_bytes=10**12)
    assert spike.parameters.keys() == unlimited.parameters.keys()
    for name in spike.parameters:
        assert torch.equal(spike.parameters[name], unlimited.parameters[name]), name
    assert spike.parameters["0.weight"].shape == (192, 64)


def test_spike_step_out_of_range():
    with pytest.raises(ValueError, match="spike_step"):
        simulate_spike(steps=3, spike_step=3)


def test_step_hooks_run_once_per_step():
    # torch wraps each optimizer class's step for its hooks; a subclass's step that called AdamW8bit.step would
    # run them twice (PagedAdamW8bit hooks in through _before_step/_after_step instead)
    AdamW8bit([torch.nn.Parameter(torch.zeros(4))])  # wrap AdamW8bit.step too
    p = torch.nn.Parameter(torch.ones(5000))
    optimizer = PagedAdamW8bit([p], paging="pager", budget_bytes=1 << 20)
    calls = []
    optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *args: calls.append("post"))
    for _ in range(2):
        p.grad = torch.ones_like(p)
        optimizer.step()
    assert calls == ["pre", "post", "pre", "post"] and optimizer.steps_done == 2 and optimizer.pager.step == 1
