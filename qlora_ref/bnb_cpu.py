"""What bitsandbytes 0.50.2 computes on this CPU: its CPU backend takes other paths by CPU feature.

"bitsandbytes' result on a CPU" is not one thing. Read from bitsandbytes/backends/cpu/ops.py and
csrc/cpu_ops.cpp, the paths that matter to the course:

    operation            taken when                                       what it computes
    quantize_4bit        always                                           PyTorch: the same bytes on every CPU
    dequantize_4bit      the last dimension is odd, or blocksize >= 2048   "portable": PyTorch, with bitsandbytes'
                         and torch's CPU capability is AVX512               Python tables (FP4's code 8 is +0.0)
                         x86 with AVX-512F (the C++ library's own CPUID    "avx512": rows of a multiple of 16 values;
                         check), the last dimension a multiple of 16        each row's scales are read as if every
                                                                            row began a new block (see below); FP4's
                                                                            code 8 is +0.0
                         aarch64, rows of whole blocks                     "neon": right values; FP4's code 8 is +0.0
                         anything else                                     "scalar": one loop over flat blocks: our
                                                                            values, bit for bit (FP4's code 8: -0.0)
    Linear4bit forward   training, or x requires grad                      dequantize_4bit as above, then F.linear:
                                                                            the decoder's mistakes are the layer's
                         inference (eval, no grad) on AVX512-BF16          the weight is repacked for a fused bfloat16
                                                                            kernel (x and absmax cast to bfloat16); the
                                                                            repacking fails unless in_features is a
                                                                            whole number of blocks
    import               AVX512-BF16                                       tries to fetch that kernel from the Hugging
                                                                            Face hub (the `kernels` package) and logs
                                                                            a warning when it cannot
    quantize_blockwise   x86                                               C++, one build for every x86 (compiled
    (8-bit: double                                                          for AVX2 and FMA; a CPU without AVX2 would
    quantization, the                                                       stop on an illegal instruction): a 65,536-
    8-bit optimizers)                                                       point lookup table (lesson 4)
                         aarch64                                           NEON, the same table; its grid index is
                                                                            rounded by other instructions (not checked
                                                                            here: no ARM machine)
    int8 matmul          torch's CPU capability AVX512                     torch._int_mm (the course does not use it)
    the 8-bit map,       always                                            torch.linspace in float32, whose last bit
    create_dynamic_map                                                      differs between torch's vector and scalar
                                                                            kernels for some levels
    offset of double     always                                            torch's float32 mean, whose last bits
    quantization                                                            depend on the order of the additions (the
                                                                            vector width, the number of threads)

No path checks for AMX; torch's bfloat16 matrix products use it through oneDNN where the CPU has it.

The AVX-512 loop's mistake: value j of row r (rows of n values) belongs to block (r*n + j) // B, but the loop
reads absmax[r * (n // B) + j // B]. The two agree only when n is a whole number of blocks (or there is one
row): rows of 96 or 160 values at B = 64 decode with other blocks' scales, from bytes equal to ours.

So the lessons check our values against `dequantize_4bit_portable`, the path that computes the same on every
CPU, and `dequantize_4bit_path` says which path bitsandbytes' own `dequantize_4bit` takes here.
"""

import platform
from math import prod

import torch

__all__ = [
    "avx512_reads_wrong_scales",
    "cpu_features",
    "decoder_rows",
    "dequantize_4bit_path",
    "dequantize_4bit_portable",
    "native_decoder_report",
]


