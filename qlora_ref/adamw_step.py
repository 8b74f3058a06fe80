"""Lesson 7: one AdamW step as bitsandbytes computes it, on float32 moments and on 8-bit ones.

`adamw_update_` is the step on float32 moments; `adamw8bit_update_` wraps it in the 8-bit decode and
re-encode of the moments (lesson 4's blockwise recipe with the dynamic map). qlora_ref.optim8bit's
AdamW8bit runs one of them per parameter; read this module first.

One step, per element (bitsandbytes' CUDA kernel kOptimizerStatic8bit2StateBlockwise, in its order)
--------------------------------------------------------------------------------------------------
    m, v  = code1[q1] * absmax1, code2[q2] * absmax2          decode the stored moments
    v     = beta2 * v + (1 - beta2) * g^2
    m     = beta1 * m + (1 - beta1) * g
    p     = p - lr * c2 / c1 * m / (sqrt(v) + c2 * eps)       c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
    p     = p * (1 - lr * weight_decay)                       decoupled weight decay, after the step
    absmax1, q1 = max |m| per block, nearest code of m / absmax1  (likewise v); the new absmax is
                                                               the new moments' own maximum
A NaN or Inf gradient element leaves its parameter alone and sets its m and v to 0: one NaN would
otherwise make its block's absmax NaN and take all 256 moments of the block with it. (bitsandbytes'
32-bit kernel, used below min_8bit_size, has no such rule: a NaN there stays in its element; so here.)
`adamw_update_` is this step on float32 moments; the optimizer wraps it in decode and re-encode.

Where bitsandbytes 0.50.2's CPU path differs (read in backends/cpu/ops.py; our choice in brackets)
  * Weight decay first, p * (1 - lr * wd) before the step [the kernel's order: after].
  * The 8-bit step is grouped p - (lr / c1) * m / (sqrt(v) / c2 + eps): the same number, rounded
    differently in float32 [the kernel's grouping; its 32-bit CPU path groups as we do]. Parameters
    then differ from bitsandbytes' CPU ones by a float32 rounding or two; the moments' bytes are equal.
  * NaN/Inf gradients are not skipped: they spread through the block [skipped, as on the GPU].
  * Re-encoding rounds through a 65536-point table, qlora_ref's rounding="lut" [the same on a CPU].
    The table's grid has no point at 0: a zero moment is stored as the level nearest 1/65535, i.e.
    2.1e-5 * absmax for m and 1.6e-5 * absmax for v (the kernel's search keeps it 0).
On a GPU the kernel searches the sorted code (a binary search, kernels/cuda_semantics.py) and then
nudges a code of m whose level has the wrong sign one step towards the value's sign. Scalars such as
1 - beta2 are rounded as each path rounds them: float64 then float32 on the CPU (Python floats), float32
throughout in the kernel, whose fused multiply-adds for m and v we also reproduce (read in its sm_90
machine code; p's update is one fma too). So the moments' bytes equal bitsandbytes' on either device;
the parameters differ by float32 roundings (the kernel's beta^t, square root and division are fast
approximations), measured at 2e-6 after 100 steps (tests/test_optim8bit_gpu.py).

"""

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType

import torch

from .dynamic8bit import dequantize_blockwise, quantize_blockwise, shared_dynamic_map
from .float32 import fma, to_float32
from .kernels import cuda_semantics
from .state import QuantState

__all__ = ["adamw8bit_update_", "adamw_update_", "step_scalars"]


@functools.lru_cache(maxsize=1024)  # every parameter of a step asks for the same ones
def step_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 kernel: bool) -> Mapping:
    """The per-step scalars of `adamw_update_`, rounded as bitsandbytes rounds them (a read-only mapping).

    kernel=False: its CPU path, Python float64 (torch rounds each to float32 where it is applied).
    kernel=True: its CUDA kernel, float32 throughout (betas, lr and eps arrive as float32), e.g.
    1 - beta2 = 1 - 0.99900001f = 0.00099998713 instead of 0.001; 1 - lr * wd is one fused
    multiply-add there (the float64 product of two float32 numbers is exact, so rounding once is the
    same). The kernel's beta^t and square root are approximations (MUFU.LG2/EX2/SQRT, --use_fast_math);
    these are the correctly rounded values.
    """
    f = to_float32 if kernel else float
    beta1, beta2, lr, eps, weight_decay = f(beta1), f(beta2), f(lr), f(eps), f(weight_decay)
    c1 = f(1.0 - f(beta1**step))
    c2 = f(math.sqrt(f(1.0 - f(beta2**step))))
    return MappingProxyType(dict(beta1=beta1, beta2=beta2, one_minus_beta1=f(1.0 - beta1),
                                 one_minus_beta2=f(1.0 - beta2), step_size=f(f(-lr * c2) / c1), eps_c2=f(c2 * eps),
                                 decay=f(1.0 - lr * weight_decay)))


@torch.no_grad()
def adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite=False):
    """One AdamW step of `param` (in place) with float32 moments m, v (updated in place).

        v = beta2 * v + (1 - beta2) * g^2
        m = beta1 * m + (1 - beta1) * g
        p = p + step_size * m / (sqrt(v) + eps * c2)     step_size = -lr * c2 / c1
        p = p * (1 - lr * weight_decay)                   only when weight_decay > 0
    with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step) (bias corrections folded into the step size),
    in float32 whatever param's dtype, written back once. skip_nonfinite: where g is NaN or +-Inf,
    m = v = 0 and p is left as it was (the 8-bit kernel's rule). Scalars are rounded as bitsandbytes'
    kernel does for CUDA tensors, as its CPU path does otherwise (step_scalars).
    """
    _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite, param.is_cuda)


