# %% [markdown]
# # Lesson 2 — The NF4 codebook, from the normal quantile function to bitsandbytes' table
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/02_nf4_codebook.ipynb)
#
# **What you will learn**
# - that a 4-bit code is an index into a table of 16 values, and how to dequantize one correctly;
# - quantile quantization: why equal-probability bins make the most of 16 codes, why its extreme quantiles are
#   infinite, and how the offset 0.9677083 avoids them;
# - why NF4 is asymmetric (8 positive levels, 7 negative, and an exact zero);
# - how to derive NF4 with `scipy.stats.norm.ppf` and match bitsandbytes' table bit for bit, and why a
#   float64 derivation does not;
# - how equal NF4's bins really are, under its own assumption and in practice;
# - how INT4, FP4 and NF4 compare on normal data (reproducing bitsandbytes' 0.0728 and 0.0965).
#
# **Prerequisites:** lesson 1 (absmax scaling, levels, blocks). The normal distribution and its cumulative
# distribution function Φ. No GPU needed.
#
# The paper: Dettmers et al. 2023, *QLoRA: Efficient Finetuning of Quantized LLMs*, arXiv:2305.14314,
# section 3 ("4-bit NormalFloat Quantization"). This lesson's code is `qlora_ref/codebooks.py`; the figures
# come from `qlora_ref/plots/codebooks.py`.

# %% [markdown]
# **The code of this lesson**: `qlora_ref/codebooks.py`.

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

import bitsandbytes.functional as bnbF
import numpy as np
import torch
from scipy.stats import norm

import qlora_ref
from qlora_ref import bnb_cpu, dequantize_4bit, fp4_codebook, int4_codebook, nf4_codebook, quantize_4bit
from qlora_ref.compare import compare
from qlora_ref.plots.codebooks import bin_masses, code_usage, plot_bin_masses, plot_codebook_levels, plot_equal_mass_slabs

# %matplotlib inline
_ = torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)  # all the data of this lesson comes from this generator
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16


def show(values, digits=4):
    """A list of numbers, rounded, on one line."""
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"


# %% [markdown]
# ## 1. A 4-bit code is an index into a table
#
# Lesson 1's symmetric quantizer stored an integer q and recovered s·q. Another way to say the same thing:
# the 4 stored bits are an **index** into a table of 16 values in [-1, 1], and a block of values is stored as
# one scale (its absmax) plus one index per value:
#
# $$ u_i = x_i / \mathrm{absmax}, \qquad q_i = \text{index of the table value nearest to } u_i, \qquad \hat x_i = \mathrm{table}[q_i] \cdot \mathrm{absmax}. $$
#
# Lesson 1's INT4 is one such table: the integers -7..7 over 7, listed from 7 down with 0 twice (as 0 and -0),
# so 16 entries hold 15 distinct values. The table can be *any* 16 numbers: that freedom is
# what NF4 uses.

# %%
print("INT4 table:", show(int4_codebook()))
print("distinct levels:", int4_codebook().unique().numel())

# %% [markdown]
# Because q is an index, dequantizing is a **lookup**: table[q] · absmax. Seed 001 "dequantizes" NF4 with
# `quantized * scales`, which multiplies the index itself. Here is what that does to one block of 64 values:

# %%
block = torch.randn(64, generator=generator)
packed, state = quantize_4bit(block, blocksize=64, quant_type="nf4")
indices = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0x0F], dim=1).reshape(-1)  # 2 codes per byte
absmax = state.absmax[0]
lookup = nf4_codebook()[indices.long()] * absmax
seed_001 = indices.float() * absmax
print("first 6 values:         ", show(block[:6]))
print("table[q] * absmax:      ", show(lookup[:6]))
print("seed 001, q * absmax:   ", show(seed_001[:6]))
print(f"mean |error|: lookup {(block - lookup).double().abs().mean():.4f}, seed 001 {(block - seed_001).double().abs().mean():.4f}")
_ = compare("lookup vs dequantize_4bit", lookup, dequantize_4bit(packed, state))

