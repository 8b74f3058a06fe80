# %% [markdown]
# # Lesson 1 — Linear quantization: a scale, a zero-point, and what one outlier does
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/01_linear_quantization.ipynb)
#
# **What you will learn**
# - the two linear quantizers, derived from scratch: symmetric (*absmax*) and asymmetric (*zero-point*);
# - how to quantize a tiny vector by hand, and check the library against your hand computation;
# - how the error shrinks with the number of bits (2 to 8), and the formula that predicts it;
# - why a zero-point helps on skewed data;
# - why one outlier ruins a per-tensor scale, and how per-channel and per-block scales contain the damage;
# - what two of the course's source documents get wrong about all this.
#
# **Prerequisites:** lesson 0 (setup). PyTorch tensors, `round`, `min`/`max`. No GPU needed.
#
# This lesson's code is `qlora_ref/linear.py` (about 100 lines); the widget's plot is in
# `qlora_ref/plots/linear.py`.

# %% [markdown]
# **The code of this lesson**: `qlora_ref/linear.py`.

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

import math

import torch

import qlora_ref
from qlora_ref import quantization_error, quantize_absmax, quantize_zeropoint
from qlora_ref.compare import compare
from qlora_ref.plots.linear import plot_levels

# %matplotlib inline
_ = torch.manual_seed(0)
generator = torch.Generator().manual_seed(0)  # all the data of this lesson comes from this generator
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %% [markdown]
# ## 0. The picture first
#
# Here is what quantizing means. The grey histogram is 65,536 numbers drawn from N(0, 1), standing in for a
# weight matrix. The red lines are the only values a 4-bit quantizer can give back: every number is replaced
# by the red line nearest to it, and the distance it moves is the error. The rest of the lesson is about
# where to put those lines.

# %%
W = torch.randn(256, 256, generator=generator)  # a stand-in weight matrix, N(0, 1) entries
fig, info = plot_levels(W, bits=4, scheme="absmax")
print(f"{W.numel():,} values, {info['levels'].numel()} levels, {info['scale']:.4f} apart; mean |error| {info['mae']:.4f}")
fig

# %% [markdown]
# The left panel spans all the levels, the right one only the data's own range (here nearly the same).
# Two things to keep in mind: the lines are evenly spaced, and one of them sits at exactly 0.
#
# ## 1. Why quantize: bytes per weight
#
# A model's memory is mostly its weights, and a weight's size is its number of bits. For a 7-billion-parameter
# model (1 GB = 10^9 bytes; a GiB is 2^30 bytes, a little more):

# %%
parameters = 7e9
for name, bits in [("float32", 32), ("bfloat16 / float16", 16), ("8-bit", 8), ("4-bit", 4)]:
    print(f"{name:>18}: {bits:2d} bits -> {parameters * bits / 8 / 1e9:5.1f} GB = {parameters * bits / 8 / 2**30:5.2f} GiB")
print(f"a GiB is {2**30 / 1e9:.4f} GB")

# %% [markdown]
# So the 28 / 14 / 7 / 3.5 GB tables in the course's sources are right in GB. (They leave out the scales
# that every quantized format has to store next to the codes; this lesson counts them.) The question of the
# whole course is how to give each weight fewer bits while losing as little as possible.

# %% [markdown]
# ## 2. Symmetric (absmax) quantization, derived
#
# With b bits we can store 2^b integers. Take the signed ones from -(2^(b-1) - 1) to 2^(b-1) - 1, a range
# symmetric around 0 (we drop -2^(b-1) so that +x and -x are treated alike; 8 bits give -127..127).
# Call the top one q_max = 2^(b-1) - 1. We want a scale s so that the largest |x| lands on q_max:
#
# $$ s = \frac{\max_i |x_i|}{q_{\max}}, \qquad q_i = \mathrm{clamp}\big(\mathrm{round}(x_i / s),\ -q_{\max},\ q_{\max}\big), \qquad \hat x_i = s\, q_i . $$
#
# The stored data are the integers q (b bits each) and the one number s. Every $\hat x$ is a multiple of s:
# the levels are evenly spaced, s apart, and 0 is one of them. Rounding to the nearest level is off by at most
# s/2. (With absmax scaling the clamp never acts; it matters when s is chosen otherwise.)

