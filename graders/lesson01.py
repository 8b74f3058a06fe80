"""Lesson 1's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_absmax_quantizer(quantize, dequantize=None)
      quantize(x, bits) -> (q, scale)          symmetric, one scale for the whole tensor
      dequantize(q, scale) -> x_hat            optional
- check_zeropoint_quantizer(quantize, dequantize=None)
      quantize(x, bits) -> (q, scale, zero)    asymmetric, one scale and zero-point for the whole tensor
      dequantize(q, scale, zero) -> x_hat      optional
  x is a float32 tensor, bits 2..8; q has x's shape (any integer or float dtype holding integers);
  scale and zero are a number, a 0-d or a one-element tensor.
"""

import math

import torch

from .harness import _call, _Fail, _first_mismatch, _fmt, _mismatch_line, _number, _run, _tensor

__all__ = ["check_absmax_quantizer", "check_zeropoint_quantizer"]


def _linear_cases():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(1000, generator=g)
    skewed = torch.rand(1000, generator=g) * 3.0 - 0.5  # mostly positive: min -0.5, max 2.5
    positive = torch.rand(500, generator=g) + 0.25  # all positive: the zero-point range must be widened to 0
    weights = torch.randn(16, 32, generator=g) * 0.02
    weights[3, 7] = 0.5  # one outlier stretches the scale for everyone
    return [
        ("1,000 normal values", normal),
        ("1,000 values in [-0.5, 2.5]", skewed),
        ("500 positive values", positive),
        ("a 16x32 weight matrix with an outlier", weights),
    ]


def _check_q(q, x, case, expected_q, hint):
    q = _tensor(q, "q")
    if q.numel() != x.numel():
        raise _Fail(f"q has {q.numel():,} values for {x.numel():,} inputs ({case})", "one code per value of x, in x's shape")
    if q.is_floating_point() and not bool((q == q.round()).all()):
        raise _Fail(f"q holds non-integers ({case}), e.g. {_fmt(float(q.reshape(-1)[(q != q.round()).reshape(-1).nonzero()[0]]))}",
                    "round x / scale to an integer with torch.round")
    found = _first_mismatch(expected_q, q)
    if found:
        raise _Fail(_mismatch_line("q", case, found, x.numel()), hint(q))


def _check_dequantize(dequantize, args, x, case, expected):
    if dequantize is None:
        return
    x_hat = _tensor(_call(dequantize, *args), "x_hat")
    if x_hat.numel() != x.numel():
        raise _Fail(f"the dequantized tensor has {x_hat.numel():,} values for {x.numel():,} inputs ({case})")
    found = _first_mismatch(expected, x_hat.float(), exact=False)
    if found:
        raise _Fail(_mismatch_line("the dequantized values", case, found, x.numel()), None)


def check_absmax_quantizer(quantize, dequantize=None) -> bool:
    """Check a symmetric per-tensor quantizer `quantize(x, bits) -> (q, scale)` against qlora_ref.quantize_absmax.

    scale = max|x| / (2^(bits-1) - 1) (within 1e-6 relative), q = clamp(round(x / scale), -qmax, qmax)
    (exactly), for bits 8, 4 and 2 on four inputs; and, if given, `dequantize(q, scale) -> x_hat` = scale * q.
    An all-zero tensor must give q = 0 and a finite, positive scale. Prints one line; True on success.
    """
    from qlora_ref.linear import quantize_absmax

    def body():
        cases = 0
        for case, x in _linear_cases():
            for bits in (8, 4, 2):
                label = f"bits={bits}, {case}"
                ref = quantize_absmax(x, bits=bits, granularity="tensor")
                qmax = 2 ** (bits - 1) - 1
                result = _call(quantize, x.clone(), bits)
                if not isinstance(result, (tuple, list)) or len(result) != 2:
                    raise _Fail("quantize should return a pair (q, scale)")
                q, scale = result
                scale_v = _number(scale, "scale")
                absmax = float(x.abs().max())
                expected_scale = float(ref.scale)
                if not math.isclose(scale_v, expected_scale, rel_tol=1e-6):
                    hint = "scale = max|x| / (2**(bits - 1) - 1): the largest level is qmax = 2^(b-1) - 1 (127 at 8 bits)"
                    if math.isclose(scale_v, absmax / 2 ** (bits - 1), rel_tol=1e-6):
                        hint = f"you divided by 2^(b-1) = {2 ** (bits - 1)}; the largest level is 2^(b-1) - 1 = {qmax}"
                    elif math.isclose(scale_v, absmax / (2**bits - 1), rel_tol=1e-6):
                        hint = "2^b - 1 levels is the zero-point quantizer's range; symmetric uses -qmax..qmax, qmax = 2^(b-1) - 1"
                    elif math.isclose(scale_v, float(x.max()) / qmax, rel_tol=1e-6):
                        hint = "absmax is the largest |x| (x.abs().max()), not the largest x"
                    raise _Fail(f"MISMATCH in scale ({label}): expected {expected_scale:.9g}, got {scale_v:.9g}", hint)

                def q_hint(q_got):
                    g = q_got.double().reshape(-1)
                    if bool((g.abs() > qmax).any()):
                        return f"some codes are outside -{qmax}..{qmax}: clamp round(x / scale) to [-qmax, qmax]"
                    u = x.double().reshape(-1) / expected_scale
                    if bool((g == u.floor()).all()) or bool((g == u.trunc()).all()):
                        return "round to the nearest integer with torch.round, not floor or int() (which truncates)"
                    return "q = clamp(round(x / scale), -qmax, qmax), computed in float32 with torch.round"

                _check_q(q, x, label, ref.q, q_hint)
                if dequantize is not None:
                    _check_dequantize(dequantize, (q, scale), x, label, ref.dequantize())
                cases += 1
        zeros = torch.zeros(64)
        q, scale = _call(quantize, zeros, 8)
        scale_v = _number(scale, "scale")
        if not (math.isfinite(scale_v) and scale_v > 0):
            raise _Fail(f"an all-zero tensor gives scale {scale_v} (then x / scale is nan)",
                        "when max|x| is 0 use any positive scale, e.g. 1.0 (torch.where(absmax > 0, absmax / qmax, 1.0))")
        _check_q(q, zeros, "bits=8, 64 zeros", torch.zeros(64), lambda _: "zeros must quantize to q = 0")
        extra = " and dequantize" if dequantize is not None else ""
        return f"quantize{extra} match qlora_ref.quantize_absmax ({cases + 1} cases, bits 8, 4 and 2)"

    return _run("check_absmax_quantizer", body)


