"""Lesson 3's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_blockwise_4bit(quantize, dequantize)
      quantize(x, code, blocksize) -> (packed, absmax)
          packed: uint8, (n + 1) // 2 bytes (any shape), two codes per byte, the even element in the high nibble
          absmax: float32, one per block of `blocksize` consecutive values (the last block may be short)
      dequantize(packed, absmax, code, n, blocksize) -> x_hat, n float32 values (any shape)
  code is NF4's 16 levels (qlora_ref.nf4_codebook()), x any shape (it is read flat, in memory order).
"""

import torch

from .harness import _call, _Fail, _first_mismatch, _mismatch_line, _run, _tensor

__all__ = ["check_blockwise_4bit"]


def _blockwise_cases():
    g = torch.Generator().manual_seed(0)
    with_zero_block = torch.randn(512, generator=g)
    with_zero_block[128:192] = 0.0  # block 2 (blocksize 64) is all zeros, as in a pruned weight
    return [
        ("4,096 normal values, blocksize 64", torch.randn(4096, generator=g), 64),
        ("a 32x48 matrix, blocksize 128", torch.randn(32, 48, generator=g) * 0.02, 128),
        ("1,000 values (a short last block), blocksize 64", torch.randn(1000, generator=g), 64),
        ("999 values (an odd count), blocksize 64", torch.randn(999, generator=g), 64),
        ("512 values whose block 2 is all zeros, blocksize 64", with_zero_block, 64),
    ]


def _bnb_quantize_4bit():
    try:
        import bitsandbytes.functional as bnbF
    except Exception:
        return None
    return lambda x, blocksize: bnbF.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")


def _unpack(packed, n):
    flat = packed.reshape(-1).to(torch.int64)
    high_first = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1)[:n]
    low_first = torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)[:n]
    return high_first, low_first