# %% [markdown]
# ## 2. Which 16 values? Quantile quantization
#
# QLoRA's premise (section 3): pretrained weights are roughly normally distributed around 0. Uniform levels
# then spend as many codes on the sparse tails as on the crowded centre. Measure how often each INT4 level is
# used on N(0, 1) data quantized in blocks of 64:

# %%
normal_sample = torch.randn(2**20, generator=generator)
levels, usage = code_usage(normal_sample, int4_codebook(), blocksize=64)
print("INT4 level:", show(levels, 2))
print("used      :", show(usage, 4))
entropy = -(usage * usage.log2()).sum().item()
print(f"the centre level is used {usage.max() / usage.min():.1f}x as often as the least used one; entropy {entropy:.3f} bits of 4")

# %% [markdown]
# A 4-bit code carries the most information, 4 bits, when all 16 values are used equally often (its entropy
# is then log2 16 = 4). So cut N(0, 1) into 16 slabs that each hold the same probability, 1/16, and give
# each slab one level. Here are the slabs: narrow in the crowded centre, wide in the tails.

# %%
fig, slab_edges = plot_equal_mass_slabs(16)
fig

# %% [markdown]
# That is **quantile quantization** (QLoRA builds NF4 on it, citing the 8-bit optimizers paper,
# Dettmers et al. 2021, arXiv:2110.02861): the slab edges are the quantiles Φ^-1(i/16), i = 0..16, where
# Φ^-1 is the normal quantile function, `scipy.stats.norm.ppf`:

# %%
edges = norm.ppf(np.arange(17) / 16)
print("edges Φ^-1(i/16):", show(edges, 3))
print("each slab's probability:", show(np.diff(norm.cdf(edges)), 4))

# %% [markdown]
# The two outer edges are infinite: Φ(x) reaches 0 and 1 only at ∓∞. The QLoRA paper (its equation 4) puts
# each level halfway between two quantiles, q_i = ½(Φ^-1(i/17) + Φ^-1((i+1)/17)), i = 0..15. Taken as
# written, its lowest level is infinite (i = 0 takes Φ^-1(0) = -∞) and its highest is not:

# %%
paper_levels = 0.5 * (norm.ppf(np.arange(16) / 17) + norm.ppf(np.arange(1, 17) / 17))
print("paper's eq. 4 levels:", show(paper_levels, 3))

# %% [markdown]
# The fix in bitsandbytes: do not go all the way to probability 1. The outermost level is placed at the
# quantile of δ = 0.9677083 instead, and the levels are then divided by that outermost value, so the table
# spans exactly [-1, 1] (the block's absmax lands on ±1). bitsandbytes' docstring says δ "was empirically
# optimized"; its issues #440 and #938 ask where it comes from. An observation, not a documented derivation:
# δ equals 929/960, the mean of 1 - 1/(2·15) and 1 - 1/(2·16), to all 7 digits given.

# %%
delta = 0.9677083
print(f"Φ^-1(δ) = {norm.ppf(delta):.4f} standard deviations")
print(f"929/960 = {929 / 960:.10f};  ((1 - 1/30) + (1 - 1/32)) / 2 = {((1 - 1 / 30) + (1 - 1 / 32)) / 2:.10f}")

# %% [markdown]
# ## 3. Why asymmetric: 8 + 7 + an exact zero
#
# A symmetric code with 16 levels has no zero: the levels come in ± pairs, so 0 falls between the middle two.
# Here is the symmetric quantile code (16 equal bins between 1 - δ and δ, one level in the middle of each):

# %%
p = np.linspace(1 - delta, delta, 17)
symmetric = 0.5 * (norm.ppf(p[1:]) + norm.ppf(p[:-1]))
symmetric /= symmetric.max()
print("symmetric 16:", show(symmetric, 4))
print(f"smallest |level|: {np.abs(symmetric).min():.4f}: 0 is not representable")