def check_zeropoint_quantizer(quantize, dequantize=None) -> bool:
    """Check an asymmetric per-tensor quantizer `quantize(x, bits) -> (q, scale, zero)` against qlora_ref.

    With low = min(x.min(), 0) and high = max(x.max(), 0) (the range always contains 0):
    scale = (high - low) / (2^bits - 1), zero = round(-low / scale), q = clamp(round(x / scale) + zero, 0, 2^bits - 1);
    and, if given, `dequantize(q, scale, zero) -> x_hat` = scale * (q - zero). Prints one line; True on success.
    """
    from qlora_ref.linear import quantize_zeropoint

    def body():
        cases = 0
        for case, x in _linear_cases():
            for bits in (8, 4, 2):
                label = f"bits={bits}, {case}"
                ref = quantize_zeropoint(x, bits=bits, granularity="tensor")
                qmax = 2**bits - 1
                result = _call(quantize, x.clone(), bits)
                if not isinstance(result, (tuple, list)) or len(result) != 3:
                    raise _Fail("quantize should return a triple (q, scale, zero)")
                q, scale, zero = result
                scale_v, zero_v = _number(scale, "scale"), _number(zero, "zero")
                lo, hi = float(x.min()), float(x.max())
                expected_scale, expected_zero = float(ref.scale), float(ref.zero)
                if not math.isclose(scale_v, expected_scale, rel_tol=1e-6):
                    hint = "scale = (high - low) / (2**bits - 1) with low = min(x.min(), 0), high = max(x.max(), 0)"
                    if math.isclose(scale_v, (hi - lo) / qmax, rel_tol=1e-6):
                        hint = "the range must contain 0 (so that 0 is exact and zero is a valid code): low = min(x.min(), 0), high = max(x.max(), 0)"
                    elif math.isclose(scale_v, (hi - lo) / (qmax + 1), rel_tol=1e-6) or math.isclose(
                        scale_v, expected_scale * qmax / (qmax + 1), rel_tol=1e-6
                    ):
                        hint = f"b bits give 2^b levels, 0..{qmax}: divide the range by 2^b - 1 = {qmax}, not 2^b"
                    raise _Fail(f"MISMATCH in scale ({label}): expected {expected_scale:.9g}, got {scale_v:.9g}", hint)
                if zero_v != expected_zero:
                    hint = "zero = round(-low / scale), an integer code, so that x = 0 maps to q = zero exactly"
                    if zero_v == -expected_zero:
                        hint = "the sign: zero = round(-low / scale), where low <= 0, so zero >= 0"
                    raise _Fail(f"MISMATCH in zero ({label}): expected {_fmt(expected_zero)}, got {_fmt(zero_v)}", hint)

                def q_hint(q_got):
                    g = q_got.double().reshape(-1)
                    if bool((g < 0).any()) or bool((g > qmax).any()):
                        return f"some codes are outside 0..{qmax}: clamp round(x / scale) + zero to [0, 2^b - 1]"
                    return "q = clamp(round(x / scale) + zero, 0, 2**bits - 1): round x / scale first, then add zero"

                _check_q(q, x, label, ref.q, q_hint)
                if dequantize is not None:
                    _check_dequantize(dequantize, (q, scale, zero), x, label, ref.dequantize())
                cases += 1
        zeros = torch.zeros(64)
        q, scale, zero = _call(quantize, zeros, 8)
        scale_v = _number(scale, "scale")
        if not (math.isfinite(scale_v) and scale_v > 0):
            raise _Fail(f"an all-zero tensor gives scale {scale_v} (then x / scale is nan)",
                        "when high == low (all zeros) use any positive scale, e.g. 1.0")
        zero_v = _number(zero, "zero")
        expected_q = torch.full((64,), zero_v)
        _check_q(q, zeros, "bits=8, 64 zeros", expected_q, lambda _: "zeros must quantize to q = zero")
        extra = " and dequantize" if dequantize is not None else ""
        return f"quantize{extra} match qlora_ref.quantize_zeropoint ({cases + 1} cases, bits 8, 4 and 2)"

    return _run("check_zeropoint_quantizer", body)
