"""float32 -> bfloat16 in Triton kernels, rounding to nearest even: written once, decorated by each kernel module.

@triton.jit decides when it decorates whether a function is compiled or interpreted (qlora_ref.kernels.twins), and
a kernel may call only functions decorated the same way as itself. So this one is left undecorated, and every kernel
module, in each of its copies, makes its own: `_round_to_bf16 = triton.jit(round_to_bf16)`.
"""

import triton.language as tl


def round_to_bf16(x):
    """float32 -> bfloat16, round to nearest even, in integer arithmetic (NaN stays NaN).

    The same rounding as the GPU's cvt.rn.bf16.f32 and torch's .to(torch.bfloat16); used only in
    Triton's interpreter, whose float32 -> bfloat16 cast drops the low 16 bits instead (Triton 3.9).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
