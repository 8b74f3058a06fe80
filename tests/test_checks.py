"""graders: the reference as "learner code" passes every checker; deliberate mistakes fail with a
message that names the first mismatch (where, expected vs got) and the right hint; an unfinished exercise
gives one "not implemented yet" line, never a traceback."""

import contextlib
import io
import math
import re
import signal
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from graders import harness
from graders.lesson01 import _linear_cases, check_absmax_quantizer, check_zeropoint_quantizer
from graders.lesson02 import check_nf4_codebook
from graders.lesson03 import _blockwise_cases, check_blockwise_4bit
from graders.lesson04 import _double_quant_cases, check_double_quant
from graders.lesson05 import check_dequantize_kernel, launch_dequantize_kernel
from graders.lesson06 import check_qlora_backward
from graders.lesson07 import _adamw_cases, _pager_cases, check_adamw_update, check_pager
from graders.lesson08 import _schedule_cases, _STEP_CASES, _STEP_CONFIG, check_learning_rate, check_training_step
from qlora_ref import dequantize_4bit, dynamic_map, nf4_codebook, quantize_4bit
from qlora_ref.adamw_step import adamw_update_
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.compare import distinguish
from qlora_ref.double_quant import compress_absmax
from qlora_ref.lora import LoRAMatmul
from qlora_ref.linear import quantize_absmax, quantize_zeropoint
from qlora_ref.pager import Pager
from qlora_ref.tasks import collate
from qlora_ref.train import TrainConfig, batch_indices, learning_rate, setup, train_step

# ------------------------------------------------------------------------------------- "learner" functions


def ref_absmax(x, bits):
    r = quantize_absmax(x, bits)
    return r.q, r.scale


def ref_absmax_dequantize(q, scale):
    return scale * q.float()


def ref_zeropoint(x, bits):
    r = quantize_zeropoint(x, bits)
    return r.q, r.scale, r.zero


def ref_zeropoint_dequantize(q, scale, zero):
    return scale * (q.float() - zero)


def ref_quantize_4bit(x, code, blocksize):
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    return packed, state.absmax


def ref_dequantize_4bit(packed, absmax, code, n, blocksize):
    return code[unpack_4bit(packed, n)] * absmax.repeat_interleave(blocksize)[:n]


def nf4_float64(offset=0.9677083):
    levels = np.concatenate([norm.ppf(np.linspace(offset, 0.5, 9)[:-1]), -norm.ppf(np.linspace(offset, 0.5, 8)[:-1]), [0.0]])
    levels = np.sort(levels)
    return torch.tensor(levels / levels.max(), dtype=torch.float32)


def ref_compress(absmax, code):
    qabsmax, offset, state2 = compress_absmax(absmax)
    return qabsmax, offset, state2.absmax


def ref_decompress(qabsmax, offset, absmax2, code):
    return code[qabsmax.long()] * absmax2.repeat_interleave(256)[: qabsmax.numel()] + offset


try:
    import triton
    import triton.language as tl
except ImportError:  # Linux wheels only: lesson 5's tests are skipped elsewhere
    triton = None
needs_triton = pytest.mark.skipif(triton is None, reason="lesson 5's kernels need triton")

if triton is not None:

    @triton.jit
    def ref_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=2 * offs + 1 < n)


def run(capsys, checker, *fns):
    ok = checker(*fns)
    out = capsys.readouterr().out
    return ok, out


# ------------------------------------------------------------------------------------- the reference passes


def test_reference_functions_pass_every_checker(capsys):
    cases = [
        (check_absmax_quantizer, (ref_absmax, ref_absmax_dequantize)),
        (check_absmax_quantizer, (ref_absmax,)),
        (check_zeropoint_quantizer, (ref_zeropoint, ref_zeropoint_dequantize)),
        (check_nf4_codebook, (nf4_codebook,)),
        (check_blockwise_4bit, (ref_quantize_4bit, ref_dequantize_4bit)),
        (check_double_quant, (ref_compress, ref_decompress)),
    ]
    if triton is not None:
        cases.append((check_dequantize_kernel, (ref_kernel,)))
    for checker, fns in cases:
        ok, out = run(capsys, checker, *fns)
        assert ok is True, out
        assert out.count("\n") == 1 and out.startswith(f"{checker.__name__}: OK — "), out


def test_nf4_success_line_says_bit_for_bit(capsys):
    _, out = run(capsys, check_nf4_codebook, nf4_codebook)
    assert "equal to bitsandbytes' table, bit for bit" in out


# ------------------------------------------------------------------------------------- not implemented yet


def stub(*args):
    raise NotImplementedError("fill in the TODO in my_function")


def bare_stub(*args):
    raise NotImplementedError


@pytest.mark.parametrize(
    "checker, n_fns",
    [(check_absmax_quantizer, 2), (check_zeropoint_quantizer, 2), (check_nf4_codebook, 1), (check_blockwise_4bit, 2),
     (check_double_quant, 2)],
)
def test_a_stub_gives_one_friendly_line(capsys, checker, n_fns):
    ok, out = run(capsys, checker, *[stub] * n_fns)
    assert ok is False
    assert out == f"{checker.__name__}: not implemented yet: fill in the TODO in my_function\n"


def test_a_stub_without_message_names_the_function(capsys):
    ok, out = run(capsys, check_nf4_codebook, bare_stub)
    assert not ok and out == "check_nf4_codebook: not implemented yet: fill in the TODO in bare_stub\n"


def test_a_stubbed_dequantize_after_a_right_quantize(capsys):
    ok, out = run(capsys, check_blockwise_4bit, ref_quantize_4bit, stub)
    assert not ok and "not implemented yet" in out


def test_other_errors_in_learner_code_propagate():
    def broken(x, bits):
        return x.nonexistent

    with pytest.raises(AttributeError):
        check_absmax_quantizer(broken)


# ------------------------------------------------------------------------------------- lesson 1 mistakes


def test_absmax_off_by_one_denominator(capsys):
    def wrong(x, bits):
        scale = x.abs().max() / 2 ** (bits - 1)
        return torch.round(x / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), scale

    ok, out = run(capsys, check_absmax_quantizer, wrong)
    assert not ok
    assert "MISMATCH in scale (bits=8, 1,000 normal values)" in out
    assert "you divided by 2^(b-1) = 128" in out


def test_absmax_floor_names_the_first_wrong_code(capsys):
    def wrong(x, bits):
        q, scale = ref_absmax(x, bits)
        return torch.floor(x / scale), scale

    ok, out = run(capsys, check_absmax_quantizer, wrong)
    x = _linear_cases()[0][1]
    q, scale = ref_absmax(x, 8)
    floor = torch.floor(x / scale).reshape(-1)
    first = int((floor != q.float()).nonzero()[0])
    assert not ok
    assert f"MISMATCH in q (bits=8, 1,000 normal values): " in out
    assert f"first at index {first}: expected {float(q[first]):.1f}, got {float(floor[first]):.1f}" in out
    assert "torch.round" in out


def test_absmax_nan_scale_on_zeros(capsys):
    def no_guard(x, bits):
        scale = x.abs().max() / (2 ** (bits - 1) - 1)
        return torch.round(x / scale).clamp(-127, 127), scale

    ok, out = run(capsys, check_absmax_quantizer, no_guard)
    assert not ok and "all-zero tensor gives scale 0.0" in out


def test_absmax_wrong_dequantize(capsys):
    ok, out = run(capsys, check_absmax_quantizer, ref_absmax, lambda q, s: q.float() / s)
    assert not ok and "MISMATCH in the dequantized values (bits=8, 1,000 normal values)" in out
    assert "first at index 0" in out


def test_zeropoint_without_zero_in_the_range(capsys):
    def wrong(x, bits):
        qmax = 2**bits - 1
        low, high = x.min(), x.max()
        scale = (high - low) / qmax
        zero = torch.round(-low / scale)
        return torch.clamp(torch.round(x / scale) + zero, 0, qmax), scale, zero

    ok, out = run(capsys, check_zeropoint_quantizer, wrong)
    assert not ok
    # the first case whose range does not contain 0 already: 500 positive values
    assert "MISMATCH in scale (bits=8, 500 positive values)" in out
    assert "the range must contain 0" in out


