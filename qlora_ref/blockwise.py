"""Lesson 3: blockwise absmax scaling, nearest-code rounding and 4-bit packing.

    absmax_b = max_{i in block b} |x_i|                      one float32 per block of B values
    u_i      = x_i / absmax_b                                 in [-1, 1]
    q_i      = the index of the code level nearest to u_i     exactly halfway goes to the lower level
    byte_j   = q_{2j} << 4 | q_{2j+1}                         the even element in the high nibble
    x^_i     = code[q_i] * absmax_b

A block confines an outlier's damage to its B neighbours; the price is 32/B bits per value for the
absmax (0.5 at B = 64).
"""

import torch


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| over each block of `blocksize` values; the last block may be shorter."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().unsqueeze(0)])
    return absmax


def scale_to_unit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """u = x / absmax per block, clamped to [-1, 1], rounded exactly as bitsandbytes does it.

    Full blocks multiply by the reciprocal (x * (1/absmax)), the short last block divides: the two
    can differ in the last bit, and bitsandbytes' CPU path does each in its own way. An all-zero
    block has absmax 0; the clamp to 1e-38 keeps its values at 0 instead of 0/0.
    """
    n = flat.numel()
    full = n - n % blocksize
    blocks = full // blocksize
    unit = flat[:full].view(blocks, blocksize) * (1.0 / absmax[:blocks].clamp(min=1e-38)).view(-1, 1)
    unit = unit.reshape(-1)
    if full < n:
        unit = torch.cat([unit, flat[full:] / absmax[blocks].clamp(min=1e-38)])
    return unit.clamp(-1, 1)


def nearest_code(unit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of `code` for each value; a tie goes to the lower level.

    Compares against the float32 midpoints of neighbouring levels (`torch.bucketize` puts a value
    equal to a boundary on its left). `code` may be in bit order (FP4 is): it is sorted here and the
    result is mapped back to bit order. FP4 holds +0 (code 0) and -0 (code 8): the stable sort keeps
    code 0 first, so a tiny negative value gets code 0 and a tiny positive one code 8, as in bitsandbytes.
    """
    order = torch.argsort(code, stable=True)
    levels = code[order]
    midpoints = (levels[:-1] + levels[1:]) / 2
    return order[torch.bucketize(unit, midpoints)]


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even one high: shape [(n + 1) // 2, 1], uint8 (bitsandbytes').

    An odd count is padded with code 0 (NF4's -1.0). quantize_4bit pads the scaled values with 0.0
    before rounding instead, as bitsandbytes does, so its padding nibble is the code of 0.0.
    """
    codes = codes.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` 4-bit codes of `packed`, high nibble first, as int64.

    int64 because they index a table: `table[codes]` with a uint8 tensor would be read as a boolean mask.
    """
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n].long()


def dequantize_codes(codes: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x^ = code[q] * absmax, in float32 (the caller casts to the output dtype, rounding once), on the codes'
    device: the table and absmax are moved there if they are elsewhere."""
    n = codes.numel()
    code, absmax = code.to(codes.device), absmax.to(codes.device)
    return code[codes.reshape(-1).long()] * absmax.repeat_interleave(blocksize)[:n]
