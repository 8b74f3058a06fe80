# %% [markdown]
# # Exercises 10 — A 4-bit weight's shard, and each rank's share of the loss
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/solutions/10_fsdp_shards.ipynb)
#
# **What you will write**
# - `shard_streams`: the bytes rank k of N keeps of a 4-bit weight, its rows [k R/N, (k+1) R/N) cut out of
#   each of the three streams (codes, absmax, nested absmax), and a ValueError where a cut would split a block;
# - `loss_weight`: what rank k multiplies its mean loss by, so that FSDP2's average of the ranks' gradients is
#   the gradient of the whole batch's mean loss.
#
# **Prerequisites:** lesson 10 (`notebooks/10_fsdp2_qlora.ipynb`), exercises 3 and 4 (the streams).
#
# In `exercises/` each function body is replaced by `raise NotImplementedError(...)`: fill them in, then run the
# checks. `check_shard_streams` compares your shards with what FSDP2 cuts from a `Weight4bit` (byte for byte)
# for nested and plain weights over 1 to 4 ranks; `check_loss_weight` averages your weighted losses as FSDP2
# averages gradients. `solutions/` holds the notebook solved.

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

from qlora_ref import quantize_4bit
from graders.lesson10 import check_loss_weight, check_shard_streams

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)
NESTED_BLOCKSIZE = 256  # absmax values per nested block

# %% [markdown]
# ## 1. The streams of one weight
#
# `quantize_4bit` of a 256 × 256 weight with double quantization: 32,768 bytes of codes (two a byte, row
# after row), 1,024 absmax codes (one per 64 values) and 4 nested absmax (one per 256 absmax, 16,384 values).

# %%
W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
packed, state = quantize_4bit(W, blocksize=64, double_quant=True)
codes, absmax, absmax2 = packed.reshape(-1), state.absmax, state.state2.absmax
print(f"codes {codes.numel():,} bytes, absmax {absmax.numel():,} ({absmax.dtype}), absmax2 {absmax2.numel()} "
      f"({absmax2.dtype})")

# %% [markdown]
# ## 2. A rank's shard
#
# Rank k of N keeps rows k R/N to (k+1) R/N, values first = k (R/N) C to last = (k+1) (R/N) C of the flat
# weight. Cut every stream at the same values: codes from first/2 to last/2, absmax from first/64 to last/64,
# absmax2 from first/16,384 to last/16,384 (with blocksize B: B and 256 B). Each cut must fall on a whole
# unit, 256 B values with double quantization (absmax2 is None without it) and B without; otherwise raise a
# ValueError that says so.

# %%
def shard_streams(codes, absmax, absmax2, shape, blocksize, world_size, rank):
    """(codes, absmax, absmax2) of rank's rows of an [R, C] 4-bit weight; absmax2 is None when not nested."""
    ### BEGIN SOLUTION
    rows, cols = shape
    unit = blocksize * NESTED_BLOCKSIZE if absmax2 is not None else blocksize
    per_rank = rows // world_size
    if rows % world_size or (per_rank * cols) % unit:
        raise ValueError(f"{rows} rows over {world_size} ranks would cut a block of {unit} values")
    first, last = rank * per_rank * cols, (rank + 1) * per_rank * cols
    nested = None if absmax2 is None else absmax2[first // unit:last // unit]
    ### END SOLUTION
    return codes[first // 2:last // 2], absmax[first // blocksize:last // blocksize], nested


# %%
_ = check_shard_streams(shard_streams)

# %% [markdown]
# ## 3. Each rank's share of the loss
#
# A batch's loss is the mean over its T answer tokens; rank k sees T_k of them and computes their mean l_k.
# FSDP2 averages the ranks' gradients: it sums them and divides by N. Find the weight w_k such that the
# average of w_k l_k over the ranks is the batch's mean, sum_k T_k l_k / T, also when the ranks' shares differ.

# %%
def loss_weight(my_tokens: int, all_tokens: int, world_size: int) -> float:
    """The factor rank k multiplies its mean loss by before backward."""
    ### BEGIN SOLUTION
    weight = world_size * my_tokens / all_tokens
    ### END SOLUTION
    return weight


# %%
_ = check_loss_weight(loss_weight)

# %% [markdown]
# ## 4. What the checker catches
#
# Each rank simply backpropagating its own mean (weight 1): right only when every rank has the same number of
# answer tokens.

# %%
_ = check_loss_weight(lambda my_tokens, all_tokens, world_size: 1.0)

# %% [markdown]
# ## Summary
#
# - A shard of whole rows is a whole quantization of those rows when every cut falls on a nested block
#   (16,384 values at B = 64): its codes, its absmax and its absmax2 are slices of the single-process streams.
# - Weighting rank k's mean loss by N T_k / T makes FSDP2's average the batch's mean.
#
# ## Check your understanding
#
# 1. Why can a rank not dequantize half a nested block, even though it holds every code and absmax code of it?
# 2. With plain absmax, which world sizes does a 4096 × 11008 weight (Llama-2-7B's down_proj) allow?
# 3. The trainer reports the whole batch's loss on every rank. Which all-reduce computes it from the ranks'
#    (T_k, l_k)?