def test_zeropoint_sign_of_zero(capsys):
    def wrong(x, bits):
        q, scale, zero = ref_zeropoint(x, bits)
        return q, scale, -zero

    ok, out = run(capsys, check_zeropoint_quantizer, wrong)
    assert not ok and "MISMATCH in zero (bits=8, 1,000 normal values)" in out and "the sign" in out


def test_zeropoint_adds_zero_before_rounding(capsys):
    def wrong(x, bits):
        q, scale, zero = ref_zeropoint(x, bits)
        return torch.clamp(torch.round(x / scale + zero + 0.5) - 0.0, 0, 2**bits - 1), scale, zero

    ok, out = run(capsys, check_zeropoint_quantizer, wrong)
    assert not ok and "MISMATCH in q (bits=8, 1,000 normal values)" in out and re.search(r"first at index \d+: expected", out)


# ------------------------------------------------------------------------------------- lesson 2 mistakes


def test_nf4_float64_derivation_is_recognised(capsys):
    ok, out = run(capsys, check_nf4_codebook, nf4_float64)
    ours, theirs = nf4_codebook(), nf4_float64()
    differ = (ours.view(torch.int32) != theirs.view(torch.int32)).nonzero().reshape(-1)
    assert not ok
    assert f"{differ.numel()} of 16 levels differ, first at index {int(differ[0])}" in out
    assert differ.numel() == 10  # the fact lesson 2 teaches
    assert "MISMATCH with bitsandbytes' table" in out
    assert "float64 derivation" in out


def test_nf4_fifteen_values(capsys):
    ok, out = run(capsys, check_nf4_codebook, lambda offset: nf4_codebook(offset)[1:])
    assert not ok and "expected 16 levels, got 15" in out


def test_nf4_unsorted(capsys):
    ok, out = run(capsys, check_nf4_codebook, lambda offset: nf4_codebook(offset).flip(0))
    assert not ok and "first at index 0: expected -1, got 1" in out and "sort the levels ascending" in out


def test_nf4_not_normalised(capsys):
    def wrong(offset):
        levels = np.concatenate([norm.ppf(torch.linspace(offset, 0.5, 9)[:-1].numpy()),
                                 -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1].numpy()), [0.0]])
        return torch.tensor(levels, dtype=torch.float32).sort().values

    ok, out = run(capsys, check_nf4_codebook, wrong)
    assert not ok and "divide every level by the largest" in out


def test_nf4_float64_dtype(capsys):
    ok, out = run(capsys, check_nf4_codebook, lambda offset: nf4_codebook(offset).double())
    assert not ok and "expected float32 levels, got torch.float64" in out


# ------------------------------------------------------------------------------------- lesson 3 mistakes


def quantize_with(pack=None, pad_code=None, clamp=True, use_abs=True):
    """The reference quantizer, with one piece swapped for a wrong one."""

    def quantize(x, code, blocksize):
        flat = x.reshape(-1).float()
        blocks = flat.split(blocksize)
        absmax = torch.stack([(b.abs() if use_abs else b).max() for b in blocks])
        per_value = (absmax.clamp(min=1e-38) if clamp else absmax).repeat_interleave(blocksize)[: flat.numel()]
        unit = flat / per_value
        codes = (unit.reshape(-1, 1) - code.reshape(1, -1)).abs().argmin(dim=1)
        if codes.numel() % 2:
            codes = torch.cat([codes, torch.tensor([pad_code if pad_code is not None else 7])])
        codes = codes.to(torch.uint8)
        packed = pack(codes) if pack else (codes[0::2] << 4) | codes[1::2]
        return packed, absmax

    return quantize


def test_the_quantize_helper_is_right_when_unmodified(capsys):
    ok, out = run(capsys, check_blockwise_4bit, quantize_with(), ref_dequantize_4bit)
    assert ok, out


def test_blockwise_wrong_nibble_order(capsys):
    ok, out = run(capsys, check_blockwise_4bit, quantize_with(pack=lambda c: (c[1::2] << 4) | c[0::2]), ref_dequantize_4bit)
    x = _blockwise_cases()[0][1]
    packed, _ = ref_quantize_4bit(x, nf4_codebook(), 64)
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    first = int((swapped.reshape(-1) != packed.reshape(-1)).nonzero()[0])
    assert not ok
    assert "MISMATCH in the packed bytes vs bitsandbytes (4,096 normal values, blocksize 64)" in out
    assert f"first at byte {first}: expected {int(packed.reshape(-1)[first]):#010b}, got {int(swapped.reshape(-1)[first]):#010b}" in out
    assert "HIGH nibble" in out


def test_blockwise_padding_with_code_zero(capsys):
    ok, out = run(capsys, check_blockwise_4bit, quantize_with(pad_code=0), ref_dequantize_4bit)
    assert not ok
    assert "999 values (an odd count)" in out and "first at byte 499" in out
    assert "the code of 0.0 (7 for NF4)" in out


def test_blockwise_zero_block_nan(capsys):
    ok, out = run(capsys, check_blockwise_4bit, quantize_with(clamp=False), ref_dequantize_4bit)
    assert not ok
    assert "block 2 is all zeros" in out and "first at byte 64" in out and "clamp(min=1e-38)" in out


def test_blockwise_absmax_without_abs(capsys):
    ok, out = run(capsys, check_blockwise_4bit, quantize_with(use_abs=False), ref_dequantize_4bit)
    assert not ok and "MISMATCH in absmax (4,096 normal values, blocksize 64)" in out and ".abs()" in out


def test_blockwise_off_by_one_code(capsys):
    def off_by_one(x, code, blocksize):
        packed, absmax = ref_quantize_4bit(x, code, blocksize)
        codes = unpack_4bit(packed, 2 * packed.numel())
        codes[10] = (codes[10] + 1) % 16
        codes = codes.to(torch.uint8)
        return (codes[0::2] << 4) | codes[1::2], absmax

    ok, out = run(capsys, check_blockwise_4bit, off_by_one, ref_dequantize_4bit)
    assert not ok and "1 of 2,048 bytes differ, first at byte 5" in out
    assert "code of value 10: expected" in out and "the nearest level is code" in out


def test_blockwise_dequantize_without_the_table(capsys):
    def wrong(packed, absmax, code, n, blocksize):
        return unpack_4bit(packed, n).float() * absmax.repeat_interleave(blocksize)[:n]

    ok, out = run(capsys, check_blockwise_4bit, ref_quantize_4bit, wrong)
    assert not ok and "MISMATCH in the dequantized values" in out and "not q * absmax" in out


def test_blockwise_dequantize_nibble_order(capsys):
    def wrong(packed, absmax, code, n, blocksize):
        flat = packed.reshape(-1)
        codes = torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)[:n].long()
        return code[codes] * absmax.repeat_interleave(blocksize)[:n]

    ok, out = run(capsys, check_blockwise_4bit, ref_quantize_4bit, wrong)
    assert not ok and "byte >> 4 first" in out


# ------------------------------------------------------------------------------------- lesson 4 mistakes

NESTED = 256
FIRST_DQ_CASE = "the absmax of a 256x256 normal weight (1,024 blocks of 64)"


def compress_with(offset=True, use_abs=True, centred_absmax2=True, blocksize=NESTED, dtype=torch.uint8):
    """A nearest-code compress_absmax written from the formulas, with one piece swapped for a wrong one."""

    def compress(absmax, code):
        mean = absmax.mean() if offset else torch.tensor(0.0)
        centred = absmax - mean
        source = centred if centred_absmax2 else absmax
        absmax2 = torch.stack([(b.abs() if use_abs else b).max() for b in source.split(blocksize)])
        unit = centred / absmax2.repeat_interleave(blocksize)[: centred.numel()]
        codes = (unit.reshape(-1, 1) - code.reshape(1, -1)).abs().argmin(dim=1)
        return codes.to(dtype), mean, absmax2

    return compress


