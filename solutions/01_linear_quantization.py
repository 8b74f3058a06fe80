# %% [markdown]
# # Exercises 1 — Write the absmax and zero-point quantizers
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/solutions/01_linear_quantization.ipynb)
#
# **What you will write**
# - `absmax_quantize` / `absmax_dequantize`: symmetric linear quantization with one scale per tensor;
# - `zeropoint_quantize` / `zeropoint_dequantize`: asymmetric linear quantization with a scale and a zero-point.
#
# **Prerequisites:** lesson 1 (`notebooks/01_linear_quantization.ipynb`), which derives both formulas.
#
# In `exercises/` the body of each function is replaced by `raise NotImplementedError(...)`: fill it in,
# then run the cell below it. A checker from `graders` compares your function with the reference
# (`qlora_ref.quantize_absmax` / `quantize_zeropoint`) on a few inputs and prints one line: `OK`, or the first
# value that differs with a hint, or `not implemented yet`. `solutions/` holds the same notebook, solved.

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

from graders.lesson01 import check_absmax_quantizer, check_zeropoint_quantizer

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. Symmetric (absmax) quantization
#
# With `bits` bits, the symmetric grid is the integers -qmax..qmax, qmax = 2^(bits-1) - 1 (127 at 8 bits; -128
# is left unused so that the grid is symmetric). The largest |x| maps to qmax:
#
# $$ s = \frac{\max_i |x_i|}{q_{\max}}, \qquad q_i = \mathrm{clamp}(\mathrm{round}(x_i / s), -q_{\max}, q_{\max}), \qquad \hat x_i = s\, q_i . $$
#
# Work in float32 with `torch.round` (it rounds halves to even, like the reference). If x is all zeros, any
# positive scale will do: use 1.0 (0 / 0 would give nan).

# %%
def absmax_quantize(x: torch.Tensor, bits: int = 8):
    """Symmetric per-tensor quantization: returns (q, scale), q the integers (as a float tensor), scale a 0-d tensor."""
    ### BEGIN SOLUTION
    qmax = 2 ** (bits - 1) - 1
    absmax = x.abs().max()
    scale = absmax / qmax if absmax > 0 else torch.tensor(1.0)
    q = torch.clamp(torch.round(x / scale), -qmax, qmax)
    ### END SOLUTION
    return q, scale


def absmax_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x_hat = scale * q, in float32."""
    ### BEGIN SOLUTION
    x_hat = scale * q.float()
    ### END SOLUTION
    return x_hat


# %%
_ = check_absmax_quantizer(absmax_quantize, absmax_dequantize)

# %% [markdown]
# ## 2. Asymmetric (zero-point) quantization
#
# The asymmetric grid is 0..2^bits - 1 and covers [low, high], where the range is first widened to contain 0
# (so that 0 is exact and the zero-point is a valid code): low = min(min x, 0), high = max(max x, 0).
#
# $$ s = \frac{\mathrm{high} - \mathrm{low}}{2^{b} - 1}, \qquad z = \mathrm{round}(-\mathrm{low} / s), \qquad
# q_i = \mathrm{clamp}(\mathrm{round}(x_i / s) + z,\ 0,\ 2^b - 1), \qquad \hat x_i = s\,(q_i - z). $$
#
# Round x / s first, then add the integer z. Again, an all-zero x gets the scale 1.0.

# %%
def zeropoint_quantize(x: torch.Tensor, bits: int = 8):
    """Asymmetric per-tensor quantization: returns (q, scale, zero), each as a tensor."""
    ### BEGIN SOLUTION
    qmax = 2**bits - 1
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / qmax if high > low else torch.tensor(1.0)
    zero = torch.round(-low / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
    ### END SOLUTION
    return q, scale, zero


def zeropoint_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """x_hat = scale * (q - zero), in float32."""
    ### BEGIN SOLUTION
    x_hat = scale * (q.float() - zero)
    ### END SOLUTION
    return x_hat


# %%
_ = check_zeropoint_quantizer(zeropoint_quantize, zeropoint_dequantize)

# %% [markdown]
# ## 3. What the checker catches
#
# A common slip: dividing by 2^(bits-1) instead of 2^(bits-1) - 1. The checker names the first mismatch and
# says what went wrong (this cell needs no code from you):

# %%
def absmax_quantize_off_by_one(x, bits=8):
    scale = x.abs().max() / 2 ** (bits - 1)
    return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), scale


_ = check_absmax_quantizer(absmax_quantize_off_by_one)

# %% [markdown]
# ## Summary
#
# - Symmetric: s = max|x| / (2^(b-1) - 1), q = clamp(round(x / s)); 0 is exact, half the grid is wasted on
#   one-signed data.
# - Asymmetric: the range [min(x, 0), max(x, 0)] on 2^b levels, with an integer zero-point so 0 stays exact.
# - Lesson 3 uses the symmetric idea per block of 64 values, with a table of 16 levels instead of a uniform grid.
#
# ## Check your understanding
#
# 1. Your symmetric 4-bit quantizer maps [-1, 1] to the integers -7..7. Which integer is never used, and how
#    much of the grid does one-signed data (all x >= 0) waste?
# 2. For x = [0.1, 0.2, 0.3], which of your two quantizers gives the smaller maximum error at 4 bits, and why?
# 3. Why must the zero-point be rounded to an integer? What goes wrong for a value of exactly 0 otherwise?
