"""Lesson 6's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_qlora_backward(backward)
      backward(grad_out, packed, state, x, A, B, scaling) -> (dL/dx, dL/dA, dL/dB)
  for y = x W0^T + scaling · x A^T B^T, W0 = dequantize_4bit(packed, state) frozen; x [..., in], A [r, in],
  B [out, r], grad_out [..., out], float32; the gradients have the shapes of x, A and B.
"""

import math

import torch

from .harness import _call, _expected_got, _Fail, _run, _tensor

__all__ = ["check_qlora_backward"]


def _qlora_backward_cases():
    """(case, grad_out, packed, state, x, A, B, scaling): fixed, seeded; leading dimensions of 1, 2 and 3."""
    from qlora_ref.fourbit import quantize_4bit

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
    from qlora_ref.fourbit import dequantize_4bit

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
