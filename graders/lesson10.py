"""Checkers for exercise 10 (FSDP2): the learner's shard of a 4-bit weight and the data-parallel loss weight.

Lesson 10's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_shard_streams(shard_streams)
      shard_streams(codes, absmax, absmax2, shape, blocksize, world_size, rank) -> (codes_k, absmax_k, absmax2_k)
          the streams of quantize_4bit's weight of `shape` [R, C] (codes flat, uint8; absmax per block of
          `blocksize`; absmax2 per 256 absmax, or None without double quantization) cut to rank's rows
          [rank R/N, (rank+1) R/N); a ValueError when a cut would fall inside a (nested) block
- check_loss_weight(loss_weight)
      loss_weight(my_tokens, all_tokens, world_size) -> the number rank k multiplies its mean loss by, so that
          FSDP2's average of the ranks' gradients is the gradient of the whole batch's mean loss
"""

import torch

from qlora_ref.fourbit import quantize_4bit
from qlora_ref.sharded_4bit import Weight4bit

from .harness import _call, _Fail, _first_mismatch, _mismatch_line, _NotImplemented, _run

__all__ = ["check_loss_weight", "check_shard_streams"]


def _shard_cases():
    """(shape, double_quant, world_size): nested weights cut at 16,384 values, plain ones at 64."""
    return [((256, 256), True, 1), ((256, 256), True, 4), ((512, 128), True, 2), ((96, 64), False, 3),
            ((256, 256), False, 4)]


def check_shard_streams(shard_streams) -> bool:
    def body():
        for shape, nested, world_size in _shard_cases():
            weight = torch.randn(*shape, generator=torch.Generator().manual_seed(world_size))
            packed, state = quantize_4bit(weight, blocksize=64, double_quant=nested)
            whole = Weight4bit.from_quantized(packed, state)
            args = (whole.codes.clone(), whole.absmax.clone(), None if not nested else whole.absmax2.clone())
            for rank, expected in enumerate(torch.chunk(whole, world_size)):
                case = f"{shape[0]} x {shape[1]}, {'nested' if nested else 'plain'}, rank {rank} of {world_size}"
                got = _call(shard_streams, *args, shape, 64, world_size, rank)
                if not isinstance(got, tuple) or len(got) != 3:
                    raise _Fail(f"shard_streams returned {type(got).__name__}, not (codes, absmax, absmax2)")
                for name, want, have in zip(("codes", "absmax", "absmax2"), expected.streams() + (None,), got):
                    if want is None:
                        if have is not None:
                            raise _Fail(f"absmax2 ({case}): expected None without double quantization")
                        continue
                    if not isinstance(have, torch.Tensor) or have.numel() != want.numel():
                        n = have.numel() if isinstance(have, torch.Tensor) else type(have).__name__
                        raise _Fail(f"MISMATCH in {name} ({case}): expected {want.numel():,} values, got {n}",
                                    _LENGTH_HINTS[name])
                    found = _first_mismatch(want, have.reshape(-1))
                    if found:
                        raise _Fail(_mismatch_line(name, case, found, want.numel()),
                                    "a rank's rows start at rank * R / N: codes at that many values / 2, absmax / 64")
        weight = Weight4bit.quantize(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)))
        try:
            _call(shard_streams, weight.codes, weight.absmax, weight.absmax2, (128, 128), 64, 2, 0)
        except ValueError:
            pass
        except _NotImplemented:
            raise
        else:
            raise _Fail("128 x 128 nested over 2 ranks: 8,192 values a rank, half a nested block of 16,384, and "
                        "shard_streams returned instead of raising ValueError",
                        "the rank holding half a nested block would miss the absmax2 of its other half")
        return "every shard equals FSDP2's cut of the single-process bytes, and half a nested block is refused"
    return _run("check_shard_streams", body)


_LENGTH_HINTS = {"codes": "two 4-bit codes a byte: R/N rows of C values are R C / (2 N) bytes",
                 "absmax": "one absmax per block of 64 values: R C / (64 N) of them",
                 "absmax2": "one absmax2 per 256 absmax values, i.e. per 16,384 weights"}


def check_loss_weight(loss_weight) -> bool:
    def body():
        cases = [([10, 10], 2), ([7, 13], 2), ([5, 9, 1, 25], 4), ([12], 1)]
        for tokens, world_size in cases:
            total = sum(tokens)
            means = [0.5 + 0.25 * k for k in range(world_size)]  # each rank's mean loss over its tokens
            whole = sum(t * m for t, m in zip(tokens, means)) / total
            weights = [float(_call(loss_weight, t, total, world_size)) for t in tokens]
            averaged = sum(w * m for w, m in zip(weights, means)) / world_size  # what FSDP2's mean makes of them
            if abs(averaged - whole) > 1e-12 * whole:
                hint = ("FSDP2 divides the sum of the ranks' gradients by N: multiply by N as well"
                        if abs(averaged * world_size - whole) <= 1e-12 * whole else
                        "weight each rank by its share of the tokens, T_k / T, then undo FSDP2's division by N")
                raise _Fail(f"MISMATCH ({world_size} ranks with {tokens} answer tokens): the averaged loss is "
                            f"{averaged:.6g}, the batch's mean is {whole:.6g}", hint)
        return "the ranks' weighted losses average to the whole batch's mean, also with unequal shares"
    return _run("check_loss_weight", body)