# %% [markdown]
# ## 3. Asymmetric (zero-point) quantization, derived
#
# If the data are not centred on 0 (think of activations after a ReLU or GELU), half of the symmetric levels
# sit where there are no values. Instead, map the range [min, max] onto all 2^b unsigned codes 0..2^b - 1:
#
# $$ s = \frac{\max_i x_i - \min_i x_i}{2^b - 1}, \qquad z = \mathrm{round}\!\left(\frac{-\min_i x_i}{s}\right), \qquad
#    q_i = \mathrm{clamp}\big(\mathrm{round}(x_i / s) + z,\ 0,\ 2^b - 1\big), \qquad \hat x_i = s\,(q_i - z). $$
#
# The *zero-point* z is the integer code that stands for the real number 0: $\hat x = s(z - z) = 0$, so 0 is
# represented exactly. That matters: zeros are everywhere in networks (padding, ReLU outputs), and an error on
# each of them would add up. Because z is rounded, the grid can shift by up to s/2 against [min, max], so one
# end of the range may be clipped by up to s/2 (the example below shows it). `qlora_ref` also widens the
# range to include 0 first (min ≤ 0 ≤ max), so that z is always a valid code.

# %% [markdown]
# ## 4. A worked example by hand
#
# Five numbers, 4 bits. First symmetric: q_max = 7.

# %%
x_list = [-1.5, -0.4, 0.0, 0.7, 2.2]
bits = 4

qmax = 2 ** (bits - 1) - 1
s = max(abs(v) for v in x_list) / qmax
q_hand = [max(-qmax, min(qmax, round(v / s))) for v in x_list]  # Python's round, like torch.round, sends .5 to even
x_hat_hand = [s * q for q in q_hand]
print(f"q_max = {qmax}, s = 2.2 / 7 = {s:.6f}")
print("x / s =", [f"{v / s:.4f}" for v in x_list])
print("q     =", q_hand)
print("x^    =", [f"{v:.4f}" for v in x_hat_hand])

# %% [markdown]
# The library does the same in float32. The integer codes must agree exactly; the dequantized values agree up
# to float32 rounding (our hand computation used Python's float64), which is what `rtol=1e-6` states: a float32
# rounding moves a value by at most 6e-8 of itself.

# %%
x = torch.tensor(x_list)
absmax_4bit = quantize_absmax(x, bits=4)
compare("absmax codes q", absmax_4bit.q, torch.tensor(q_hand))
compare("absmax x^", absmax_4bit.dequantize(), torch.tensor(x_hat_hand, dtype=torch.float64), rtol=1e-6)
print(f"library scale: {absmax_4bit.scale.item():.6f}")

# %% [markdown]
# Now asymmetric: 16 codes 0..15 for the range [-1.5, 2.2].

# %%
qmax_unsigned = 2**bits - 1
lo, hi = min(x_list), max(x_list)
s = (hi - lo) / qmax_unsigned
z = round(-lo / s)
q_hand = [max(0, min(qmax_unsigned, round(v / s) + z)) for v in x_list]
x_hat_hand = [s * (q - z) for q in q_hand]
print(f"s = 3.7 / 15 = {s:.6f}, z = round(1.5 / s) = round({-lo / s:.4f}) = {z}")
print("x / s + z =", [f"{v / s + z:.4f}" for v in x_list])
print("q         =", q_hand)
print("x^        =", [f"{v:.4f}" for v in x_hat_hand])
print(f"representable range: [{s * (0 - z):.4f}, {s * (qmax_unsigned - z):.4f}]  (the data's: [{lo}, {hi}])")

