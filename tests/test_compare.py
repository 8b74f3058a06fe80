"""qlora_ref.compare.compare: the one-line exact / close / DIFFERENT verdict the notebooks print."""

import math

import numpy as np
import torch

from qlora_ref.compare import compare


def test_exact_prints_and_returns_the_same_line(capsys):
    x = torch.arange(1000, dtype=torch.float32)
    line = compare("packed codes", x, x.clone())
    assert line == "packed codes: exact (1,000 values)"
    assert capsys.readouterr().out == line + "\n"


def test_exact_singular_and_integer_dtypes():
    assert compare("one", torch.tensor([3], dtype=torch.uint8), torch.tensor([3])) == "one: exact (1 value)"


def test_exact_across_float_dtypes_when_values_are_equal():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert compare("cast", x, x.double()) == "cast: exact (64 values)"


def test_without_a_tolerance_equality_is_claimed_and_a_rounding_step_is_different():
    ref = torch.ones(16)
    ours = ref.clone()
    ours[[1, 4]] += 1.2e-7
    assert compare("dequantized", ours, ref) == "dequantized: DIFFERENT, 2 of 16 differ, first at index 1: ours 1.00000012 vs 1"


def test_with_a_tolerance_the_line_is_the_same_whether_equal_or_not():
    """What a checked notebook prints must not depend on the CPU: exact and within tolerance read alike."""
    ref = torch.ones(16)
    ours = ref.clone()
    ours[[1, 4]] += 1.2e-7
    close = "dequantized: close (every value within 1e-06·|reference|; 16 values)"
    assert compare("dequantized", ours, ref, rtol=1e-6) == close
    assert compare("dequantized", ref.clone(), ref, rtol=1e-6) == close
    assert compare("both", ours, ref, rtol=1e-6, atol=1e-8) == "both: close (every value within 1e-08 + 1e-06·|reference|; 16 values)"


def test_outside_the_tolerance_is_different_and_says_by_how_much_it_was_allowed():
    line = compare("far", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), rtol=1e-5, atol=1e-6)
    assert line == "far: DIFFERENT, 1 of 2 differ by more than 1e-06 + 1e-05·|reference|, first at index 1: ours 2 vs 3"


def test_signed_zero_is_not_exact_and_is_named():
    line = compare("zero", torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]))
    assert line == "zero: equal values, but 1 of 2 are zeros of opposite signs (-0.0 vs 0.0)"
    assert compare("zero", torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0]), atol=0.5).startswith("zero: close")


def test_nan_matches_nan():
    x = torch.tensor([1.0, math.nan])
    assert compare("nan", x, x.clone()) == "nan: exact (2 values)"


def test_different_counts_and_shows_first_index():
    ref = torch.linspace(0, 1, 16)
    ours = ref.clone()
    ours[[5, 9, 12]] += 0.01
    line = compare("absmax", ours, ref)
    assert line.startswith("absmax: DIFFERENT, 3 of 16 differ, first at index 5: ours 0.3433 vs 0.3333")


def test_different_uses_enough_digits_to_tell_values_apart():
    ref = torch.tensor([1.0], dtype=torch.float64)
    ours = ref + 1e-4
    assert compare("digits", ours, ref) == "digits: DIFFERENT, 1 of 1 differ, first at index 0: ours 1.0001 vs 1"


def test_different_reports_multidimensional_index():
    ref = torch.zeros(3, 4, dtype=torch.int64)
    ours = ref.clone()
    ours[2, 1] = 7
    assert compare("codes", ours, ref) == "codes: DIFFERENT, 1 of 12 differ, first at index (2, 1): ours 7 vs 0"


def test_shape_mismatch_same_count_is_noted():
    x = torch.arange(6.0)
    line = compare("reshaped", x, x.reshape(1, 6))
    assert line == "reshaped: exact (6 values); shapes differ: ours [6] vs reference [1, 6]"


def test_different_number_of_values():
    line = compare("sizes", torch.zeros(4), torch.zeros(5))
    assert line == "sizes: DIFFERENT shapes, ours [4] (4 values) vs reference [5] (5 values)"


def test_accepts_numpy_and_lists():
    assert compare("np", np.array([1.0, 2.0]), [1.0, 2.0]) == "np: exact (2 values)"


def test_tolerance_can_be_widened():
    line = compare("loose", torch.tensor([1.0]), torch.tensor([1.001]), atol=1e-2)
    assert line.startswith("loose: close")