# %% [markdown]
# Zero matters (lesson 1: padding, and the many weights near 0 would all pick up an error). NF4 therefore
# builds the two halves separately and shares the zero: 8 positive levels Φ^-1(p) at 8 equally spaced
# probabilities from δ down towards 0.5, 7 negative ones the same way, and 0. That is 8 + 7 + 1 = 16 codes,
# all used. (bitsandbytes' symmetric variant, `create_normal_map(use_extra_value=False)`, has 7 + 7 + 1 = 15
# distinct values and wastes a code.)
#
# ## 4. NF4, derived step by step
#
# In float64 throughout, with numpy:

# %%
positive_p = np.linspace(delta, 0.5, 9)[:-1]  # 8 probabilities, 0.9677 .. 0.5585 (0.5 itself would give 0)
negative_p = np.linspace(delta, 0.5, 8)[:-1]  # 7 probabilities, 0.9677 .. 0.5668
print("positive probabilities:", show(positive_p))
print("negative probabilities:", show(negative_p))
positive = norm.ppf(positive_p)
negative = -norm.ppf(negative_p)
print("Φ^-1, positive:", show(positive))
print("-Φ^-1, negative:", show(negative))
nf4_float64 = np.sort(np.concatenate([negative, [0.0], positive]))
nf4_float64 /= nf4_float64.max()
print("NF4 (float64):", show(nf4_float64))

# %% [markdown]
# Now bitsandbytes' table, the 16 float32 values its kernels use (`get_4bit_type("nf4")`). Our float64
# derivation is **close, but not bit for bit**:

# %%
bnb_nf4 = bnbF.get_4bit_type("nf4", device="cpu")
ours_float64 = torch.tensor(nf4_float64, dtype=torch.float32)
compare("float64 derivation vs bitsandbytes", ours_float64, bnb_nf4, rtol=1e-6)
compare("float64 derivation vs bitsandbytes, bit for bit", ours_float64, bnb_nf4)
ulps = ours_float64.view(torch.int32) - bnb_nf4.view(torch.int32)  # neighbouring float32s differ by 1 here
print("difference in float32 steps, per entry:", ulps.tolist())
print(f"{int((ulps != 0).sum())} of 16 entries differ, by at most {(ours_float64 - bnb_nf4).abs().max().item():.1e}")

# %% [markdown]
# The difference is in the recipe. bitsandbytes' `create_normal_map` builds the probabilities with
# `torch.linspace`, in **float32** (δ itself becomes 0.96770829), evaluates Φ^-1 in float64 (scipy), stores
# the results as float32 and divides by the maximum in float32. Follow the same recipe and every bit agrees:

# %%
positive_p32 = torch.linspace(delta, 0.5, 9)[:-1]  # float32
negative_p32 = torch.linspace(delta, 0.5, 8)[:-1]
print(f"δ in float32: {positive_p32[0].item():.10f}")
print("largest probability error of float32:", f"{np.abs(positive_p32.double().numpy() - positive_p).max():.2e}")
values = np.concatenate([norm.ppf(positive_p32.numpy()), -norm.ppf(negative_p32.numpy()), [0.0]])
table32 = torch.tensor(values, dtype=torch.float32).sort().values
table32 = table32 / table32.max()
compare("float32 recipe vs bitsandbytes", table32, bnb_nf4)
compare("qlora_ref.nf4_codebook() vs bitsandbytes", nf4_codebook(), bnb_nf4)
print("bit for bit:", torch.equal(nf4_codebook().view(torch.int32), bnb_nf4.view(torch.int32)))
create_map = bnbF.create_normal_map()  # 256 entries: the 16 values and 240 zeros of padding for 8-bit indexing
_ = compare("create_normal_map()'s distinct values", create_map.unique(), bnb_nf4)

