"""`compare(name, ours, reference)`: one line saying whether two tensors match, for "ours vs bitsandbytes".

In the spirit of the `cmp` helper of Karpathy's makemore lectures: a learner sees at a glance whether a
piece they wrote matches the reference, and by how much it misses when it does not.

    >>> compare("packed codes", ours, theirs)
    packed codes: exact (1,000 values)
    >>> compare("dequantized", ours, theirs)
    dequantized: close, max |diff| 1.2e-07, 10 of 16 values differ
    >>> compare("absmax", ours, theirs)
    absmax: DIFFERENT, 3 of 16 differ, first at index 5: ours 0.12 vs 0.13

- exact: every value equal (NaN matches NaN, and a float zero must have the same sign: -0.0 is not 0.0).
- close: not exact, but every value within `atol + rtol * |reference|` (torch.allclose's test; by default
  rtol 1e-5 and atol 1e-8, which is a few float32 rounding steps).
- DIFFERENT: some value is outside that tolerance; the line counts them and shows the first.
A shape mismatch with the same number of values is compared value by value in memory order and reported
at the end of the line; a different number of values is DIFFERENT straight away.
"""

import torch

__all__ = ["compare"]


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


def _pair(a: float, b: float) -> str:
    """The two numbers with just enough digits to tell them apart (4 significant digits when that is enough)."""
    for digits in (4, 6, 9, 17):
        left, right = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if left != right:
            return f"ours {left} vs {right}"
    return f"ours {a!r} vs {b!r}"


def compare(name: str, ours: torch.Tensor, reference: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-8) -> str:
    """Print and return one line: `name: exact (...)`, `name: close, max |diff| ...` or `name: DIFFERENT, ...`."""
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
        both_nan = torch.isnan(a) & torch.isnan(b)
        equal = (a == b) | both_nan
        same_sign = torch.signbit(a) == torch.signbit(b)
        within = torch.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
    else:
        equal = a == b
        same_sign = torch.ones_like(equal)
        within = equal

    if bool((equal & same_sign).all()):
        line = f"{name}: exact ({_count(n)}){shape_note}"
    elif bool(within.all()):
        differ = int((~(equal & same_sign)).sum())
        finite = ~torch.isnan(a) & ~torch.isnan(b)
        diff = (a[finite] - b[finite]).abs()
        biggest = float(diff.max()) if diff.numel() else 0.0
        line = f"{name}: close, max |diff| {biggest:.2g}, {differ:,} of {n:,} values differ"
        if biggest == 0.0:
            line += " (only the sign of zero)"
        line += shape_note
    else:
        outside = (~within).nonzero().reshape(-1)
        first = int(outside[0])
        where = _index(first, ours_t.shape if ours_t.shape == ref_t.shape else torch.Size([n]))
        line = (
            f"{name}: DIFFERENT, {outside.numel():,} of {n:,} differ, first at {where}: "
            f"{_pair(float(a[first]), float(b[first]))}{shape_note}"
        )
    print(line)
    return line