def test_nearest_codes_pass_and_the_line_counts_bitsandbytes_lookup_table(capsys):
    import bitsandbytes.functional as bnbF

    compress = compress_with()
    code = dynamic_map()
    differ = total = 0
    for _, absmax, weight in _double_quant_cases():
        bnb_state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)[1]
        differ += int((compress(absmax, code)[0] != bnb_state.absmax).sum())
        total += absmax.numel()
    ok, out = run(capsys, check_double_quant, compress, ref_decompress)
    assert ok, out
    assert 0 < differ < total // 100  # lesson 4: the table and the nearest code disagree on a few tenths of a percent
    assert "each code is a nearest level or bitsandbytes' byte" in out and f"{differ} of {total:,} codes differ from bitsandbytes' CPU bytes" in out


def test_the_reference_line_says_bit_for_bit(capsys):
    _, out = run(capsys, check_double_quant, ref_compress, ref_decompress)
    assert "offset, absmax2 and codes equal bitsandbytes' nested state, bit for bit; decompress too" in out


def test_double_quant_without_the_offset(capsys):
    ok, out = run(capsys, check_double_quant, compress_with(offset=False), ref_decompress)
    mean = _double_quant_cases()[0][1].mean()
    assert not ok
    assert f"MISMATCH in offset ({FIRST_DQ_CASE}): expected {float(mean):.9g}, got 0" in out
    assert "subtract the mean first" in out


def test_double_quant_absmax2_without_abs(capsys):
    wrong = compress_with(use_abs=False)
    ok, out = run(capsys, check_double_quant, wrong, ref_decompress)
    for case, absmax, _ in _double_quant_cases():  # the first case where a block's largest |centred| is negative
        differ = (wrong(absmax, dynamic_map())[2] != compress_absmax(absmax)[2].absmax).nonzero().reshape(-1)
        if differ.numel():
            break
    assert differ.numel(), "no case has a block whose largest |absmax - offset| is negative: the checker cannot catch this"
    assert not ok
    assert f"MISMATCH in absmax2 ({case}): " in out and f"first at index {int(differ[0])}" in out
    assert "take .abs() before the max" in out


def test_double_quant_absmax2_of_the_uncentred_values(capsys):
    ok, out = run(capsys, check_double_quant, compress_with(centred_absmax2=False), ref_decompress)
    assert not ok and "MISMATCH in absmax2" in out and "of the centred values, absmax - offset" in out


def test_double_quant_blocks_of_64(capsys):
    ok, out = run(capsys, check_double_quant, compress_with(blocksize=64), ref_decompress)
    assert not ok and f"expected 4 absmax2 values, got 16 ({FIRST_DQ_CASE})" in out and "ceil(1024 / 256) = 4" in out


def test_double_quant_codes_not_bytes(capsys):
    ok, out = run(capsys, check_double_quant, compress_with(dtype=torch.int64), ref_decompress)
    assert not ok and "qabsmax should be uint8, got torch.int64" in out


def test_double_quant_one_code_off_by_one(capsys):
    def wrong(absmax, code):
        qabsmax, offset, absmax2 = ref_compress(absmax, code)
        qabsmax = qabsmax.clone()
        qabsmax[300] += 1
        return qabsmax, offset, absmax2

    ok, out = run(capsys, check_double_quant, wrong, ref_decompress)
    assert not ok
    assert f"MISMATCH in qabsmax ({FIRST_DQ_CASE}): 1 of 1,024 codes are neither a nearest level nor bitsandbytes' byte, first at index 300" in out
    assert "one level off" in out


@pytest.mark.parametrize(
    "decompress, hint",
    [
        (lambda q, off, a2, code: code[q.long()] * a2.repeat_interleave(NESTED)[: q.numel()], "add the offset back"),
        (lambda q, off, a2, code: q.float() * a2.repeat_interleave(NESTED)[: q.numel()] + off, "an index into the map"),
        (lambda q, off, a2, code: (code[q.long()] + off) * a2.repeat_interleave(NESTED)[: q.numel()], "scale first"),
        # one rounding instead of two (what an fma or addcmul does): equal to 1e-6, not bit for bit
        (lambda q, off, a2, code: (code.double()[q.long()] * a2.double().repeat_interleave(NESTED)[: q.numel()] + off.double()).float(),
         "close but not bit for bit"),
    ],
    ids=["no offset", "no lookup", "offset before scaling", "one rounding"],
)
def test_double_quant_decompress_mistakes(capsys, decompress, hint):
    ok, out = run(capsys, check_double_quant, ref_compress, decompress)
    assert not ok and f"MISMATCH in the decompressed absmax ({FIRST_DQ_CASE})" in out and hint in out


# ------------------------------------------------------------------------------------- lesson 5 mistakes

FIRST_KERNEL_CASE = "99 float32 values, NF4, blocks of 32, TILE 16 (4 programs)"

if triton is not None:

    @triton.jit
    def stub_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        raise NotImplementedError("fill in the TODO in my_kernel")

    @triton.jit
    def bare_stub_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        raise NotImplementedError

    @triton.jit
    def swapped_nibbles(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=2 * offs + 1 < n)

    @triton.jit
    def no_lookup(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, (byte >> 4).to(tl.float32) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, (byte & 0xF).to(tl.float32) * absmax, mask=2 * offs + 1 < n)

    @triton.jit
    def block_of_the_byte_index(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=2 * offs + 1 < n)

    @triton.jit
    def odd_store_unmasked(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=mask)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=mask)

    @triton.jit
    def first_tile_only(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.arange(0, TILE)  # forgets tl.program_id(0): every program does the first tile
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=2 * offs + 1 < n)

    @triton.jit
    def multiplies_in_the_output_dtype(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr,
                                       TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        dtype = out_ptr.dtype.element_ty
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0).to(dtype)
        tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte >> 4).to(tl.int32)).to(dtype) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte & 0xF).to(tl.int32)).to(dtype) * absmax,
                 mask=2 * offs + 1 < n)

    @triton.jit
    def lookup_helper(code_ptr, nibble):
        return tl.load(code_ptr + nibble.to(tl.int32))

    @triton.jit
    def calls_a_helper(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        mask = offs < (n + 1) // 2
        byte = tl.load(packed_ptr + offs, mask=mask, other=0)
        absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
        tl.store(out_ptr + 2 * offs, lookup_helper(code_ptr, byte >> 4) * absmax, mask=2 * offs < n)
        tl.store(out_ptr + 2 * offs + 1, lookup_helper(code_ptr, byte & 0xF) * absmax, mask=2 * offs + 1 < n)

    @triton.jit
    def typo_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
        tl.store(out_ptr + offs, tl.load(packd_ptr + offs))  # noqa: F821 (the learner's typo)


@needs_triton
@pytest.mark.parametrize("kernel_name, message", [("stub_kernel", "my_kernel"), ("bare_stub_kernel", "bare_stub_kernel")])
def test_a_stub_kernel_gives_one_friendly_line(capsys, kernel_name, message):
    ok, out = run(capsys, check_dequantize_kernel, globals()[kernel_name])
    assert ok is False and out == f"check_dequantize_kernel: not implemented yet: fill in the TODO in {message}\n"


def test_an_endless_loop_is_stopped_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(harness, "TIME_LIMIT_S", 1)

    def learning_rate(config, step):
        while True:
            try:
                time.sleep(0.01)
            except Exception:  # a catch-all in the loop cannot swallow the stop
                pass

    handler = signal.getsignal(signal.SIGALRM)
    start = time.perf_counter()
    ok, out = run(capsys, check_learning_rate, learning_rate)
    assert ok is False and out == ("check_learning_rate: stopped after 1 s: learning_rate never returned (an endless "
                                   "loop?); graders.harness.TIME_LIMIT_S sets the limit\n")
    assert time.perf_counter() - start < 10
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) is handler


@needs_triton
def test_an_endless_kernel_is_stopped_too(capsys, monkeypatch):
    monkeypatch.setattr(harness, "TIME_LIMIT_S", 1)

    @triton.jit
    def endless_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
        i = 0
        while i >= 0:
            i += 1

    ok, out = run(capsys, check_dequantize_kernel, endless_kernel)
    assert ok is False and out.startswith("check_dequantize_kernel: stopped after 1 s: endless_kernel never returned")


@needs_triton
def test_a_kernel_without_the_decorator(capsys):
    ok, out = run(capsys, check_dequantize_kernel, ref_kernel.fn)
    assert not ok and "expected a Triton kernel, got function" in out and "@triton.jit" in out


