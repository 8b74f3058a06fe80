"""qlora_ref.checks: the reference as "learner code" passes every checker; deliberate mistakes fail with a
message that names the first mismatch (where, expected vs got) and the right hint; an unfinished exercise
gives one "not implemented yet" line, never a traceback."""

import re

import numpy as np
import pytest
import torch
from scipy.stats import norm

from qlora_ref import nf4_codebook, quantize_4bit
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.checks import (
    _blockwise_cases,
    _linear_cases,
    check_absmax_quantizer,
    check_blockwise_4bit,
    check_nf4_codebook,
    check_zeropoint_quantizer,
)
from qlora_ref.linear import quantize_absmax, quantize_zeropoint

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
    ]
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
    [(check_absmax_quantizer, 2), (check_zeropoint_quantizer, 2), (check_nf4_codebook, 1), (check_blockwise_4bit, 2)],
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
