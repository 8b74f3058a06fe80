"""float32 arithmetic rounded as a GPU rounds it, computed on any device (lesson 7).

bitsandbytes' CUDA AdamW kernel rounds every scalar to float32 and computes its moments with fused
multiply-adds, which round a * b + c once. PyTorch on a CPU has neither by itself: `to_float32` rounds a
Python float, `fma` computes the single rounding exactly in float64 (round to odd).
"""

import math
import struct

import torch


def to_float32(x: float) -> float:
    """x rounded to the nearest float32 (struct packs a C float; no tensor, as this runs every step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def fma(a: torch.Tensor, b, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in float32 rounded once, as a fused multiply-add instruction (b: a tensor or a float32 number).

    The product of two float32 numbers is exact in float64. Their sum is not always: rounding it to
    float64 and then to float32 would round twice, and differ from the fma where the float64 sum lands
    exactly halfway between two float32 numbers. So the sum is rounded to odd instead: TwoSum gives the
    float64 sum and its exact remainder; where the remainder is not 0 and the sum's last bit is 0, the
    sum steps one float64 ulp towards the remainder. Rounding that to float32 is the correct rounding of
    the exact a * b + c (24 + 2 <= 53 bits, Boldo and Melquiond, "Emulation of FMA and correctly rounded
    sums: proved algorithms using rounding to odd", 2008).
    """
    product = a.double() * (b.double() if isinstance(b, torch.Tensor) else b)
    addend = c.double()
    total = product + addend
    addend_part = total - product  # TwoSum (Knuth): remainder = product + addend - total, exactly
    remainder = (product - (total - addend_part)) + (addend - addend_part)
    even = (total.view(torch.int64) & 1) == 0
    towards = torch.where(remainder > 0, math.inf, -math.inf).to(total.dtype)
    total = torch.where((remainder != 0) & even, torch.nextafter(total, towards), total)
    return total.float()
