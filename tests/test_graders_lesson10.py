"""Exercise 10's checkers: the reference passes, a stub says so, the usual mistakes get their hint."""

import pytest

from graders.lesson10 import check_loss_weight, check_shard_streams


def run(capsys, checker, fn):
    ok = checker(fn)
    return ok, capsys.readouterr().out


def reference_shard(codes, absmax, absmax2, shape, blocksize, world_size, rank):
    rows, cols = shape
    unit = blocksize * 256 if absmax2 is not None else blocksize
    if rows % world_size or (rows // world_size * cols) % unit:
        raise ValueError("a cut inside a block")
    first, last = rank * rows // world_size * cols, (rank + 1) * rows // world_size * cols
    return (codes[first // 2:last // 2], absmax[first // blocksize:last // blocksize],
            None if absmax2 is None else absmax2[first // unit:last // unit])


def test_the_references_pass(capsys):
    ok, out = run(capsys, check_shard_streams, reference_shard)
    assert ok and out.startswith("check_shard_streams: OK — ") and out.count("\n") == 1
    ok, out = run(capsys, check_loss_weight, lambda t, total, n: n * t / total)
    assert ok and out.startswith("check_loss_weight: OK — ")


@pytest.mark.parametrize("checker", [check_shard_streams, check_loss_weight])
def test_a_stub_gives_one_friendly_line(capsys, checker):
    def stub(*args):
        raise NotImplementedError("fill in the TODO in my_function")

    ok, out = run(capsys, checker, stub)
    assert not ok and out == f"{checker.__name__}: not implemented yet: fill in the TODO in my_function\n"


def test_codes_cut_at_values_not_bytes(capsys):
    def values_not_bytes(codes, absmax, absmax2, shape, blocksize, world_size, rank):
        c, a, b = reference_shard(codes, absmax, absmax2, shape, blocksize, world_size, rank)
        first = rank * shape[0] // world_size * shape[1]
        return codes[first:first + c.numel()], a, b

    ok, out = run(capsys, check_shard_streams, values_not_bytes)
    assert not ok and "MISMATCH in codes (256 x 256, nested, rank 1 of 4)" in out and "hint:" in out


def test_half_a_nested_block_must_be_refused(capsys):
    def never_refuses(codes, absmax, absmax2, shape, blocksize, world_size, rank):
        rows, cols = shape
        first, last = rank * rows // world_size * cols, (rank + 1) * rows // world_size * cols
        return (codes[first // 2:last // 2], absmax[first // blocksize:last // blocksize],
                None if absmax2 is None else absmax2[first // (blocksize * 256):-(-last // (blocksize * 256))])

    ok, out = run(capsys, check_shard_streams, never_refuses)
    assert not ok and "returned instead of raising ValueError" in out


def test_the_mean_without_n_is_named(capsys):
    ok, out = run(capsys, check_loss_weight, lambda t, total, n: t / total)
    assert not ok and "multiply by N as well" in out
