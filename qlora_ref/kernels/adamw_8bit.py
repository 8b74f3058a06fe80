"""Triton kernel 4: a whole 8-bit AdamW step of one parameter in one launch (lesson 7's optimizer, fused).

What you will learn
-------------------
* Why fusion wins here. `qlora_ref.adamw_step.adamw8bit_update_` is the step in PyTorch: decode m and v,
  the update, quantize m and v again (a binary search: 7 rounds of compare and gather), nudge signs,
  copy back. Over a hundred kernel launches per parameter, each reading and writing whole tensors. A
  LoRA adapter of a 7B model holds 65,536-262,144 values: each of those kernels runs for a few
  microseconds and its launch costs more. This kernel loads p, g, the two codes and the two absmax
  once, keeps everything in registers, and stores p, the codes and the absmax once: one launch and
  about 16 bytes per float32 value (read p, g and 2 codes, write p and 2 codes), which is what
  bitsandbytes' kOptimizerStatic8bit2StateBlockwise does.
* Why a program can own its blocks. The new absmax of a block is the maximum of the block's new
  moments, and nothing else depends on other blocks: a program that holds whole blocks (a tile of
  NB x BLOCKSIZE values, one block per row) decodes, updates, reduces and encodes without talking to
  any other program. The old absmax is read and the new one written by the same program.
* Rounding on purpose. The kernel runs with `enable_fp_fusion=False`, so Triton contracts no `a * b + c`
  by itself; the three fused multiply-adds bitsandbytes' kernel has (read in its sm_90 machine code)
  are written out with `tl.fma`. Division and square root are the correctly rounded `div_rn` and
  `sqrt_rn` (Triton's `/` on float32 is an approximation), as in PyTorch. So on a GPU this kernel and
  `adamw8bit_update_` give the same bytes, p included.
* Numbers from memory, not arguments. The seven per-step scalars (bias corrections, learning rate, betas)
  are loaded from a float32 tensor rather than passed by value: a CUDA graph replays a launch with the
  arguments it was recorded with, so a captured step (qlora_ref.cuda_graph) must find each step's values
  at a fixed address, rewritten before every replay. Eager calls get a cached tensor per step.
* Reuse. The encode is blockwise_8bit.py's quantizer, called on values already in registers:
  the same `_pivot_search` (bitsandbytes' binary search), `_reciprocal` (MUFU.RCP on the GPU) and
  flush-to-zero helpers, taken from that module loaded in the same mode (compiled or interpreted).

The step, per element (step_scalars gives the float32 scalars; fl = one float32 rounding)
----------------------------------------------------------------------------------------
    finite = g is not NaN or +-Inf;  g = 0 where not finite
    m = ftz(code1[q1] * absmax1),  v = ftz(code2[q2] * absmax2)                       decode
    v = fma(g, fl((1 - beta2) g), fl(beta2 v))        (fp16/bf16 g: fma(v, beta2, fl(g fl((1 - beta2) g))))
    m = fma(g, 1 - beta1, fl(beta1 m))
    p = fma(m / (sqrt(v) + eps c2), step_size, p) * (1 - lr wd)      stored only where finite
    m = v = 0 where not finite
    absmax1, q1 = blockwise 8-bit quantization of m (signed map) + the sign nudge;  absmax2, q2 of v

Measured (H100 80GB HBM3, triton 3.6, torch 2.11, bitsandbytes 0.50.2, 2026-11-22)
-----------------------------------------------------------------------------------
448 LoRA-shaped tensors of 16 x 4096 (tests/test_optim8bit_gpu.py): 27 ms per optimizer step, against
24 ms for bitsandbytes' AdamW8bit and 1.4 s for the PyTorch step. A 7B QLoRA training step, r = 64
(bench/results/baseline-ours-phases-fused-*): our paged optimizer step 0.043-0.058 s, was 0.70-0.78 s.
Moments byte-equal to bitsandbytes' CUDA AdamW8bit over 100 steps.
"""

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ..adamw_step import step_scalars
from ..dynamic8bit import shared_dynamic_map
from ..validation import FLOAT_DTYPES, check_blocksize
from . import blockwise_8bit
from .launch import TRITON_TYPES, compile_for
from .quantize_4bit import launch_config
from .twins import interpreted, twin