@needs_triton
def test_kernel_swapped_nibbles_names_the_first_value(capsys):
    x = torch.randn(99, generator=torch.Generator().manual_seed(0))  # the checker's first case
    packed, state = quantize_4bit(x, blocksize=32)
    codes = unpack_4bit(packed, 100)
    swapped = torch.stack([codes[1::2], codes[0::2]], dim=1).reshape(-1)[:99]
    expected, wrong = dequantize_4bit(packed, state), state.code[swapped] * state.absmax.repeat_interleave(32)[:99]
    first = int((expected != wrong).nonzero()[0])
    ok, out = run(capsys, check_dequantize_kernel, swapped_nibbles)
    assert not ok
    assert f"MISMATCH in the values vs qlora_ref.dequantize_4bit ({FIRST_KERNEL_CASE}): " in out
    expected_text, got_text = distinguish(float(expected[first]), float(wrong[first]))
    assert f"first at index {first}: expected {expected_text}, got {got_text}" in out
    assert "nibble order" in out


@needs_triton
@pytest.mark.parametrize(
    "kernel_name, hint",
    [
        ("no_lookup", "an index into the table"),
        ("block_of_the_byte_index", "its block is (2 * offs) // BLOCKSIZE"),
        ("odd_store_unmasked", f"stored past the end ({FIRST_KERNEL_CASE}): value index 99 of a tensor of 99"),
        ("first_tile_only", f"values were never stored ({FIRST_KERNEL_CASE}), first at index 32"),
        ("multiplies_in_the_output_dtype", "multiply in float32"),
        ("calls_a_helper", "calls another @triton.jit function"),
    ],
)
def test_kernel_mistakes(capsys, kernel_name, hint):
    ok, out = run(capsys, check_dequantize_kernel, globals()[kernel_name])
    assert not ok and hint in out, out


@needs_triton
def test_kernel_output_dtype_mistake_is_caught_on_the_float16_case(capsys):
    _, out = run(capsys, check_dequantize_kernel, multiplies_in_the_output_dtype)
    assert "(1,000 float16 values, NF4, blocks of 64, TILE 64 (a short last block))" in out


