"""Checkers for the exercises: does a learner's function compute what the reference (and bitsandbytes) does?

Each checker calls the learner's function on a few fixed, seeded inputs, compares the result with
qlora_ref (and with bitsandbytes where it has the same thing and is installed), and prints ONE line:

    check_nf4_codebook: OK — equal to bitsandbytes' table, bit for bit
    check_absmax_quantizer: MISMATCH in q (bits=4, 1,000 normal values): 3 of 1,000 differ, first at index 17: expected 5, got 6
      hint: q = clamp(round(x / scale), -qmax, qmax) with torch.round (floor or int() truncate)
    check_blockwise_4bit: not implemented yet: fill in the TODO in pack_nibbles

It returns True on success and False otherwise. It never raises for a wrong or unfinished answer: a function
that raises NotImplementedError (an exercise stub) gives the "not implemented yet" line, a wrong result the
first mismatch (where, expected vs got) and a hint. Any other exception in the learner's code propagates with
its traceback, since that is a bug to read. A call of the learner's code that runs longer than TIME_LIMIT_S
seconds (an endless loop) is stopped and gives a "stopped after" line, instead of hanging the notebook (by
SIGALRM, so in the main thread on Linux and macOS, where notebooks run their cells; elsewhere no limit).
"""

import math
import signal
import threading
from contextlib import contextmanager

import torch

from qlora_ref.compare import distinguish


class _Fail(Exception):
    """One failed comparison: the line to print (and an optional hint)."""

    def __init__(self, line, hint=None):
        super().__init__(line)
        self.line = line
        self.hint = hint


TIME_LIMIT_S = 120  # the longest one call of a learner's function may run (the checkers' own take seconds)


class _TimedOut(BaseException):
    """A learner's call ran past TIME_LIMIT_S (a BaseException, so that `except Exception` in a loop cannot
    swallow it)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


@contextmanager
def _time_limit(fn):
    """Stop the block with _TimedOut after TIME_LIMIT_S seconds: a SIGALRM timer, where there is one to take
    (the main thread, a platform with SIGALRM, no timer already running for someone else)."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return
    name = getattr(getattr(fn, "fn", fn), "__name__", "your function")

    def stop(signum, frame):
        raise _TimedOut(name)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _NotImplemented(Exception):
    """A learner's stub raised NotImplementedError: its message, or which function still has a TODO."""

    def __init__(self, err: NotImplementedError, name: str):
        super().__init__(str(err).strip() or f"fill in the TODO in {name}")


def _call(fn, *args):
    try:
        with _time_limit(fn):
            return fn(*args)
    except NotImplementedError as err:
        raise _NotImplemented(err, getattr(fn, "__name__", "your function"))


def _run(name, body):
    """Run a checker body; print the one line (and hint) it ends with; True on success."""
    try:
        ok_line = body()
    except _NotImplemented as err:
        message = str(err)
        print(f"{name}: not implemented yet: {message}")
        return False
    except _Fail as fail:
        print(f"{name}: {fail.line}")
        if fail.hint:
            print(f"  hint: {fail.hint}")
        return False
    except _TimedOut as stopped:
        print(f"{name}: stopped after {TIME_LIMIT_S} s: {stopped.name} never returned (an endless loop?); "
              "graders.harness.TIME_LIMIT_S sets the limit")
        return False
    print(f"{name}: OK — {ok_line}")
    return True


# Comparisons: the first value that differs, said the same way by every checker.


def _number(value, what):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise _Fail(
                f"{what} should be one number (per tensor), got a tensor of shape {list(value.shape)}",
                "one scale for the whole tensor: reduce over all values (x.abs().max(), x.min(), x.max())",
            )
        return float(value.reshape(-1)[0])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Fail(f"{what} should be a number or a one-element tensor, got {type(value).__name__}")


def _tensor(value, what):
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception:
            raise _Fail(f"{what} should be a tensor, got {type(value).__name__}")
    return value.detach().cpu()


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == int(v) and abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.9g}"
    return str(v)


def _first_mismatch(expected, got, exact=True, rtol=1e-6):
    """None, or (count, index, expected value, got value) of the first differing element (flat order)."""
    e = expected.reshape(-1)
    g = got.reshape(-1)
    if e.is_floating_point() or g.is_floating_point():
        e, g = e.double(), g.double()
        if exact:
            differ = ~(e == g)
        else:
            differ = ~torch.isclose(g, e, rtol=rtol, atol=0.0)
    else:
        differ = e.long() != g.long()
    if not bool(differ.any()):
        return None
    idx = int(differ.nonzero()[0])
    ev, gv = e[idx].item(), g[idx].item()
    return int(differ.sum()), idx, ev, gv


def _expected_got(expected, got) -> str:
    """"expected X, got Y": whole numbers as _fmt writes them, other floats with just enough digits to tell the
    two apart (compare.distinguish), since the digits beyond those change from CPU to CPU."""
    texts = [_fmt(expected), _fmt(got)]
    if all(isinstance(v, float) and not math.isnan(v) for v in (expected, got)):
        short = distinguish(expected, got)
        texts = [text if "." in text and text.endswith(".0") else fine for text, fine in zip(texts, short)]
    return f"expected {texts[0]}, got {texts[1]}"


def _mismatch_line(what, case, found, n):
    count, idx, ev, gv = found
    return f"MISMATCH in {what} ({case}): {count:,} of {n:,} differ, first at index {idx}: {_expected_got(ev, gv)}"