__all__ = ["SCALAR_NAMES", "adamw8bit_kernel", "adamw8bit_update_triton", "compile_ahead", "device_scalars",
           "scalar_values"]

DEFAULT_TILE_VALUES = 1024  # values per program (NB = TILE // BLOCKSIZE blocks, at least one)


@triton.jit
def _signbit(x):
    return (x.to(tl.uint32, bitcast=True) >> 31).to(tl.int32)


INTERPRETED = interpreted(_signbit)
_quantizer = blockwise_8bit._twin(interpret=INTERPRETED)  # its helpers, jit-ed in the same mode as this module
_ftz, _max_nan, _pivot_search = _quantizer._ftz, _quantizer._max_nan, _quantizer._pivot_search
_reciprocal, _round_to_bf16 = _quantizer._reciprocal, _quantizer._round_to_bf16


@triton.jit
def _encode(x, code_ptr, HW_RCP: tl.constexpr):
    """(codes int32, absmax per row) of a [NB, BLOCKSIZE] tile: blockwise_8bit's quantize_blockwise_kernel."""
    x = _ftz(x)
    absmax = tl.reduce(tl.abs(x), 1, _max_nan)
    u = _ftz(x * _reciprocal(absmax, HW_RCP)[:, None])
    return _pivot_search(u, code_ptr), absmax


