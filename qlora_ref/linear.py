"""Lesson 1: linear quantization, symmetric (absmax) and asymmetric (zero-point), 2 to 8 bits.

A scale s (and a zero-point z) per group of values, where a group is the whole tensor, one row
(an output channel of a weight matrix) or one block of B consecutive values:

    symmetric:  s = absmax / (2^(b-1) - 1),      q = clamp(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),  x^ = s q
    asymmetric: s = (max - min) / (2^b - 1),     z = round(-min / s),
                q = clamp(round(x / s) + z, 0, 2^b - 1),                                         x^ = s (q - z)

Symmetric keeps 0 exact and wastes half the range on skewed data; zero-point fits [min, max] and
keeps 0 exact too (z is an integer). Either way one outlier stretches s for its whole group.
"""

from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "block")


@dataclass
class LinearQuantized:
    """Integer codes `q` (x's shape), one `scale` and `zero` per group, and how groups were formed."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    granularity: str
    blocksize: int
    shape: torch.Size

    def dequantize(self) -> torch.Tensor:
        """x^ = s (q - z), float32, in the original shape."""
        groups = to_groups(self.q.float(), self.granularity, self.blocksize)
        return from_groups(self.scale * (groups - self.zero), self.shape)


def to_groups(x: torch.Tensor, granularity: str, blocksize: int) -> torch.Tensor:
    """x as a [groups, values] matrix; a short last block is padded by repeating its last value,
    which changes neither its absmax nor its min and max."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    return torch.cat([flat, flat[-1:].expand(pad)]).view(-1, blocksize)


def from_groups(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n = torch.Size(shape).numel()
    return groups.reshape(-1)[:n].reshape(shape)


def _check(x, bits, granularity, blocksize):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError("x is empty: there is nothing to quantize")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; a linear scale cannot represent them")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "channel" and x.dim() < 2:
        raise ValueError("per-channel quantization needs a tensor with at least 2 dimensions (rows = channels)")
    if granularity == "block" and (not isinstance(blocksize, int) or blocksize < 1):
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")


def quantize_absmax(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", blocksize: int = 64) -> LinearQuantized:
    """Symmetric quantization: s = absmax / (2^(b-1) - 1), q = clamp(round(x / s), -qmax, qmax)."""
    _check(x, bits, granularity, blocksize)
    groups = to_groups(x.float(), granularity, blocksize)
    qmax = 2 ** (bits - 1) - 1
    absmax = groups.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))  # any scale keeps zeros at 0
    q = torch.clamp(torch.round(groups / scale), -qmax, qmax)
    return LinearQuantized(from_groups(q, x.shape).to(torch.int16), scale, torch.zeros_like(scale), bits, granularity, blocksize, x.shape)


def quantize_zeropoint(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", blocksize: int = 64) -> LinearQuantized:
    """Asymmetric quantization: s = (max - min) / (2^b - 1), z = round(-min / s), q = clamp(round(x/s) + z, 0, 2^b - 1).

    The range is widened to include 0 first, so that z is a valid code and 0 is represented exactly.
    """
    _check(x, bits, granularity, blocksize)
    groups = to_groups(x.float(), granularity, blocksize)
    qmax = 2**bits - 1
    low = groups.amin(dim=1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=1, keepdim=True).clamp(min=0)
    scale = torch.where(high > low, (high - low) / qmax, torch.ones_like(high))
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(groups / scale) + zero, 0, qmax)
    return LinearQuantized(from_groups(q, x.shape).to(torch.int16), scale, zero, bits, granularity, blocksize, x.shape)


def quantization_error(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Mean absolute, root-mean-square and maximum absolute error of x^ against x (float64 sums)."""
    diff = (x.double() - x_hat.double()).reshape(-1)
    return {
        "mae": diff.abs().mean().item(),
        "rmse": diff.pow(2).mean().sqrt().item(),
        "max": diff.abs().max().item(),
    }