zeropoint_4bit = quantize_zeropoint(x, bits=4)
compare("zero-point codes q", zeropoint_4bit.q, torch.tensor(q_hand))
compare("zero-point x^", zeropoint_4bit.dequantize(), torch.tensor(x_hat_hand, dtype=torch.float64), rtol=1e-6)
print(f"library scale {zeropoint_4bit.scale.item():.6f}, zero-point {int(zeropoint_4bit.zero)}")

# %% [markdown]
# Two things to notice. The 0.0 came back as exactly 0.0 in both schemes. And rounding z from 6.08 down to 6
# shifted the grid: the representable range is [-1.48, 2.22], so -1.5 is clipped to -1.48 (an error of
# 0.02 < s/2) while 0.02 of range above 2.2 goes unused.
#
# ## 5. Two mistakes in the sources
#
# **Seed 003** writes linear quantization as $Q(w) = \mathrm{round}\big((w - z)/s\big)\cdot s + z$. Read with z
# as a real-valued offset (the natural choice is z = min), this *is* an evenly spaced grid from min to max,
# but it misses two things: there is no clamp (so nothing says how many codes, i.e. how many bits, there are),
# and 0 is in general **not** one of the levels. On our five numbers, at 4 bits:

# %%
s_seed = (hi - lo) / qmax_unsigned
z_seed = lo  # z as a real offset: the grid starts at min
Q_seed = [round((v - z_seed) / s_seed) * s_seed + z_seed for v in x_list]
print("seed 003's Q(w):", [f"{v:.4f}" for v in Q_seed])
print(f"Q(0) = {Q_seed[2]:.4f}, not 0; ours: {float(zeropoint_4bit.dequantize()[2]):.4f}")

# %% [markdown]
# The form used by integer hardware and by PyTorch keeps z an *integer* code, as in section 3:
# q = clamp(round(x/s) + z, 0, 2^b - 1) and x^ = s (q - z), which makes 0 exact (Jacob et al. 2018,
# arXiv:1712.05877, give the reasons). Seed 000 names "a scale factor and a zero-point" but its formulas are
# missing; section 3 above is what they should say.
#
# **Seed 003** also comments `tensor / tensor.abs().max()` as "Normalize to unit variance". Dividing by the
# absolute maximum does something else: it maps the largest |x| to 1, so every value lands in [-1, 1]. The
# variance is not 1, and depends on how many values share the maximum:

# %%
unit_tensor = W / W.abs().max()
unit_blocks = W.reshape(-1, 64) / W.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
# Statistics that are printed are summed in float64: a float32 sum's last digits depend on the order of the
# additions, which depends on the CPU and the number of threads.
print(f"whole tensor ({W.numel():,} values) / absmax: max |u| = {unit_tensor.abs().max():.4f}, std = {unit_tensor.double().std():.4f}")
print(f"blocks of 64 / their absmax:        max |u| = {unit_blocks.abs().max():.4f}, std = {unit_blocks.double().std():.4f}")
print(f"x / x.std() (that would be unit variance): std = {(W / W.std()).double().std():.4f}")

# %% [markdown]
# ## 6. Error against bits, on normal data
#
# Quantize section 0's 256 x 256 matrix W (entries N(0, 1)) per tensor with 2 to 8 bits. When the levels are dense
# compared with the data, the rounding error of a value is spread evenly over [-s/2, s/2], which predicts a
# mean absolute error of s/4 and a root-mean-square error of s/√12. Each extra bit halves s, so it should halve
# the error:

# %%
print("bits  levels     s        MAE    s/4  MAE/(s/4)   RMSE   s/√12 | zero-point MAE")
for b in range(2, 9):
    sym = quantize_absmax(W, bits=b)
    err = quantization_error(W, sym.dequantize())
    asym_err = quantization_error(W, quantize_zeropoint(W, bits=b).dequantize())
    s = sym.scale.item()
    print(
        f"{b:4d} {2**b - 1:7d} {s:8.4f} {err['mae']:9.5f} {s / 4:7.4f} {err['mae'] / (s / 4):9.3f}"
        f" {err['rmse']:8.5f} {s / math.sqrt(12):7.4f} | {asym_err['mae']:.5f}"
    )