# %% [markdown]
# So `qlora_ref.nf4_codebook()` uses the float32 recipe: it is the table bitsandbytes ships. The float64
# derivation is the "mathematically cleaner" one, off by a few float32 steps (at most about 1e-7) in 10 of the
# 16 entries: harmless for accuracy, but it would break byte-for-byte comparisons of dequantized weights.
#
# ## 5. The sources' NF4 lists
#
# Seed 004 prints NF4 as a list of **15** values. Seed 001 prints 16. Side by side with the true table
# (rounded to 4 decimals):

# %%
seed_004 = [-1.0, -0.69, -0.52, -0.39, -0.28, -0.18, -0.09, 0.0, 0.08, 0.17, 0.27, 0.38, 0.51, 0.68, 1.0]
seed_001 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
            0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]  # fmt: skip
true_nf4 = nf4_codebook().tolist()
print(f"seed 004 has {len(seed_004)} values, seed 001 {len(seed_001)}, NF4 has {len(true_nf4)}")
print("index   NF4      seed 001   seed 004")
for i, value in enumerate(true_nf4):
    seed4 = f"{seed_004[i]:8.2f}" if i < 8 else "        "  # the negative half and 0 line up
    print(f"{i:5d} {value:8.4f} {seed_001[i]:9.4f}  {seed4}")
print("seed 004's positive values:", seed_004[8:])
print("NF4's positive values:     ", show(true_nf4[8:], 4))
nearest = [min(true_nf4[8:], key=lambda t: abs(t - v)) for v in seed_004[8:]]
print("seed 004 minus nearest NF4 level:", show([v - t for v, t in zip(seed_004[8:], nearest)], 3))
_ = compare("seed 001 vs NF4 rounded to 4 decimals", torch.tensor(seed_001), torch.tensor([round(v, 4) for v in true_nf4]))

# %% [markdown]
# Seed 004's negative half is right (truncated to 2 digits), but its positive half has only 7 values, and five
# of them are off by 0.009 to 0.053 from the nearest NF4 level. Seed 001's 16 values are NF4 correctly rounded to 4 decimals.
#
# ## 6. Are NF4's bins really of equal mass?
#
# Rounding to the nearest level gives each level a bin: from the midpoint with its lower neighbour to the
# midpoint with its upper one. Put the levels where the construction assumes they are, at table · Φ^-1(δ) =
# table · 1.848 standard deviations, and compute each bin's probability under N(0, 1):

# %%
nf4_scale = norm.ppf(delta)
levels, masses = bin_masses(nf4_codebook(), nf4_scale)
print("level:", show(levels, 3))
print("mass :", show(masses, 4))
print(f"1/16 = {1 / 16:.4f}; masses from {masses.min():.4f} to {masses.max():.4f} (sum {masses.sum():.6f})")
print(f"the 7 negative levels' bins: {masses[:7].mean():.4f} on average (0.4677/7 = {(delta - 0.5) / 7:.4f})")
print(f"the 8 positive levels' bins:  {masses[8:].mean():.4f} on average (0.4677/8 = {(delta - 0.5) / 8:.4f})")

# %% [markdown]
# Honestly: **roughly** equal, not equal. Every bin holds between 0.056 and 0.071, against 1/16 = 0.0625. The
# asymmetry shows: the 7 negative levels share the left half (0.067 each on average, the spacing 0.4677/7 of
# their probabilities) and the 8 positive ones the right half (0.059, about 0.4677/8). The construction makes
# the *levels* equally spaced in probability; the rounding bins between them come out only roughly equal.
#
# In practice the assumption itself does not hold. A block of 64 values is divided by its own absmax, and the
# absmax of 64 normal values is not 1.848 standard deviations but about 2.6 on average. The levels are
# stretched further out than the construction assumed, so the central ones are used more:

# %%
nf4_levels, nf4_usage = code_usage(normal_sample, nf4_codebook(), blocksize=64)
block_absmax = normal_sample.reshape(-1, 64).abs().amax(dim=1).double()  # float64: its mean is printed
print(f"absmax of a block of 64 N(0,1) values: mean {block_absmax.mean():.3f}, median {block_absmax.median():.3f}")
print("measured usage at blocksize 64:", show(nf4_usage, 4))
_, masses_at_mean = bin_masses(nf4_codebook(), block_absmax.mean().item())
print(f"bin masses, levels × {block_absmax.mean():.3f}:   ", show(masses_at_mean, 4))
entropy = -(nf4_usage * nf4_usage.log2()).sum().item()
print(f"entropy of NF4's code usage: {entropy:.3f} bits of 4; ±1 together: {nf4_usage[0] + nf4_usage[-1]:.4f} (1/64 = {1 / 64:.4f})")
fig, _ = plot_bin_masses(nf4_codebook(), nf4_scale, usage=(nf4_levels, nf4_usage))
fig

# %% [markdown]
# The bars are the construction's bin masses, the dots the measured usage at blocksize 64. Measured, the
# central levels are used about 9% of the time and the outermost ones under 2%: one value per block *is* the
# absmax and lands exactly on ±1, so at least 1/64 of all values go there. The code carries 3.88 bits of
# information per value, not 4.
#
# The QLoRA paper calls NF4 "information theoretically optimal" for normally distributed weights, and seed 002
# repeats it. The computation above shows what that rests on: equal-mass bins for N(0, 1) with the tails cut
# at δ. Blockwise absmax scaling changes the distribution the code actually sees; Yoshida 2023, *NF4 Isn't
# Information Theoretically Optimal (and that's Good)*, arXiv:2306.06965, works this out (bitsandbytes even
# carries his block-size-specific alternative as `get_4bit_type("af4")`). NF4 is still the best of the three
# 4-bit codes here, as section 8 measures.
#
# ## 7. The other two tables: FP4 and INT4
#
# bitsandbytes' FP4 is a tiny floating-point format: 1 sign bit, 2 exponent bits and 1 mantissa bit, with
# its own exponent bias (not the OCP E2M1 format). Its table is listed in bit order; bit 3 is the sign:

