"""Checkers for the exercises: does a learner's function compute what the reference (and bitsandbytes) does?

Each checker calls the learner's function on a few fixed, seeded inputs, compares the result with
qlora_ref (and with bitsandbytes where it has the same thing and is installed), and prints ONE line:

    check_nf4_codebook: OK — equal to bitsandbytes' table, bit for bit
    check_absmax_quantizer: MISMATCH in q (bits=4, 1,000 normal values): 3 of 1,000 differ, first at index 17: expected 5, got 6
      hint: q = clamp(round(x / scale), -qmax, qmax) with torch.round (floor or int() truncate)
    check_blockwise_4bit: not implemented yet: fill in the TODO in pack_nibbles

It returns True on success and False otherwise. It never raises for a wrong or unfinished answer: a function
that raises NotImplementedError (an exercise stub) gives the "not implemented yet" line, a wrong result the
first mismatch (where, expected vs got) and a hint. Any other exception in the learner's code propagates with
its traceback, since that is a bug to read. A call of the learner's code that runs longer than TIME_LIMIT_S
seconds (an endless loop) is stopped and gives a "stopped after" line, instead of hanging the notebook (by
SIGALRM, so in the main thread on Linux and macOS, where notebooks run their cells; elsewhere no limit).

The contracts (what the learner's functions take and return):

- check_absmax_quantizer(quantize, dequantize=None)
      quantize(x, bits) -> (q, scale)          symmetric, one scale for the whole tensor
      dequantize(q, scale) -> x_hat            optional
- check_zeropoint_quantizer(quantize, dequantize=None)
      quantize(x, bits) -> (q, scale, zero)    asymmetric, one scale and zero-point for the whole tensor
      dequantize(q, scale, zero) -> x_hat      optional
  x is a float32 tensor, bits 2..8; q has x's shape (any integer or float dtype holding integers);
  scale and zero are a number, a 0-d or a one-element tensor.
- check_nf4_codebook(nf4_codebook)
      nf4_codebook(offset) -> 16 float32 levels, ascending, from -1.0 to 1.0
- check_blockwise_4bit(quantize, dequantize)
      quantize(x, code, blocksize) -> (packed, absmax)
          packed: uint8, (n + 1) // 2 bytes (any shape), two codes per byte, the even element in the high nibble
          absmax: float32, one per block of `blocksize` consecutive values (the last block may be short)
      dequantize(packed, absmax, code, n, blocksize) -> x_hat, n float32 values (any shape)
  code is NF4's 16 levels (qlora_ref.nf4_codebook()), x any shape (it is read flat, in memory order).
- check_double_quant(compress, decompress)
      compress(absmax, code) -> (qabsmax, offset, absmax2)
          offset: absmax.mean(); absmax2: float32, max |absmax - offset| per block of 256;
          qabsmax: uint8, one code per absmax value (a nearest level of the map, or bitsandbytes' byte)
      decompress(qabsmax, offset, absmax2, code) -> absmax^ = code[qabsmax] * absmax2 + offset, float32
  absmax is the float32 absmax of a 4-bit state, code the 256-level dynamic map (qlora_ref.dynamic_map()).
- check_dequantize_kernel(kernel)
      a @triton.jit kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr)
      on the grid (cdiv((n + 1) // 2, TILE),), run in Triton's interpreter on CPU tensors (no GPU needed);
      launch_dequantize_kernel(kernel, packed, state, tile) runs it the same way on a quantize_4bit state.
- check_qlora_backward(backward)
      backward(grad_out, packed, state, x, A, B, scaling) -> (dL/dx, dL/dA, dL/dB)
  for y = x W0^T + scaling · x A^T B^T, W0 = dequantize_4bit(packed, state) frozen; x [..., in], A [r, in],
  B [out, r], grad_out [..., out], float32; the gradients have the shapes of x, A and B.
- check_adamw_update(update)
      update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) -> None, p, m, v updated in place
  one AdamW step on float32 tensors in bitsandbytes' CUDA kernel order (qlora_ref.optim8bit.adamw_update_).
- check_pager(pager_class)
      pager = pager_class(budget_bytes)
      pager.add(name, nbytes)      a page of nbytes (0 allowed) in host memory; ValueError if nbytes > budget_bytes
      pager.fetch(name)            the page to the device, most recently used, evicting least recently used
                                   pages while resident bytes + nbytes > budget_bytes (a hit moves nothing)
      pager.events                 a list, one tuple ("in" | "out", name, resident bytes after the move) per move
  the bookkeeping of qlora_ref.pager.Pager (which also moves the tensors), compared event for event.
- check_learning_rate(learning_rate)
      learning_rate(config, step) -> float     the warm-up + cosine rate of step `step` (from 0) of a TrainConfig
  compared with qlora_ref.train.learning_rate at every step of four schedules (within 1e-9 relative).
- check_training_step(training_step)
      training_step(run) -> float              one optimizer step of a qlora_ref.train.setup run, in place:
                                               run.step advanced, the mean loss appended to run.losses and returned
  compared with qlora_ref.train.train_step on two tiny QLoRA runs: batches, losses, learning rates, gradients at
  optimizer.step(), adapters and optimizer state, bit for bit (the logged loss within 1e-6 relative).
"""

import math
import random
import signal
import threading
from contextlib import contextmanager

import torch

from .compare import distinguish

__all__ = [
    "check_absmax_quantizer",
    "check_zeropoint_quantizer",
    "check_nf4_codebook",
    "check_blockwise_4bit",
    "check_double_quant",
    "check_dequantize_kernel",
    "launch_dequantize_kernel",
    "check_qlora_backward",
    "check_adamw_update",
    "check_pager",
    "check_learning_rate",
    "check_training_step",
]


class _Fail(Exception):
    """One failed comparison: the line to print (and an optional hint)."""

    def __init__(self, line, hint=None):
        super().__init__(line)
        self.line = line
        self.hint = hint


TIME_LIMIT_S = 120  # the longest one call of a learner's function may run (the checkers' own take seconds)


class _TimedOut(BaseException):
    """A learner's call ran past TIME_LIMIT_S (a BaseException, so that `except Exception` in a loop cannot
    swallow it)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


@contextmanager
def _time_limit(fn):
    """Stop the block with _TimedOut after TIME_LIMIT_S seconds: a SIGALRM timer, where there is one to take
    (the main thread, a platform with SIGALRM, no timer already running for someone else)."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return
    name = getattr(getattr(fn, "fn", fn), "__name__", "your function")

    def stop(signum, frame):
        raise _TimedOut(name)

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _NotImplemented(Exception):
    """A learner's stub raised NotImplementedError: its message, or which function still has a TODO."""

    def __init__(self, err: NotImplementedError, name: str):
        super().__init__(str(err).strip() or f"fill in the TODO in {name}")


def _call(fn, *args):
    try:
        with _time_limit(fn):
            return fn(*args)
    except NotImplementedError as err:
        raise _NotImplemented(err, getattr(fn, "__name__", "your function"))


def _run(name, body):
    """Run a checker body; print the one line (and hint) it ends with; True on success."""
    try:
        ok_line = body()
    except _NotImplemented as err:
        message = str(err)
        print(f"{name}: not implemented yet: {message}")
        return False
    except _Fail as fail:
        print(f"{name}: {fail.line}")
        if fail.hint:
            print(f"  hint: {fail.hint}")
        return False
    except _TimedOut as stopped:
        print(f"{name}: stopped after {TIME_LIMIT_S} s: {stopped.name} never returned (an endless loop?); "
              "qlora_ref.checks.TIME_LIMIT_S sets the limit")
        return False
    print(f"{name}: OK — {ok_line}")
    return True


# ---------------------------------------------------------------------------------------------- comparisons


def _number(value, what):
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise _Fail(
                f"{what} should be one number (per tensor), got a tensor of shape {list(value.shape)}",
                "one scale for the whole tensor: reduce over all values (x.abs().max(), x.min(), x.max())",
            )
        return float(value.reshape(-1)[0])
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _Fail(f"{what} should be a number or a one-element tensor, got {type(value).__name__}")


def _tensor(value, what):
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception:
            raise _Fail(f"{what} should be a tensor, got {type(value).__name__}")
    return value.detach().cpu()


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == int(v) and abs(v) < 1e6:
            return f"{v:.1f}"
        return f"{v:.9g}"
    return str(v)


def _first_mismatch(expected, got, exact=True, rtol=1e-6):
    """None, or (count, index, expected value, got value) of the first differing element (flat order)."""
    e = expected.reshape(-1)
    g = got.reshape(-1)
    if e.is_floating_point() or g.is_floating_point():
        e, g = e.double(), g.double()
        if exact:
            differ = ~(e == g)
        else:
            differ = ~torch.isclose(g, e, rtol=rtol, atol=0.0)
    else:
        differ = e.long() != g.long()
    if not bool(differ.any()):
        return None
    idx = int(differ.nonzero()[0])
    ev, gv = e[idx].item(), g[idx].item()
    return int(differ.sum()), idx, ev, gv