mae_4, mae_8 = (quantization_error(W, quantize_absmax(W, bits=b).dequantize())["mae"] for b in (4, 8))
print(f"INT4's error / INT8's: {mae_4 / mae_8:.1f}; mean |x| of W {W.double().abs().mean():.4f}, √(2/π) = {math.sqrt(2 / math.pi):.4f}")

# %% [markdown]
# From 3 bits up, the measured error matches s/4 and s/√12 to within 1%, and INT8's error (0.0090) is 18 times
# smaller than INT4's (0.1625), as their steps are: s shrinks from absmax/7 to absmax/127. At 2 bits the
# prediction fails: with levels -s, 0, s and s = max|x| = 4.56, almost every value rounds to 0 and its error is
# just |x| (the mean of |x| for N(0, 1) is √(2/π) = 0.798, and W's is 0.80). On this symmetric data the
# zero-point scheme gains little: one more level (2^b instead of 2^b - 1).
#
# ## 7. Skewed data: where the zero-point pays
#
# Activations after a GELU are skewed: GELU's output never goes below about -0.17, but its positive side is
# long. Absmax must still cover [-max, max], so about half its codes are never used:

# %%
skewed = torch.nn.functional.gelu(torch.randn(256, 256, generator=generator))
print(f"GELU outputs: min {skewed.min():.4f}, max {skewed.max():.4f}")
for b in (4, 8):
    sym, asym = quantize_absmax(skewed, bits=b), quantize_zeropoint(skewed, bits=b)
    mae_sym = quantization_error(skewed, sym.dequantize())["mae"]
    mae_asym = quantization_error(skewed, asym.dequantize())["mae"]
    print(
        f"{b} bits: absmax uses {sym.q.unique().numel():3d} of {2**b - 1} codes, MAE {mae_sym:.5f} | "
        f"zero-point uses {asym.q.unique().numel():3d} of {2**b}, MAE {mae_asym:.5f} ({mae_sym / mae_asym:.2f}x smaller)"
    )

# %% [markdown]
# The zero-point scheme spends its codes on [-0.17, 4.42] instead of [-4.42, 4.42], so its step is about half
# as large: the error drops 1.5x at 4 bits and 1.9x at 8 bits. Weights, which are roughly symmetric around 0, do not need this, and
# QLoRA's 4-bit formats (lesson 2) are symmetric-range codes with a single absmax per block.
#
# ## 8. One outlier ruins a per-tensor scale
#
# Now put one large value, 50, into W, as if one weight had grown about 11 times larger than all others. (LLM.int8(),
# Dettmers et al. 2022, arXiv:2208.07339, found such systematic outliers in the hidden states of large
# transformers.) With one scale for the whole tensor, s grows with the outlier, and the other 65,535 values
# share a grid that has become far too coarse:

# %%
W_outlier = W.clone()
W_outlier[3, 7] = 50.0
for b in (8, 4):
    clean = quantize_absmax(W, bits=b)
    spoiled = quantize_absmax(W_outlier, bits=b)
    err_clean = quantization_error(W, clean.dequantize())["mae"]
    err_spoiled = quantization_error(W_outlier, spoiled.dequantize())["mae"]
    zeros = int((spoiled.q == 0).sum())
    print(
        f"{b} bits per tensor: s {clean.scale.item():.4f} -> {spoiled.scale.item():.4f}, "
        f"MAE {err_clean:.4f} -> {err_spoiled:.4f} ({err_spoiled / err_clean:.1f}x), values rounded to 0: {zeros:,} of {W.numel():,}"
    )
print(f"the outlier is {50 / W.abs().max():.1f} times W's largest |x| ({W.abs().max():.2f})")
big = int((W.abs() > 50 / 7 / 2).sum())
print(f"values of W with |x| > 3.57 (half a 4-bit step): {big}")