# %%
print("FP4 table (bit order):", show(fp4_codebook(), 4))
print("FP4 × 12:             ", show(fp4_codebook() * 12, 4))
print("distinct FP4 levels:", show(fp4_codebook().unique(), 4))
compare("FP4 table vs bitsandbytes", fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu"))
print("signbit of entry 8: ours", torch.signbit(fp4_codebook()[8]).item(), "| bitsandbytes' table", torch.signbit(bnbF.get_4bit_type("fp4", device="cpu")[8]).item())

# %% [markdown]
# FP4 spends two codes on 0 (+0 and -0) and has its levels spaced like a float: dense near 0 (even a level at
# ±0.0052), sparse near ±1. Our table's entry 8 is -0.0, while bitsandbytes' Python table has +0.0 there. What
# matters is what its quantizer and dequantizer do. Quantize two tiny values, +1e-4 and -1e-4: both round to
# zero, but to *which* zero? bitsandbytes (CPU) gives the positive one code 8 and dequantizes it to **-0.0**,
# and the negative one code 0, +0.0. (Its C++ scalar loop does, which every CPU takes for a row of four values;
# its other decoders use the Python table, lesson 0, section 4.) Ours does the same, because its table has -0.0 at entry 8 and its
# nearest-level search puts +0.0 before -0.0 (a value above their midpoint, 0, takes the second):

# %%
tiny = torch.tensor([1.0, 1e-4, -1e-4, 0.0])  # the 1.0 sets the absmax
packed_bnb, state_bnb = bnbF.quantize_4bit(tiny, blocksize=64, quant_type="fp4")
packed_ours, state_ours = quantize_4bit(tiny, blocksize=64, quant_type="fp4")
print("bytes: bitsandbytes", [f"0x{b:02x}" for b in packed_bnb.reshape(-1).tolist()], "ours", [f"0x{b:02x}" for b in packed_ours.reshape(-1).tolist()])
restored_bnb = bnbF.dequantize_4bit(packed_bnb, state_bnb).reshape(-1)
restored_ours = dequantize_4bit(packed_ours, state_ours)
print("dequantized: bitsandbytes", restored_bnb.tolist(), " ours", restored_ours.tolist())
_ = compare("FP4 dequantized (sign of zero included)", restored_ours, restored_bnb)

# %% [markdown]
# INT4 has no table in bitsandbytes 0.50.2 that one can fetch: `get_4bit_type("int4")` raises, because it
# divides an integer tensor in place. Ours is the list 7..-7 divided by 7:

# %%
try:
    bnbF.get_4bit_type("int4", device="cpu")
    print("get_4bit_type('int4') worked")
except RuntimeError as error:
    print(f"bitsandbytes 0.50.2 get_4bit_type('int4') raises {type(error).__name__}")

# %% [markdown]
# Using the INT4 table blockwise is lesson 1's absmax quantizer at 4 bits with blocks of 64. The codes agree;
# the values agree up to float32 rounding (lesson 1 computes (absmax/7)·q, the table (q/7)·absmax: two roundings
# each, so `rtol=1e-6`):

# %%
x = torch.randn(64 * 1024, generator=generator)
packed, state = quantize_4bit(x, blocksize=64, quant_type="int4")
codes = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 0x0F], dim=1).reshape(-1).long()
lesson_1 = qlora_ref.quantize_absmax(x, bits=4, granularity="block", blocksize=64)
compare("INT4 table codes vs lesson 1's q", (int4_codebook()[codes] * 7).round().long(), lesson_1.q)
_ = compare("INT4 dequantized vs lesson 1's", dequantize_4bit(packed, state), lesson_1.dequantize(), rtol=1e-6)

# %% [markdown]
# ## 8. INT4 vs FP4 vs NF4 on normal data
#
# bitsandbytes' tests hold its 4-bit quantizers to a mean absolute error of 0.0728 (NF4) and 0.0965 (FP4) on
# N(0, 1) data with blocks of 64. Reproduce it on 2^22 values, with ours and with bitsandbytes' own
# functions side by side. bitsandbytes' values come from its portable decoder, which computes the same on every
# CPU (lesson 0, section 4):

# %%
data = torch.randn(2**22, generator=generator)
print("code  MAE (ours)  MAE (bnb)  RMSE (ours)  max error")
results = {}
for quant_type in ("int4", "fp4", "nf4"):
    packed, state = quantize_4bit(data, blocksize=64, quant_type=quant_type)
    restored = dequantize_4bit(packed, state)
    error = qlora_ref.quantization_error(data, restored)
    results[quant_type] = error["mae"]
    bnb_mae = "        -"
    if quant_type != "int4":  # bitsandbytes has no int4 quantizer
        packed_bnb, state_bnb = bnbF.quantize_4bit(data, blocksize=64, quant_type=quant_type)
        restored_bnb = bnb_cpu.dequantize_4bit_portable(packed_bnb, state_bnb)
        bnb_mae = f"{qlora_ref.quantization_error(data, restored_bnb)['mae']:9.4f}"
    print(f"{quant_type:>4} {error['mae']:10.4f} {bnb_mae} {error['rmse']:12.4f} {error['max']:10.4f}")
    if quant_type != "int4":
        compare(f"     {quant_type} packed bytes, ours vs bitsandbytes", packed, packed_bnb)
        compare(f"     {quant_type} dequantized, ours vs bitsandbytes", restored, restored_bnb)
print(f"NF4's error is {1 - results['nf4'] / results['int4']:.0%} below INT4's and {1 - results['nf4'] / results['fp4']:.0%} below FP4's")

