"""Lesson 4's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_double_quant(compress, decompress)
      compress(absmax, code) -> (qabsmax, offset, absmax2)
          offset: absmax.mean(); absmax2: float32, max |absmax - offset| per block of 256;
          qabsmax: uint8, one code per absmax value (a nearest level of the map, or bitsandbytes' byte)
      decompress(qabsmax, offset, absmax2, code) -> absmax^ = code[qabsmax] * absmax2 + offset, float32
  absmax is the float32 absmax of a 4-bit state, code the 256-level dynamic map (qlora_ref.dynamic_map()).
"""

import torch

from .harness import _call, _Fail, _first_mismatch, _mismatch_line, _number, _run, _tensor

__all__ = ["check_double_quant"]


def _double_quant_cases():
    """(label, the float32 absmax of a real 4-bit state, the weight it came from): 4, 1 and 4 nested blocks."""
    from qlora_ref.fourbit import quantize_4bit

    g = torch.Generator().manual_seed(0)
    outlier_rows = torch.randn(75, 128, generator=g) * 0.02
    outlier_rows[10] *= 30.0  # one row of large weights: its blocks' absmax are far above the mean
    quiet_rows = torch.randn(1000, 64, generator=g)
    quiet_rows[520:560] *= 0.01  # 40 blocks far below the mean: in their nested block the largest |centred| is negative
    weights = [
        ("the absmax of a 256x256 normal weight (1,024 blocks of 64)", torch.randn(256, 256, generator=g)),
        ("the absmax of a 75x128 weight with an outlier row (150 blocks: one short nested block)", outlier_rows),
        ("the absmax of 1,000 blocks of 64, 40 of them near zero (a short last nested block of 232)", quiet_rows),
    ]
    return [(label, quantize_4bit(w, blocksize=64)[1].absmax, w) for label, w in weights]