def check_blockwise_4bit(quantize, dequantize) -> bool:
    """Check a blockwise NF4 quantizer and its inverse against qlora_ref.quantize_4bit and bitsandbytes.

    quantize(x, code, blocksize) -> (packed, absmax): the bytes (exactly; compared with bitsandbytes'
    CPU quantize_4bit when it is installed) and the per-block absmax (exactly). An odd count fills the last
    low nibble with the code of 0.0 (7 for NF4), as bitsandbytes does; an all-zero block has absmax 0 and all its
    codes are the code of 0.0. dequantize(packed, absmax, code, n, blocksize) -> x_hat is called on the
    reference's packed bytes and absmax and must give code[q] * absmax exactly. Prints one line; True on success.
    """
    from qlora_ref.blockwise import dequantize_codes, unpack_4bit
    from qlora_ref.codebooks import nf4_codebook
    from qlora_ref.fourbit import quantize_4bit as reference

    def body():
        code = nf4_codebook()
        bnb = _bnb_quantize_4bit()
        for case, x, blocksize in _blockwise_cases():
            n = x.numel()
            ref_packed, state = reference(x, blocksize=blocksize, quant_type="nf4")
            expected_absmax = state.absmax
            source = "qlora_ref"
            if bnb is not None:
                bnb_packed, bnb_state = bnb(x, blocksize)
                if torch.equal(bnb_packed, ref_packed) and torch.equal(bnb_state.absmax, expected_absmax):
                    source = "bitsandbytes"
            result = _call(quantize, x.clone(), code.clone(), blocksize)
            if not isinstance(result, (tuple, list)) or len(result) != 2:
                raise _Fail("quantize should return a pair (packed, absmax)")
            packed, absmax = (_tensor(v, name) for v, name in zip(result, ("packed", "absmax")))

            # absmax first: the codes depend on it.
            blocks = expected_absmax.numel()
            if absmax.numel() != blocks:
                hint = f"one absmax per block of {blocksize} values: ceil(n / blocksize) = {blocks} (the last block may be short)"
                raise _Fail(f"expected {blocks} absmax values, got {absmax.numel()} ({case})", hint)
            found = _first_mismatch(expected_absmax, absmax.float())
            if found:
                hint = "absmax of a block = the largest |x| in it (x.abs().amax over the block), in float32"
                flat = x.reshape(-1)
                if found[1] < blocks and float(flat[found[1] * blocksize:(found[1] + 1) * blocksize].max()) == found[3]:
                    hint = "the largest |x|, not the largest x: take .abs() before the max"
                raise _Fail(_mismatch_line("absmax", case, found, blocks), hint)

            # then the bytes
            if packed.dtype != torch.uint8:
                raise _Fail(f"packed should be uint8, got {packed.dtype} ({case})", "return codes as torch.uint8 bytes")
            if packed.numel() != (n + 1) // 2:
                hint = "two 4-bit codes per byte: (n + 1) // 2 bytes (an odd count leaves half of the last byte free)"
                raise _Fail(f"expected {(n + 1) // 2:,} bytes for {n:,} values, got {packed.numel():,} ({case})", hint)
            found = _first_mismatch(ref_packed, packed)
            if found:
                expected_codes = unpack_4bit(ref_packed, n + n % 2)
                high_first, low_first = _unpack(packed, n + n % 2)
                wrong = (high_first != expected_codes).nonzero().reshape(-1)
                first = int(wrong[0])
                line = (f"MISMATCH in the packed bytes vs {source} ({case}): {found[0]:,} of {packed.numel():,} bytes differ, "
                        f"first at byte {found[1]}: expected {int(found[2]):#010b}, got {int(found[3]):#010b} "
                        f"(code of value {first}: expected {int(expected_codes[first])}, got {int(high_first[first])})")
                if torch.equal(low_first, expected_codes):
                    hint = "nibble order: the even element goes in the HIGH nibble, byte = q[2i] << 4 | q[2i + 1]"
                elif n % 2 and first == n:
                    hint = ("the last byte's free low nibble: bitsandbytes pads with the code of 0.0 (7 for NF4), "
                            "not with 0: append a 0.0 to the scaled values before rounding")
                elif first < n and float(absmax.reshape(-1)[first // blocksize]) == 0.0:
                    hint = "an all-zero block has absmax 0 and 0 / 0 is nan: divide by absmax.clamp(min=1e-38), so its codes are the code of 0.0"
                else:
                    unit = float(x.reshape(-1)[first] / expected_absmax[first // blocksize])
                    levels = ", ".join(f"{v:.4f}" for v in code.tolist())
                    hint = (f"value {first} scales to u = x / absmax = {unit:.6f}; the nearest level is code "
                            f"{int(expected_codes[first])} ({float(code[expected_codes[first]]):.4f}), a tie going to the lower level "
                            f"(NF4 levels: [{levels}])")
                raise _Fail(line, hint)

            # dequantize, on the reference's bytes (so a wrong quantize cannot hide a right dequantize)
            expected = dequantize_codes(unpack_4bit(ref_packed, n), code, expected_absmax, blocksize)
            x_hat = _tensor(_call(dequantize, ref_packed.clone(), expected_absmax.clone(), code.clone(), n, blocksize), "x_hat")
            if x_hat.numel() != n:
                raise _Fail(f"dequantize returned {x_hat.numel():,} values for n = {n:,} ({case})",
                            "return the first n values: an odd count has a padding nibble to drop")
            found = _first_mismatch(expected, x_hat.float())
            if found:
                codes = unpack_4bit(ref_packed, n)
                per_value = expected_absmax.repeat_interleave(blocksize)[:n]
                swapped = _unpack(ref_packed, n + n % 2)[1][:n]
                hint = "x_hat[i] = code[q[i]] * absmax[i // blocksize]: look the level up in the table, then scale"
                if torch.equal(x_hat.reshape(-1).float(), codes.float() * per_value):
                    hint = "q is an index into the table, not a value: x_hat = code[q] * absmax, not q * absmax"
                elif torch.equal(x_hat.reshape(-1).float(), code[swapped] * per_value):
                    hint = "nibble order: the high nibble holds the even element (byte >> 4 first, then byte & 0x0F)"
                raise _Fail(_mismatch_line("the dequantized values", case, found, n), hint)
        versus = "bitsandbytes' CPU quantize_4bit" if bnb is not None else "qlora_ref.quantize_4bit (bitsandbytes is not installed)"
        return f"packed bytes, absmax and dequantized values equal {versus} (5 cases, blocksizes 64 and 128)"

    return _run("check_blockwise_4bit", body)
