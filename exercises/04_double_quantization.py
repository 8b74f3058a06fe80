# %% [markdown]
# # Exercises 4 — Double quantization: quantize the quantization constants
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/04_double_quantization.ipynb)
#
# **What you will write**
# - `compress_absmax`: the absmax of a 4-bit state, minus its mean (the offset), quantized to 8 bits with the
#   dynamic map in blocks of 256: one byte per absmax, one float32 `absmax2` per 256 of them;
# - `decompress_absmax`: the inverse, absmax^ = code[q] · absmax2 + offset, bit for bit as bitsandbytes.
#
# **Prerequisites:** lesson 4 (`notebooks/04_double_quantization.ipynb`) and exercise 3 (blockwise absmax, the
# nearest code). The paper: Dettmers et al. 2023, *QLoRA*, arXiv:2305.14314, section 3, "Double Quantization".
#
# In `exercises/` each function body is replaced by `raise NotImplementedError(...)`: fill them in, then run the
# check. `check_double_quant` compares your offset, `absmax2` and codes with bitsandbytes' nested state
# (`quantize_4bit(..., compress_statistics=True)`) on the absmax of three real weights, and your
# `decompress_absmax` with bitsandbytes' restored absmax, and prints one line. `solutions/` holds the notebook
# solved.

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

from qlora_ref import dynamic_map, quantize_4bit, quantize_blockwise
from graders.lesson04 import check_double_quant

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)
code = dynamic_map(signed=True)  # the 256 levels of the 8-bit dynamic map, ascending (lesson 4)
NESTED_BLOCKSIZE = 256  # absmax values per second-level block, as in bitsandbytes

# %% [markdown]
# ## 1. What you quantize
#
# The input is the float32 absmax of a 4-bit state: one per block of 64 weights, all positive. For a 256 × 256
# weight, 1,024 of them:

# %%
W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
absmax = quantize_4bit(W, blocksize=64)[1].absmax
print(f"{absmax.numel():,} absmax values ({absmax.dtype}): min {absmax.min():.4f}, mean {absmax.mean():.4f}, max {absmax.max():.4f}")
print(f"dynamic map: {code.numel()} levels from {code.min():.5f} to {code.max():.5f}")

# %% [markdown]
# ## 2. Compress
#
# 1. offset = the mean of all absmax values (`absmax.mean()`, one float32); centred = absmax - offset;
# 2. cut `centred` into blocks of 256 consecutive values (the last may be short) and take
#    absmax2_b = max |centred| over block b, one float32 per block;
# 3. u = centred / absmax2 of its block lies in [-1, 1]; its code is the index of the nearest of the 256
#    levels (as in exercise 3, ties to the lower level), stored as uint8.
#
# bitsandbytes' CPU quantizer rounds u through a lookup table instead of picking the nearest level, so a few
# of your codes may differ from its bytes (lesson 4, section 6): the checker accepts either, and counts them.

# %%
def compress_absmax(absmax: torch.Tensor, code: torch.Tensor):
    """(qabsmax uint8, offset float32 scalar, absmax2 float32 per block of 256): 8-bit codes of absmax - offset."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in compress_absmax")
    return qabsmax, offset, absmax2


# %% [markdown]
# ## 3. Decompress
#
# Look each code up in the map, scale it by its block's absmax2, then add the offset back:
# absmax^_i = code[q_i] · absmax2[i // 256] + offset. Compute the product first and add afterwards, each rounded to
# float32: bitsandbytes dequantizes in one step and adds the offset in another.

# %%
def decompress_absmax(qabsmax: torch.Tensor, offset: torch.Tensor, absmax2: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """absmax^ = code[qabsmax] * absmax2 of its block of 256 + offset, float32."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in decompress_absmax")
    return absmax_hat


# %%
_ = check_double_quant(compress_absmax, decompress_absmax)

# %% [markdown]
# ## 4. What the checker catches
#
# Skipping the offset: 8-bit blockwise quantization of the absmax as it is, with lesson 4's library function
# (this cell needs no code from you). The offset comes first in the check, so that is where it stops:

# %%
def compress_without_offset(absmax, code):
    qabsmax, state2 = quantize_blockwise(absmax, code=code, blocksize=NESTED_BLOCKSIZE, rounding="nearest")
    return qabsmax, 0.0, state2.absmax


_ = check_double_quant(compress_without_offset, decompress_absmax)

# %% [markdown]
# ## Summary
#
# - Double quantization stores each block's absmax as one byte: the mean is subtracted (one float32 offset
#   per tensor), the rest quantized with the dynamic map in blocks of 256 (one float32 absmax2 each).
# - The constants cost 8/64 + 32/(64 · 256) = 0.127 bits per parameter instead of 32/64 = 0.5.
# - Restoring is a lookup, a product and a sum, each rounded to float32, in bitsandbytes' order.
# - Lesson 5 does the same restoring inside a Triton kernel, one absmax per row of the tile.
#
# ## Check your understanding
#
# 1. Why is the mean subtracted from the absmax values before quantizing them with the signed dynamic map?
# 2. Recompute the constants' cost for blocksize 128 with nested blocks of 256. How much does double
#    quantization save per parameter there?
# 3. Your `decompress_absmax` must round each operation to float32 in bitsandbytes' order. Which reordering
#    would change the bytes, and why?
