"""Launching a compiled Triton kernel with less Python, and compiling one for a GPU that need not be here: written
once for every kernel module.

`kernel[grid](...)` binds the arguments, works out the specialization (each pointer's 16-byte alignment; whether an
integer is 1, a multiple of 16, wider than 32 bits), finds the compiled kernel and launches it: Python that can take
longer than the GPU needs for a 4096 x 4096 weight. It returns the compiled kernel, so `launch` sends the first
launch of each specialization that way and later ones with the same key straight to the compiled kernel's own
launcher, `compiled[grid](*args, *constexprs)`.
"""

import torch
import triton

from .twins import interpreted

__all__ = ["FAST_LAUNCH", "TRITON_TYPES", "compile_for", "launch"]

FAST_LAUNCH = True  # False: every launch goes through kernel[grid](...) (bench/kernels.py measures both)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_COMPILED = {}


def _spec(value: int):
    return (value == 1, value % 16 == 0, value >= 2**31)


def launch(kernel, names, grid, args, constexprs, num_warps, **options):
    """kernel[grid](*args, **dict(zip(names, constexprs)), num_warps=num_warps, **options); `args` are the tensors,
    then the integers. A kernel run by Triton's interpreter returns nothing to keep and always goes the long way."""
    pointers = [a for a in args if isinstance(a, torch.Tensor)]
    ints = args[len(pointers):]
    key = (kernel, pointers[0].device.index, tuple(p.dtype for p in pointers),
           tuple(p.data_ptr() % 16 == 0 for p in pointers), tuple(_spec(i) for i in ints), constexprs, num_warps)
    compiled = _COMPILED.get(key) if FAST_LAUNCH else None
    if compiled is not None:
        compiled[grid](*args, *constexprs)
        return
    compiled = kernel[grid](*args, **dict(zip(names, constexprs)), num_warps=num_warps, **options)
    if compiled is not None and not interpreted(kernel):
        _COMPILED[key] = compiled


def compile_for(kernel, capability: int, pointers: dict, ints: dict, constexprs: dict, num_warps: int, *,
                aligned=None, fp_fusion: bool = False):
    """Triton's CompiledKernel of `kernel` (a compiled, not interpreted, JITFunction) for compute capability
    `capability` (75: a Colab T4, 90: an H100), with no GPU and no driver: `.asm["ptx"]`, `.asm["cubin"]`.

    pointers and ints map argument names to Triton types ("*fp32", "i32"); `aligned` names those declared 16-byte
    aligned or divisible by 16 (default: all of them), as the launcher finds them for tensors fresh from torch.
    fp_fusion=False keeps a product and a sum two roundings, as every kernel here is launched.
    """
    from triton.backends.compiler import GPUTarget

    signature = {**pointers, **ints, **{name: "constexpr" for name in constexprs}}
    aligned = [*pointers, *ints] if aligned is None else aligned
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