def _expected_got(expected, got) -> str:
    """"expected X, got Y": whole numbers as _fmt writes them, other floats with just enough digits to tell the
    two apart (compare.distinguish), since the digits beyond those change from CPU to CPU."""
    texts = [_fmt(expected), _fmt(got)]
    if all(isinstance(v, float) and not math.isnan(v) for v in (expected, got)):
        short = distinguish(expected, got)
        texts = [text if "." in text and text.endswith(".0") else fine for text, fine in zip(texts, short)]
    return f"expected {texts[0]}, got {texts[1]}"


def _mismatch_line(what, case, found, n):
    count, idx, ev, gv = found
    return f"MISMATCH in {what} ({case}): {count:,} of {n:,} differ, first at index {idx}: {_expected_got(ev, gv)}"


# ---------------------------------------------------------------------------------------------- lesson 1


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
    from .linear import quantize_absmax

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
    from .linear import quantize_zeropoint

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


# ---------------------------------------------------------------------------------------------- lesson 2


def _bnb_nf4_table():
    """bitsandbytes' NF4 table (float32, CPU), or None when bitsandbytes is not installed."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or it fails to load: check against qlora_ref only
        return None
    return bnbF.get_4bit_type("nf4", device="cpu").float()


def _nf4_float64(offset):
    """The NF4 formula evaluated in float64 throughout (NOT bitsandbytes' table: used to recognise it)."""
    import numpy as np
    from scipy.stats import norm

    levels = np.concatenate([norm.ppf(np.linspace(offset, 0.5, 9)[:-1]), -norm.ppf(np.linspace(offset, 0.5, 8)[:-1]), [0.0]])
    levels = np.sort(levels)
    return torch.tensor(levels / levels.max(), dtype=torch.float32)


def _bits_differ(expected, got):
    """Indices where the float32 bit patterns differ (so -0.0 is not 0.0)."""
    return (expected.view(torch.int32) != got.view(torch.int32)).nonzero().reshape(-1)


def check_nf4_codebook(nf4_codebook) -> bool:
    """Check `nf4_codebook(offset) -> 16 float32 levels` bit for bit: against bitsandbytes' NF4 table
    (get_4bit_type("nf4"), when bitsandbytes is installed) and qlora_ref.nf4_codebook at offset 0.9677083,
    and against qlora_ref.nf4_codebook at offset 0.99. Prints one line; True on success."""
    from .codebooks import NF4_OFFSET
    from .codebooks import nf4_codebook as reference

    def one(offset, expected, source):
        got = _tensor(_call(nf4_codebook, offset), "the codebook")
        label = f"offset {offset}"
        if got.numel() != 16:
            hint = "NF4 has 16 levels: 8 positive, 7 negative and an exact 0 (linspace(offset, 0.5, 9)[:-1] and linspace(offset, 0.5, 8)[:-1])"
            raise _Fail(f"expected 16 levels, got {got.numel()} ({label})", hint)
        got = got.reshape(-1)
        if got.dtype != torch.float32:
            raise _Fail(f"expected float32 levels, got {got.dtype} ({label})",
                        "bitsandbytes' table is float32: torch.tensor(levels, dtype=torch.float32) before dividing by the max")
        differ = _bits_differ(expected, got)
        if differ.numel() == 0:
            return
        idx = int(differ[0])
        line = (f"MISMATCH with {source} ({label}): {differ.numel()} of 16 levels differ, first at index {idx}: "
                f"expected {float(expected[idx]):.9g}, got {float(got[idx]):.9g}")
        if not bool((got[1:] >= got[:-1]).all()):
            hint = "sort the levels ascending: code 0 is -1.0, code 7 is 0.0, code 15 is 1.0"
        elif float(got.max()) != 1.0 or float(got.min()) != -1.0:
            hint = "normalise: divide every level by the largest one (so they span [-1, 1])"
        elif _bits_differ(_nf4_float64(offset), got).numel() == 0:
            hint = ("this is the float64 derivation, which differs from bitsandbytes' table in a few float32 steps: "
                    "take the probabilities as float32 (torch.linspace(offset, 0.5, 9)), apply norm.ppf, "
                    "convert to float32, sort, then divide by the max in float32")
        elif bool(torch.allclose(got, expected, rtol=0, atol=1e-6)):
            hint = ("close but not bit for bit: probabilities from torch.linspace (float32), norm.ppf (float64), "
                    "then a float32 tensor divided by its max in float32")
        else:
            hint = ("positives: norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]), negatives: -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1]), "
                    "plus 0; sort and divide by the max")
        raise _Fail(line, hint)

    def body():
        table = _bnb_nf4_table()
        if table is not None:
            one(NF4_OFFSET, table, "bitsandbytes' table")
        else:
            one(NF4_OFFSET, reference(NF4_OFFSET), "qlora_ref.nf4_codebook")
        one(0.99, reference(0.99), "qlora_ref.nf4_codebook")
        if table is None:
            return "equal to qlora_ref.nf4_codebook, bit for bit (bitsandbytes is not installed: not compared with it)"
        return "equal to bitsandbytes' table, bit for bit (and to qlora_ref at offset 0.99)"

    return _run("check_nf4_codebook", body)


# ---------------------------------------------------------------------------------------------- lesson 3


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
    from .blockwise import dequantize_codes, unpack_4bit
    from .codebooks import nf4_codebook
    from .fourbit import quantize_4bit as reference

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


# ---------------------------------------------------------------------------------------------- lesson 4


def _double_quant_cases():
    """(label, the float32 absmax of a real 4-bit state, the weight it came from): 4, 1 and 4 nested blocks."""
    from .fourbit import quantize_4bit

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
    from .blockwise import scale_to_unit

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
    from .codebooks import dynamic_map
    from .double_quant import NESTED_BLOCKSIZE, compress_absmax, decompress_absmax

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


# ---------------------------------------------------------------------------------------------- lesson 5


def _kernel_cases():
    """(label, x, quant_type, blocksize, TILE): odd counts, short last blocks, several programs, fp16 output."""
    g = torch.Generator().manual_seed(0)
    return [
        ("99 float32 values, NF4, blocks of 32, TILE 16 (4 programs)", torch.randn(99, generator=g), "nf4", 32, 16),
        ("1,000 float16 values, NF4, blocks of 64, TILE 64 (a short last block)",
         torch.randn(1000, generator=g).half(), "nf4", 64, 64),
        ("a 24x40 float32 matrix, FP4, blocks of 128, TILE 32", torch.randn(24, 40, generator=g) * 0.02, "fp4", 128, 32),
        ("333 float16 values, NF4, blocks of 64, TILE 256 (one program)", torch.randn(333, generator=g).half(), "nf4", 64, 256),
    ]


def _interpreted(kernel):
    """`kernel` as Triton's interpreter runs it (what @triton.jit gives under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if not isinstance(kernel, JITFunction):
        raise _Fail(f"expected a Triton kernel, got {type(kernel).__name__}", "decorate the kernel with @triton.jit")
    return InterpretedFunction(kernel.fn)


def _launch_guarded(kernel, packed, absmax, code, n, blocksize, dtype, tile):
    """Run the kernel in Triton's interpreter on CPU tensors with NaN past the end of the output (to see
    stores out of bounds) and spare bytes past the end of the inputs (so that an unmasked load reads
    memory that exists). Returns the output buffer, guard included."""
    from triton.runtime.errors import InterpreterError

    guard = 2 * tile
    n_bytes = (n + 1) // 2
    packed_buf = torch.cat([packed.reshape(-1), torch.full((guard,), 0xFF, dtype=torch.uint8)])
    absmax_buf = torch.cat([absmax.reshape(-1).float(), torch.zeros(guard)])
    out = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    grid = ((n_bytes + tile - 1) // tile,)
    try:
        with _time_limit(kernel):
            _interpreted(kernel)[grid](packed_buf, absmax_buf, code.float(), out, n, BLOCKSIZE=blocksize, TILE=tile)
    except InterpreterError as err:
        cause = err.__cause__
        if isinstance(cause, NotImplementedError):
            name = getattr(getattr(kernel, "fn", kernel), "__name__", "your kernel")
            raise _NotImplemented(cause, name)
        if isinstance(cause, RuntimeError) and "outside of the scope of a kernel" in str(cause):
            raise _Fail("your kernel calls another @triton.jit function, which this checker cannot interpret",
                        "write the steps inline in the kernel (or define everything after setting TRITON_INTERPRET=1, as lesson 5 does)")
        raise
    return out


def launch_dequantize_kernel(kernel, packed, state, tile: int = 64) -> torch.Tensor:
    """Run a learner's 4-bit dequantize kernel on a qlora_ref state, in Triton's interpreter on the CPU.

    The launch: grid = (cdiv((n + 1) // 2, tile),), kernel[grid](packed, state.absmax, state.code, out, n,
    BLOCKSIZE=state.blocksize, TILE=tile), out of state.dtype; returns out in state.shape.
    """
    if state.nested:
        raise ValueError("the exercise kernel takes a plain state: quantize with double_quant=False")
    n = state.numel
    out = _launch_guarded(kernel, packed.cpu(), state.absmax.cpu(), state.code.cpu(), n, state.blocksize, state.dtype, tile)
    return out[:n].reshape(state.shape)


def _bnb_dequantize_4bit(x, quant_type, blocksize):
    """bitsandbytes' (packed, dequantized values) for x, or None when bitsandbytes is not installed. The values
    come from its portable decoder, the same on every CPU (its native one depends on the CPU: qlora_ref.bnb_cpu)."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:
        return None
    from .bnb_cpu import dequantize_4bit_portable

    packed, state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return packed, dequantize_4bit_portable(packed, state)


def check_dequantize_kernel(kernel) -> bool:
    """Check a Triton 4-bit dequantize kernel (lesson 5) against qlora_ref.dequantize_4bit and bitsandbytes.

    kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr), launched
    on grid (cdiv((n + 1) // 2, TILE),): program p turns packed bytes p*TILE .. p*TILE + TILE - 1 into values,
    out[2j] = code[byte_j >> 4] * absmax[2j // BLOCKSIZE] and out[2j + 1] = code[byte_j & 0xF] * absmax[...],
    multiplied in float32 and stored in out's dtype (float32 or float16), nothing stored at or past out[n].
    It runs in Triton's interpreter on CPU tensors (any machine, no GPU) on four inputs: odd counts, short
    last blocks, NF4 and FP4. The values must equal qlora_ref's bit for bit, and bitsandbytes' portable
    decoder's where it is installed. Prints one line; True on success.
    """
    from .blockwise import unpack_4bit
    from .fourbit import dequantize_4bit, quantize_4bit

    def body():
        bnb_seen = False
        for case, x, quant_type, blocksize, tile in _kernel_cases():
            n = x.numel()
            packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            expected = dequantize_4bit(packed, state).reshape(-1)
            out = _launch_guarded(kernel, packed, state.absmax, state.code, n, blocksize, x.dtype, tile)

            past = out[n:]
            if not bool(past.isnan().all()):
                first = n + int((~past.isnan()).nonzero()[0])
                raise _Fail(f"the kernel stored past the end ({case}): value index {first} of a tensor of {n}",
                            "mask the stores: 2*offs < n for the even values and 2*offs + 1 < n for the odd ones "
                            "(an odd n has no last odd value)")
            got = out[:n]
            unwritten = got.isnan()
            if bool(unwritten.any()):
                first = int(unwritten.nonzero()[0])
                hint = "store every value: the even one at out_ptr + 2*offs, the odd one at out_ptr + 2*offs + 1"
                if first >= 2 * tile:
                    hint = f"each program owns its own bytes: offs = tl.program_id(0) * TILE + tl.arange(0, TILE) (value {first} is in program {first // (2 * tile)})"
                raise _Fail(f"{int(unwritten.sum()):,} of {n:,} values were never stored ({case}), first at index {first}", hint)

            references = [("qlora_ref.dequantize_4bit", expected)]
            bnb = _bnb_dequantize_4bit(x, quant_type, blocksize)
            if bnb is not None and torch.equal(bnb[0], packed):  # the same bytes: its values are a second reference
                bnb_seen = True
                references.append(("bitsandbytes' portable dequantize_4bit", bnb[1].reshape(-1)))
            found = None
            for reference, values in references:
                found = _first_mismatch(values, got)
                if found:
                    break
            if found:
                codes = unpack_4bit(packed, n + n % 2)
                per_value = state.absmax.repeat_interleave(blocksize)[:n]
                code = state.code
                swapped = torch.stack([codes[1::2], codes[0::2]], dim=1).reshape(-1)[:n]
                # the block of byte j taken as j // BLOCKSIZE instead of 2j // BLOCKSIZE
                block_of_byte = state.absmax.repeat_interleave(blocksize)[: (n + 1) // 2].repeat_interleave(2)[:n]
                candidates = [
                    (code[swapped] * per_value,
                     "nibble order: the high nibble (byte >> 4) is the even value 2j, the low nibble (byte & 0xF) the odd one"),
                    (codes[:n].float() * per_value,
                     "the nibble is an index into the table: tl.load(code_ptr + nibble), not the nibble itself"),
                    (code[codes[:n]] * block_of_byte,
                     "byte j holds values 2j and 2j + 1: its block is (2 * offs) // BLOCKSIZE, not offs // BLOCKSIZE"),
                    (code[codes[:n]].to(x.dtype) * per_value.to(x.dtype),
                     "multiply in float32 (code and absmax are float32) and convert once, when storing"),
                ]
                hint = ("out[2j] = code[byte_j >> 4] * absmax[2j // BLOCKSIZE], out[2j + 1] = code[byte_j & 0xF] * the same "
                        "absmax, in float32")
                for candidate, candidate_hint in candidates:
                    if torch.equal(candidate.to(x.dtype).float(), got.float()):
                        hint = candidate_hint
                        break
                raise _Fail(_mismatch_line(f"the values vs {reference}", case, found, n), hint)
        versus = "qlora_ref.dequantize_4bit and bitsandbytes' portable dequantize_4bit" if bnb_seen else "qlora_ref.dequantize_4bit"
        return f"equal to {versus}, exactly (4 cases: odd counts, short last blocks, NF4 and FP4, float32 and float16)"

    return _run("check_dequantize_kernel", body)


# ---------------------------------------------------------------------------------------------- lesson 6


def _qlora_backward_cases():
    """(case, grad_out, packed, state, x, A, B, scaling): fixed, seeded; leading dimensions of 1, 2 and 3."""
    from .fourbit import quantize_4bit

    g = torch.Generator().manual_seed(0)
    specs = [  # label, x's shape, out_features, r, alpha, double_quant
        ("x [7, 48], W0 [40, 48], r=4, scaling 4.0", (7, 48), 40, 4, 16, False),
        ("x [2, 5, 64], W0 [33, 64], r=8, scaling 0.5", (2, 5, 64), 33, 8, 4, True),
        ("x [3, 1, 2, 20], W0 [24, 20], r=1, scaling 16.0", (3, 1, 2, 20), 24, 1, 16, True),
    ]
    cases = []
    for label, x_shape, out_features, r, alpha, double_quant in specs:
        in_features = x_shape[-1]
        packed, state = quantize_4bit(torch.randn(out_features, in_features, generator=g) * 0.1, blocksize=64,
                                      double_quant=double_quant)
        x = torch.randn(x_shape, generator=g)
        A = torch.randn(r, in_features, generator=g) / math.sqrt(in_features)
        B = torch.randn(out_features, r, generator=g) * 0.1  # not zero as at init: B = 0 would give dL/dA = 0
        grad_out = torch.randn(*x_shape[:-1], out_features, generator=g)
        cases.append((label, grad_out, packed, state, x, A, B, alpha / r))
    return cases


def _dense_lora_grads(grad_out, weight, x, A, B, scaling):
    """dL/dx, dL/dA, dL/dB by autograd through y = x W^T + s · (x A^T) B^T, W dense and frozen."""
    x, A, B = (t.clone().requires_grad_(True) for t in (x, A, B))
    y = x @ weight.t() + scaling * ((x @ A.t()) @ B.t())
    y.backward(grad_out)
    return x.grad, A.grad, B.grad


# float32 products summed in another order differ by a few ulps of the largest term (tens of terms here).
BACKWARD_RTOL = 1e-5


def _close(expected, got):
    """Elementwise |got - expected| <= 1e-5 · |expected| + 1e-5 · max|expected|."""
    tol = BACKWARD_RTOL * (expected.abs() + expected.abs().max())
    return (got.double() - expected.double()).abs() <= tol.double()


def _gradient_shape_hint(name, got_shape, expected_shape, x_shape):
    if got_shape[-2:] == expected_shape and len(got_shape) > 2:
        return ("sum over every leading dimension of x: flatten g and x to [tokens, features] "
                "(reshape(-1, features)) before the product, so the tokens are summed")
    if tuple(reversed(got_shape)) == tuple(expected_shape):
        return f"{name} has the shape of the parameter ({list(expected_shape)}): you built its transpose"
    if name == "dL/dx":
        return f"dL/dx has x's shape {list(x_shape)}: reshape it back (grad.reshape(x.shape))"
    return f"{name} has the shape of the parameter, {list(expected_shape)}"


def check_qlora_backward(backward) -> bool:
    """Check the backward of the QLoRA layer (lesson 6) against autograd through the dense layer.

    backward(grad_out, packed, state, x, A, B, scaling) -> (dL/dx, dL/dA, dL/dB) for y = x W0^T + s x A^T B^T,
    W0 = dequantize_4bit(packed, state) frozen (no gradient), no dropout:
        dL/dx = g W0 + s (g B) A,   dL/dA = s (g B)^T x,   dL/dB = s g^T (x A^T)
    with g = grad_out and every leading dimension of x summed. Three cases in float32 on the CPU, x of shapes
    [7, 48], [2, 5, 64] and [3, 1, 2, 20]; each gradient must be within 1e-5 · (|expected| + max|expected|) of
    autograd's (the same products summed in another order round differently). Prints one line; True on success.
    """
    from .fourbit import dequantize_4bit

    def body():
        for case, grad_out, packed, state, x, A, B, scaling in _qlora_backward_cases():
            weight = dequantize_4bit(packed, state)
            expected = _dense_lora_grads(grad_out, weight, x, A, B, scaling)
            result = _call(backward, grad_out.clone(), packed, state, x.clone(), A.clone(), B.clone(), scaling)
            if not isinstance(result, (tuple, list)) or len(result) != 3:
                count = len(result) if isinstance(result, (tuple, list)) else 1
                hint = "return three tensors: grad_x, grad_A, grad_B"
                if count == 4:
                    hint = ("W0 is frozen: it gets no gradient (only its codes are stored, and nothing would use one); "
                            "return (grad_x, grad_A, grad_B) only")
                raise _Fail(f"backward should return (dL/dx, dL/dA, dL/dB), got {count} value(s) ({case})", hint)
            gB = grad_out.reshape(-1, grad_out.shape[-1]) @ B
            for name, exp, got in zip(("dL/dx", "dL/dA", "dL/dB"), expected, result):
                if got is None:
                    raise _Fail(f"{name} is None ({case})", f"return a tensor of shape {list(exp.shape)}")
                got = _tensor(got, name).float()
                if tuple(got.shape) != tuple(exp.shape):
                    raise _Fail(f"{name} has shape {list(got.shape)}, expected {list(exp.shape)} ({case})",
                                _gradient_shape_hint(name, tuple(got.shape), tuple(exp.shape), tuple(x.shape)))
                close = _close(exp, got)
                if bool(close.all()):
                    continue
                differ = ~close.reshape(-1)
                idx = int(differ.nonzero()[0])
                line = (f"MISMATCH in {name} ({case}): {int(differ.sum()):,} of {exp.numel():,} differ, first at "
                        f"index {idx}: {_expected_got(exp.reshape(-1)[idx].item(), got.reshape(-1)[idx].item())}")
                if name == "dL/dx":
                    base_path = grad_out @ weight
                    lora_path = (gB @ A).reshape(x.shape)
                    candidates = [
                        (base_path, "the adapters' path is missing: dL/dx = g W0 + s (g B) A"),
                        (scaling * lora_path, "the base's path is missing: W0 is frozen, but it still passes the "
                                              "gradient on to x: dL/dx = g W0 + s (g B) A"),
                        (base_path + lora_path, "forgot the scaling on the adapters' path: + s (g B) A"),
                    ]
                else:
                    candidates = [
                        (exp / scaling, f"forgot the scaling: {name} = s · ({'(g B)^T x' if name == 'dL/dA' else 'g^T (x A^T)'}) with s = alpha/r"),
                        (exp * scaling, "the scaling is applied twice"),
                    ]
                hint = "dL/dx = g W0 + s (g B) A, dL/dA = s (g B)^T x, dL/dB = s g^T (x A^T), x and g flattened to [tokens, features]"
                for candidate, candidate_hint in candidates:
                    if bool(_close(candidate, got).all()):
                        hint = candidate_hint
                        break
                raise _Fail(line, hint)
        return ("dL/dx, dL/dA and dL/dB match autograd through the dense layer within 1e-5 "
                "(3 cases: x [7, 48], [2, 5, 64], [3, 1, 2, 20])")

    return _run("check_qlora_backward", body)


# ---------------------------------------------------------------------------------------------- lesson 7


def _adamw_cases():
    """(case, hyperparameters, p, [5 gradients]): large lr · weight_decay and eps where their mistakes show."""
    g = torch.Generator().manual_seed(0)
    specs = [  # label, shape, hyperparameters, gradient scale
        ("lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.5, 1,000 values", (1000,),
         dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5), 1.0),
        ("lr 1e-3, betas (0.8, 0.99), eps 1e-3, weight_decay 0, [7, 13], gradients ~1e-3", (7, 13),
         dict(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-3, weight_decay=0.0), 1e-3),
        ("lr 0.05, betas (0.5, 0.9), eps 1e-6, weight_decay 0.1, [3, 33]", (3, 33),
         dict(lr=0.05, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.1), 10.0),
    ]
    cases = []
    for label, shape, hyper, grad_scale in specs:
        p = torch.randn(shape, generator=g)
        grads = [torch.randn(shape, generator=g) * grad_scale for _ in range(5)]
        cases.append((label, hyper, p, grads))
    return cases


def _adamw_variants(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """(p, hint) for the usual mistakes, each computed from the state before the step (m, v: after it)."""
    c1 = 1 - beta1**step
    c2 = math.sqrt(1 - beta2**step)
    step_size, decay = -lr * c2 / c1, 1 - lr * weight_decay
    return [
        ((p * decay + step_size * m / (v.sqrt() + eps * c2)),
         "weight decay applied before the step: bitsandbytes' CUDA kernel decays after: "
         "p = p + step_size · m / (sqrt(v) + eps·c2), then p = p · (1 - lr·weight_decay)"),
        ((p - lr * m / (v.sqrt() + eps)) * decay,
         "bias correction missing: step_size = -lr · c2 / c1 with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step)"),
        ((p + step_size * m / (v.sqrt() + eps)) * decay,
         "eps added outside the sqrt term scaled by c2: with the bias corrections folded into the step size the "
         "denominator is sqrt(v) + eps·c2 (that is c2 · (sqrt(v̂) + eps))"),
        ((p + step_size * m / (v.sqrt() + eps * c2)) * (1 - weight_decay),
         "the decoupled decay is p · (1 - lr·weight_decay): lr times weight_decay, not weight_decay alone"),
        ((p + step_size * m / (v.sqrt() + eps * c2)),
         "weight decay missing: after the step, p = p · (1 - lr·weight_decay)"),
        ((p + step_size * m / (v + eps * c2)) * decay,
         "the denominator is sqrt(v) + eps·c2: the square root of the second moment"),
    ]


def _moment_hint(which, got, m_old, v_old, g, p, beta1, beta2, weight_decay):
    beta, old = (beta1, m_old) if which == "m" else (beta2, v_old)
    term = g if which == "m" else g * g
    in_place = ("update m, v and p in place (m.mul_(beta1).add_(...), p.copy_(...)): `m = ...` inside the "
                "function makes a new tensor that the caller never sees")
    if torch.equal(got, old) and not torch.equal(old, beta * old + (1 - beta) * term):
        return in_place
    candidates = [
        ((1 - beta) * old + beta * term, f"{which} = beta · {which} + (1 - beta) · {'g' if which == 'm' else 'g²'}: "
                                        f"beta multiplies the old moment"),
        (beta * old + (1 - beta) * (g if which == "v" else g * g),
         "m averages g, v averages g² (the squared gradient)"),
    ]
    if weight_decay > 0:
        g_l2 = g + weight_decay * p
        candidates.append((beta * old + (1 - beta) * (g_l2 if which == "m" else g_l2 * g_l2),
                           "that is Adam with L2 regularisation (weight_decay · p added to the gradient); AdamW "
                           "decouples it: the moments see g alone, and p · (1 - lr·weight_decay) comes after the step"))
    for candidate, hint in candidates:
        if bool(torch.isclose(got, candidate, rtol=1e-5, atol=1e-30).all()):
            return hint
    return f"{which} = beta{1 if which == 'm' else 2} · {which} + (1 - beta{1 if which == 'm' else 2}) · {'g' if which == 'm' else 'g²'}"


def check_adamw_update(update) -> bool:
    """Check one AdamW step in bitsandbytes' kernel order (lesson 7) against qlora_ref.optim8bit.adamw_update_.

    update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay) updates the float32 tensors p, m and v in
    place (it returns nothing):
        v = beta2 · v + (1 - beta2) · g²,   m = beta1 · m + (1 - beta1) · g
        p = p + step_size · m / (sqrt(v) + eps · c2),   step_size = -lr · c2 / c1
        p = p · (1 - lr · weight_decay)                               (decoupled weight decay, after the step)
    with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step). Three cases of five steps each (steps 1-5), each step
    started from the reference's state. Tolerances (float32 roundings in another order): m within
    1e-6 · (|m_old| + |g|), v within 1e-6 · v, p within 1e-5 · |the reference's change of p| + 1e-6 · |p|.
    Prints one line (with how many values of p were equal bit for bit); True on success.
    """
    from .optim8bit import adamw_update_

    def body():
        exact = total = 0
        for case, hyper, p0, grads in _adamw_cases():
            p_ref, m_ref, v_ref = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
            for step, g in enumerate(grads, start=1):
                label = f"step {step}, {case}"
                p_old, m_old, v_old = p_ref.clone(), m_ref.clone(), v_ref.clone()
                p, m, v = p_old.clone(), m_old.clone(), v_old.clone()
                _call(update, p, g.clone(), m, v, step, hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                      hyper["weight_decay"])
                adamw_update_(p_ref, g, m_ref, v_ref, step, **hyper)
                n = p.numel()
                m_tol = 1e-6 * (m_old.abs() + g.abs())
                v_tol = 1e-6 * v_ref
                p_tol = 1e-5 * (p_ref - p_old).abs() + 1e-6 * p_ref.abs()
                for which, got, exp, tol in (("m", m, m_ref, m_tol), ("v", v, v_ref, v_tol), ("p", p, p_ref, p_tol)):
                    differ = ((got.double() - exp.double()).abs() > tol.double()).reshape(-1)
                    if not bool(differ.any()):
                        continue
                    idx = int(differ.nonzero()[0])
                    line = (f"MISMATCH in {which} ({label}): {int(differ.sum()):,} of {n:,} differ, first at index "
                            f"{idx}: {_expected_got(exp.reshape(-1)[idx].item(), got.reshape(-1)[idx].item())}")
                    if which != "p":
                        hint = _moment_hint(which, got, m_old, v_old, g, p_old, hyper["beta1"], hyper["beta2"],
                                            hyper["weight_decay"])
                    elif torch.equal(got, p_old):
                        hint = "p did not change: update it in place (p.add_(...), p.mul_(...) or p.copy_(...))"
                    else:
                        hint = ("p = p + step_size · m / (sqrt(v) + eps·c2) with the new m and v, then "
                                "p · (1 - lr·weight_decay)")
                        for candidate, candidate_hint in _adamw_variants(p_old, g, m_ref, v_ref, step, **hyper):
                            if bool(((got.double() - candidate.double()).abs() <= p_tol.double()).all()):
                                hint = candidate_hint
                                break
                    raise _Fail(line, hint)
                exact += int((p == p_ref).sum())
                total += n
        return (f"p, m and v match qlora_ref's adamw_update_ (3 cases, steps 1-5; "
                f"{exact:,} of {total:,} values of p equal bit for bit)")

    return _run("check_adamw_update", body)


# ---------------------------------------------------------------------------------------------- lesson 7: the pager


def _pager_cases():
    """(case, budget, {page: bytes}, [pages fetched, in order]): one by hand, then four seeded ones. Each has a
    page of 0 bytes and one of the whole budget, and fetches pages that are already on the device."""
    cases = [(
        "by hand, budget 100", 100, {"a": 40, "b": 30, "c": 30, "d": 50, "zero": 0, "whole": 100},
        ["a", "b", "c", "a", "d", "zero", "whole", "zero", "a", "a", "c", "b", "zero", "d", "b"],
    )]
    for seed, budget in enumerate((1000, 777, 4099, 64)):
        rng = random.Random(seed)
        sizes = {f"p{i}": rng.randint(1, budget // 2) for i in range(rng.randint(5, 8))}
        sizes.update(zero=0, whole=budget, almost=budget - 1)
        names = list(sizes)
        weights = [1.0] * (len(names) - 2) + [0.2, 0.2]  # the two large pages, rarely: each empties the device
        fetches = []
        for _ in range(60):
            recent = fetches[-3:]  # some locality, so that pages are fetched again while on the device
            fetches.append(rng.choice(recent) if recent and rng.random() < 0.3 else rng.choices(names, weights)[0])
        for name in ("whole", "zero"):  # each at least once, somewhere after the first ten fetches
            fetches.insert(rng.randrange(10, len(fetches)), name)
        cases.append((f"seed {seed}, budget {budget}, {len(sizes)} pages", budget, sizes, fetches))
    return cases


_EVENT_HINT = ('record each move as a tuple (direction, name, resident_bytes after it): self.events.append(("out", '
               'victim, self.resident_bytes)) after an eviction, ("in", name, self.resident_bytes) after a fetch')


def _learner_events(pager):
    """pager.events as a list of (str, name, int) tuples, or _Fail naming what is wrong with it."""
    events = getattr(pager, "events", None)
    if not isinstance(events, list):
        raise _Fail(f"the pager's `events` should be a list, got {type(events).__name__}", _EVENT_HINT)
    normalised = []
    for event in events:
        if not isinstance(event, (tuple, list)) or len(event) != 3 or event[0] not in ("in", "out"):
            raise _Fail(f"an event should be a tuple (\"in\" or \"out\", name, resident bytes), got {event!r}",
                        _EVENT_HINT)
        try:
            normalised.append((event[0], event[1], int(event[2])))
        except (TypeError, ValueError):
            raise _Fail(f"an event's third field should be the resident bytes (an int), got {event!r}", _EVENT_HINT)
    return normalised


def _pager_hint(name, expected, got, budget, sizes, last_used, loaded):
    """The likeliest mistake behind one fetch's wrong events. `last_used` and `loaded` (when each page was last
    fetched, and last brought in) hold the pages on the device before this fetch."""
    over = [event for event in got if event[2] > budget]
    if over:
        return (f"the device would hold {over[0][2]:,} bytes, more than the budget of {budget:,}: keep evicting "
                "while resident_bytes + nbytes > budget_bytes (a while loop: one eviction may not make room)")
    if not expected:
        return (f"{name!r} is already on the device (a hit): no bytes move and nothing is recorded; only make it "
                "the most recently used (self.resident.move_to_end(name))")
    if not got:
        return f"{name!r} is not on the device: bring it in (evicting first if it does not fit) and record (\"in\", ...)"
    expected_out = [event[1] for event in expected if event[0] == "out"]
    got_out = [event[1] for event in got if event[0] == "out"]
    if got_out != expected_out:
        least_recent_first = sorted(last_used, key=last_used.get)
        n = len(got_out)
        if got_out == least_recent_first[:n] and n > len(expected_out):
            return ("you evicted more pages than needed: stop as soon as resident_bytes + nbytes <= budget_bytes "
                    "(a page that fills the budget exactly fits)")
        if got_out == least_recent_first[:n]:
            return "too few pages evicted: keep evicting while resident_bytes + nbytes > budget_bytes"
        if name in got_out:
            return f"you evicted {name!r}, the page being fetched: evict among the other pages on the device"
        stranger = next((page for page in got_out if page not in last_used), None)
        if stranger is not None:
            return f"{stranger!r} is not on the device: evict only pages that are"
        if got_out == sorted(last_used, key=loaded.get)[:n]:
            return ("you evicted the pages that came in longest ago (first in, first out); LRU evicts the page "
                    f"*used* longest ago, {expected_out[0]!r} first: a fetch of a page already on the device must "
                    "make it the most recently used (move_to_end)")
        if got_out == least_recent_first[::-1][:n]:
            return ("you evicted the most recently used page first: evict from the least recently used end "
                    "(self.resident.popitem(last=False) when the most recent is kept at the end)")
        if got_out == [page for page in least_recent_first if sizes[page]][:n]:
            return ("a page of 0 bytes is evicted like any other when it is the least recently used (though it "
                    "frees nothing): LRU order alone decides")
        return "evict the least recently used page first: the resident page whose last fetch is the oldest"
    if [event[:2] for event in got] != [event[:2] for event in expected]:
        return "evict first, then bring the page in: its (\"in\", ...) event comes after the (\"out\", ...) ones"
    return ("the third field is the bytes on the device after the move: subtract the page's bytes when it goes out, "
            "add them when it comes in")


def _device_state(sizes, last_used, budget):
    """The pages on the device (the keys of last_used), least recently used first, and their bytes."""
    if not last_used:
        return "the device empty"
    pages = ", ".join(f"{page} ({sizes[page]:,})" for page in sorted(last_used, key=last_used.get))
    used = sum(sizes[page] for page in last_used)
    return f"the device holding {pages} (least recently used first; {used:,} of {budget:,} bytes)"


def _add_page(pager, name, nbytes, budget):
    try:
        _call(pager.add, name, nbytes)
    except ValueError as err:
        raise _Fail(f"add({name!r}, {nbytes:,}) with a budget of {budget:,} bytes raised ValueError: {err}",
                    "refuse only a page larger than the whole budget (nbytes > budget_bytes): a page of 0 bytes, "
                    "or of exactly the budget, fits once the other pages are evicted")


def _refuses_a_page_larger_than_the_budget(pager_class):
    budget = 100
    pager = _call(pager_class, budget)
    hint = ("a page larger than the whole budget could never be on the device (evicting every other page does not "
            "make room): in add, if nbytes > self.budget_bytes: raise ValueError(...) saying so")
    try:
        _call(pager.add, "huge", budget + 1)
    except _NotImplemented:
        raise
    except ValueError:
        return
    except Exception as err:
        raise _Fail(f"add('huge', {budget + 1}) with a budget of {budget} bytes raised {type(err).__name__} ({err}), "
                    "expected a ValueError", hint)
    raise _Fail(f"add('huge', {budget + 1}) with a budget of {budget} bytes was accepted", hint)


def check_pager(pager_class) -> bool:
    """Check an LRU pager (lesson 7) against the bookkeeping of qlora_ref.pager.Pager, event for event.

    pager_class(budget_bytes) has add(name, nbytes), fetch(name) and a list `events`; fetching a page that is
    not on the device evicts the least recently used pages while resident + nbytes > budget, recording
    ("out", page, resident bytes after) for each, then brings it in: ("in", name, resident bytes after). A
    fetch of a page on the device records nothing and makes it the most recently used. Five sequences of
    fetches (one by hand, four seeded: budgets 1000, 777, 4099 and 64 bytes), with pages of 0 bytes and of
    the whole budget; then add must refuse (ValueError) a page larger than the budget. Prints one line (the
    first fetch whose events differ, the device before it, expected vs got events, and a hint); True on success.
    """
    from .pager import Pager

    def body():
        fetches = hits = evictions = 0
        cases = _pager_cases()
        for case, budget, sizes, sequence in cases:
            reference, pager = Pager(budget), _call(pager_class, budget)
            for name, nbytes in sizes.items():
                reference.add(name, {"bytes": torch.empty(nbytes, dtype=torch.uint8)})
                _add_page(pager, name, nbytes, budget)
            last_used, loaded = {}, {}  # of the pages on the device: when each was last fetched, last brought in
            for i, name in enumerate(sequence):
                seen_reference, seen = len(reference.events), len(_learner_events(pager))
                reference.fetch(name)
                _call(pager.fetch, name)
                expected = [(e.direction, e.page, e.resident_after) for e in reference.events[seen_reference:]]
                got = _learner_events(pager)[seen:]
                if got != expected:
                    raise _Fail(
                        f"MISMATCH at fetch {i + 1} of {len(sequence)} ({case}): fetch({name!r}) with "
                        f"{_device_state(sizes, last_used, budget)}: expected events {expected}, got {got}",
                        _pager_hint(name, expected, got, budget, sizes, last_used, loaded),
                    )
                for direction, page, _ in expected:
                    if direction == "out":
                        del last_used[page], loaded[page]
                    else:
                        loaded[page] = i
                last_used[name] = i
                fetches += 1
                hits += not expected
                evictions += sum(event[0] == "out" for event in expected)
        _refuses_a_page_larger_than_the_budget(pager_class)
        return (f"events equal qlora_ref.pager.Pager's in {len(cases)} sequences ({fetches} fetches: {hits} hits, "
                f"{evictions} evictions; pages of 0 bytes and of the whole budget), and a page larger than the "
                "budget is refused")

    return _run("check_pager", body)


# ---------------------------------------------------------------------------------------------- lesson 8: the schedule


def _schedule_cases():
    """(case, TrainConfig): lesson 8's schedule, a short one, one without warm-up, one with a one-step cosine."""
    from .train import TrainConfig

    return [
        ("lr 3e-3, steps 150, warmup_steps 10, min_lr_ratio 0.1 (lesson 8's run)",
         TrainConfig(lr=3e-3, steps=150, warmup_steps=10, min_lr_ratio=0.1)),
        ("lr 1e-3, steps 6, warmup_steps 2, min_lr_ratio 0.1", TrainConfig(lr=1e-3, steps=6, warmup_steps=2, min_lr_ratio=0.1)),
        ("lr 2e-4, steps 40, no warm-up, min_lr_ratio 0", TrainConfig(lr=2e-4, steps=40, warmup_steps=0, min_lr_ratio=0.0)),
        ("lr 5e-3, steps 11, warmup_steps 10, min_lr_ratio 0.25 (a cosine of one step)",
         TrainConfig(lr=5e-3, steps=11, warmup_steps=10, min_lr_ratio=0.25)),
    ]


def _schedule_variants(config):
    """(schedule(step), hint): the usual mistakes in learning_rate, each alone, to recognise a learner's."""
    from .train import learning_rate

    lr, warmup, steps, floor = config.lr, config.warmup_steps, config.steps, config.min_lr_ratio

    def cosine(step, start=warmup, span=steps - 1 - warmup, low=floor, mixed=True):
        progress = (step - start) / max(1, span)
        half = 0.5 * (1 + math.cos(math.pi * progress))
        return lr * (low + (1 - low) * half) if mixed else lr * (low + half)

    def warm_then(after):
        return lambda step: learning_rate(config, step) if step < warmup else after(step)

    return [
        (lambda step: lr * step / warmup if step < warmup else learning_rate(config, step),
         "the warm-up is lr · (step + 1) / warmup_steps: step 0 already trains with lr / warmup_steps, not 0 "
         "(a step at lr 0 would be wasted), and the last warm-up step reaches lr"),
        (warm_then(lambda step: cosine(step, span=steps - warmup)),
         "the cosine ends at the last step, steps - 1: progress = (step - warmup_steps) / max(1, steps - 1 - "
         "warmup_steps), so that the last step trains at lr · min_lr_ratio"),
        (warm_then(lambda step: cosine(step, low=0.0)),
         "the cosine decays to lr · min_lr_ratio, not to 0: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress)))"),
        (warm_then(lambda step: cosine(step, start=0, span=steps - 1)),
         "the cosine starts where the warm-up ends: progress = (step - warmup_steps) / max(1, steps - 1 - "
         "warmup_steps) is 0 at step warmup_steps, so the first step after the warm-up trains at lr"),
        (warm_then(lambda step: cosine(step, mixed=False)),
         "mix the floor in: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress))) goes from lr down to lr · m; "
         "lr · (m + 0.5 · (1 + cos(...))) starts above lr"),
        (warm_then(lambda step: lr),
         "after the warm-up the learning rate follows a cosine down to lr · min_lr_ratio at the last step"),
    ]


def check_learning_rate(learning_rate) -> bool:
    """Check a warm-up + cosine schedule `learning_rate(config, step) -> float` (lesson 8) against
    qlora_ref.train.learning_rate, at every step of four schedules:

        lr(s) = lr · (s + 1) / warmup_steps                                   for s < warmup_steps
        lr(s) = lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress)))            after, m = min_lr_ratio,
                progress = (s - warmup_steps) / max(1, steps - 1 - warmup_steps)
    Values pass within 1e-9 relative (+ 1e-12 · lr): the same formula rearranged in float64 moves the last
    bits. The line says how many were equal bit for bit, which check_training_step needs (it compares weights
    bit for bit). Prints one line; True on success.
    """
    from dataclasses import replace

    from .train import learning_rate as reference

    def body():
        exact = total = 0
        for case, config in _schedule_cases():
            expected, got = [], []
            for step in range(config.steps):
                try:
                    value = _call(learning_rate, replace(config), step)
                except ZeroDivisionError:
                    if config.warmup_steps == 0:
                        hint = ("with warmup_steps = 0 there is no warm-up: divide by warmup_steps only when "
                                "step < warmup_steps")
                    else:
                        hint = ("a cosine of one step: steps - 1 - warmup_steps is 0 here, so divide by "
                                "max(1, steps - 1 - warmup_steps)")
                    raise _Fail(f"learning_rate(config, {step}) divided by zero ({case})", hint)
                expected.append(reference(config, step))
                got.append(_number(value, f"learning_rate(config, {step})"))
            tolerance = [1e-9 * abs(e) + 1e-12 * config.lr for e in expected]
            wrong = [s for s, (e, g, tol) in enumerate(zip(expected, got, tolerance)) if not abs(g - e) <= tol]
            if wrong:
                step = wrong[0]
                line = (f"MISMATCH ({case}): {len(wrong)} of {config.steps} steps differ, first at step {step}: "
                        f"expected {expected[step]:.9g}, got {got[step]:.9g}")
                hint = next((hint for variant, hint in _schedule_variants(config)
                             if all(abs(variant(s) - g) <= tol for s, (g, tol) in enumerate(zip(got, tolerance)))),
                            None)
                if hint is None and step < config.warmup_steps:
                    hint = "during the warm-up (step < warmup_steps): lr · (step + 1) / warmup_steps"
                elif hint is None:
                    hint = ("after the warm-up: lr · (m + (1 - m) · 0.5 · (1 + cos(pi · progress))), progress = "
                            "(step - warmup_steps) / max(1, steps - 1 - warmup_steps), m = min_lr_ratio")
                raise _Fail(line, hint)
            exact += sum(g == e for e, g in zip(expected, got))
            total += config.steps
        line = f"equal to qlora_ref.train.learning_rate at every step of 4 schedules ({total} steps"
        if exact == total:
            return line + ", all bit for bit)"
        return (line + f"; {exact} bit for bit, the rest within 1e-9: a rearranged formula, which "
                "check_training_step will see, as it compares weights bit for bit)")

    return _run("check_learning_rate", body)


# ---------------------------------------------------------------------------------------------- lesson 8: the step

# (case, TrainConfig settings beyond _STEP_CONFIG, steps compared). The first clips at a norm below that of one
# micro-batch's gradient (about 0.55-0.7 here), so that clipping too early changes the result. warmup_steps 3: the
# rates of the first steps (lr/3, 2lr/3) differ from config.lr and from each other, so that a rate never set, or
# read a step ahead, shows at step 1.
_STEP_CASES = [
    ("grad_accum 2, dropout 0.1, clipping at 0.4", dict(max_grad_norm=0.4, dropout=0.1), 3),
    ("grad_accum 2, no dropout, no clipping (max_grad_norm 0)", dict(max_grad_norm=0.0, dropout=0.0, seed=1), 2),
]
_STEP_CONFIG = dict(n_train=64, n_eval=16, batch_size=8, grad_accum=2, steps=6, warmup_steps=3, r=4, alpha=8,
                    lr=3e-3, gradient_checkpointing=False, progress=False, samples=0, device="cpu")


class _StepRecorder:
    """What happens inside a run's training step, seen through hooks: the input ids and loss of each forward
    pass, the trainable gradients after each backward pass, and the learning rates and gradients that
    optimizer.step() is called with."""

    def __init__(self, run):
        self.params = {name: p for name, p in run.model.named_parameters() if p.requires_grad}
        run.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        run.model.register_forward_hook(self._after_forward, with_kwargs=True)
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(lambda p, name=name: self._accumulated(name, p))
        run.optimizer.register_step_pre_hook(self._before_step)
        self.clear()

    def clear(self):
        self.forwards = []  # (input_ids, with labels, loss)
        self.backwards = []  # {name: gradient after that backward}
        self.steps = []  # ([lr of each group], {name: gradient or None})

    def _before_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels", args[1] if len(args) > 1 else None)
        self.forwards.append([None if ids is None else ids.detach().clone(), labels is not None, None])

    def _after_forward(self, module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        self.forwards[-1][2] = None if loss is None else float(loss.detach())

    def _accumulated(self, name, p):
        if not self.backwards or name in self.backwards[-1]:  # each backward fills every trainable once
            self.backwards.append({})
        self.backwards[-1][name] = p.grad.detach().clone()

    def _before_step(self, optimizer, args, kwargs):
        grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in self.params.items()}
        self.steps.append(([group["lr"] for group in optimizer.param_groups], grads))


def _batch_index(run, ids, upto):
    """The index i < upto whose batch (batch_indices + collate) has these input ids, or None."""
    from .tasks import collate
    from .train import batch_indices

    config = run.config
    for index in range(upto):
        examples = [run.train_examples[i] for i in batch_indices(len(run.train_examples), config.batch_size,
                                                                   config.seed, index)]
        candidate = collate(examples, run.tokenizer)["input_ids"]
        if candidate.shape == ids.shape and torch.equal(candidate, ids):
            return index
    return None


def _check_batches(reference, yours, ref_rec, rec, step, case):
    k = reference.config.grad_accum
    if not rec.forwards:  # the model was not called through model(...): its hooks saw nothing to compare
        return
    if len(rec.forwards) != k:
        raise _Fail(f"MISMATCH at step {step} ({case}): the model ran {len(rec.forwards)} forward passes, expected "
                    f"grad_accum = {k}, one per micro-batch",
                    "for micro in range(config.grad_accum): one batch, one forward pass with labels, one backward")
    for micro, ((expected, _, _), (got, _, _)) in enumerate(zip(ref_rec.forwards, rec.forwards)):
        if got is not None and got.shape == expected.shape and torch.equal(got, expected):
            continue
        index = (step - 1) * k + micro
        found = None if got is None else _batch_index(yours, got, (step + 1) * k + 1)
        line = (f"MISMATCH at step {step} ({case}): micro-batch {micro + 1} of {k} should be batch index {index} "
                f"(run.step * grad_accum + micro = {step - 1} * {k} + {micro})")
        if found is None:
            hint = ("batch = collate([run.train_examples[i] for i in batch_indices(len(run.train_examples), "
                    "config.batch_size, config.seed, index)], run.tokenizer)")
        else:
            line += f", got the examples of batch index {found}"
            hint = ("each micro-batch of each step is a new slice of the data: index = run.step * "
                    "config.grad_accum + micro")
            if found == index - micro:
                hint = ("every micro-batch used the same examples: " + hint)
        raise _Fail(line, hint)


def _check_loss(reference, yours, returned, ref_rec, rec, step, case):
    k = reference.config.grad_accum
    if len(yours.losses) != step:
        raise _Fail(f"after step {step} ({case}) run.losses has {len(yours.losses)} entries, expected {step}",
                    "append the step's mean loss (a float) to run.losses, once per step")
    expected = reference.losses[-1]
    for what, value in (("run.losses[-1]", yours.losses[-1]), ("the value training_step returned", returned)):
        if isinstance(value, torch.Tensor):
            raise _Fail(f"{what} is a tensor ({case}), expected a Python float",
                        "use loss.item(): a loss tensor keeps the step's whole autograd graph (every saved "
                        "activation) alive for as long as run.losses holds it")
        if value is None:
            raise _Fail(f"{what} is None ({case}), expected the step's mean loss",
                        "return the mean loss of the micro-batches, the value appended to run.losses")
        got = _number(value, what)
        # 1e-6 relative: the mean may be taken in float32 (tensors) or float64 (Python floats, as train_step
        # does); a float32 rounding is 6e-8 relative. Everything that changes the weights is compared exactly.
        if abs(got - expected) <= 1e-6 * abs(expected):
            continue
        line = f"MISMATCH at step {step} ({case}) in {what}: expected {expected:.9g}, got {got:.9g}"
        losses = [loss for _, _, loss in ref_rec.forwards]

        def close(a, b):
            return abs(a - b) <= 1e-6 * abs(b)

        if rec.forwards and not all(with_labels for _, with_labels, _ in rec.forwards):
            hint = ("call run.model(input_ids=batch['input_ids'], labels=batch['labels']): with labels the model "
                    "computes the loss on the answer tokens only (labels -100 elsewhere)")
        elif close(got, expected / k):
            hint = ("log the unscaled loss: the mean of loss.item() over the micro-batches (loss / grad_accum is "
                    "what backward() gets, not what the step reports)")
        elif close(got, expected * k):
            hint = "the mean, not the sum: divide the sum of the micro-batches' losses by grad_accum"
        elif any(close(got, loss) for loss in losses):
            hint = "average the losses of all grad_accum micro-batches, not one of them"
        elif len(rec.forwards) == len(losses) and rec.forwards[0][2] == losses[0]:
            hint = ("the first micro-batch's loss is right, a later one's is not: nothing may change the model "
                    "between micro-batches (one optimizer.step(), after the loop), and dropout draws its masks "
                    "in the order of the forward passes")
        else:
            hint = ("the mean over the micro-batches of run.model(input_ids=..., labels=...).loss.item(), one "
                    "forward pass per micro-batch, in order (dropout draws from the random generator in that order)")
        raise _Fail(line, hint)


def _ratio(got, expected):
    """c such that got = c · expected (within 1e-5 relative), or None."""
    scale = float(expected.double().norm())
    if scale == 0.0:
        return None
    c = float(got.double().norm()) / scale
    if torch.allclose(got.double(), c * expected.double(), rtol=1e-5, atol=1e-12 * scale):
        return c
    return None


def _gradient_hint(config, ref_rec, rec, left_over, name):
    """The likeliest reason why the gradient of `name` at optimizer.step() differs from the reference's."""
    k = config.grad_accum
    ref_backwards, backwards = ref_rec.backwards, rec.backwards
    got_step = rec.steps[0][1][name]
    if left_over and backwards and any(not torch.equal(backwards[0][n], r) for n, r in ref_backwards[0].items()):
        return ("the previous step left its gradients in .grad, and backward() adds to .grad: this step's "
                "gradient includes the last one's. Zero them after optimizer.step(): "
                "run.optimizer.zero_grad(set_to_none=True)")
    if backwards and not torch.equal(backwards[0][name], ref_backwards[0][name]):
        expected = ref_backwards[0 if len(backwards) == len(ref_backwards) else -1][name]
        c = _ratio(backwards[0][name], expected)
        if c is not None and abs(c - k) < 1e-4:
            return (f"each micro-batch's gradient is grad_accum = {k} times too large: backward() on "
                    "loss / config.grad_accum, so that the micro-batches add up to the gradient of their mean loss")
        if c is not None and abs(c - 1) > 1e-4:
            return (f"the gradient is {c:.4g} times the expected: scale each micro-batch's loss by "
                    f"1 / grad_accum = 1/{k} before backward(), no more and no less")
        return "the loss of each micro-batch, divided by grad_accum, and its backward(): one per micro-batch"
    if len(backwards) == len(ref_backwards) and any(
            not torch.equal(b[n], r[n]) for b, r in zip(backwards, ref_backwards) for n in r):
        return ("the gradients changed between two micro-batches' backward passes (clipped or zeroed inside the "
                "loop?): let the micro-batches accumulate untouched, then clip once, after the last backward")
    if config.max_grad_norm == 0:
        return ("max_grad_norm = 0 means no clipping (clip_grad_norm_ with max_norm 0 would zero every gradient): "
                "clip only if config.max_grad_norm > 0")
    if not bool(got_step.any()):
        return ("the gradient is zero at optimizer.step(): zero the gradients after the step (for the next one), "
                "not between the backward passes and the step")
    if torch.equal(got_step, ref_backwards[-1][name]):
        return ("the gradient was not clipped: torch.nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm) "
                "after the last backward, before optimizer.step()")
    return ("clip once, over all trainable parameters together: clip_grad_norm_(run.trainable, "
            "config.max_grad_norm) scales every gradient by the same factor, from their joint norm")


def _check_step_calls(ref_rec, rec, step, case):
    # Counted in the reference's unit: its optimizer.step() runs the step pre-hooks once per call.
    calls = len(rec.steps) // len(ref_rec.steps)
    if calls != 1:
        hint = ("after the last micro-batch's backward (and the clipping), call run.optimizer.step() once" if not calls
                else "call run.optimizer.step() once per training step, after all micro-batches: not inside the loop")
        raise _Fail(f"at step {step} ({case}) run.optimizer.step() was called {calls} times, expected once", hint)


def _check_optimizer_step(reference, ref_rec, rec, left_over, step, case):
    from .train import learning_rate

    config = reference.config
    (expected_lrs, expected_grads), (got_lrs, got_grads) = ref_rec.steps[0], rec.steps[0]
    for expected, got in zip(expected_lrs, got_lrs):
        if got == expected:
            continue
        line = (f"MISMATCH at step {step} ({case}) in the learning rate at optimizer.step(): expected "
                f"{expected!r} (learning_rate(config, {step - 1})), got {got!r}")
        if isinstance(got, (int, float)) and abs(got - expected) <= 1e-9 * expected:
            hint = ("equal up to the last bits: your learning_rate rearranges the formula, and the weights are "
                    "compared bit for bit. Write it in the order of check_learning_rate's formula: "
                    "lr * (step + 1) / warmup_steps, lr * (m + (1 - m) * 0.5 * (1 + cos(pi * progress)))")
        elif got == config.lr:
            hint = ("the learning rate was never set (the optimizer still has config.lr): before optimizer.step(), "
                    "set group['lr'] = learning_rate(config, run.step) in every param group")
        elif got == learning_rate(config, step):
            hint = ("that is the next step's rate: read the schedule at run.step before advancing it (the first "
                    "step is run.step = 0)")
        else:
            hint = "set group['lr'] = learning_rate(config, run.step) in every param group, before optimizer.step()"
        raise _Fail(line, hint)
    for name, expected in expected_grads.items():
        got = got_grads[name]
        if got is None:
            raise _Fail(f"MISMATCH at step {step} ({case}): the gradient of {name} is None at optimizer.step()",
                        "backward() on each micro-batch's loss before optimizer.step(); zero the gradients after "
                        "the step, not before it")
        found = _first_mismatch(expected, got)
        if found:
            raise _Fail(_mismatch_line(f"the gradient of {name} at optimizer.step()", f"step {step}, {case}", found,
                                       expected.numel()),
                        _gradient_hint(config, ref_rec, rec, left_over, name))


def _check_after_step(reference, yours, step, case):
    from .optim8bit import optimizer_state_tensors

    if yours.step != step:
        raise _Fail(f"after step {step} ({case}) run.step is {yours.step}, expected {step}",
                    "advance run.step by one at the end of the step: the schedule and the batches read it")
    expected_params = dict(reference.model.named_parameters())
    for name, p in yours.model.named_parameters():
        if p.requires_grad:
            found = _first_mismatch(expected_params[name].detach(), p.detach())
            if found:
                raise _Fail(_mismatch_line(f"{name} after the step", f"step {step}, {case}", found, p.numel()),
                            "the learning rate and the gradients at optimizer.step() were right: change the "
                            "adapters only through run.optimizer.step(), once per step")
    expected_state, got_state = optimizer_state_tensors(reference.optimizer), optimizer_state_tensors(yours.optimizer)
    for key, expected in expected_state.items():
        got = got_state.get(key)
        if got is None or not torch.equal(got, expected):
            raise _Fail(f"MISMATCH at step {step} ({case}) in the optimizer's state {key}",
                        "use run.optimizer as it is (one step() per training step), and do not replace it")


def _grads_left(run):
    """Whether a step left nonzero gradients in .grad (zero_grad(set_to_none=True) leaves None)."""
    return any(p.grad is not None and bool(p.grad.any()) for p in run.trainable)


def check_training_step(training_step) -> bool:
    """Check one QLoRA training step `training_step(run) -> float` (lesson 8) against qlora_ref.train.train_step.

    Given a run from qlora_ref.train.setup, one step: set every param group's lr to learning_rate(config,
    run.step); for each of the grad_accum micro-batches (index run.step * grad_accum + micro, batch_indices +
    collate), a forward pass with labels and backward() on loss / grad_accum; clip the gradient norm of the
    trainable parameters to max_grad_norm (when > 0); run.optimizer.step(); zero the gradients; advance run.step;
    append the mean of the micro-batches' losses (a float) to run.losses and return it.

    Two tiny QLoRA runs on the CPU (the course's model, r 4, batches of 8, grad_accum 2; clipping at 0.4 with
    dropout for 3 steps, no clipping for 2), each set up twice from the same seed: one stepped by train_step,
    one by yours. After every step, compared in this order: the micro-batches' input ids, the number of
    optimizer.step() calls, the mean loss (within 1e-6 relative: averaged in float32 or in float64), the learning
    rate and every gradient at optimizer.step(), run.step, the adapters and the optimizer's state (all exactly).
    The gradients seen after each backward pass name the likeliest mistake. Prints one line; True on success.
    """
    from .train import TrainConfig, setup, train_step

    def compare(case, config, steps):
        runs, states = [], []
        for _ in range(2):  # setup seeds torch: both runs start identical, with the same random state
            runs.append(setup(config))
            states.append(torch.get_rng_state())
        (reference, yours), records = runs, [_StepRecorder(run) for run in runs]
        for step in range(1, steps + 1):
            left_over = _grads_left(yours)
            returned = None
            for i, run in enumerate(runs):  # each run draws its dropout masks from its own random state
                torch.set_rng_state(states[i])
                records[i].clear()
                if run is reference:
                    train_step(run)
                else:
                    returned = _call(training_step, run)
                states[i] = torch.get_rng_state()
            _check_batches(reference, yours, records[0], records[1], step, case)
            _check_step_calls(records[0], records[1], step, case)
            _check_loss(reference, yours, returned, records[0], records[1], step, case)
            _check_optimizer_step(reference, records[0], records[1], left_over, step, case)
            _check_after_step(reference, yours, step, case)

    def body():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny model: one thread is fastest, and spinning threads crawl on a busy CPU
        try:
            with torch.random.fork_rng(devices=[]):  # setup reseeds torch; the caller's random state is restored
                for case, changes, steps in _STEP_CASES:
                    compare(case, TrainConfig(**_STEP_CONFIG, **changes), steps)
        finally:
            torch.set_num_threads(threads)
        total = sum(steps for _, _, steps in _STEP_CASES)
        return (f"batches, losses, learning rates, gradients, adapters and optimizer state equal train_step's, "
                f"bit for bit ({total} steps of two runs: grad_accum 2, dropout, clipping on and off)")

    return _run("check_training_step", body)
