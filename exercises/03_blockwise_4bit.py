# %% [markdown]
# # Exercises 3 — Blockwise NF4 quantization and 4-bit packing
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/03_blockwise_4bit.ipynb)
#
# **What you will write**
# - `block_absmax`: one absmax per block of `blocksize` consecutive values;
# - `nearest_code`: the index of the nearest of the 16 levels;
# - `pack_nibbles` / `unpack_nibbles`: two 4-bit codes per byte, the even element in the high nibble;
# - `quantize_nf4` and `dequantize_nf4`, which put them together, byte for byte as bitsandbytes' `quantize_4bit`.
#
# **Prerequisites:** lessons 2 and 3 (`notebooks/03_blockwise_4bit.ipynb`). The paper: Dettmers et al. 2023,
# *QLoRA*, arXiv:2305.14314.
#
# In `exercises/` each function body is replaced by `raise NotImplementedError(...)`: fill them in, then run the
# check. `check_blockwise_4bit` compares your bytes and absmax with bitsandbytes' CPU `quantize_4bit` and your
# dequantized values with `code[q] * absmax`, on five inputs (a short last block, an odd count, an all-zero block),
# and prints one line. `solutions/` holds the notebook solved.

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

from qlora_ref import nf4_codebook
from graders.lesson03 import check_blockwise_4bit

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)
code = nf4_codebook()  # the 16 NF4 levels, ascending (lesson 2)

# %% [markdown]
# ## 1. One absmax per block
#
# Read x flat (in memory order) and cut it into blocks of `blocksize` values; the last block may be shorter.
# absmax_b = max |x_i| over block b, one float32 per block: ceil(n / blocksize) of them.

# %%
def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| over each block of `blocksize` consecutive values of the 1-D tensor `flat` (the last may be short)."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in block_absmax")
    return absmax


# %% [markdown]
# ## 2. The nearest level
#
# Each scaled value u = x / absmax lies in [-1, 1]; its code is the index of the nearest level of the (ascending)
# table. Exactly halfway between two levels, take the lower one (`argmin` returns the first minimum).

# %%
def nearest_code(unit: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """For each value of `unit`, the index (int64) of the nearest entry of the ascending table `code`."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in nearest_code")
    return codes


# %% [markdown]
# ## 3. Two codes per byte
#
# A code takes 4 bits, so a byte holds two: byte_j = q_{2j} << 4 | q_{2j+1}, the even element in the **high**
# nibble (bitsandbytes' order). `unpack_nibbles` undoes it and returns the first n codes as int64 (to index a table).

# %%
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """An even number of 4-bit codes -> uint8 bytes, two per byte, the even one in the high nibble."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in pack_nibbles")
    return packed


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n 4-bit codes of `packed`, high nibble first, as int64."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in unpack_nibbles")
    return codes


# %% [markdown]
# ## 4. Quantize and dequantize
#
# Put the pieces together: u = x / absmax of its block; with an odd count append one 0.0 to u (bitsandbytes fills
# the free low nibble with the code of 0.0, 7 for NF4); round to the nearest code; pack. An all-zero block has
# absmax 0: divide by `absmax.clamp(min=1e-38)` so that 0 / 0 does not make nan (store the absmax unclamped).
#
# Dequantizing looks each code up in the table and scales it by its block's absmax: x̂_i = code[q_i] · absmax_b.

# %%
def quantize_nf4(x: torch.Tensor, code: torch.Tensor, blocksize: int = 64):
    """Blockwise 4-bit quantization of x (read flat): returns (packed uint8 bytes, absmax per block)."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in quantize_nf4")
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, blocksize: int = 64) -> torch.Tensor:
    """The n values x_hat = code[q] * absmax of their block, float32, flat."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in dequantize_nf4")
    return x_hat


# %%
_ = check_blockwise_4bit(quantize_nf4, dequantize_nf4)

# %% [markdown]
# ## Summary
#
# - Blockwise absmax confines an outlier to its block, at 32 / blocksize bits per value for the scales.
# - The code is an index into the table; dequantizing is a lookup then a multiplication, never `q * absmax`.
# - Two codes per byte, the even element high: the same bytes as bitsandbytes, checked.
#
# ## Check your understanding
#
# 1. A tensor of 1,000,000 values is quantized with blocksize 64. How many bytes do the codes take, and the
#    float32 absmax? How many bits per value is that in all?
# 2. Why is `q * absmax` wrong as a dequantization, and what value would it give for the code 15 of NF4?
# 3. An odd number of values leaves half a byte unused. What does bitsandbytes put there, and why does it
#    matter for bit-exactness?