# %% [markdown]
# At 4 bits the step is 50/7 = 7.1, so every value with |x| < 3.57 becomes 0: all of W is erased except the
# outlier itself and the handful of values beyond 3.57 (which become ±7.14, an even bigger error). The MAE
# (0.797) is just the mean |x|.
#
# The cure is more scales. *Per channel* gives each row of W (each output channel) its own scale; *per block*
# gives each run of 64 consecutive values its own. The outlier then only spoils its own row or block. The
# price is storage: one float32 scale per group, 32 bits shared by the group's values.

# %%
row, col = 3, 7
flat_index = row * W.shape[1] + col
print("granularity  scales  +bits/value | MAE all   its group  elsewhere | values -> 0")
for b in (8, 4):
    for granularity in ("tensor", "channel", "block"):
        spoiled = quantize_absmax(W_outlier, bits=b, granularity=granularity, blocksize=64)
        error = (W_outlier - spoiled.dequantize()).abs().reshape(-1).double()
        group = torch.zeros(W.numel(), dtype=torch.bool)
        if granularity == "tensor":
            group[:] = True
        elif granularity == "channel":
            group[row * 256 : (row + 1) * 256] = True
        else:
            start = flat_index // 64 * 64
            group[start : start + 64] = True
        elsewhere = f"{error[~group].mean():9.4f}" if (~group).any() else "        -"
        print(
            f"{b} bits {granularity:>7} {spoiled.scale.numel():5d} {32 * spoiled.scale.numel() / W.numel():9.4f}"
            f" | {error.mean():8.4f} {error[group].mean():9.4f} {elsewhere} | {(spoiled.q == 0).float().mean():10.1%}"
        )

# %% [markdown]
# Per channel and per block, the outlier's group still suffers (its other values share the big scale), but
# everyone else is untouched. Not approximately: exactly. Outside row 3, the per-channel result with the
# outlier equals the one without it, and outside the outlier's block the per-block result does too:

# %%
others_rows = torch.ones(256, dtype=torch.bool)
others_rows[row] = False
compare(
    "per channel, rows other than 3",
    quantize_absmax(W_outlier, bits=4, granularity="channel").dequantize()[others_rows],
    quantize_absmax(W, bits=4, granularity="channel").dequantize()[others_rows],
)
others_blocks = torch.ones(W.numel() // 64, dtype=torch.bool)
others_blocks[flat_index // 64] = False
_ = compare(
    "per block, blocks other than the outlier's",
    quantize_absmax(W_outlier, bits=4, granularity="block").dequantize().reshape(-1, 64)[others_blocks],
    quantize_absmax(W, bits=4, granularity="block").dequantize().reshape(-1, 64)[others_blocks],
)

# %% [markdown]
# Blocks of 64 are exactly what QLoRA does for its 4-bit weights (lesson 3): one absmax per 64 weights, at
# 32/64 = 0.5 extra bits per weight, which lesson 4's double quantization then shrinks.
#
# ## 9. See it: the levels over the data
#
# `plot_levels` draws the histogram of the data and the quantizer's levels (red lines) on top: on the left
# the whole range, on the right only the bulk of the data (its own min..max, the outlier excluded). It
# returns the figure and the numbers it drew. Section 0's picture again, now with an outlier at 20
# appended to W.

# %%
fig, info = plot_levels(W, bits=4, scheme="absmax", outlier=20.0)
print(f"{info['levels'].numel()} levels, step s = {info['scale']:.4f}; {info['levels_in_bulk']} of them inside the bulk")
print(f"MAE on W (the outlier excluded): {info['mae']:.4f}")
fig

# %% [markdown]
# Move the sliders: bits 2 to 8, absmax or zero-point, the outlier's size (0 = none) and the data (normal W, or
# the skewed GELU outputs). Watch how many levels stay inside the bulk, and the MAE in the right panel's title.
# (The widget needs a live kernel; a static view of the notebook shows nothing here.)

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import interact

DATA = {"normal W": W, "GELU outputs (skewed)": skewed}


def show_levels(data="normal W", bits=4, scheme="absmax", outlier=0.0):
    return plot_levels(DATA[data], bits=bits, scheme=scheme, outlier=outlier)[0]


_ = interact(show_levels, data=list(DATA), bits=(2, 8), scheme=["absmax", "zeropoint"], outlier=(0.0, 50.0, 5.0))

# %% [markdown]
# ## Summary
#
# - Symmetric: s = absmax / (2^(b-1) - 1), q = clamp(round(x/s)), x^ = s q. Asymmetric: s = (max - min)/(2^b - 1),
#   integer zero-point z = round(-min/s), q = clamp(round(x/s) + z, 0, 2^b - 1), x^ = s (q - z). Both keep 0 exact.
# - With dense levels the error is uniform: MAE = s/4, RMSE = s/√12; each bit halves it (INT8 18x below INT4 here).
# - On skewed data the zero-point cuts the error (1.5x at 4 bits, 1.9x at 8 here); on symmetric weights it gains little.
# - One outlier stretches the scale of its whole group: per tensor, 4 bits erased every other value of W.
#   Per channel or per block of 64, only its own group is hurt, for 32/64 = 0.5 extra bits per value at B = 64.
# - Corrected from the sources: seed 003's Q(w) = round((w - z)/s)·s + z has no clamp and misses 0; dividing
#   by the absmax maps values into [-1, 1], it does not normalise to unit variance.

# %% [markdown]
# ## Check your understanding
#
# 1. Why does the symmetric scheme use -127..127 at 8 bits and not -128..127?
#
# <details><summary>Answer</summary>
#
# So that +x and -x get codes of the same size: the range is symmetric around 0 and absmax scaling maps the
# largest |x| onto ±127. The code -128 has no positive partner; with s = max|x| / 127 nothing would round
# to it, so it is simply not used (one code of 256).
#
# </details>

# %% [markdown]
# 2. A tensor's values lie in [0.5, 3.5]. Which of the two schemes quantizes it better at 4 bits, and what are
#    s and z? (Remember that `qlora_ref` widens the range to include 0 first.)
#
# <details><summary>Answer</summary>
#
# The zero-point scheme. Widened to [0, 3.5], its 16 codes cover the data: s = 3.5 / 15 ≈ 0.233 and
# z = round(0 / s) = 0. Absmax needs s = 3.5 / 7 = 0.5 and wastes all its negative codes (the values use
# codes 1..7 only), so its step, and its error, is about twice as large. Check with
# `quantize_zeropoint(torch.tensor([0.5, 3.5]), bits=4)`.
#
# </details>

# %% [markdown]
# 3. In section 6 the 2-bit MAE (0.78) is far below the predicted s/4 = 1.14. Explain why the prediction fails.
#
# <details><summary>Answer</summary>
#
# s/4 assumes levels dense compared with the data, so that each value's rounding error is spread evenly over
# [-s/2, s/2]. At 2 bits there are three levels, -s, 0, s, with s = 4.56: almost every value rounds to 0 and
# its error is |x| itself, whose mean is about √(2/π) = 0.798, less for the few values that round to ±s.
#
# </details>

# %% [markdown]
# 4. With blocks of 64, how many extra bits per value do the float32 scales cost, and how many with blocks of
#    256? What do you lose with the larger blocks?
#
# <details><summary>Answer</summary>
#
# 32/64 = 0.5 bits and 32/256 = 0.125 bits per value. With larger blocks an outlier coarsens the grid of
# 256 values instead of 64, and even without outliers a block's absmax is larger (the maximum of more
# normal values), so the step is larger and so is the error (lesson 3 measures it).
#
# </details>

# %% [markdown]
# **Exercise:** [exercises/01_linear_quantization.ipynb](../exercises/01_linear_quantization.ipynb) (solution:
# [solutions/01_linear_quantization.ipynb](../solutions/01_linear_quantization.ipynb))