@triton.jit
def adamw8bit_kernel(
    p_ptr,  # float32 / float16 / bfloat16 [n]: the parameter, updated in place
    g_ptr,  # float32 / float16 / bfloat16 [n]: its gradient
    q1_ptr, q2_ptr,  # uint8 [n]: m's and v's codes, read and rewritten
    absmax1_ptr, absmax2_ptr,  # float32 [ceil(n / BLOCKSIZE)]: their absmax, read and rewritten
    code1_ptr, code2_ptr,  # float32 [256]: the signed (m) and unsigned (v) dynamic maps
    scalars_ptr,  # float32 [7]: beta1, beta2, 1 - beta1, 1 - beta2, step_size, eps c2, 1 - lr wd (SCALAR_NAMES)
    n,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,  # blocks per program
    FLOAT32_GRAD: tl.constexpr,  # the kernel's fma for v depends on the gradient's dtype
    HW_RCP: tl.constexpr,  # MUFU.RCP for 1 / absmax (GPU), else the correctly rounded division
    SOFT_BF16: tl.constexpr,  # round bf16 parameters in integers (the interpreter's cast truncates)
):
    # Read from memory, not passed as arguments, so that a captured CUDA graph replays with each step's values.
    beta1, beta2 = tl.load(scalars_ptr), tl.load(scalars_ptr + 1)
    one_minus_beta1, one_minus_beta2 = tl.load(scalars_ptr + 2), tl.load(scalars_ptr + 3)
    step_size, eps_c2, decay = tl.load(scalars_ptr + 4), tl.load(scalars_ptr + 5), tl.load(scalars_ptr + 6)
    block = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    inside = index < n
    block_inside = block * BLOCKSIZE < n

    g = tl.load(g_ptr + index, mask=inside, other=0.0).to(tl.float32)
    finite = inside & (tl.abs(g) <= 3.4028234663852886e38)  # |g| <= FLT_MAX: false for NaN, +-Inf, the padding
    g = tl.where(finite, g, 0.0)
    q1 = tl.load(q1_ptr + index, mask=inside, other=0).to(tl.int32)
    q2 = tl.load(q2_ptr + index, mask=inside, other=0).to(tl.int32)
    m = _ftz(tl.load(code1_ptr + q1) * tl.load(absmax1_ptr + block, mask=block_inside, other=0.0)[:, None])
    v = _ftz(tl.load(code2_ptr + q2) * tl.load(absmax2_ptr + block, mask=block_inside, other=0.0)[:, None])

    if FLOAT32_GRAD:
        v = tl.fma(g, one_minus_beta2 * g, beta2 * v)
    else:
        v = tl.fma(v, beta2, g * (one_minus_beta2 * g))
    m = tl.fma(g, one_minus_beta1, beta1 * m)

    p = tl.load(p_ptr + index, mask=inside, other=0.0).to(tl.float32)
    p = tl.fma(tl.div_rn(m, tl.sqrt_rn(v) + eps_c2), step_size, p) * decay
    if SOFT_BF16:
        p_out = _round_to_bf16(p)
    else:
        p_out = p.to(p_ptr.dtype.element_ty)
    tl.store(p_ptr + index, p_out, mask=finite)  # a non-finite gradient leaves its parameter alone

    m = tl.where(finite, m, 0.0)  # and zeroes its moments; the padding is 0 too (it must not raise absmax)
    v = tl.where(finite, v, 0.0)
    c1, absmax1 = _encode(m, code1_ptr, HW_RCP)
    wrong_sign = _signbit(tl.load(code1_ptr + c1)) != _signbit(m)  # m's level must keep m's sign
    c1 = tl.where(wrong_sign, (c1 + tl.where(m > 0, 1, -1)) & 0xFF, c1)
    c2, absmax2 = _encode(v, code2_ptr, HW_RCP)
    tl.store(q1_ptr + index, c1.to(tl.uint8), mask=inside)
    tl.store(q2_ptr + index, c2.to(tl.uint8), mask=inside)
    tl.store(absmax1_ptr + block, absmax1, mask=block_inside)
    tl.store(absmax2_ptr + block, absmax2, mask=block_inside)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _check(param, grad, state, blocksize) -> None:
    if param.dtype not in FLOAT_DTYPES or grad.dtype not in FLOAT_DTYPES:
        raise TypeError(f"the 8-bit AdamW kernel updates float32, float16 or bfloat16 parameters and gradients, "
                        f"got {param.dtype} and {grad.dtype}")
    if grad.shape != param.shape:
        raise ValueError(f"the gradient has shape {tuple(grad.shape)}, its parameter {tuple(param.shape)}")
    blocks = -(-param.numel() // blocksize)
    expected = {"state1": (torch.uint8, param.numel()), "state2": (torch.uint8, param.numel()),
                "absmax1": (torch.float32, blocks), "absmax2": (torch.float32, blocks)}
    for key, (dtype, numel) in expected.items():
        tensor = state[key]
        if tensor.dtype != dtype or tensor.numel() != numel or not tensor.is_contiguous():
            raise ValueError(f"state[{key!r}] must be a contiguous {dtype} tensor of {numel} values for a parameter "
                             f"of shape {tuple(param.shape)} and blocksize {blocksize}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if tensor.device != param.device:
            raise ValueError(f"state[{key!r}] is on {tensor.device}, the parameter on {param.device}")


def adamw8bit_update_triton(param, grad, state: dict, step, lr, beta1, beta2, eps, weight_decay, blocksize: int = 256,
                            *, scalars=None, hw_rcp=None, tile_values=None, num_warps=None) -> None:
    """adamw_step.adamw8bit_update_ with kernel=True in one launch: same arguments, same bytes.

    param (and state's four tensors) are updated in place. CPU tensors run in Triton's interpreter,
    with the correctly rounded reciprocal where the GPU has MUFU.RCP (hw_rcp=None: the GPU's on a GPU).
    The kernel reads its seven per-step numbers (step_scalars, in SCALAR_NAMES order) from a float32
    tensor: `device_scalars` of the hyperparameters by default, or `scalars`, a float32 [7] tensor on
    param's device that the caller fills (a captured CUDA graph keeps pointing at the same one).
    """
    check_blocksize(blocksize)
    _check(param, grad, state, blocksize)
    if (param.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=param.device.type == "cpu").adamw8bit_update_triton(
            param, grad, state, step, lr, beta1, beta2, eps, weight_decay, blocksize, scalars=scalars, hw_rcp=hw_rcp,
            tile_values=tile_values, num_warps=num_warps)
    n = param.numel()
    if n == 0:
        return
    if scalars is None:
        scalars = device_scalars(step, lr, beta1, beta2, eps, weight_decay, param.device)
    elif scalars.dtype != torch.float32 or scalars.numel() != len(SCALAR_NAMES) or scalars.device != param.device:
        raise ValueError(f"scalars must be a float32 tensor of {len(SCALAR_NAMES)} values on {param.device}, got "
                         f"{scalars.dtype} {tuple(scalars.shape)} on {scalars.device}")
    contiguous = param.is_contiguous()
    flat = param.detach() if contiguous else param.detach().contiguous()
    nb, num_warps = launch_config(blocksize, tile_values or DEFAULT_TILE_VALUES, num_warps)
    hw_rcp = not INTERPRETED if hw_rcp is None else bool(hw_rcp)
    args = (flat, grad.contiguous(), state["state1"], state["state2"], state["absmax1"], state["absmax2"],
            shared_dynamic_map(True, param.device), shared_dynamic_map(False, param.device), scalars, n)
    options = dict(BLOCKSIZE=blocksize, NB=nb, FLOAT32_GRAD=grad.dtype == torch.float32, HW_RCP=hw_rcp,
                   SOFT_BF16=INTERPRETED and param.dtype == torch.bfloat16, num_warps=num_warps, enable_fp_fusion=False)
    grid = (triton.cdiv(-(-n // blocksize), nb),)
    if INTERPRETED:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # 1 / 0 and 0 * inf, as on the GPU
            adamw8bit_kernel[grid](*args, **options)
    else:
        adamw8bit_kernel[grid](*args, **options)
    if not contiguous:
        param.detach().copy_(flat)


SCALAR_NAMES = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "step_size", "eps_c2", "decay")


def scalar_values(step, lr, beta1, beta2, eps, weight_decay) -> list:
    """The kernel's seven float32 numbers for one step (step_scalars with kernel=True), in SCALAR_NAMES order."""
    s = step_scalars(step, lr, beta1, beta2, eps, weight_decay, kernel=True)
    return [s[name] for name in SCALAR_NAMES]


@functools.lru_cache(maxsize=64)  # every parameter of a step asks for the same ones
def device_scalars(step, lr, beta1, beta2, eps, weight_decay, device) -> torch.Tensor:
    """scalar_values in a float32 tensor on `device`, made once per step: copied from pinned memory without
    waiting (a blocking copy would stall the host until the GPU caught up, once a step)."""
    values = torch.tensor(scalar_values(step, lr, beta1, beta2, eps, weight_decay), dtype=torch.float32)
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def compile_ahead(capability: int, dtype: torch.dtype = torch.float32, grad_dtype=None, blocksize: int = 256,
                  *, tile_values: int = DEFAULT_TILE_VALUES, num_warps=None):
    """Compile adamw8bit_kernel for a GPU that need not be here (75: a Colab T4, 80, 90: H100).

    Returns Triton's CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`). Pointers other than scalars_ptr are
    declared 16-byte aligned and n a multiple of 16, as the launcher finds them for fresh torch tensors.
    """
    nb, num_warps = launch_config(blocksize, tile_values, num_warps)
    grad_dtype = dtype if grad_dtype is None else grad_dtype
    pointers = {"p_ptr": "*" + TRITON_TYPES[dtype], "g_ptr": "*" + TRITON_TYPES[grad_dtype], "q1_ptr": "*u8",
                "q2_ptr": "*u8", "absmax1_ptr": "*fp32", "absmax2_ptr": "*fp32", "code1_ptr": "*fp32",
                "code2_ptr": "*fp32", "scalars_ptr": "*fp32"}
    constexprs = {"BLOCKSIZE": blocksize, "NB": nb,
                  "FLOAT32_GRAD": grad_dtype == torch.float32, "HW_RCP": True, "SOFT_BF16": False}
    aligned = [name for name in pointers if name != "scalars_ptr"] + ["n"]  # a row of a scalars table may not be
    return compile_for(_twin(interpret=False).adamw8bit_kernel, capability, pointers, {"n": "i32"}, constexprs,
                       num_warps, aligned=aligned)