# %% [markdown]
# Both reference numbers reproduce: NF4 0.0728 and FP4 0.0965, and our bytes equal bitsandbytes' exactly. So do
# the dequantized values, but for the sign of FP4's zeros: its portable decoder looks codes up in its Python
# table, whose entry 8 is +0.0, where ours (like its C++ scalar loop, section 7) is -0.0. INT4 (0.0913) lands
# between them: on normal data FP4's float-like spacing wastes more than uniform spacing does. (One oddity:
# for a 1-D input of even length, bitsandbytes' native CPU `dequantize_4bit` returns shape [1, n], not [n].)
#
# ## 9. See it: the 16 levels over the data
#
# Each code's distinct levels (lines) over the normal density NF4 is built for, N(0, (1/1.848)^2) on [-1, 1]:

# %%
fig, info = plot_codebook_levels(("int4", "fp4", "nf4"))
for name, lv in info["levels"].items():
    print(f"{name}: {lv.numel()} levels, {int((lv.abs() <= 0.5).sum())} of them in [-0.5, 0.5]")
fig

# %% [markdown]
# Real LLM weights are not at hand here (no downloads in this course's checks), so we use a **stand-in, and
# say so**: a Student-t sample with 5 degrees of freedom, scaled to standard deviation 0.02 (the
# `initializer_range` of GPT-2 and LLaMA configurations). It is roughly bell-shaped like trained weights but
# with heavier tails, which is what makes absmax scaling suffer. It is synthetic: do not read real-model
# numbers off it. Each value is a normal divided by the root of the mean of 5 squared normals, all from our
# seeded generator:

# %%
def student_t(shape, dof, generator):
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((dof, *shape), generator=generator).pow(2).sum(dim=0)
    return z / (chi2 / dof).sqrt()


stand_in = student_t((1024, 1024), 5, generator)
stand_in = stand_in * (0.02 / stand_in.double().std().item())  # a float64 std: the same scale on every CPU
normal_ref = torch.randn(1024, 1024, generator=generator) * 0.02
for name, w in (("stand-in (t, 5 dof)", stand_in), ("normal, same std", normal_ref)):
    std = w.double().std().item()
    beyond = (w.abs() > 4 * std).double().mean().item()
    print(f"{name:>20}: std {std:.4f}, max |w| {w.abs().max():.4f}, share beyond 4 std {beyond:.2e}")

fig, info = plot_codebook_levels(("int4", "fp4", "nf4"), data=stand_in, blocksize=64)
for name, mae in info["mae"].items():
    print(f"{name}: MAE {mae:.3e} = {mae / 0.02:.1%} of the std")
fig

# %% [markdown]
# On the heavy-tailed stand-in NF4 is still best, and FP4 catches up with INT4. A likely reason: with heavier
# tails a block's absmax is more often far out, the rest of the block is squeezed towards 0, and FP4's dense
# levels near 0 pay off. The spikes at ±1 in the histogram are the blocks' absmax values themselves.
#
# The widget: choose the background (the normal density or the stand-in weights), the block size, and NF4's
# offset δ (0.9677083 is bitsandbytes'). Watch NF4's outer levels move, and its MAE in the titles. (It needs a
# live kernel.)

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import FloatSlider, interact

BACKGROUNDS = {"normal density": None, "stand-in weights (Student-t)": stand_in[:256]}


def show_codes(background="normal density", blocksize=64, offset=0.9677083):
    codes = {"int4": int4_codebook(), "fp4": fp4_codebook(), "nf4": nf4_codebook(offset)}
    return plot_codebook_levels(codes, data=BACKGROUNDS[background], blocksize=blocksize)[0]


_ = interact(
    show_codes,
    background=list(BACKGROUNDS),
    blocksize=[32, 64, 128, 256, 1024, 4096],
    offset=FloatSlider(value=0.9677083, min=0.9, max=0.999, step=0.0005, readout_format=".4f"),
)