@needs_triton
def test_other_errors_in_a_kernel_propagate():
    from triton.runtime.errors import InterpreterError

    with pytest.raises(InterpreterError, match="packd_ptr"):
        check_dequantize_kernel(typo_kernel)


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 700),
    blocksize=st.sampled_from([32, 64, 128, 256]),
    tile=st.sampled_from([8, 16, 64, 128]),
    dtype=st.sampled_from([torch.float32, torch.float16]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    seed=st.integers(0, 2**16),
)
def test_launch_dequantize_kernel_runs_the_reference_kernel_exactly(n, blocksize, tile, dtype, quant_type, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    got = launch_dequantize_kernel(ref_kernel, packed, state, tile=tile)
    expected = dequantize_4bit(packed, state)
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(got.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       expected.view(torch.int16 if dtype == torch.float16 else torch.int32))


@needs_triton
def test_launch_dequantize_kernel_keeps_the_shape_and_refuses_a_nested_state():
    x = torch.randn(7, 45, generator=torch.Generator().manual_seed(0))
    packed, state = quantize_4bit(x, blocksize=64)
    assert launch_dequantize_kernel(ref_kernel, packed, state, tile=8).shape == (7, 45)
    packed, nested = quantize_4bit(x, blocksize=64, double_quant=True)
    with pytest.raises(ValueError, match="plain state: quantize with double_quant=False"):
        launch_dequantize_kernel(ref_kernel, packed, nested)


# ------------------------------------------------------------------------------------- lesson 6: the QLoRA backward


def ref_qlora_backward(grad_out, packed, state, x, A, B, scaling):
    """The library's own backward (LoRAMatmul, the node QLoRALinear runs) as the learner's function."""
    x, A, B = (t.clone().requires_grad_(True) for t in (x, A, B))
    LoRAMatmul.apply(x, None, (packed, state), None, A, B, scaling).backward(grad_out)
    return x.grad, A.grad, B.grad


def formula_qlora_backward(grad_out, packed, state, x, A, B, scaling):
    weight = dequantize_4bit(packed, state)
    g, h = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
    gB = g @ B
    return grad_out @ weight + scaling * (gB @ A).reshape(x.shape), scaling * gB.t() @ h, scaling * g.t() @ (h @ A.t())


@pytest.mark.parametrize("fn", [ref_qlora_backward, formula_qlora_backward])
def test_qlora_backward_reference_passes(capsys, fn):
    ok, out = run(capsys, check_qlora_backward, fn)
    assert ok and out.startswith("check_qlora_backward: OK — ") and out.count("\n") == 1


def test_qlora_backward_stub(capsys):
    ok, out = run(capsys, check_qlora_backward, stub)
    assert ok is False and out == "check_qlora_backward: not implemented yet: fill in the TODO in my_function\n"


def _grads_then(change):
    def fn(grad_out, packed, state, x, A, B, scaling):
        return change(formula_qlora_backward(grad_out, packed, state, x, A, B, scaling), grad_out,
                      dequantize_4bit(packed, state), scaling)
    return fn


FIRST_LORA_CASE = "x [7, 48], W0 [40, 48], r=4, scaling 4.0"


@pytest.mark.parametrize(
    "change, message, hint",
    [
        (lambda r, g, w, s: (r[0], r[1] / s, r[2]), f"MISMATCH in dL/dA ({FIRST_LORA_CASE}): 192 of 192 differ",
         "forgot the scaling: dL/dA"),
        (lambda r, g, w, s: (r[0], r[1], r[2] / s), "MISMATCH in dL/dB", "forgot the scaling: dL/dB"),
        (lambda r, g, w, s: (r[0], r[1] * s, r[2]), "MISMATCH in dL/dA", "applied twice"),
        (lambda r, g, w, s: (r[0], r[1].t(), r[2]), "dL/dA has shape [48, 4], expected [4, 48]", "its transpose"),
        (lambda r, g, w, s: (r[0], r[1], r[2].t()), "dL/dB has shape [4, 40], expected [40, 4]", "its transpose"),
        (lambda r, g, w, s: (r[0].reshape(-1, r[0].shape[-1]), r[1], r[2]), "dL/dx has shape",
         "reshape it back"),
        (lambda r, g, w, s: (*r, torch.zeros_like(w)), "got 4 value(s)", "W0 is frozen"),
        (lambda r, g, w, s: (g @ w, r[1], r[2]), "MISMATCH in dL/dx", "the adapters' path is missing"),
        (lambda r, g, w, s: (r[0] - g @ w, r[1], r[2]), "MISMATCH in dL/dx", "the base's path is missing"),
        (lambda r, g, w, s: (r[0], None, r[2]), "dL/dA is None", "return a tensor of shape [4, 48]"),
    ],
)
def test_qlora_backward_mistakes(capsys, change, message, hint):
    ok, out = run(capsys, check_qlora_backward, _grads_then(change))
    assert not ok and message in out and hint in out, out


def test_qlora_backward_unsummed_leading_dimensions(capsys):
    def batched(grad_out, packed, state, x, A, B, scaling):  # forgets to flatten: one dL/dA per batch entry
        grad_x, grad_A, grad_B = formula_qlora_backward(grad_out, packed, state, x, A, B, scaling)
        if x.dim() == 3:
            grad_A = scaling * (grad_out @ B).transpose(-1, -2) @ x
        return grad_x, grad_A, grad_B

    ok, out = run(capsys, check_qlora_backward, batched)
    assert not ok and "dL/dA has shape [2, 8, 64], expected [8, 64] (x [2, 5, 64]" in out
    assert "sum over every leading dimension" in out


def test_qlora_backward_missing_scaling_on_the_adapters_path_to_x(capsys):
    def change(r, g, w, s):
        return (r[0] - g @ w) / s + g @ w, r[1], r[2]

    ok, out = run(capsys, check_qlora_backward, _grads_then(change))
    assert not ok and "forgot the scaling on the adapters' path" in out


def test_qlora_backward_tolerance_is_tight_enough_to_see_one_wrong_value(capsys):
    def change(r, g, w, s):
        grad_B = r[2].clone()
        grad_B[3, 1] *= 1 + 1e-3
        return r[0], r[1], grad_B

    ok, out = run(capsys, check_qlora_backward, _grads_then(change))
    assert not ok and f"MISMATCH in dL/dB ({FIRST_LORA_CASE}): 1 of 160 differ, first at index 13" in out


# ------------------------------------------------------------------------------------- lesson 7: the AdamW update


def kernel_order_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
    p.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    p.mul_(1 - lr * weight_decay)


def textbook_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """Adam's m-hat / v-hat form: the same numbers up to float32 rounding, which the tolerances allow."""
    m.copy_(beta1 * m + (1 - beta1) * g)
    v.copy_(beta2 * v + (1 - beta2) * g * g)
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    p.copy_((p - lr * m_hat / (v_hat.sqrt() + eps)) * (1 - lr * weight_decay))


def torch_adamw_step(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    param = torch.nn.Parameter(p)
    param.grad = g
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=False)
    opt.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
    opt.step()


def test_adamw_update_reference_passes_bit_for_bit(capsys):
    ok, out = run(capsys, check_adamw_update, adamw_update_)
    assert ok and "5,950 of 5,950 values of p equal bit for bit" in out


def test_adamw_update_kernel_order_and_textbook_form_pass(capsys):
    assert run(capsys, check_adamw_update, kernel_order_adamw)[0]
    ok, out = run(capsys, check_adamw_update, textbook_adamw)
    assert ok and "values of p equal bit for bit" in out


def test_adamw_update_stub(capsys):
    ok, out = run(capsys, check_adamw_update, stub)
    assert ok is False and out == "check_adamw_update: not implemented yet: fill in the TODO in my_function\n"


def _adamw_with(**changes):
    """kernel_order_adamw with one piece replaced: decay_first, no_bias_correction, eps_unscaled, ..."""
    def fn(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        if changes.get("l2"):
            g = g + weight_decay * p
            weight_decay = 0.0
        if changes.get("not_in_place"):
            return None
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if changes.get("betas_swapped"):
            m.mul_(1 - beta1).add_(g, alpha=beta1)
        else:
            m.mul_(beta1).add_(g, alpha=1 - beta1)
        c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
        step_size = -lr if changes.get("no_bias_correction") else -lr * c2 / c1
        eps_term = eps if changes.get("eps_unscaled") or changes.get("no_bias_correction") else eps * c2
        decay = 1 - (weight_decay if changes.get("decay_without_lr") else lr * weight_decay)
        if changes.get("decay_first"):
            p.mul_(decay)
        p.add_(m / (v.sqrt() + eps_term), alpha=step_size)
        if not changes.get("decay_first") and not changes.get("no_decay"):
            p.mul_(decay)
    return fn


FIRST_ADAMW_CASE = "step 1, lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.5, 1,000 values"


@pytest.mark.parametrize(
    "change, message, hint",
    [
        ("decay_first", f"MISMATCH in p ({FIRST_ADAMW_CASE}): 1,000 of 1,000 differ",
         "weight decay applied before the step: bitsandbytes' CUDA kernel decays after"),
        ("no_bias_correction", f"MISMATCH in p ({FIRST_ADAMW_CASE})", "bias correction missing"),
        ("eps_unscaled", f"MISMATCH in p ({FIRST_ADAMW_CASE})", "eps added outside the sqrt term scaled by c2"),
        ("decay_without_lr", "MISMATCH in p", "lr times weight_decay, not weight_decay alone"),
        ("no_decay", "MISMATCH in p", "weight decay missing"),
        ("l2", f"MISMATCH in m ({FIRST_ADAMW_CASE})", "Adam with L2 regularisation"),
        ("not_in_place", f"MISMATCH in m ({FIRST_ADAMW_CASE})", "update m, v and p in place"),
        ("betas_swapped", "MISMATCH in m", "beta multiplies the old moment"),
    ],
)
def test_adamw_update_mistakes(capsys, change, message, hint):
    ok, out = run(capsys, check_adamw_update, _adamw_with(**{change: True}))
    assert not ok and message in out and hint in out, out


def test_adamw_update_torch_adamw_is_caught_for_its_decay_order(capsys):
    ok, out = run(capsys, check_adamw_update, torch_adamw_step)
    assert not ok and "weight decay applied before the step" in out


def test_adamw_update_eps_mistake_is_seen_without_weight_decay(capsys):
    def eps_unscaled_no_decay_case_first(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
        fn = _adamw_with(eps_unscaled=True) if weight_decay == 0 else kernel_order_adamw
        fn(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)

    ok, out = run(capsys, check_adamw_update, eps_unscaled_no_decay_case_first)
    assert not ok and "(step 1, lr 1e-3, betas (0.8, 0.99), eps 1e-3, weight_decay 0, [7, 13]" in out
    assert "eps added outside the sqrt term scaled by c2" in out


def test_adamw_update_first_mismatch_names_expected_and_got(capsys):
    p, g = _adamw_cases()[0][2].clone(), _adamw_cases()[0][3][0]
    expected, wrong = p.clone(), p.clone()
    hyper = _adamw_cases()[0][1]
    adamw_update_(expected, g, torch.zeros_like(p), torch.zeros_like(p), 1, **hyper)
    _adamw_with(decay_first=True)(wrong, g, torch.zeros_like(p), torch.zeros_like(p), 1, **hyper)
    ok, out = run(capsys, check_adamw_update, _adamw_with(decay_first=True))
    expected_text, got_text = distinguish(float(expected[0]), float(wrong[0]))
    assert not ok and f"first at index 0: expected {expected_text}, got {got_text}" in out


# ------------------------------------------------------------------------------------- lesson 7: the pager


class ReferencePager:
    """qlora_ref.pager.Pager itself behind the exercise's interface (pages of real tensors)."""

    def __init__(self, budget_bytes):
        self.pager = Pager(budget_bytes)

    def add(self, name, nbytes):
        self.pager.add(name, {"state": torch.empty(nbytes, dtype=torch.uint8)})

    def fetch(self, name):
        self.pager.fetch(name)

    @property
    def events(self):
        return [(e.direction, e.page, e.resident_after) for e in self.pager.events]


def list_pager(mistake=None):
    """An LRU pager written differently from the notebook's (a list, most recent last), or with one `mistake`."""

    class ListPager:
        def __init__(self, budget_bytes):
            self.budget, self.sizes, self.order, self.events = budget_bytes, {}, [], []

        def used(self):
            return sum(self.sizes[page] for page in self.order)

        def add(self, name, nbytes):
            too_big = nbytes >= self.budget if mistake == "refuse_equal" else nbytes > self.budget
            if too_big and mistake != "no_refusal":
                raise ValueError(f"page {name!r} ({nbytes} bytes) is larger than the budget ({self.budget})")
            self.sizes[name] = nbytes

        def record(self, direction, name):
            after = self.used()
            if mistake == "resident_before":
                after += -self.sizes[name] if direction == "in" else self.sizes[name]
            self.events.append((name, direction, after) if mistake == "fields_swapped" else (direction, name, after))

        def fetch(self, name):
            if name in self.order:
                if mistake == "hit_recorded":
                    self.record("in", name)
                if mistake != "fifo":
                    self.order.remove(name)
                    self.order.append(name)
                return
            need = self.sizes[name]
            if mistake == "in_first":
                self.order.append(name)
                self.record("in", name)
                need = 0
            evicted = 0
            while self.used() + need > self.budget or (mistake == "ge" and self.order and self.used() + need == self.budget):
                if mistake == "if_not_while" and evicted:
                    break
                candidates = [page for page in self.order if page != name]
                if mistake == "skip_zero":
                    candidates = [page for page in candidates if self.sizes[page]]
                victim = candidates[-1] if mistake == "mru" else candidates[0]
                self.order.remove(victim)
                self.record("out", victim)
                evicted += 1
            if mistake != "in_first":
                self.order.append(name)
                self.record("in", name)

    return ListPager


def pager_stub(budget_bytes):
    raise NotImplementedError("fill in the TODO in my_function")


def test_pager_reference_and_an_independent_lru_pass(capsys):
    for pager_class in (ReferencePager, list_pager()):
        ok, out = run(capsys, check_pager, pager_class)
        assert ok is True and out.count("\n") == 1 and out.startswith("check_pager: OK — "), out


def test_pager_success_line_counts_fetches_hits_and_evictions(capsys):
    fetches = hits = evictions = 0
    for _, budget, sizes, sequence in _pager_cases():
        pager = list_pager()(budget)
        for name, nbytes in sizes.items():
            pager.add(name, nbytes)
        for name in sequence:
            hits += name in pager.order
            pager.fetch(name)
        fetches += len(sequence)
        evictions += sum(event[0] == "out" for event in pager.events)
    _, out = run(capsys, check_pager, list_pager())
    assert f"({fetches} fetches: {hits} hits, {evictions} evictions;" in out
    assert hits > 0 and evictions > 0


def test_pager_cases_have_the_awkward_pages():
    cases = _pager_cases()
    assert len(cases) == 5
    for case, budget, sizes, sequence in cases:
        for awkward in (0, budget):  # a page of 0 bytes and one of the whole budget, each fetched
            assert any(sizes[name] == awkward for name in sequence), f"{case}: no page of {awkward} bytes is fetched"
        pager = list_pager()(budget)
        for name, nbytes in sizes.items():
            pager.add(name, nbytes)
        hits = 0
        for name in sequence:
            hits += name in pager.order
            pager.fetch(name)
        evictions = sum(event[0] == "out" for event in pager.events)
        assert hits and evictions, f"{case}: {hits} hits, {evictions} evictions"


@pytest.mark.parametrize("stub_class", [pager_stub, type("HalfDone", (list_pager(),), {"fetch": lambda self, name: stub()})])
def test_pager_stub(capsys, stub_class):
    ok, out = run(capsys, check_pager, stub_class)
    assert ok is False and out == "check_pager: not implemented yet: fill in the TODO in my_function\n"


def test_pager_other_errors_in_learner_code_propagate():
    class Broken(list_pager()):
        def fetch(self, name):
            return self.no_such_attribute

    with pytest.raises(AttributeError):
        check_pager(Broken)


# The case by hand: budget 100, pages a 40, b 30, c 30, d 50. Fetches a, b, c fill the device (100); fetching a
# again makes the order b, c, a (least recent first). Fetch 5, d (50 bytes), needs 50 free: LRU evicts b (70
# left) and c (40), then d comes in (90). FIFO evicts in arrival order, a (60) and b (30), then d (80).
FETCH_5 = "MISMATCH at fetch 5 of 15 (by hand, budget 100): fetch('d') with the device holding a"
FETCH_5_EXPECTED = "expected events [('out', 'b', 70), ('out', 'c', 40), ('in', 'd', 90)]"


@pytest.mark.parametrize(
    "mistake, messages, hint",
    [
        ("fifo", [FETCH_5.replace("holding a", "holding b (30), c (30), a (40) (least recently used first; 100 of 100"),
                  f"{FETCH_5_EXPECTED}, got [('out', 'a', 60), ('out', 'b', 30), ('in', 'd', 80)]"],
         "first in, first out"),
        # one eviction: b out (70), then d in: 120 bytes on a device of 100
        ("if_not_while", [f"{FETCH_5_EXPECTED}, got [('out', 'b', 70), ('in', 'd', 120)]"],
         "the device would hold 120 bytes, more than the budget of 100: keep evicting"),
        # fetch 3, c (30) fits exactly beside a and b (70): nothing must go; ">=" evicts a
        ("ge", ["MISMATCH at fetch 3 of 15 (by hand, budget 100): fetch('c')",
                "expected events [('in', 'c', 100)], got [('out', 'a', 30), ('in', 'c', 60)]"],
         "you evicted more pages than needed"),
        # the most recent of b, c, a is a (refetched), then c: a (60), c (30), then d (80)
        ("mru", [f"{FETCH_5_EXPECTED}, got [('out', 'a', 60), ('out', 'c', 30), ('in', 'd', 80)]"],
         "you evicted the most recently used page first"),
        ("hit_recorded", ["MISMATCH at fetch 4 of 15 (by hand, budget 100): fetch('a')",
                          "expected events [], got [('in', 'a', 100)]"], "(a hit): no bytes move and nothing is recorded"),
        ("in_first", [f"{FETCH_5_EXPECTED}, got [('in', 'd', 150)"], "the device would hold 150 bytes"),
        ("resident_before", ["MISMATCH at fetch 1 of 15 (by hand, budget 100): fetch('a') with the device empty",
                             "expected events [('in', 'a', 40)], got [('in', 'a', 0)]"],
         "the third field is the bytes on the device after the move"),
        ("skip_zero", ["MISMATCH at fetch"], "a page of 0 bytes is evicted like any other"),
        ("fields_swapped", ["an event should be a tuple (\"in\" or \"out\", name, resident bytes), got ('a', 'in', 40)"],
         "record each move as a tuple (direction, name, resident_bytes after it)"),
        ("no_refusal", ["add('huge', 101) with a budget of 100 bytes was accepted"], "raise ValueError"),
        ("refuse_equal", ["add('whole', 100) with a budget of 100 bytes raised ValueError"],
         "refuse only a page larger than the whole budget"),
    ],
)
def test_pager_mistakes(capsys, mistake, messages, hint):
    ok, out = run(capsys, check_pager, list_pager(mistake))
    assert ok is False
    assert out.startswith("check_pager: ") and out.count("\n") == 2 and "\n  hint: " in out, out
    for message in messages:
        assert message in out, out
    assert hint in out, out


def test_pager_events_in_the_wrong_order(capsys):
    class InAfterOut(list_pager()):
        def fetch(self, name):
            seen = len(self.events)
            super().fetch(name)
            if len(self.events) > seen:  # a miss: the "in" first, then the evictions
                self.events[seen:] = self.events[-1:] + self.events[seen:-1]

    ok, out = run(capsys, check_pager, InAfterOut)
    assert not ok and f"{FETCH_5_EXPECTED}, got [('in', 'd', 90), ('out', 'b', 70), ('out', 'c', 40)]" in out
    assert "evict first, then bring the page in" in out


def test_pager_events_must_be_a_list(capsys):
    class NoEvents(list_pager()):
        def __init__(self, budget_bytes):
            super().__init__(budget_bytes)
            del self.events

        def record(self, direction, name):
            pass

    ok, out = run(capsys, check_pager, NoEvents)
    assert not ok and "the pager's `events` should be a list, got NoneType" in out


FETCHES = [(case, i, len(sequence)) for case, _, _, sequence in _pager_cases() for i in range(len(sequence))]


@settings(max_examples=15, deadline=None)
@given(st.integers(0, len(FETCHES) - 1))
def test_pager_every_fetch_is_compared(k):
    """A pager right everywhere but at one fetch is caught exactly there."""
    calls = []

    class WrongOnce(list_pager()):
        def fetch(self, name):
            super().fetch(name)
            calls.append(name)
            if len(calls) == k + 1:
                self.events.append(("out", name, 0))

    case, i, n = FETCHES[k]
    with contextlib.redirect_stdout(io.StringIO()) as buffer:  # capsys is per test, not per hypothesis example
        ok = check_pager(WrongOnce)
    output = buffer.getvalue()
    assert not ok and f"MISMATCH at fetch {i + 1} of {n} ({case}): " in output, output


# ------------------------------------------------------------------------------------- lesson 8: the schedule


def formula_learning_rate(config, step):
    """The schedule written from its formula (not qlora_ref's code), in the order the exercise gives."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    m = config.min_lr_ratio
    return config.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))


def rearranged_learning_rate(config, step):
    """The same schedule with its operations regrouped: equal up to float64 rounding."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps * config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    m = config.min_lr_ratio
    return config.lr * m + config.lr * (1 - m) * (1 + math.cos(math.pi * progress)) / 2


def schedule_with(warm_from=1, span_less=1, floor=True, offset=True, mixed=True, decay=True, guard=True):
    """The schedule with one piece changed (each default is the right one)."""

    def schedule(config, step):
        w, m = config.warmup_steps, (config.min_lr_ratio if floor else 0.0)
        if step < w:
            return config.lr * (step + warm_from) / w
        if not decay:
            return config.lr
        span = config.steps - span_less - (w if offset else 0)
        progress = (step - (w if offset else 0)) / (max(1, span) if guard else span)
        half = 0.5 * (1 + math.cos(math.pi * progress))
        return config.lr * (m + (1 - m) * half) if mixed else config.lr * (m + half)

    return schedule


SCHEDULE_STEPS = sum(config.steps for _, config in _schedule_cases())
LESSON_SCHEDULE = "lr 3e-3, steps 150, warmup_steps 10, min_lr_ratio 0.1 (lesson 8's run)"


def test_learning_rate_reference_and_formula_pass_bit_for_bit(capsys):
    for schedule in (learning_rate, formula_learning_rate, schedule_with()):
        ok, out = run(capsys, check_learning_rate, schedule)
        assert ok and out == ("check_learning_rate: OK — equal to qlora_ref.train.learning_rate at every step of 4 "
                              f"schedules ({SCHEDULE_STEPS} steps, all bit for bit)\n"), out


def test_learning_rate_rearranged_passes_and_counts_the_bits(capsys):
    exact = sum(rearranged_learning_rate(config, step) == learning_rate(config, step)
                for _, config in _schedule_cases() for step in range(config.steps))
    assert 0 < exact < SCHEDULE_STEPS  # the regrouping does move some last bits
    ok, out = run(capsys, check_learning_rate, rearranged_learning_rate)
    assert ok and f"({SCHEDULE_STEPS} steps; {exact} bit for bit, the rest within 1e-9" in out


def test_learning_rate_cases_cover_no_warmup_and_a_one_step_cosine():
    configs = [config for _, config in _schedule_cases()]
    assert any(c.warmup_steps == 0 and c.min_lr_ratio == 0 for c in configs)
    assert any(c.steps - 1 - c.warmup_steps == 0 for c in configs)


@pytest.mark.parametrize(
    "schedule, message, hint",
    [
        (schedule_with(warm_from=0), f"MISMATCH ({LESSON_SCHEDULE}): 10 of 150 steps differ, first at step 0: "
                                     "expected 0.0003, got 0", "step 0 already trains with lr / warmup_steps"),
        (schedule_with(span_less=0), "139 of 150 steps differ, first at step 11", "the cosine ends at the last step"),
        (schedule_with(floor=False), "139 of 150 steps differ, first at step 11", "decays to lr · min_lr_ratio, not to 0"),
        # every cosine step differs but the last, where both reach the floor
        (schedule_with(offset=False), "139 of 150 steps differ, first at step 10: expected 0.003,",
         "the cosine starts where the warm-up ends"),
        (schedule_with(mixed=False), "first at step 10: expected 0.003, got 0.0033", "mix the floor in"),
        (schedule_with(decay=False), "first at step 11", "follows a cosine down to lr · min_lr_ratio"),
        (lambda config, step: formula_learning_rate(config, step) * (1 + 1e-8) if step == 77 else
         formula_learning_rate(config, step), "1 of 150 steps differ, first at step 77", "after the warm-up"),
        (lambda config, step: formula_learning_rate(config, step) * 2 if step == 3 else
         formula_learning_rate(config, step), "1 of 150 steps differ, first at step 3", "during the warm-up"),
    ],
)
def test_learning_rate_mistakes(capsys, schedule, message, hint):
    ok, out = run(capsys, check_learning_rate, schedule)
    assert not ok and out.startswith("check_learning_rate: ") and out.count("\n") == 2, out
    assert message in out and hint in out, out


def warmup_first(config, step):
    """Right, but it divides by warmup_steps before asking whether there is a warm-up."""
    warm = (step + 1) / config.warmup_steps
    return config.lr * warm if warm < 1 else formula_learning_rate(config, step)


@pytest.mark.parametrize(
    "schedule, message, hint",
    [
        (warmup_first, "learning_rate(config, 0) divided by zero (lr 2e-4, steps 40, no warm-up", "divide by warmup_steps only when"),
        (schedule_with(guard=False), "learning_rate(config, 10) divided by zero (lr 5e-3, steps 11, warmup_steps 10",
         "max(1, steps - 1 - warmup_steps)"),
    ],
)
def test_learning_rate_division_by_zero_is_explained(capsys, schedule, message, hint):
    ok, out = run(capsys, check_learning_rate, schedule)
    assert not ok and message in out and hint in out, out


def test_learning_rate_stub_and_wrong_types(capsys):
    ok, out = run(capsys, check_learning_rate, stub)
    assert not ok and out == "check_learning_rate: not implemented yet: fill in the TODO in my_function\n"
    ok, out = run(capsys, check_learning_rate, lambda config, step: "fast")
    assert not ok and "learning_rate(config, 0) should be a number or a one-element tensor, got str" in out
    def as_tensor(config, step):
        return torch.tensor([formula_learning_rate(config, step)], dtype=torch.float64)

    ok, out = run(capsys, check_learning_rate, as_tensor)
    assert ok, out  # a one-element tensor is a number


# ------------------------------------------------------------------------------------- lesson 8: the step


def step_with(mistake=None, schedule=learning_rate):
    """One training step written from the exercise's description (not from train_step), with one mistake."""

    def training_step(run):
        config = run.config
        if mistake == "zero_at_start":
            run.optimizer.zero_grad(set_to_none=False)
        if mistake != "no_lr":
            for group in run.optimizer.param_groups:
                group["lr"] = schedule(config, run.step + (mistake == "lr_ahead"))
        total = 0.0
        for micro in range(config.grad_accum):
            index = {"same_batch": run.step * config.grad_accum, "step_index": run.step + micro}.get(
                mistake, run.step * config.grad_accum + micro)
            examples = [run.train_examples[i] for i in
                        batch_indices(len(run.train_examples), config.batch_size, config.seed, index)]
            batch = collate(examples, run.tokenizer)
            if mistake == "no_labels":  # every position scored, the prompt's included
                logits = run.model(input_ids=batch["input_ids"]).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch["input_ids"][:, 1:].reshape(-1))
            else:
                loss = run.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            scaled = loss if mistake == "no_divide" else loss / config.grad_accum
            scaled.backward()
            total += (scaled if mistake == "scaled_loss" else loss).item()
            if mistake == "clip_inside":
                torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
            if mistake == "step_inside":
                run.optimizer.step()
        if mistake == "clip_always" or (config.max_grad_norm > 0 and mistake not in ("no_clip", "clip_inside")):
            torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
        if mistake in ("zero_before_step", "zero_none_before_step"):
            run.optimizer.zero_grad(set_to_none=mistake == "zero_none_before_step")
        if mistake not in ("step_inside", "no_step"):
            run.optimizer.step()
        if mistake not in ("no_zero", "zero_at_start"):
            run.optimizer.zero_grad(set_to_none=True)
        if mistake != "no_advance":
            run.step += 1
        mean = {"sum_loss": total, "last_loss": loss.item(), "tensor_loss": loss}.get(mistake, total / config.grad_accum)
        if mistake != "no_append":
            run.losses.append(mean)
        return None if mistake == "no_return" else mean

    return training_step


def equivalent_step(run):
    """The same step written differently, each difference legitimate: zero_grad(set_to_none=False) at the start,
    the losses kept and one backward over their mean, clipping over model.parameters() (the frozen ones have no
    gradient), the mean loss formed in float32."""
    config = run.config
    run.optimizer.zero_grad(set_to_none=False)
    lr = learning_rate(config, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    losses = []
    for micro in range(config.grad_accum):
        indices = batch_indices(len(run.train_examples), config.batch_size, config.seed,
                                config.grad_accum * run.step + micro)
        batch = collate([run.train_examples[i] for i in indices], run.tokenizer)
        losses.append(run.model(batch["input_ids"], batch["labels"]).loss)
    (sum(losses) / config.grad_accum).backward()
    if config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm=config.max_grad_norm)
    run.optimizer.step()
    run.step += 1
    run.losses.append(float(torch.stack([loss.detach() for loss in losses]).mean()))
    return run.losses[-1]


CLIPPED, UNCLIPPED = (case for case, _, _ in _STEP_CASES)
STEP_OK = ("check_training_step: OK — batches, losses, learning rates, gradients, adapters and optimizer state equal "
           f"train_step's, bit for bit ({sum(steps for _, _, steps in _STEP_CASES)} steps of two runs")


def test_training_step_written_from_the_description_passes(capsys):
    ok, out = run(capsys, check_training_step, step_with())
    assert ok and out.startswith(STEP_OK) and out.count("\n") == 1, out


def test_training_step_equivalent_forms_pass(capsys):
    ok, out = run(capsys, check_training_step, equivalent_step)
    assert ok and out.startswith(STEP_OK), out


def test_training_step_cases_clip_early_enough_and_also_not_at_all():
    clipped, unclipped = (dict(changes) for _, changes, _ in _STEP_CASES)
    assert clipped["max_grad_norm"] > 0 and clipped["dropout"] > 0 and unclipped["max_grad_norm"] == 0
    # the clipping case must clip a single micro-batch's share of the gradient, or clipping too early would not show
    config = TrainConfig(**_STEP_CONFIG, **clipped)
    state = torch.get_rng_state()
    trial = setup(config)
    indices = batch_indices(len(trial.train_examples), config.batch_size, config.seed, 0)
    batch = collate([trial.train_examples[i] for i in indices], trial.tokenizer)
    (trial.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss / config.grad_accum).backward()
    norm = torch.cat([p.grad.reshape(-1) for p in trial.trainable]).norm()
    torch.set_rng_state(state)
    assert norm > config.max_grad_norm


def test_training_step_stubs_and_errors(capsys):
    ok, out = run(capsys, check_training_step, stub)
    assert not ok and out == "check_training_step: not implemented yet: fill in the TODO in my_function\n"

    def uses_a_stubbed_schedule(run_):
        raise NotImplementedError("fill in the TODO in learning_rate")

    ok, out = run(capsys, check_training_step, uses_a_stubbed_schedule)
    assert not ok and out == "check_training_step: not implemented yet: fill in the TODO in learning_rate\n"
    with pytest.raises(AttributeError):
        check_training_step(lambda run_: run_.no_such_field)


def test_training_step_leaves_the_callers_random_state_alone(capsys):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    run(capsys, check_training_step, step_with("no_lr"))
    assert torch.equal(torch.get_rng_state(), before)


def test_training_step_counts_optimizer_steps(capsys):
    ok, out = run(capsys, check_training_step, step_with("step_inside"))
    assert not ok and f"at step 1 ({CLIPPED}) run.optimizer.step() was called 2 times, expected once" in out
    ok, out = run(capsys, check_training_step, train_step)
    assert ok, out


GRADIENT = "MISMATCH in the gradient of model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "mistake, messages, hint",
    [
        ("no_divide", [f"{GRADIENT}.lora_B.weight at optimizer.step() (step 1, {CLIPPED})"],
         "each micro-batch's gradient is grad_accum = 2 times too large"),
        ("clip_inside", [f"{GRADIENT}.lora_B.weight at optimizer.step() (step 1, {CLIPPED})"],
         "the gradients changed between two micro-batches' backward passes"),
        # lora_A's gradient is zero at step 1 (B starts at 0), so the first nonzero one left over is at step 2
        ("no_zero", [f"{GRADIENT}.lora_A.weight at optimizer.step() (step 2, {CLIPPED})"],
         "the previous step left its gradients in .grad"),
        ("no_clip", [f"{GRADIENT}.lora_B.weight at optimizer.step() (step 1, {CLIPPED})"], "was not clipped"),
        ("clip_always", [f"(step 1, {UNCLIPPED}): 512 of 512 differ", "got -0.0"], "max_grad_norm = 0 means no clipping"),
        ("zero_before_step", [f"{GRADIENT}.lora_B.weight at optimizer.step() (step 1, {CLIPPED})", "got 0.0"],
         "the gradient is zero at optimizer.step()"),
        ("zero_none_before_step", [f"MISMATCH at step 1 ({CLIPPED}): the gradient of model.layers.0.self_attn.q_proj"
                                   ".lora_A.weight is None at optimizer.step()"], "zero the gradients after the step"),
        ("same_batch", [f"MISMATCH at step 1 ({CLIPPED}): micro-batch 2 of 2 should be batch index 1 (run.step * "
                        "grad_accum + micro = 0 * 2 + 1), got the examples of batch index 0"],
         "every micro-batch used the same examples"),
        ("step_index", [f"MISMATCH at step 2 ({CLIPPED}): micro-batch 1 of 2 should be batch index 2", "batch index 1"],
         "index = run.step * config.grad_accum + micro"),
        # warmup_steps 3: step 1 trains at lr / 3 = 0.001; never set, the optimizer keeps lr = 0.003
        ("no_lr", [f"MISMATCH at step 1 ({CLIPPED}) in the learning rate at optimizer.step(): expected 0.001 "
                   "(learning_rate(config, 0)), got 0.003"], "the learning rate was never set"),
        ("lr_ahead", ["expected 0.001 (learning_rate(config, 0)), got 0.002"], "that is the next step's rate"),
        ("no_advance", [f"after step 1 ({CLIPPED}) run.step is 0, expected 1"], "advance run.step by one"),
        ("step_inside", [f"at step 1 ({CLIPPED}) run.optimizer.step() was called 2 times, expected once"],
         "not inside the loop"),
        ("no_step", [f"at step 1 ({CLIPPED}) run.optimizer.step() was called 0 times"], "call run.optimizer.step() once"),
        ("sum_loss", [f"MISMATCH at step 1 ({CLIPPED}) in run.losses[-1]"], "the mean, not the sum"),
        ("scaled_loss", [f"MISMATCH at step 1 ({CLIPPED}) in run.losses[-1]"], "log the unscaled loss"),
        ("last_loss", [f"MISMATCH at step 1 ({CLIPPED}) in run.losses[-1]"], "not one of them"),
        ("tensor_loss", [f"run.losses[-1] is a tensor ({CLIPPED}), expected a Python float"], "use loss.item()"),
        ("no_append", [f"after step 1 ({CLIPPED}) run.losses has 0 entries, expected 1"], "append the step's mean loss"),
        ("no_return", [f"the value training_step returned is None ({CLIPPED})"], "return the mean loss"),
        ("no_labels", [f"MISMATCH at step 1 ({CLIPPED}) in run.losses[-1]"], "labels=batch['labels']"),
    ],
)
def test_training_step_mistakes(capsys, mistake, messages, hint):
    ok, out = run(capsys, check_training_step, step_with(mistake))
    assert ok is False
    assert out.startswith("check_training_step: ") and out.count("\n") == 2 and "\n  hint: " in out, out
    for message in messages:
        assert message in out, out
    assert hint in out, out


def test_training_step_a_rearranged_schedule_is_told_apart_from_a_missing_one(capsys):
    config = TrainConfig(**_STEP_CONFIG, **_STEP_CASES[0][1])
    expected, got = learning_rate(config, 2), rearranged_learning_rate(config, 2)
    assert expected != got and got == config.lr  # lr * 3 / 3 rounds up; (3 / 3) * lr is lr itself
    ok, out = run(capsys, check_training_step, step_with(schedule=rearranged_learning_rate))
    assert not ok and f"MISMATCH at step 3 ({CLIPPED}) in the learning rate at optimizer.step(): expected {expected!r}" in out
    assert f"got {got!r}" in out and "equal up to the last bits" in out, out


CALLS = [(case, step) for case, _, steps in _STEP_CASES for step in range(1, steps + 1)]


@pytest.mark.parametrize("call", [0, len(CALLS) - 1])
def test_training_step_one_bit_off_is_caught_at_its_step(capsys, call):
    """A step right everywhere but in one adapter value, one float32 step away, at one call: caught there."""
    names = []

    def one_bit_off(run_):
        loss = step_with()(run_)
        if len(names) == call:
            name, last = [(n, p) for n, p in run_.model.named_parameters() if p.requires_grad][-1]
            with torch.no_grad():
                flat = last.view(-1)
                flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))
        names.append(name if len(names) == call else None)
        return loss

    case, step = CALLS[call]
    ok, out = run(capsys, check_training_step, one_bit_off)
    assert not ok and f"MISMATCH in {names[call]} after the step (step {step}, {case}): 1 of " in out, out
    assert "differ, first at index 7" in out
