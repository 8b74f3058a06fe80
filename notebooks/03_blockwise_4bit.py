# %% [markdown]
# # Lesson 3 — Blockwise 4-bit quantization
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/03_blockwise_4bit.ipynb)
#
# Lesson 2 built NF4, a table of 16 levels in [-1, 1]. This lesson turns a weight tensor into 4-bit codes
# with it, the way QLoRA stores its frozen weights: one absmax per block of 64 values, the nearest level
# for every value, two codes per byte. We check every byte against bitsandbytes.
#
# **What you will learn**
# - why the scale is taken per *block* and not per tensor (one outlier, measured both ways);
# - the four steps: absmax per block, scaling to [-1, 1], nearest code (a tie goes to the *lower* level),
#   packing two codes per byte (the even element in the high nibble), and the padding nibble of an odd length;
# - how the block size trades error against the memory of the constants (32/B bits per parameter);
# - that `qlora_ref.quantize_4bit` produces the same bytes as `bitsandbytes.functional.quantize_4bit`;
# - what is wrong in a widely copied sketch of NF4 quantization, and how to do it right.
#
# **Prerequisites:** lesson 1 (absmax quantization, `quantization_error`) and lesson 2 (the NF4 codebook).
#
# **Sources:** blockwise quantization comes from the 8-bit optimizers paper (Dettmers et al. 2021,
# arXiv:2110.02861); QLoRA (Dettmers et al. 2023, arXiv:2305.14314, section 2, "Block-wise k-bit
# Quantization") uses it with NF4 and blocks of 64.

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/blockwise.py`, `qlora_ref/fourbit.py`,
# `qlora_ref/state.py`.

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

# %matplotlib inline
import bitsandbytes.functional as bnbF
import torch
from IPython.display import display

import qlora_ref
from qlora_ref import bnb_cpu, dequantize_4bit, nf4_codebook, quantization_error, quantize_4bit
from qlora_ref.blockwise import block_absmax, dequantize_codes, nearest_code, pack_4bit, scale_to_unit, unpack_4bit
from qlora_ref.compare import compare
from qlora_ref.plots.blockwise import blocksize_figure, blocksize_rows, outlier_figure

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
NF4 = nf4_codebook()
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
import bitsandbytes

print("torch", torch.__version__, "| bitsandbytes", bitsandbytes.__version__)

# %% [markdown]
# ## 1. Why blocks: one outlier, one scale
#
# Absmax scaling divides by the largest |x| of a group, so the group's values land in [-1, 1], where the
# codebook lives. If the group is the whole tensor, a single outlier sets the scale for everybody. Large
# models do have such outliers (Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339).
#
# 4096 weights from N(0, 1), one of them set to 20. First one absmax for the whole tensor (a block of 4096),
# then one per block of 64. The error is measured on the 4095 ordinary values.

# %%
gen = torch.Generator().manual_seed(0)
x = torch.randn(4096, generator=gen)
x[1000] = 20.0
ordinary = torch.ones(4096, dtype=torch.bool)
ordinary[1000] = False

mae = {}
for blocksize, label in [(4096, "one absmax per tensor"), (64, "one absmax per 64   ")]:
    packed, state = quantize_4bit(x, blocksize=blocksize)
    x_hat = dequantize_4bit(packed, state)
    codes = unpack_4bit(packed, x.numel())
    mae[blocksize] = quantization_error(x[ordinary], x_hat[ordinary])["mae"]
    print(
        f"{label}: mean |error| {mae[blocksize]:.4f}, levels used {codes[ordinary].unique().numel():2d} of 16, "
        f"values set to 0: {(x_hat[ordinary] == 0).float().mean():.1%}"
    )
print(f"per-tensor error / per-block error: {mae[4096] / mae[64]:.1f}")
print(f"divided by the outlier, the ordinary values lie within ±{x[ordinary].abs().max() / 20:.3f}")

# %% [markdown]
# With one scale for the tensor the ordinary values are divided by 20, so they all fall within about
# ±0.2 of zero: 6 of NF4's 16 levels cover them, 61% of them collapse to exactly 0, and the mean error is
# 5.5 times larger. With blocks of 64 the outlier only spoils its own block (section 7 shows that
# the other blocks do not change at all).
#
# ## 2. The four steps, on 10 numbers
#
# To see every number, take 10 values and blocks of 4 (the library allows 32 to 4096; the low-level
# functions of `qlora_ref.blockwise` take any size). 10 = 4 + 4 + 2: the last block is short.
#
# **Step 1: absmax per block**, one float32 per block.

# %%
x10 = torch.tensor([0.3, -1.2, 0.05, 0.8, 2.5, -0.1, 0.4, -0.6, 0.02, -0.07])
absmax = block_absmax(x10, blocksize=4)
print("x      :", [f"{v:+.2f}" for v in x10.tolist()])
print("absmax :", [f"{v:.2f}" for v in absmax.tolist()])

# %% [markdown]
# **Step 2: scale to [-1, 1].** u = x / absmax of its block. Every block now has a value at ±1 exactly.
# (One source calls this "normalize to unit variance". It is not: absmax scaling fixes the *range*, not the
# variance. On N(0, 1) data in blocks of 64 the scaled values have a standard deviation near 0.39, measured below.)

# %%
u10 = scale_to_unit(x10, absmax, blocksize=4)
print("u      :", [f"{v:+.3f}" for v in u10.tolist()])

big = torch.randn(2**20, generator=gen)
u_big = scale_to_unit(big, block_absmax(big, 64), 64)
print(f"N(0,1) in blocks of 64, after absmax scaling: min {u_big.min():+.3f}, max {u_big.max():+.3f}, std {u_big.double().std():.4f}")

# %% [markdown]
# **Step 3: the nearest code.** Each u becomes the index (0..15) of the nearest NF4 level. The levels are
# sorted, so "nearest" means: count how many midpoints between neighbouring levels lie below u.

# %%
codes10 = nearest_code(u10, NF4)
print("code   :", codes10.tolist())
print("level  :", [f"{v:+.3f}" for v in NF4[codes10].tolist()])

# %% [markdown]
# **Step 4 (dequantization): look the code up, multiply by the block's absmax.** x^ = NF4[q] * absmax.
# The code is an *index*, not a value: it has to go through the table.

# %%
x10_hat = dequantize_codes(codes10, NF4, absmax, blocksize=4)
print("x^     :", [f"{v:+.3f}" for v in x10_hat.tolist()])
print("error  :", [f"{v:+.3f}" for v in (x10 - x10_hat).tolist()])

# %% [markdown]
# The block of (2.5, -0.1, 0.4, -0.6) loses its small values to a coarse grid (absmax 2.5), while the
# last block, with absmax 0.07, keeps 0.02 and -0.07 to within a few thousandths.
#
# ## 3. A value exactly on a midpoint goes to the lower level
#
# A value halfway between two levels is as close to one as to the other, and a choice has to be made.
# bitsandbytes compares with `u > midpoint`, so a tie goes to the **lower** level (`torch.bucketize`
# does the same: a value equal to a boundary stays on its left). We build the float32 midpoint between
# NF4 level 8 (0.0796) and level 9 (0.1609), and the midpoint between level 6 (-0.0911) and level 7 (0).
# In a block whose absmax is 1.0, u = x exactly, so these values reach the rounding unchanged.

# %%
mid_pos = (NF4[8] + NF4[9]) / 2
mid_neg = (NF4[6] + NF4[7]) / 2
just_above = torch.nextafter(mid_pos, torch.tensor(1.0))  # the next float32 above the midpoint

tie = torch.zeros(64)
tie[:4] = torch.stack([torch.tensor(1.0), mid_pos, mid_neg, just_above])
ours_packed, _ = quantize_4bit(tie, blocksize=64)
bnb_packed, _ = bnbF.quantize_4bit(tie, blocksize=64, quant_type="nf4")

ours_codes = unpack_4bit(ours_packed, 4)
for name, value, code in zip(["1.0", "midpoint 8|9", "midpoint 6|7", "1 ulp above 8|9"], tie[:4], ours_codes):
    print(f"{name:>16}: u = {value.item():+.9f} -> code {code.item():2d} = level {NF4[code.item()].item():+.4f}")
_ = compare("packed bytes, ours vs bitsandbytes", ours_packed, bnb_packed)

# %% [markdown]
# "Lower" is towards -1, so on the positive side a tie rounds towards zero and on the negative side away
# from it. One float32 step above the midpoint already goes up. Any other rule (ties away from zero,
# or ties to even) would change such bytes; real weights rarely sit exactly on a midpoint, but byte-exact
# means matching this rule too.
#
# ## 4. Two codes per byte
#
# A code needs 4 bits, a byte has 8: byte j holds code(x[2j]) in its **high** nibble and code(x[2j+1])
# in its low nibble, `byte = q[2j] << 4 | q[2j+1]`. The bits of the first bytes of a 64-value block:

# %%
x64 = torch.randn(64, generator=gen)
packed64, state64 = quantize_4bit(x64, blocksize=64)
codes64 = nearest_code(scale_to_unit(x64, block_absmax(x64, 64), 64), NF4)
for j in range(3):
    byte = packed64[j, 0].item()
    print(
        f"byte {j}: {byte:08b} = {byte:3d}   high {byte >> 4:04b} = code {codes64[2 * j].item():2d} (x[{2 * j}] = {x64[2 * j].item():+.3f})"
        f"   low {byte & 15:04b} = code {codes64[2 * j + 1].item():2d} (x[{2 * j + 1}] = {x64[2 * j + 1].item():+.3f})"
    )
print("packed:", tuple(packed64.shape), packed64.dtype, "| pack_4bit of the codes gives the same:", torch.equal(pack_4bit(codes64), packed64))

# %% [markdown]
# The packed tensor is a column: shape [(n+1)//2, 1], uint8, whatever the shape of the weight (the state
# remembers the shape). With an **odd** number of values the last byte has a free low nibble. bitsandbytes
# fills it by quantizing a 0.0, so it holds the code of 0.0: 0b0111 (7) in NF4. Plain zero padding of the
# *codes* would put 0b0000 there, which is NF4's -1.0. The padding is never read back, but it is part of the bytes.

# %%
x5 = torch.tensor([0.5, -1.0, 0.25, 0.0, 0.75])
ours5, state5 = quantize_4bit(x5, blocksize=64)
bnb5, _ = bnbF.quantize_4bit(x5, blocksize=64, quant_type="nf4")
print("shape:", tuple(ours5.shape), "for", x5.numel(), "values")
print("bytes, ours:        ", [f"{b:08b}" for b in ours5.flatten().tolist()])
print("bytes, bitsandbytes:", [f"{b:08b}" for b in bnb5.flatten().tolist()])
print(f"last low nibble: {ours5[-1, 0].item() & 15:04b} -> NF4 level {NF4[ours5[-1, 0].item() & 15].item()}")
naive = pack_4bit(nearest_code(x5 / x5.abs().max(), NF4))
print("zero-padded codes:  ", [f"{b:08b}" for b in naive.flatten().tolist()], f"-> last nibble is NF4 level {NF4[0].item()}")
print("FP4's code of 0.0 is", int((qlora_ref.fp4_codebook() == 0).nonzero()[0]), "so there the two agree")

# %% [markdown]
# ## 5. Ours vs bitsandbytes, live
#
# `qlora_ref.quantize_4bit` does the four steps for a whole tensor. Against
# `bitsandbytes.functional.quantize_4bit(x, blocksize=64, quant_type="nf4")`: the packed bytes, the absmax
# and the dequantized values must all be equal, bit for bit. Three weights: a float32 matrix, one with an
# odd number of values (and a short last block), and a bfloat16 one. bitsandbytes' dequantized values come from
# its portable decoder, the one that computes the same on every CPU (lesson 0, section 4).

# %%
cases = {
    "1024x2048 float32": torch.randn(1024, 2048, generator=gen),
    "37x101 float32 (odd)": torch.randn(37, 101, generator=gen),
    "512x768 bfloat16": torch.randn(512, 768, generator=gen).to(torch.bfloat16),
}
for name, w in cases.items():
    print(f"-- {name}: {w.numel():,} values, {-(-w.numel() // 64):,} blocks")
    ours_q, ours_state = quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_q, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    compare("  packed codes", ours_q, bnb_q)
    compare("  absmax", ours_state.absmax, bnb_state.absmax)
    compare("  dequantized", dequantize_4bit(ours_q, ours_state), bnb_cpu.dequantize_4bit_portable(bnb_q, bnb_state))

# %% [markdown]
# One difference is not in the values but in the shape: for a **1-D** tensor, bitsandbytes' native CPU
# dequantization returns shape [1, n] (it treats a vector as one row; a row of 1,000 values goes through its
# C++ scalar loop on every CPU); ours returns the input's shape.

# %%
v = torch.randn(1000, generator=gen)
ours_q, ours_state = quantize_4bit(v)
bnb_q, bnb_state = bnbF.quantize_4bit(v, blocksize=64, quant_type="nf4")
_ = compare("dequantized vector", dequantize_4bit(ours_q, ours_state), bnbF.dequantize_4bit(bnb_q, bnb_state))

# %% [markdown]
# ## 6. A sketch from the source notes, corrected
#
# One of the course's source documents gives this sketch of NF4 quantization (its NF4 levels are right:
# they are lesson 2's table to 4 decimals). Run as written, it has three problems.

# %%
NF4_LEVELS = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                           0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0])
print("the sketch's levels = NF4 to 4 decimals:", torch.equal(NF4_LEVELS, (NF4 * 1e4).round() / 1e4))


def map_to_nearest_level(normalized, levels):
    return nearest_code(normalized, levels)  # the sketch leaves this undefined; this is lesson 2's rule


def quantize_nf4(tensor, block_size=64):  # as in the source
    blocks = tensor.reshape(-1, block_size)
    scales = blocks.abs().max(dim=1, keepdim=True)
    normalized = blocks / scales
    quantized = map_to_nearest_level(normalized, NF4_LEVELS)
    return quantized, scales


def dequantize_nf4(quantized, scales):  # as in the source
    return quantized * scales


for n in (4096, 1000):
    try:
        quantize_nf4(torch.randn(n, generator=gen))
    except (TypeError, RuntimeError) as err:
        print(f"n = {n}: {type(err).__name__}: {err}")

# %% [markdown]
# 1. `Tensor.max(dim=...)` returns a pair (values, indices), so `blocks / scales` is a TypeError; it needs `.values`.
# 2. `reshape(-1, block_size)` only works when the length is a multiple of the block size. 1000 = 15 × 64 + 40:
#    the last block is short. `block_absmax` handles it (and bitsandbytes does too; section 5 had 3737 values).
#
# Fix the first and look at the third: `quantized * scales` multiplies the code *indices* (0..15) by the
# scale. Dequantization must look the code up first: `NF4[q] * absmax`.

# %%
# Drawn in float64, then rounded to float32: torch's float32 randn computes its logarithms and cosines with
# vector instructions on x86 and without them elsewhere, so its last bits differ by CPU, and this cell prints
# values close enough to a midpoint for that to show.
w = torch.randn(4096, generator=gen, dtype=torch.float64).float()
blocks = w.reshape(-1, 64)
scales = blocks.abs().max(dim=1, keepdim=True).values  # fix 1
q = map_to_nearest_level(blocks / scales, NF4_LEVELS)
wrong = dequantize_nf4(q, scales).reshape(-1)
right = (NF4_LEVELS[q] * scales).reshape(-1)  # fix 3: through the table
print(f"quantized * scales:             mean |error| {quantization_error(w, wrong)['mae']:.4f}, range [{wrong.min():.2f}, {wrong.max():.2f}]")
print(f"NF4_LEVELS[quantized] * scales: mean |error| {quantization_error(w, right)['mae']:.4f}, range [{right.min():.2f}, {right.max():.2f}]")

# %% [markdown]
# With the lookup the error is NF4's usual level. Two smaller differences remain against the real thing.
# The sketch's levels are rounded to 4 decimals, so its midpoints move by up to 0.00005 and a value close
# to a midpoint can get the neighbouring code; and it keeps each code in an int64, 16 times the memory of
# a 4-bit code. The codes, against `qlora_ref.quantize_4bit` on the same tensor:

# %%
ours_q, ours_state = quantize_4bit(w, blocksize=64)
ours_codes = unpack_4bit(ours_q, w.numel()).long()
_ = compare("codes, sketch vs qlora_ref", q.reshape(-1), ours_codes)
for i in (q.reshape(-1) != ours_codes).nonzero().reshape(-1).tolist()[:2]:
    a, b = sorted([q.reshape(-1)[i].item(), ours_codes[i].item()])
    u = w[i] / scales.reshape(-1)[i // 64]
    print(
        f"value {i}: u = {u.item():+.7f}; midpoint of levels {a}|{b}: exact {((NF4[a] + NF4[b]) / 2).item():+.7f}, "
        f"from 4 decimals {((NF4_LEVELS[a] + NF4_LEVELS[b]) / 2).item():+.7f}"
    )

# %% [markdown]
# ## 7. An outlier stays in its block
#
# Quantize 4096 values in blocks of 64, then put an outlier of 50 at index 1000 (block 15) and quantize
# again. Every value outside block 15 dequantizes to exactly what it was before.

# %%
w = torch.randn(4096, generator=gen)
w_out = w.clone()
w_out[1000] = 50.0
block = 1000 // 64
others = torch.ones(4096, dtype=torch.bool)
others[block * 64 : (block + 1) * 64] = False

before = dequantize_4bit(*quantize_4bit(w, blocksize=64))
after = dequantize_4bit(*quantize_4bit(w_out, blocksize=64))
compare("the other 63 blocks, before vs after the outlier", after[others], before[others])
keep = ~others
keep[1000] = False
print(
    f"block {block} (without the outlier itself): mean |error| {quantization_error(w[keep], before[keep])['mae']:.4f} "
    f"-> {quantization_error(w[keep], after[keep])['mae']:.4f}"
)
whole_before = dequantize_4bit(*quantize_4bit(w, blocksize=4096))
whole_after = dequantize_4bit(*quantize_4bit(w_out, blocksize=4096))
_ = compare("one block of 4096, before vs after", whole_after[others], whole_before[others])

# %% [markdown]
# ## 8. Block size: error against memory
#
# Each block stores one float32 absmax: 32 bits shared by B values, so **32/B bits per parameter** on top
# of the 4 bits of the code. Smaller blocks cost more memory; larger blocks have larger absmax values
# (the maximum of B normal samples grows with B), so the levels are spread wider and the error grows.
# Measured on 2^20 values of N(0, 1), for every block size bitsandbytes supports:

# %%
sample = torch.randn(2**20, generator=gen)
rows = blocksize_rows(sample)
print("    B   overhead 32/B   bits/param   mean absmax   mean |err|   rms err")
for row in rows:
    print(
        f"{row['blocksize']:5d}   {32 / row['blocksize']:13.4f}   {row['bits']:10.4f}   {row['mean_absmax']:11.3f}"
        f"   {row['mae']:10.4f}   {row['rmse']:7.4f}"
    )
by_b = {row["blocksize"]: row for row in rows}
print(f"B = 64 against bitsandbytes' reference 0.0728: {by_b[64]['mae'] - 0.0728:+.5f}")
print(f"B = 32 vs 64: {by_b[32]['mae'] / by_b[64]['mae'] - 1:+.1%} error;  B = 128 vs 64: {by_b[128]['mae'] / by_b[64]['mae'] - 1:+.1%} error")

# %% [markdown]
# At B = 64, QLoRA's choice, the mean absolute error on this sample is 0.0727, within 0.0001 of the 0.0728
# that bitsandbytes' own tests expect for NF4 on N(0, 1) (lesson 2 reproduces it, and FP4's 0.0965, on a
# larger sample). Halving the block to 32 buys 7% less error for 0.5 more bits per parameter; doubling it
# to 128 saves 0.25 bits and costs 6% more error.

# %%
blocksize_figure(rows, highlight=64)

# %% [markdown]
# The state reports what it costs: `QuantState.bits_per_parameter()` counts the bits of the codes and of
# the absmax values, divided by the number of values. For a 4096 × 1024 weight:

# %%
W = torch.randn(4096, 1024, generator=gen)
for blocksize in (32, 64, 256):
    _, state = quantize_4bit(W, blocksize=blocksize)
    print(f"B = {blocksize:3d}: {state.absmax.numel():7,} absmax values, {state.bits_per_parameter():.4f} bits per parameter (4 + 32/{blocksize} = {4 + 32 / blocksize})")
print(f"at B = 64 the absmax values are {0.5 / 4.5:.1%} of the bits")

# %% [markdown]
# 4.5 bits at B = 64: the constants are 11% of the memory of a QLoRA weight (0.5 of 4.5 bits). Lesson 4
# compresses them.
#
# ## 9. Try it: block size and outlier
#
# `outlier_figure` (in `qlora_ref/plots/blockwise.py`) quantizes 1024 values of N(0, 1) with one outlier
# and draws the values around it with their reconstruction (top) and the mean error of every block (bottom,
# the outlier's block in red). It also returns the numbers it drew:

# %%
fig, info = outlier_figure(blocksize=64, outlier=20.0)
print(f"outlier's block {info['outlier_block']}: mean |error| {info['block_mae'][info['outlier_block']]:.4f}; "
      f"the other blocks: {info['block_mae'].median():.4f} (median)")
display(fig)

# %% [markdown]
# Move the sliders: with B = 1024 the whole sample is one block and every value pays for the outlier;
# with B = 32 only 32 values do.

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import FloatSlider, SelectionSlider, interact


def show(blocksize=64, outlier=20.0):
    fig, info = outlier_figure(blocksize=blocksize, outlier=outlier)
    display(fig)
    print(f"mean |error| over all values: {quantization_error(info['x'], info['x_hat'])['mae']:.4f}")


interact(
    show,
    blocksize=SelectionSlider(options=[32, 64, 128, 256, 512, 1024], value=64),
    outlier=FloatSlider(min=0, max=50, step=1, value=20),
);

# %% [markdown]
# ## Summary
#
# - Blockwise absmax: one float32 scale per block of B values, so an outlier only coarsens its own block
#   (measured: the 63 other blocks were bit-identical with and without it).
# - u = x / absmax lies in [-1, 1] (a range, not unit variance); the code is the index of the nearest NF4
#   level, a tie going to the lower level; x^ = NF4[q] * absmax (a table lookup, never q * absmax).
# - Two codes per byte, the even element high; packed shape [(n+1)//2, 1]; an odd length pads with the
#   code of 0.0 (0b0111 in NF4).
# - Block size trades error for memory: 4 + 32/B bits per parameter, 4.5 at B = 64, where NF4's mean
#   absolute error on N(0, 1) is 0.0727 here (0.0728 on lesson 2's larger sample).
# - `qlora_ref.quantize_4bit` reproduces bitsandbytes' packed bytes, absmax and dequantized values exactly.

# %% [markdown]
# ## Check your understanding
#
# 1. A block of 64 values holds one value of 8.0 and otherwise values within ±1. After scaling, the
#    ordinary values lie within ±1/8: which NF4 levels can they use? Check with `nearest_code`.
#
# <details><summary>Answer</summary>
#
# Four: -0.0911, 0, 0.0796 and 0.1609. The midpoint between -0.1848 and -0.0911 is -0.138, below -1/8, so
# nothing reaches -0.1848; the midpoint between 0.0796 and 0.1609 is 0.120, so values in (0.120, 0.125]
# take 0.1609. `nearest_code(torch.linspace(-0.125, 0.125, 101), NF4).unique()` gives codes 6, 7, 8, 9.
#
# </details>

# %% [markdown]
# 2. Why does the mean error grow with the block size even on data without outliers?
#
# <details><summary>Answer</summary>
#
# The absmax of a block is the largest of B values, and the largest of more normal values is larger
# (section 8's "mean absmax" column). Dividing by a larger absmax squeezes the block's values towards 0,
# and multiplying back spreads NF4's levels wider apart in the data's units: a coarser grid, a larger error.
#
# </details>

# %% [markdown]
# 3. A tensor has 4097 values. How many bytes does the packed tensor have, how many absmax values at B = 64,
#    and what is in the last nibble?
#
# <details><summary>Answer</summary>
#
# (4097 + 1) // 2 = 2049 bytes; 65 absmax values (64 full blocks and a last block of one value); the last
# low nibble holds the code of 0.0, 0b0111 (7) in NF4, as section 4 shows for 5 values.
#
# </details>

# %% [markdown]
# 4. bitsandbytes breaks a tie towards the lower level. Write a value for which "ties away from zero" would
#    give a different NF4 code, and check it with `nearest_code`.
#
# <details><summary>Answer</summary>
#
# Section 3's `mid_pos`, the float32 midpoint between levels 8 (0.0796) and 9 (0.1609):
# `nearest_code(mid_pos.reshape(1), NF4)` gives 8, the lower level; ties away from zero would give 9. On the
# negative side the two rules agree: the lower level of a tie there is the one farther from zero.
#
# </details>

# %% [markdown]
# **Exercise:** [exercises/03_blockwise_4bit.ipynb](../exercises/03_blockwise_4bit.ipynb) (solution:
# [solutions/03_blockwise_4bit.ipynb](../solutions/03_blockwise_4bit.ipynb))