# %% [markdown]
# ## Summary
#
# - A 4-bit code is an index into a 16-value table; dequantize by lookup, table[q] · absmax (not q · absmax).
# - Quantile quantization gives each level an equal share of N(0, 1). Its extreme quantiles are infinite;
#   NF4 stops at δ = 0.9677083 (Φ^-1(δ) = 1.848) and divides by that level so the table spans [-1, 1].
# - NF4 is asymmetric, 8 positive + 7 negative + an exact 0 = 16 levels, so that 0 is exact and no code is
#   wasted.
# - bitsandbytes' table comes from float32 probabilities, float64 Φ^-1, float32 division: `nf4_codebook()`
#   follows that recipe and is bit for bit equal; a float64 derivation differs in 10 of 16 entries by a few
#   float32 steps.
# - Under its own scaling NF4's bins hold 0.056 to 0.071 of the probability (1/16 = 0.0625); in blocks of 64
#   the measured usage runs from 1.7% to 9.2%, 3.88 bits of entropy.
# - On N(0, 1) with blocks of 64: MAE NF4 0.0728, INT4 0.0913, FP4 0.0965, reproducing bitsandbytes' numbers.
# - Corrected from the sources: NF4 has 16 values, not 15 (seed 004's positive half is wrong); dequantizing
#   needs the lookup (seed 001); "information theoretically optimal" holds only under assumptions blockwise
#   scaling breaks (seed 002, and the paper).

# %% [markdown]
# ## Check your understanding
#
# 1. Why does quantile quantization need an offset such as δ, and what would happen to the table without it?
#
# <details><summary>Answer</summary>
#
# The quantiles of probability 0 and 1 are at ∓∞, so without an offset an outer level is infinite (section 2
# prints the paper's equation 4: its lowest level is -inf), and the table could not be scaled to [-1, 1].
# Stopping at δ = 0.9677083 puts the outermost level at Φ^-1(δ) = 1.848 standard deviations, which is then
# divided out so that the block's absmax lands on ±1.
#
# </details>

# %% [markdown]
# 2. Count NF4's levels: how many are positive, how many negative, and why not 8 of each?
#
# <details><summary>Answer</summary>
#
# 8 positive, 7 negative and an exact 0: 16. A code with 8 of each would be symmetric and have no zero
# (section 3: its smallest |level| is not 0), and zero must be exact. Adding a zero to 8 + 8 would need 17
# codes; 7 + 7 + 1 would leave one of the 16 codes unused.
#
# </details>

# %% [markdown]
# 3. bitsandbytes and a float64 derivation disagree in the last bits of 10 entries. Which one is "right", and
#    why does this course's code follow bitsandbytes?
#
# <details><summary>Answer</summary>
#
# Neither is better in any way that matters: they differ by a few float32 steps, far below any quantization
# error. The float64 derivation is the cleaner computation of the formula; bitsandbytes' float32 recipe gives
# the table its kernels actually use. The course follows bitsandbytes because it checks its dequantized
# weights against bitsandbytes byte for byte, and a different table would break that.
#
# </details>

# %% [markdown]
# 4. The measured usage of NF4's ±1 levels is about 1.8% each at blocksize 64. What would you expect at
#    blocksize 32, and why? (Try it with `code_usage`.)
#
# <details><summary>Answer</summary>
#
# More: one value of every block is the block's absmax and lands exactly on ±1, so at blocksize 32 at least
# 1/32 of all values (3.1%, twice the 1/64) go to ±1 together. The absmax of 32 values is also smaller on
# average, so the other values reach the outer levels a little more often too.
#
# </details>

# %% [markdown]
# **Exercise:** [exercises/02_nf4_codebook.ipynb](../exercises/02_nf4_codebook.ipynb) (solution:
# [solutions/02_nf4_codebook.ipynb](../solutions/02_nf4_codebook.ipynb))