def cpu_features() -> dict:
    """The checks bitsandbytes' CPU backend makes, as it makes them: {"machine", "avx512f", "avx512bf16", "torch"}.

    avx512f is its C++ library's own CPUID answer (the decoder asks it); avx512bf16 its Python check
    (bitsandbytes.functional.has_avx512bf16, read when it registers its CPU kernels); "torch" is
    torch.backends.cpu.get_cpu_capability() (ATEN_CPU_CAPABILITY=avx2 lowers it, and it alone).
    """
    import bitsandbytes.functional as bnbF
    from bitsandbytes.cextension import lib

    try:
        avx512f = bool(lib.has_avx512f_cpu())
    except (AttributeError, OSError, RuntimeError):  # no such symbol: an ARM or a library-less build
        avx512f = False
    return {
        "machine": platform.machine(),
        "avx512f": avx512f,
        "avx512bf16": bool(bnbF.has_avx512bf16()),
        "torch": torch.backends.cpu.get_cpu_capability(),
    }


def decoder_rows(shape):
    """(rows, values a row) as bitsandbytes' C++ decoder sees a shape: a 1-D tensor is one row."""
    return prod(shape[:-1]) if len(shape) > 1 else 1, shape[-1]


def dequantize_4bit_path(shape, blocksize: int, features: dict = None) -> str:
    """Which path bitsandbytes' CPU dequantize_4bit takes for a weight of this shape, on this CPU or on one with
    these `features` (cpu_features()'s keys): "portable", "avx512", "neon" or "scalar" (this module's table)."""
    _, n = decoder_rows(shape)
    features = features or cpu_features()
    if n % 2 or (blocksize >= 2048 and features["torch"] == "AVX512"):
        return "portable"
    if features["machine"] in ("aarch64", "arm64"):
        return "neon" if n % blocksize == 0 else "scalar"
    if features["avx512f"] and n % 16 == 0 and blocksize >= 16:
        return "avx512"
    return "scalar"


def avx512_reads_wrong_scales(shape, blocksize: int) -> bool:
    """Whether the AVX-512 loop reads other blocks' scales for this shape: several rows, not whole blocks."""
    m, n = decoder_rows(shape)
    return m > 1 and n % blocksize != 0


def dequantize_4bit_portable(packed: torch.Tensor, quant_state) -> torch.Tensor:
    """bitsandbytes' own portable 4-bit decoder (backends/default/ops.py), on bitsandbytes' QuantState.

    The path its CPU backend falls back to; plain PyTorch, so it computes the same on every CPU:
    code[q] * absmax in float32, then the cast. Its FP4 table has +0.0 at code 8 (ours, like its scalar C++ loop and
    its CUDA kernel, -0.0), so FP4 zeros differ from ours in sign only.
    """
    import bitsandbytes.functional as bnbF
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = quant_state.absmax
    if quant_state.nested:  # as bitsandbytes.functional.dequantize_4bit rebuilds it
        absmax = (bnbF.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
    code = _get_4bit_code(quant_state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, quant_state.blocksize,
                                    quant_state.shape, quant_state.dtype)


def native_decoder_report(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64) -> str:
    """One sentence on what bitsandbytes' own dequantize_4bit makes of `weight`'s bytes on this CPU, against ours:
    the path it takes and, where its values differ from ours, how many and how large its error is."""
    import bitsandbytes.functional as bnbF

    from .fourbit import dequantize_4bit, quantize_4bit
    from .linear import quantization_error

    packed, state = quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    packed_bnb, state_bnb = bnbF.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    native = bnbF.dequantize_4bit(packed_bnb, state_bnb).reshape(weight.shape)
    ours = dequantize_4bit(packed, state)
    path = dequantize_4bit_path(weight.shape, blocksize)
    rows = f"{quant_type}, {tuple(weight.shape)} at blocksize {blocksize}: bitsandbytes' {path} path"
    if torch.equal(native, ours):
        return f"{rows} gives our values from our bytes"
    source = "bytes equal to ours" if torch.equal(packed, packed_bnb) else "other bytes than ours"
    mean = weight.double().abs().mean().item()
    theirs_error, our_error = (quantization_error(weight, values)["mae"] / mean for values in (native, ours))
    return (f"{rows} misreads the scales: from {source} it decodes {int((native != ours).sum()):,} of "
            f"{ours.numel():,} values differently, mean error {theirs_error:.2f} of the mean |w| against "
            f"{our_error:.2f} for ours")