def _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite, kernel: bool):
    """adamw_update_ rounded as bitsandbytes' CUDA kernel (kernel=True: its float32 scalars and fused
    multiply-adds, IEEE square root and division) or as its CPU path (False), on any device."""
    s = step_scalars(step, lr, beta1, beta2, eps, weight_decay, kernel=kernel)
    g = grad.float()
    finite = torch.isfinite(g) if skip_nonfinite else None
    if finite is not None:
        g = torch.where(finite, g, 0.0)
    if kernel:  # the kernel's fmas, read in its sm_90 machine code (fl: one float32 rounding)
        scaled = g * s["one_minus_beta2"]
        if grad.dtype == torch.float32:
            v.copy_(fma(g, scaled, v * s["beta2"]))  # fma(g, fl((1 - beta2) g), fl(beta2 v))
        else:
            v.copy_(fma(v, s["beta2"], g * scaled))  # fma(v, beta2, fl(g fl((1 - beta2) g)))
        m.copy_(fma(g, s["one_minus_beta1"], m * s["beta1"]))  # fma(g, 1 - beta1, fl(beta1 m))
    else:
        v.mul_(beta2).addcmul_(g, g, value=s["one_minus_beta2"])
        m.mul_(beta1).add_(g, alpha=s["one_minus_beta1"])
    p = param.detach().to(torch.float32, copy=True)
    if kernel:  # IEEE float32 sqrt and division: through float64, which rounds them correctly once back in
        # float32 (53 >= 2 * 24 + 2 bits); torch's own float32 sqrt on a CPU can be an ulp off
        update = (m.double() / (v.double().sqrt().float() + s["eps_c2"]).double()).float()
        p = fma(update, s["step_size"], p)
    else:
        p.add_(m / v.sqrt().add_(s["eps_c2"]), alpha=s["step_size"])
    if weight_decay > 0:
        p.mul_(s["decay"])
    if finite is not None:
        m.masked_fill_(~finite, 0.0)
        v.masked_fill_(~finite, 0.0)
        p = torch.where(finite, p, param)
    param.copy_(p)


@torch.no_grad()
def adamw8bit_update_(param, grad, state: dict, step, lr, beta1, beta2, eps, weight_decay, blocksize: int = 256,
                      kernel=None) -> None:
    """One AdamW step of `param` with 8-bit moments, in PyTorch; param and state updated in place.

    state holds m as codes state1 (uint8, param's shape) with absmax1 (float32, one per block of
    `blocksize`), v likewise as state2 and absmax2 (AdamW8bit's state). The step:
        m, v = code1[state1] * absmax1, code2[state2] * absmax2      decode (signed / unsigned dynamic map)
        adamw_update_(param, grad, m, v, ..., skip_nonfinite=True)
        absmax1, state1 = max |m| per block, the code of m / absmax1  (likewise v): encode
    kernel=True: bitsandbytes' CUDA kernel's bytes, on any device: its binary search over the code and
    its sign nudge (cuda_semantics; on a CPU the reciprocal is the correctly rounded model of the GPU's).
    kernel=False: its CPU path's bytes (the 65536-point table). None: True for CUDA tensors.
    """
    kernel = param.is_cuda if kernel is None else kernel
    m = _decode(state["state1"], state["absmax1"], True, blocksize, kernel)
    v = _decode(state["state2"], state["absmax2"], False, blocksize, kernel)
    _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, True, kernel)
    for name, values, signed in (("1", m, True), ("2", v, False)):
        codes, absmax = _encode(values, signed, blocksize, kernel)
        state["state" + name].copy_(codes)
        state["absmax" + name].copy_(absmax)


def _decode(codes, absmax, signed: bool, blocksize: int, kernel: bool) -> torch.Tensor:
    state = QuantState(absmax=absmax, shape=codes.shape, code=shared_dynamic_map(signed, codes.device),
                       dtype=torch.float32, blocksize=blocksize)
    if kernel:  # ftz(code[q] * absmax): the kernel flushes denormal products
        return cuda_semantics.dequantize_blockwise(codes, state)
    return dequantize_blockwise(codes, state, backend="torch")


def _encode(values, signed: bool, blocksize: int, kernel: bool):
    """Codes and absmax of a moment: bitsandbytes' CPU rounding (kernel=False) or its CUDA search.

    The CUDA kernel then moves a code of m whose level has the other sign bit than m one step towards
    m's sign: a small negative m that rounds to the level 0.0 gets the smallest negative level.
    """
    code = shared_dynamic_map(signed, values.device)
    if not kernel:
        codes, qstate = quantize_blockwise(values, code, blocksize, backend="torch")
        return codes, qstate.absmax
    codes, absmax = cuda_semantics.quantize_blockwise_codes(values, code, blocksize)
    if signed:
        wrong_sign = torch.signbit(code[codes.long()]) != torch.signbit(values)
        nudged = (codes.to(torch.int16) + torch.where(values > 0, 1, -1)) & 0xFF
        codes = torch.where(wrong_sign, nudged, codes.to(torch.int16)).to(torch.uint8)
    return codes, absmax