def _bnb_nested_state(weight):
    """bitsandbytes' nested state of `weight` (NF4, blocks of 64), or None when bitsandbytes is not installed."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:
        return None
    return bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)[1]


def _nearest_level_ok(codes, centred, absmax2, code, blocksize):
    """Which codes are a nearest level of u = x / absmax2 (either rounding of the division), up to float32
    rounding of the distances: the true nearest-code rule, however the learner computed it."""
    from qlora_ref.blockwise import scale_to_unit

    levels = code.double()
    ok = torch.zeros(codes.numel(), dtype=torch.bool)
    by_division = (centred / absmax2.clamp(min=1e-38).repeat_interleave(blocksize)[: centred.numel()]).clamp(-1, 1)
    for u in (scale_to_unit(centred, absmax2, blocksize), by_division):
        distances = (u.double().reshape(-1, 1) - levels.reshape(1, -1)).abs()
        chosen = distances.gather(1, codes.long().reshape(-1, 1)).reshape(-1)
        ok |= chosen <= distances.min(dim=1).values + 1e-6 * u.double().abs() + 1e-12
    return ok


def check_double_quant(compress, decompress) -> bool:
    """Check double quantization of the absmax (lesson 4) against qlora_ref.double_quant and bitsandbytes.

    compress(absmax, code) -> (qabsmax, offset, absmax2), with absmax the float32 absmax of a 4-bit state and
    code the 256-level dynamic map: offset = absmax.mean() (exactly), absmax2 = max |absmax - offset| per block of
    256 (exactly), qabsmax = uint8 codes of (absmax - offset) / absmax2. Each code passes when it is
    bitsandbytes' byte (its CPU lookup-table rounding) or a nearest level (lesson 3's rule).
    decompress(qabsmax, offset, absmax2, code) -> absmax^ = code[qabsmax] * absmax2[i // 256] + offset, the
    product rounded to float32 before the sum, as bitsandbytes does; it is called on bitsandbytes' (or
    qlora_ref's) nested state and must equal its dequantized absmax exactly. Prints one line; True on success.
    """
    from qlora_ref.codebooks import dynamic_map
    from qlora_ref.double_quant import NESTED_BLOCKSIZE, compress_absmax, decompress_absmax

    def body():
        code = dynamic_map(signed=True)
        versus = "qlora_ref.double_quant (bitsandbytes is not installed)"
        not_bnb = total = 0
        for case, absmax, weight in _double_quant_cases():
            n = absmax.numel()
            ref_q, ref_offset, ref_state2 = compress_absmax(absmax)
            bnb = _bnb_nested_state(weight)
            if bnb is not None and torch.equal(bnb.absmax, ref_q) and torch.equal(bnb.state2.absmax, ref_state2.absmax):
                versus = "bitsandbytes' nested state"
            result = _call(compress, absmax.clone(), code.clone())
            if not isinstance(result, (tuple, list)) or len(result) != 3:
                raise _Fail("compress should return a triple (qabsmax, offset, absmax2)")
            qabsmax, absmax2 = _tensor(result[0], "qabsmax"), _tensor(result[2], "absmax2")
            offset = _number(result[1], "offset")

            expected_offset = float(ref_offset)
            if offset != expected_offset:
                hint = "offset = absmax.mean(), one float32 for the whole tensor, subtracted before quantizing"
                if offset == 0.0:
                    hint = ("subtract the mean first: the absmax values are all positive, so without it they use only the "
                            "top of the map's positive half (lesson 4, section 4)")
                raise _Fail(f"MISMATCH in offset ({case}): expected {expected_offset:.9g}, got {offset:.9g}", hint)

            centred = absmax - ref_offset
            blocks = ref_state2.absmax.numel()
            if absmax2.numel() != blocks:
                hint = f"one absmax2 per block of {NESTED_BLOCKSIZE} absmax values: ceil({n} / {NESTED_BLOCKSIZE}) = {blocks}"
                raise _Fail(f"expected {blocks} absmax2 values, got {absmax2.numel()} ({case})", hint)
            found = _first_mismatch(ref_state2.absmax, absmax2.float())
            if found:
                block = centred[found[1] * NESTED_BLOCKSIZE:(found[1] + 1) * NESTED_BLOCKSIZE]
                hint = f"absmax2 of a block = the largest |absmax - offset| over its {NESTED_BLOCKSIZE} values"
                if found[3] == float(block.max()):
                    hint = "the largest |absmax - offset|, not the largest absmax - offset: take .abs() before the max"
                elif found[3] == float(absmax[found[1] * NESTED_BLOCKSIZE:(found[1] + 1) * NESTED_BLOCKSIZE].max()):
                    hint = "take the block maximum of the centred values, absmax - offset, not of absmax"
                raise _Fail(_mismatch_line("absmax2", case, found, blocks), hint)

            if qabsmax.numel() != n:
                raise _Fail(f"expected {n:,} codes, one per absmax value, got {qabsmax.numel():,} ({case})")
            if qabsmax.dtype != torch.uint8:
                raise _Fail(f"qabsmax should be uint8, got {qabsmax.dtype} ({case})", "one byte per code: .to(torch.uint8)")
            qabsmax = qabsmax.reshape(-1)
            if not torch.equal(qabsmax, ref_q):
                ok = (qabsmax == ref_q) | _nearest_level_ok(qabsmax, centred, ref_state2.absmax, code, NESTED_BLOCKSIZE)
                if not bool(ok.all()):
                    i = int((~ok).nonzero()[0])
                    u = float(centred[i] / ref_state2.absmax[i // NESTED_BLOCKSIZE])
                    nearest = int((code.double() - u).abs().argmin())
                    line = (f"MISMATCH in qabsmax ({case}): {int((~ok).sum()):,} of {n:,} codes are neither a nearest level "
                            f"nor bitsandbytes' byte, "
                            f"first at index {i}: u = (absmax - offset) / absmax2 = {u:.7f}, nearest level {float(code[nearest]):.7f} "
                            f"(code {nearest}), got code {int(qabsmax[i])} ({float(code[int(qabsmax[i])]):.7f})")
                    hint = "the code is the index of the nearest of the 256 levels to u (lesson 3's rule), in the map's order"
                    if abs(int(qabsmax[i]) - nearest) == 1:
                        hint = "one level off: compare u with the midpoints between levels, or take argmin |u - code|"
                    raise _Fail(line, hint)
                not_bnb += int((qabsmax != ref_q).sum())
            total += n

            # decompress, on the reference's state (so a wrong compress cannot hide a right decompress)
            expected = decompress_absmax(ref_q, ref_offset, ref_state2)
            got = _tensor(_call(decompress, ref_q.clone(), ref_offset.clone(), ref_state2.absmax.clone(), code.clone()), "absmax^")
            if got.numel() != n:
                raise _Fail(f"decompress returned {got.numel():,} values for {n:,} codes ({case})")
            found = _first_mismatch(expected, got.float())
            if found:
                levels, scale2 = code[ref_q.long()], ref_state2.absmax.repeat_interleave(NESTED_BLOCKSIZE)[:n]
                hint = "absmax^ = code[qabsmax] * absmax2[i // 256] + offset: look up, scale, then add the offset"
                if torch.equal(got.float(), levels * scale2):
                    hint = "add the offset back: absmax^ = code[qabsmax] * absmax2 + offset"
                elif torch.equal(got.float(), ref_q.float() * scale2 + ref_offset):
                    hint = "qabsmax is an index into the map, not a value: code[qabsmax] * absmax2, not qabsmax * absmax2"
                elif torch.equal(got.float(), (levels + ref_offset) * scale2):
                    hint = "scale first, then add the offset: code[q] * absmax2 + offset, not (code[q] + offset) * absmax2"
                elif bool(torch.allclose(got.float(), expected, rtol=1e-6, atol=0)):
                    hint = ("close but not bit for bit: round the product to float32 first, then add the offset "
                            "(two roundings, as bitsandbytes' separate dequantize and + offset; no addcmul)")
                raise _Fail(_mismatch_line("the decompressed absmax", case, found, n), hint)
        if not_bnb == 0:
            return f"offset, absmax2 and codes equal {versus}, bit for bit; decompress too (3 cases)"
        return (f"offset and absmax2 equal {versus}, each code is a nearest level or bitsandbytes' byte, and decompress is exact (3 cases); "
                f"{not_bnb} of {total:,} codes differ from bitsandbytes' CPU bytes, which round through a lookup "
                f"table (lesson 4, section 6)")

    return _run("check_double_quant", body)
