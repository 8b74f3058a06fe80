"""Lesson 7's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_adamw_update(update)
      update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) -> None, p, m, v updated in place
  one AdamW step on float32 tensors in bitsandbytes' CUDA kernel order (qlora_ref.adamw_step.adamw_update_).
- check_pager(pager_class)
      pager = pager_class(budget_bytes)
      pager.add(name, nbytes)      a page of nbytes (0 allowed) in host memory; ValueError if nbytes > budget_bytes
      pager.fetch(name)            the page to the device, most recently used, evicting least recently used
                                   pages while resident bytes + nbytes > budget_bytes (a hit moves nothing)
      pager.events                 a list, one tuple ("in" | "out", name, resident bytes after the move) per move
  the bookkeeping of qlora_ref.pager.Pager (which also moves the tensors), compared event for event.
"""

import math
import random

import torch

from .harness import _call, _expected_got, _Fail, _NotImplemented, _run

__all__ = ["check_adamw_update", "check_pager"]


def _adamw_cases():
    """(case, hyperparameters, p, [5 gradients]): large lr · weight_decay and eps where their mistakes show."""
    g = torch.Generator().manual_seed(0)
    specs = [  # label, shape, hyperparameters, gradient scale
        ("lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.5, 1,000 values", (1000,),
         dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5), 1.0),
        ("lr 1e-3, betas (0.8, 0.99), eps 1e-3, weight_decay 0, [7, 13], gradients ~1e-3", (7, 13),
         dict(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.0), 1e-3),
        ("lr 0.05, betas (0.5, 0.9), eps 1e-6, weight_decay 0.1, [3, 33]", (3, 33),
         dict(lr=0.05, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.1), 10.0),
    ]
    cases = []
    for label, shape, hyper, grad_scale in specs:
        p = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) * grad_scale for _ in range(5)]
        cases.append((label, hyper, p, grads))
    return cases


