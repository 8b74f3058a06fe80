# %% [markdown]
# # Exercises 5 — A Triton kernel that dequantizes 4-bit weights
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/solutions/05_triton_kernels.ipynb)
#
# **What you will write**
# - the body of `dequantize_4bit_kernel`: each program of the grid takes TILE packed bytes, unpacks the two
#   4-bit codes of each byte, looks them up in the codebook, scales them by their block's absmax and stores
#   the values, masked at the end.
#
# **Prerequisites:** lesson 5 (`notebooks/05_triton_kernels.ipynb`), which builds the same kernel step by step,
# and exercise 3 (packing two codes per byte). No GPU: the checker runs your kernel in Triton's interpreter on the
# CPU, on small inputs, in about a second.
#
# In `exercises/` the kernel's body is replaced by `raise NotImplementedError(...)`: fill it in, then run the
# check. `check_dequantize_kernel` launches your kernel on four inputs (odd counts, a short last block, NF4 and
# FP4, float32 and float16 output), compares its values with `qlora_ref.dequantize_4bit` and bitsandbytes'
# `dequantize_4bit`, watches for stores past the end, and prints one line. `solutions/` holds the notebook solved.

# %%
import logging
import os
import sys

# Before importing torch: bitsandbytes would otherwise torch.compile its CPU code paths, which is slow.
os.environ["TORCH_COMPILE_DISABLE"] = "1"
# bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a kernel from the Hugging Face hub and logs a
# warning to stderr when it cannot. The course runs offline: that logger is kept quiet (lesson 0, section 4).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # clone the course, install it beside Colab's own torch (tools/colab_install.sh), run from notebooks/
    import importlib
    import subprocess

    subprocess.run(["sh", "-c", "[ -d qlora-course ] || git clone -q --depth 1 -b main https://github.com/OWNER/qlora-course; "
                    f"sh qlora-course/tools/colab_install.sh {sys.executable}"], cwd="/content", check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir("/content/qlora-course/notebooks")

import torch
import triton
import triton.language as tl

from qlora_ref import dequantize_4bit, quantize_4bit
from graders.lesson05 import check_dequantize_kernel, launch_dequantize_kernel
from qlora_ref.compare import compare

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The contract
#
# The packed tensor holds (n + 1) // 2 bytes, byte j = q_{2j} << 4 | q_{2j+1} (the even value in the high
# nibble); `absmax` one float32 per block of BLOCKSIZE values; `code` the 16 levels of the codebook. The grid
# has cdiv((n + 1) // 2, TILE) programs, and program p owns bytes p·TILE .. p·TILE + TILE - 1:
#
#     out[2j]     = code[byte_j >> 4]  · absmax[2j // BLOCKSIZE]
#     out[2j + 1] = code[byte_j & 0xF] · absmax[2j // BLOCKSIZE]      (both values of a byte share a block)
#
# multiplied in float32; `tl.store` converts to the output's dtype. The last program's tile runs past the end:
# mask its loads and stores (an odd n has no value 2j + 1 in its last byte).
#
# No `TRITON_INTERPRET=1` here: the checker (and `launch_dequantize_kernel`) run the kernel in Triton's
# interpreter themselves, so this notebook works on any machine. Write the whole kernel in its one function:
# the interpreter cannot call another `@triton.jit` function from it unless the variable was set before both
# were defined (as lesson 5 does).

# %%
@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,  # uint8 [(n + 1) // 2]: two 4-bit codes per byte, the even value in the high nibble
    absmax_ptr,  # float32 [cdiv(n, BLOCKSIZE)]: one absmax per block
    code_ptr,  # float32 [16]: the codebook, indexed by the 4-bit code
    out_ptr,  # float32 or float16 [n]: the values
    n,  # number of values (may be odd)
    BLOCKSIZE: tl.constexpr,  # values per absmax
    TILE: tl.constexpr,  # packed bytes per program
):
    ### BEGIN SOLUTION
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)  # this program's bytes
    mask = offs < (n + 1) // 2
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
    even = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax
    odd = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax
    tl.store(out_ptr + 2 * offs, even, mask=2 * offs < n)
    tl.store(out_ptr + 2 * offs + 1, odd, mask=2 * offs + 1 < n)
    ### END SOLUTION


# %%
_ = check_dequantize_kernel(dequantize_4bit_kernel)

# %% [markdown]
# ## 2. Run it yourself
#
# `launch_dequantize_kernel(kernel, packed, state, tile)` launches a kernel with this contract on a
# `quantize_4bit` state (in the interpreter, on the CPU) and returns the values in the state's shape and dtype.
# Once your kernel passes, try other shapes, tiles and block sizes and compare with the reference:
#
#     x = torch.randn(7, 45, generator=torch.Generator().manual_seed(0))
#     packed, state = quantize_4bit(x, blocksize=64)
#     compare("my kernel vs dequantize_4bit", launch_dequantize_kernel(dequantize_4bit_kernel, packed, state, tile=8),
#             dequantize_4bit(packed, state))
#
# ## 3. What the checker catches
#
# The most common slip: the nibbles in the wrong order (the low nibble taken as the even value). This kernel is
# complete but swaps them (this cell needs no code from you):

# %%
@triton.jit
def dequantize_swapped_nibbles(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
    offs = tl.program_id(0) * TILE + tl.arange(0, TILE)
    mask = offs < (n + 1) // 2
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + (2 * offs) // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out_ptr + 2 * offs, tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * absmax, mask=2 * offs < n)
    tl.store(out_ptr + 2 * offs + 1, tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax, mask=2 * offs + 1 < n)


_ = check_dequantize_kernel(dequantize_swapped_nibbles)

# %% [markdown]
# Launched by hand on a 7 × 45 weight, the swapped kernel differs from the reference wherever the two codes of a
# byte differ:

# %%
x = torch.randn(7, 45, generator=torch.Generator().manual_seed(0))
packed, state = quantize_4bit(x, blocksize=64)
_ = compare("swapped kernel vs dequantize_4bit", launch_dequantize_kernel(dequantize_swapped_nibbles, packed, state, tile=8),
            dequantize_4bit(packed, state))

# %% [markdown]
# ## Summary
#
# - A Triton kernel is written per tile: program id → byte offsets → mask; a load brings TILE bytes in.
# - `byte >> 4` and `byte & 0xF` are the even and odd codes; `tl.load(code_ptr + q)` is the table lookup; the
#   block of byte j is 2j // BLOCKSIZE.
# - Two stores, at 2·offs and 2·offs + 1, each with its own mask: an odd count has no last odd value.
# - Lesson 5's library kernel adds double dequantization, 16-byte stores with `tl.join` and unmasked full tiles.
#
# ## Check your understanding
#
# 1. With TILE = 1024 bytes per program, how many programs does a 4096 x 4096 weight need?
# 2. Why do the two stores need separate masks, and which one is partial for an odd number of values?
# 3. The kernel reads the block's absmax once per byte. How would you make it read it once per block, and
#    would that change the output bytes?
