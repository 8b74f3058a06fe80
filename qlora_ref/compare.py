"""`compare(name, ours, reference)`: one line saying whether two tensors match, for "ours vs bitsandbytes".

In the spirit of the `cmp` helper of Karpathy's makemore lectures: a learner sees at a glance whether a
piece they wrote matches the reference. Two kinds of claim, and the line says which one was made:

    >>> compare("packed codes", ours, theirs)                            # exact: the default
    packed codes: exact (1,000 values)
    >>> compare("absmax", ours, theirs)
    absmax: DIFFERENT, 3 of 16 differ, first at index 5: ours 0.12 vs 0.13
    >>> compare("logits", ours, theirs, rtol=1e-5, atol=1e-6)          # close: a stated tolerance
    logits: close (every value within 1e-06 + 1e-05·|reference|; 4,096 values)

- exact: every value equal (NaN matches NaN; a float zero must have the same sign: -0.0 is not 0.0, and
  equal values whose zeros differ only in sign are reported as such).
- close (only when rtol or atol is given): every value within atol + rtol * |reference|, torch.isclose's test.
  The line is the same whether the two happen to be equal or not: a sum of float32 products comes out a few
  rounding steps apart on another CPU, another thread count or another BLAS, and a printed line that the
  course checks must read the same on every machine. How far apart they are is not printed, for that reason.
- DIFFERENT: some value is not equal (or outside the tolerance); the line counts them and shows the first.
A shape mismatch with the same number of values is compared value by value in memory order and reported
at the end of the line; a different number of values is DIFFERENT straight away.
"""

import torch

__all__ = ["compare", "distinguish"]


def _as_tensor(value) -> torch.Tensor:
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return tensor.detach().cpu()


def _common(ours: torch.Tensor, reference: torch.Tensor):
    """Both as float64, or both as int64 when neither is a float (so large integers compare exactly)."""
    if ours.is_floating_point() or reference.is_floating_point():
        return ours.double(), reference.double()
    return ours.long(), reference.long()


def _count(n: int) -> str:
    return f"{n:,} value" + ("" if n == 1 else "s")


def _index(flat_index: int, shape: torch.Size) -> str:
    if len(shape) <= 1:
        return f"index {flat_index}"
    position = []
    for size in reversed(shape):
        position.append(flat_index % size)
        flat_index //= size
    return f"index {tuple(reversed(position))}"


def distinguish(a: float, b: float) -> tuple:
    """The two numbers with just enough digits to tell them apart, 4 significant digits when that is enough:
    digits beyond those would be the ones that change from CPU to CPU."""
    for digits in (4, 6, 9, 17):
        left, right = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if left != right:
            return left, right
    return repr(a), repr(b)


def _tolerance(rtol: float, atol: float) -> str:
    """"1e-06 + 1e-05·|reference|", "1e-05·|reference|" or "0.001"."""
    parts = ([f"{atol:g}"] if atol else []) + ([f"{rtol:g}·|reference|"] if rtol else [])
    return " + ".join(parts) or "0"


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor, *, rtol: float = None, atol: float = None) -> str:
    """Print and return one line: `name: exact (...)`, `name: close (...)` or `name: DIFFERENT, ...`.

    Without rtol and atol the claim is equality; with either (the other then 0) it is closeness within
    atol + rtol * |reference|.
    """
    tolerance = rtol is not None or atol is not None
    rtol, atol = rtol or 0.0, atol or 0.0
    ours_t, ref_t = _as_tensor(ours), _as_tensor(reference)
    if ours_t.numel() != ref_t.numel():
        line = (
            f"{name}: DIFFERENT shapes, ours {list(ours_t.shape)} ({_count(ours_t.numel())}) "
            f"vs reference {list(ref_t.shape)} ({_count(ref_t.numel())})"
        )
        print(line)
        return line
    shape_note = ""
    if ours_t.shape != ref_t.shape:
        shape_note = f"; shapes differ: ours {list(ours_t.shape)} vs reference {list(ref_t.shape)}"
    a, b = _common(ours_t.reshape(-1), ref_t.reshape(-1))
    n = a.numel()

    if a.is_floating_point():
        equal = (a == b) | (torch.isnan(a) & torch.isnan(b))
        same_sign = torch.signbit(a) == torch.signbit(b)
        within = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True) if tolerance else equal
    else:
        equal = within = a == b
        same_sign = torch.ones_like(equal)

    if tolerance and bool(within.all()):
        line = f"{name}: close (every value within {_tolerance(rtol, atol)}; {_count(n)}){shape_note}"
    elif bool((equal & same_sign).all()):
        line = f"{name}: exact ({_count(n)}){shape_note}"
    elif bool(equal.all()):
        zeros = int((~same_sign).sum())
        line = f"{name}: equal values, but {zeros:,} of {n:,} are zeros of opposite signs (-0.0 vs 0.0){shape_note}"
    else:
        outside = (~within).nonzero().reshape(-1)
        first = int(outside[0])
        where = _index(first, ours_t.shape if ours_t.shape == ref_t.shape else torch.Size([n]))
        beyond = f" by more than {_tolerance(rtol, atol)}" if tolerance else ""
        line = (
            f"{name}: DIFFERENT, {outside.numel():,} of {n:,} differ{beyond}, first at {where}: "
            "ours {} vs {}".format(*distinguish(float(a[first]), float(b[first]))) + shape_note
        )
    print(line)
    return line