def _adamw_variants(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """(p, hint) for the usual mistakes, each computed from the state before the step (m, v: after it)."""
    c1 = 1 - beta1**step
    c2 = math.sqrt(1 - beta2**step)
    step_size, decay = -lr * c2 / c1, 1 - lr * weight_decay
    return [
        ((p * decay + step_size * m / (v.sqrt() + eps * c2)),
         "weight decay applied before the step: bitsandbytes' CUDA kernel decays after: "
         "p = p + step_size · m / (sqrt(v) + eps·c2), then p = p · (1 - lr·weight_decay)"),
        ((p - lr * m / (v.sqrt() + eps)) * decay,
         "bias correction missing: step_size = -lr · c2 / c1 with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step)"),
        ((p + step_size * m / (v.sqrt() + eps)) * decay,
         "eps added outside the sqrt term scaled by c2: with the bias corrections folded into the step size the "
         "denominator is sqrt(v) + eps·c2 (that is c2 · (sqrt(v̂) + eps))"),
        ((p + step_size * m / (v.sqrt() + eps * c2)) * (1 - weight_decay),
         "the decoupled decay is p · (1 - lr·weight_decay): lr times weight_decay, not weight_decay alone"),
        ((p + step_size * m / (v.sqrt() + eps * c2)),
         "weight decay missing: after the step, p = p · (1 - lr·weight_decay)"),
        ((p + step_size * m / (v + eps * c2)) * decay,
         "the denominator is sqrt(v) + eps·c2: the square root of the second moment"),
    ]


def _moment_hint(which, got, m_old, v_old, g, p, beta1, beta2, weight_decay):
    beta, old = (beta1, m_old) if which == "m" else (beta2, v_old)
    term = g if which == "m" else g * g
    in_place = ("update m, v and p in place (m.mul_(beta1).add_(...), p.copy_(...)): `m = ...` inside the "
                "function makes a new tensor that the caller never sees")
    if torch.equal(got, old) and not torch.equal(old, beta * old + (1 - beta) * term):
        return in_place
    candidates = [
        ((1 - beta) * old + beta * term, f"{which} = beta · {which} + (1 - beta) · {'g' if which == 'm' else 'g²'}: "
                                        f"beta multiplies the old moment"),
        (beta * old + (1 - beta) * (g if which == "v" else g * g),
         "m averages g, v averages g² (the squared gradient)"),
    ]
    if weight_decay > 0:
        g_l2 = g + weight_decay * p
        candidates.append((beta * old + (1 - beta) * (g_l2 if which == "m" else g_l2 * g_l2),
                           "that is Adam with L2 regularisation (weight_decay · p added to the gradient); AdamW "
                           "decouples it: the moments see g alone, and p · (1 - lr·weight_decay) comes after the step"))
    for candidate, hint in candidates:
        if bool(torch.isclose(got, candidate, rtol=1e-5, atol=1e-30).all()):
            return hint
    return f"{which} = beta{1 if which == 'm' else 2} · {which} + (1 - beta{1 if which == 'm' else 2}) · {'g' if which == 'm' else 'g²'}"


def check_adamw_update(update) -> bool:
    """Check one AdamW step in bitsandbytes' kernel order (lesson 7) against qlora_ref.optim8bit.adamw_update_.

    update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) updates the float32 tensors p, m and v in
    place (it returns nothing):
        v = beta2 · v + (1 - beta2) · g²,   m = beta1 · m + (1 - beta1) · g
        p = p + step_size · m / (sqrt(v) + eps · c2),   step_size = -lr · c2 / c1
        p = p · (1 - lr · weight_decay)                               (decoupled weight decay, after the step)
    with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step). Three cases of five steps each (steps 1-5), each step
    started from the reference's state. Tolerances (float32 roundings in another order): m within
    1e-6 · (|m_old| + |g|), v within 1e-6 · v, p within 1e-5 · |the reference's change of p| + 1e-6 · |p|.
    Prints one line (with how many values of p were equal bit for bit); True on success.
    """
    from qlora_ref.adamw_step import adamw_update_

    def body():
        exact = total = 0
        for case, hyper, p0, grads in _adamw_cases():
            p_ref, m_ref, v_ref = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
            for step, g in enumerate(grads, start=1):
                label = f"step {step}, {case}"
                p_old, m_old, v_old = p_ref.clone(), m_ref.clone(), v_ref.clone()
                p, m, v = p_old.clone(), m_old.clone(), v_old.clone()
                _call(update, p, g.clone(), m, v, step, hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                      hyper["weight_decay"])
                adamw_update_(p_ref, g, m_ref, v_ref, step, **hyper)
                n = p.numel()
                m_tol = 1e-6 * (m_old.abs() + g.abs())
                v_tol = 1e-6 * v_ref
                p_tol = 1e-5 * (p_ref - p_old).abs() + 1e-6 * p_ref.abs()
                for which, got, exp, tol in (("m", m, m_ref, m_tol), ("v", v, v_ref, v_tol), ("p", p, p_ref, p_tol)):
                    differ = ((got.double() - exp.double()).abs() > tol.double()).reshape(-1)
                    if not bool(differ.any()):
                        continue
                    idx = int(differ.nonzero()[0])
                    line = (f"MISMATCH in {which} ({label}): {int(differ.sum()):,} of {n:,} differ, first at index "
                            f"{idx}: {_expected_got(exp.reshape(-1)[idx].item(), got.reshape(-1)[idx].item())}")
                    if which != "p":
                        hint = _moment_hint(which, got, m_old, v_old, g, p_old, hyper["beta1"], hyper["beta2"],
                                            hyper["weight_decay"])
                    elif torch.equal(got, p_old):
                        hint = "p did not change: update it in place (p.add_(...), p.mul_(...) or p.copy_(...))"
                    else:
                        hint = ("p = p + step_size · m / (sqrt(v) + eps·c2) with the new m and v, then "
                                "p · (1 - lr·weight_decay)")
                        for candidate, candidate_hint in _adamw_variants(p_old, g, m_ref, v_ref, step, **hyper):
                            if bool(((got.double() - candidate.double()).abs() <= p_tol.double()).all()):
                                hint = candidate_hint
                                break
                    raise _Fail(line, hint)
                exact += int((p == p_ref).sum())
                total += n
        return (f"p, m and v match qlora_ref's adamw_update_ (3 cases, steps 1-5; "
                f"{exact:,} of {total:,} values of p equal bit for bit)")

    return _run("check_adamw_update", body)


# The pager


def _pager_cases():
    """(case, budget, {page: bytes}, [pages fetched, in order]): one by hand, then four seeded ones. Each has a
    page of 0 bytes and one of the whole budget, and fetches pages that are already on the device."""
    cases = [(
        "by hand, budget 100", 100, {"a": 40, "b": 30, "c": 30, "d": 50, "zero": 0, "whole": 100},
        ["a", "b", "c", "a", "d", "zero", "whole", "zero", "a", "a", "c", "b", "zero", "d", "b"],
    )]
    for seed, budget in enumerate((1000, 777, 4099, 64)):
        rng = random.Random(seed)
        sizes = {f"p{i}": rng.randint(1, budget // 2) for i in range(rng.randint(5, 8))}
        sizes.update(zero=0, whole=budget, almost=budget - 1)
        names = list(sizes)
        weights = [1.0] * (len(names) - 2) + [0.2, 0.2]  # the two large pages, rarely: each empties the device
        fetches = []
        for _ in range(60):
            recent = fetches[-3:]  # some locality, so that pages are fetched again while on the device
            fetches.append(rng.choice(recent) if recent and rng.random() < 0.3 else rng.choices(names, weights)[0])
        for name in ("whole", "zero"):  # each at least once, somewhere after the first ten fetches
            fetches.insert(rng.randrange(10, len(fetches)), name)
        cases.append((f"seed {seed}, budget {budget}, {len(sizes)} pages", budget, sizes, fetches))
    return cases


_EVENT_HINT = ('record each move as a tuple (direction, name, resident_bytes after it): self.events.append(("out", '
               'victim, self.resident_bytes)) after an eviction, ("in", name, self.resident_bytes) after a fetch')


def _learner_events(pager):
    """pager.events as a list of (str, name, int) tuples, or _Fail naming what is wrong with it."""
    events = getattr(pager, "events", None)
    if not isinstance(events, list):
        raise _Fail(f"the pager's `events` should be a list, got {type(events).__name__}", _EVENT_HINT)
    normalised = []
    for event in events:
        if not isinstance(event, (tuple, list)) or len(event) != 3 or event[0] not in ("in", "out"):
            raise _Fail(f"an event should be a tuple (\"in\" or \"out\", name, resident bytes), got {event!r}",
                        _EVENT_HINT)
        try:
            normalised.append((event[0], event[1], int(event[2])))
        except (TypeError, ValueError):
            raise _Fail(f"an event's third field should be the resident bytes (an int), got {event!r}", _EVENT_HINT)
    return normalised


def _pager_hint(name, expected, got, budget, sizes, last_used, loaded):
    """The likeliest mistake behind one fetch's wrong events. `last_used` and `loaded` (when each page was last
    fetched, and last brought in) hold the pages on the device before this fetch."""
    over = [event for event in got if event[2] > budget]
    if over:
        return (f"the device would hold {over[0][2]:,} bytes, more than the budget of {budget:,}: keep evicting "
                "while resident_bytes + nbytes > budget_bytes (a while loop: one eviction may not make room)")
    if not expected:
        return (f"{name!r} is already on the device (a hit): no bytes move and nothing is recorded; only make it "
                "the most recently used (self.resident.move_to_end(name))")
    if not got:
        return f"{name!r} is not on the device: bring it in (evicting first if it does not fit) and record (\"in\", ...)"
    expected_out = [event[1] for event in expected if event[0] == "out"]
    got_out = [event[1] for event in got if event[0] == "out"]
    if got_out != expected_out:
        least_recent_first = sorted(last_used, key=last_used.get)
        n = len(got_out)
        if got_out == least_recent_first[:n] and n > len(expected_out):
            return ("you evicted more pages than needed: stop as soon as resident_bytes + nbytes <= budget_bytes "
                    "(a page that fills the budget exactly fits)")
        if got_out == least_recent_first[:n]:
            return "too few pages evicted: keep evicting while resident_bytes + nbytes > budget_bytes"
        if name in got_out:
            return f"you evicted {name!r}, the page being fetched: evict among the other pages on the device"
        stranger = next((page for page in got_out if page not in last_used), None)
        if stranger is not None:
            return f"{stranger!r} is not on the device: evict only pages that are"
        if got_out == sorted(last_used, key=loaded.get)[:n]:
            return ("you evicted the pages that came in longest ago (first in, first out); LRU evicts the page "
                    f"*used* longest ago, {expected_out[0]!r} first: a fetch of a page already on the device must "
                    "make it the most recently used (move_to_end)")
        if got_out == least_recent_first[::-1][:n]:
            return ("you evicted the most recently used page first: evict from the least recently used end "
                    "(self.resident.popitem(last=False) when the most recent is kept at the end)")
        if got_out == [page for page in least_recent_first if sizes[page]][:n]:
            return ("a page of 0 bytes is evicted like any other when it is the least recently used (though it "
                    "frees nothing): LRU order alone decides")
        return "evict the least recently used page first: the resident page whose last fetch is the oldest"
    if [event[:2] for event in got] != [event[:2] for event in expected]:
        return "evict first, then bring the page in: its (\"in\", ...) event comes after the (\"out\", ...) ones"
    return ("the third field is the bytes on the device after the move: subtract the page's bytes when it goes out, "
            "add them when it comes in")


def _device_state(sizes, last_used, budget):
    """The pages on the device (the keys of last_used), least recently used first, and their bytes."""
    if not last_used:
        return "the device empty"
    pages = ", ".join(f"{page} ({sizes[page]:,})" for page in sorted(last_used, key=last_used.get))
    used = sum(sizes[page] for page in last_used)
    return f"the device holding {pages} (least recently used first; {used:,} of {budget:,} bytes)"


def _add_page(pager, name, nbytes, budget):
    try:
        _call(pager.add, name, nbytes)
    except ValueError as err:
        raise _Fail(f"add({name!r}, {nbytes:,}) with a budget of {budget:,} bytes raised ValueError: {err}",
                    "refuse only a page larger than the whole budget (nbytes > budget_bytes): a page of 0 bytes, "
                    "or of exactly the budget, fits once the other pages are evicted")


def _refuses_a_page_larger_than_the_budget(pager_class):
    budget = 100
    pager = _call(pager_class, budget)
    hint = ("a page larger than the whole budget could never be on the device (evicting every other page does not "
            "make room): in add, if nbytes > self.budget_bytes: raise ValueError(...) saying so")
    try:
        _call(pager.add, "huge", budget + 1)
    except _NotImplemented:
        raise
    except ValueError:
        return
    except Exception as err:
        raise _Fail(f"add('huge', {budget + 1}) with a budget of {budget} bytes raised {type(err).__name__} ({err}), "
                    "expected a ValueError", hint)
    raise _Fail(f"add('huge', {budget + 1}) with a budget of {budget} bytes was accepted", hint)


def check_pager(pager_class) -> bool:
    """Check an LRU pager (lesson 7) against the bookkeeping of qlora_ref.pager.Pager, event for event.

    pager_class(budget_bytes) has add(name, nbytes), fetch(name) and a list `events`; fetching a page that is
    not on the device evicts the least recently used pages while resident + nbytes > budget, recording
    ("out", page, resident bytes after) for each, then brings it in: ("in", name, resident bytes after). A
    fetch of a page on the device records nothing and makes it the most recently used. Five sequences of
    fetches (one by hand, four seeded: budgets 1000, 777, 4099 and 64 bytes), with pages of 0 bytes and of
    the whole budget; then add must refuse (ValueError) a page larger than the budget. Prints one line (the
    first fetch whose events differ, the device before it, expected vs got events, and a hint); True on success.
    """
    from qlora_ref.pager import Pager

    def body():
        fetches = hits = evictions = 0
        cases = _pager_cases()
        for case, budget, sizes, sequence in cases:
            reference, pager = Pager(budget), _call(pager_class, budget)
            for name, nbytes in sizes.items():
                reference.add(name, {"bytes": torch.empty(nbytes, dtype=torch.uint8)})
                _add_page(pager, name, nbytes, budget)
            last_used, loaded = {}, {}  # of the pages on the device: when each was last fetched, last brought in
            for i, name in enumerate(sequence):
                seen_reference, seen = len(reference.events), len(_learner_events(pager))
                reference.fetch(name)
                _call(pager.fetch, name)
                expected = [(e.direction, e.page, e.resident_after) for e in reference.events[seen_reference:]]
                got = _learner_events(pager)[seen:]
                if got != expected:
                    raise _Fail(
                        f"MISMATCH at fetch {i + 1} of {len(sequence)} ({case}): fetch({name!r}) with "
                        f"{_device_state(sizes, last_used, budget)}: expected events {expected}, got {got}",
                        _pager_hint(name, expected, got, budget, sizes, last_used, loaded),
                    )
                for direction, page, _ in expected:
                    if direction == "out":
                        del last_used[page], loaded[page]
                    else:
                        loaded[page] = i
                last_used[name] = i
                fetches += 1
                hits += not expected
                evictions += sum(event[0] == "out" for event in expected)
        _refuses_a_page_larger_than_the_budget(pager_class)
        return (f"events equal qlora_ref.pager.Pager's in {len(cases)} sequences ({fetches} fetches: {hits} hits, "
                f"{evictions} evictions; pages of 0 bytes and of the whole budget), and a page larger than the "
                "budget is refused")

    return _run("check_pager", body)
