# %% [markdown]
# # Exercises 2 — Build the NF4 codebook from the normal quantile function
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/02_nf4_codebook.ipynb)
#
# **What you will write**
# - `nf4_codebook(offset)`: NF4's 16 levels, derived with `scipy.stats.norm.ppf`, equal to bitsandbytes' table
#   **bit for bit**.
#
# **Prerequisites:** lesson 2 (`notebooks/02_nf4_codebook.ipynb`). The paper: Dettmers et al. 2023, *QLoRA*,
# arXiv:2305.14314, section 3.
#
# In `exercises/` the function body is replaced by `raise NotImplementedError(...)`: fill it in, then run the cell
# below it. `check_nf4_codebook` compares your table with bitsandbytes' (`get_4bit_type("nf4")`) and with
# `qlora_ref.nf4_codebook` at another offset, bit for bit, and prints one line. `solutions/` holds it solved.

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

import numpy as np
import torch
from scipy.stats import norm

from graders.lesson02 import check_nf4_codebook

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The recipe
#
# NF4 is asymmetric: 8 positive levels, 7 negative ones and an exact 0. With the offset δ = 0.9677083 (which keeps
# the extreme quantiles finite):
#
# - positives: Φ⁻¹(p) for p in `linspace(δ, 0.5, 9)` without its last point (0.5, whose quantile is 0);
# - negatives: −Φ⁻¹(p) for p in `linspace(δ, 0.5, 8)` without its last point;
# - add 0, sort ascending, divide by the largest level, so the table spans [-1, 1].
#
# To get bitsandbytes' bytes, follow its precision exactly: the probabilities are a **float32** grid
# (`torch.linspace`), `norm.ppf` works in float64, the levels are converted to **float32**, sorted, and divided
# by their max in float32. (Lesson 2 shows that the same formula in float64 throughout lands a few float32 steps
# away in 10 of the 16 entries.)

# %%
def nf4_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """NF4's 16 levels, ascending from -1.0 to 1.0, as a float32 tensor (bitsandbytes' table at the default offset)."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in nf4_codebook")
    return table


# %%
_ = check_nf4_codebook(nf4_codebook)

# %% [markdown]
# ## 2. The float64 derivation fails the check
#
# The same formula with float64 probabilities (`np.linspace`) is a perfectly good normal-float table, but not the
# one bitsandbytes ships. The checker recognises it (this cell needs no code from you):

# %%
def nf4_codebook_float64(offset=0.9677083):
    levels = np.concatenate([norm.ppf(np.linspace(offset, 0.5, 9)[:-1]), -norm.ppf(np.linspace(offset, 0.5, 8)[:-1]), [0.0]])
    levels = np.sort(levels)
    return torch.tensor(levels / levels.max(), dtype=torch.float32)


_ = check_nf4_codebook(nf4_codebook_float64)

# %% [markdown]
# ## Summary
#
# - NF4 = 8 positive and 7 negative normal quantiles, plus 0, normalised to [-1, 1].
# - "Equal to bitsandbytes" is a statement about bytes: float32 probabilities, float64 quantiles, float32 division.
# - Lesson 3 quantizes each block of 64 values to the nearest of these 16 levels.
#
# ## Check your understanding
#
# 1. Why does NF4 have 8 positive levels but only 7 negative ones, and why is 0 one of the 16?
# 2. The same recipe in float64 throughout differs from bitsandbytes' table in some entries. Which step
#    of the recipe decides the bytes, and by how many ulps do they differ?
# 3. What does the offset 0.9677083 control, and what would happen to the extreme levels with offset 0.99?
