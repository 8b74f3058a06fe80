"""Lesson 2: the codebooks. A 4-bit code is an index into 16 values; an 8-bit one into 256.

Every table here is a float32 tensor indexed by the stored bits (`table[code] = value`), equal to
bitsandbytes 0.50.2's, so `table[q] * absmax` is dequantization. One sign bit differs: FP4's code 8
is -0.0 here (bit 3 is the sign), +0.0 in bitsandbytes' Python table (it writes `-0`, a Python int),
while its C++ dequantizer returns -0.0 for code 8, as we do.

NF4 (QLoRA, Dettmers et al. 2023, section 3): quantile quantization of N(0, 1), made asymmetric so
that zero is exact. With offset delta = 0.9677083,

    positives = Phi^-1(p) for p in linspace(delta, 0.5, 9)[:-1]      (8 values)
    negatives = -Phi^-1(p) for p in linspace(delta, 0.5, 8)[:-1]     (7 values)
    NF4 = sort(positives + negatives + [0]) / max                      (16 values, in [-1, 1])
"""

from functools import lru_cache

import numpy as np
import torch

NF4_OFFSET = 0.9677083


@lru_cache(maxsize=8)
def _nf4_levels(offset: float) -> tuple:
    from scipy.stats import norm  # here, not at the top: importing scipy.stats takes seconds

    positive_p = torch.linspace(offset, 0.5, 9)[:-1].numpy()
    negative_p = torch.linspace(offset, 0.5, 8)[:-1].numpy()
    levels = np.concatenate([norm.ppf(positive_p), -norm.ppf(negative_p), [0.0]])
    table = torch.tensor(levels, dtype=torch.float32).sort().values
    return tuple((table / table.max()).tolist())


def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4's 16 levels from the normal quantile function, equal to bitsandbytes' table bit for bit.

    The probabilities are a float32 grid (bitsandbytes builds them with torch.linspace), the
    quantiles are float64 (scipy), and the normalisation is a float32 division. The same formula
    evaluated in float64 throughout lands up to a few float32 steps away in 10 of the 16 entries;
    lesson 2 shows both, and this float32 recipe is the one whose bytes bitsandbytes ships.
    The levels are computed once per offset (scipy is slow to call); each call returns a new tensor.
    """
    return torch.tensor(_nf4_levels(offset), dtype=torch.float32)


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2; not OCP E2M1).

    Bit 3 is the sign; bits 0-2 index the magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3], all divided by
    12 (the largest), so FP4 spends two of its 16 codes on +0 and -0.
    """
    magnitudes = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0])
    table = torch.cat([magnitudes, -magnitudes])
    return table / table.abs().max()


def int4_codebook() -> torch.Tensor:
    """Uniform INT4 as bitsandbytes names it: the integers 7..-7 over 7 (+0 and -0 both present).

    It is lesson 1's symmetric absmax quantizer at 4 bits written as a table: 15 evenly spaced levels.
    """
    table = torch.tensor([7.0, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7])
    return table / table.abs().max()


def fp4_e3m0_codebook() -> torch.Tensor:
    """FP4 with 3 exponent bits and no mantissa (E3M0), the QLoRA paper's Table 2 "Float4 (E3M0)".

    Bit 3 is the sign, bits 0-2 the exponent field e: e = 0 is zero, e = 1..7 is 2^(e - 7). So the
    magnitudes are 0 and the seven powers of two 1/64 .. 1 (each level twice the one below: equal
    relative, not absolute, steps), and +0 and -0 take two codes. The values are those of bitsandbytes'
    `create_fp8_map(signed=True, exponent_bits=3, precision_bits=0, total_bits=4)` (which sorts them).
    """
    magnitudes = torch.tensor([0.0] + [2.0 ** (e - 7) for e in range(1, 8)])
    return torch.cat([magnitudes, -magnitudes])


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 8-bit dynamic map (Dettmers 2015), bitsandbytes' `create_dynamic_map(signed, 7, 8)`.

    For exponent e = 0..6 the scale is 10^(e-6) and the fraction is the midpoints of a linspace(0.1, 1)
    with 2^e + 1 (signed) or 2^(e+1) + 1 (unsigned) points, mirrored for the signed map; add 0 and 1.
    Small exponents get few fraction bits and large ones many, so the map covers 7 decades with
    ~3 significant digits where the magnitudes are largest. Signed: 256 values in [-0.99297, 1];
    unsigned (for Adam's second moment): 256 values in [0, 1].
    """
    values = []
    for exponent in range(7):
        points = 2**exponent + 1 if signed else 2 ** (exponent + 1) + 1
        boundaries = torch.linspace(0.1, 1, points, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        values += ((10 ** (exponent - 6)) * means).tolist()
        if signed:
            values += (-(10 ** (exponent - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


CODEBOOKS = {"nf4": nf4_codebook, "fp4": fp4_codebook, "fp4_e3m0": fp4_e3m0_codebook, "int4": int4_codebook}


def codebook_4bit(quant_type: str) -> torch.Tensor:
    """The 16-entry table for 'nf4', 'fp4', 'fp4_e3m0' or 'int4'."""
    if quant_type not in CODEBOOKS:
        raise ValueError(f"quant_type must be one of {sorted(CODEBOOKS)}, got {quant_type!r}")
    return CODEBOOKS[quant_type]()


_DERIVED_TABLES = {}


def derived_table(code: torch.Tensor, device, build) -> torch.Tensor:
    """build(code, device): a lookup table derived from a codebook, kept for the last 16 uses.

    Such tables (the 8-bit rounding table of dynamic8bit; the pair table of a GEMV variant in bench/experiments)
    cost more to build than the work they serve, and callers pass the same code tensor every step. Keyed by the
    tensor (its id and version), the device and the builder; an entry holds its tensor, so the id cannot be
    reused while it is cached, and at most 16 are kept, so fresh code tensors do not pile up tables.
    """
    key = (id(code), code._version, str(device), build)
    hit = _DERIVED_TABLES.get(key)
    if hit is not None and hit[0] is code:
        return hit[1]
    table = build(code, device)
    if len(_DERIVED_TABLES) >= 16:
        _DERIVED_TABLES.pop(next(iter(_DERIVED_TABLES)))
    _DERIVED_TABLES[key] = (code, table)
    return table
