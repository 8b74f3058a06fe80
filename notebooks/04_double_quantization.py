# %% [markdown]
# # Lesson 4 — Double quantization
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/04_double_quantization.ipynb)
#
# Lesson 3 stored one float32 absmax per block of 64 weights: 0.5 bits per parameter on top of the 4 bits
# of the code, 11% of the memory of a QLoRA weight. QLoRA's *double quantization* quantizes those
# constants too, to 8 bits, and brings their cost down to 0.127 bits per parameter.
#
# **What you will learn**
# - what the absmax constants cost, computed from a real quantization state;
# - how they are quantized: subtract their mean (the offset), then 8-bit blockwise quantization with the
#   *dynamic map* in blocks of 256; and how the dynamic map is built;
# - that `qlora_ref.quantize_4bit(..., double_quant=True)` gives the same state, field by field, as
#   `bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`;
# - that bitsandbytes' CPU 8-bit quantizer does not always pick the nearest code, and why byte-exact means
#   reproducing its lookup table;
# - the memory saved (0.373 bits per parameter, about 3 GB for a 65B model) and what it costs in error.
#
# **Prerequisites:** lesson 3 (blockwise absmax, `quantize_4bit`, `QuantState.bits_per_parameter()`).
#
# **Sources:** QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 3, "Double Quantization"; the
# dynamic map: Dettmers 2015 (arXiv:1511.04561) and the 8-bit optimizers paper (Dettmers et al. 2021,
# arXiv:2110.02861).

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/double_quant.py`, `qlora_ref/dynamic8bit.py`.

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
import dataclasses

import bitsandbytes.functional as bnbF
import torch
from IPython.display import display

from qlora_ref import (
    bnb_cpu,
    constant_bits_per_parameter,
    constants_memory_table,
    dequantize_4bit,
    dequantize_blockwise,
    dynamic_map,
    quantization_error,
    quantize_4bit,
    quantize_blockwise,
)
from qlora_ref.blockwise import scale_to_unit
from qlora_ref.compare import compare
from qlora_ref.double_quant import decompress_absmax
from qlora_ref.plots.double_quant import dynamic_map_figure, overhead_figure

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
gen = torch.Generator().manual_seed(0)
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
import bitsandbytes

print("torch", torch.__version__, "| bitsandbytes", bitsandbytes.__version__)

# %% [markdown]
# ## 1. What the constants cost
#
# A 4096 × 4096 weight (the size of one attention projection of a 7B model), quantized to NF4 in blocks
# of 64 as in lesson 3:

# %%
# Drawn in float64, then rounded to float32: torch's float32 randn computes its logarithms and cosines with
# vector instructions on x86 and without them elsewhere, so its last bits differ by CPU; the counts of codes
# printed below would differ with them.
W = torch.randn(4096, 4096, generator=gen, dtype=torch.float64).float()
packed, state = quantize_4bit(W, blocksize=64)
code_bytes = packed.numel() * packed.element_size()
absmax_bytes = state.absmax.numel() * state.absmax.element_size()
print(f"codes : {code_bytes:>10,} bytes ({W.numel():,} 4-bit codes, two per byte)")
print(f"absmax: {absmax_bytes:>10,} bytes ({state.absmax.numel():,} float32 values, one per block of 64)")
print(f"bits per parameter: {state.bits_per_parameter()} = 4 + {state.bits_per_parameter() - 4}; "
      f"the constants are {absmax_bytes / (code_bytes + absmax_bytes):.1%} of the bytes")
print(f"for a 65B-parameter model: {65e9 * 32 / 64 / 8e9:.2f} GB of absmax values")

# %% [markdown]
# ## 2. What the absmax values look like
#
# The absmax of a block is the largest |w| of 64 weights: always positive, and on normally distributed
# weights it varies only by a factor of about 4 from block to block.

# %%
absmax = state.absmax
print(f"{absmax.numel():,} values: min {absmax.min():.3f}, mean {absmax.double().mean():.3f}, max {absmax.max():.3f}, "
      f"std / mean {absmax.double().std() / absmax.double().mean():.3f}; max / min {absmax.max() / absmax.min():.1f}")

# %% [markdown]
# 8 bits are plenty for numbers like these; what matters is how the 256 codes are spread.
#
# ## 3. The 8-bit dynamic map
#
# bitsandbytes quantizes the constants with the **dynamic map** of its 8-bit optimizers (Dettmers 2015;
# Dettmers et al. 2021), `qlora_ref.dynamic_map()`, a table of 256 values in [-1, 1]. (The QLoRA paper says
# "8-bit Floats"; the code uses this map.) Its positive levels, first on a linear axis, then on a log axis:

# %%
DYN = dynamic_map(signed=True)
fig, per_decade = dynamic_map_figure(DYN)
print("positive levels per decade, from [1e-07, 1e-06] up to [0.1, 1]:", per_decade)
fig

# %% [markdown]
# On the linear axis the 63 levels below 0.1 are squeezed into the left tenth, and the 31 below 0.01 cannot be
# told from 0. The log axis shows the design: one group of levels per decade, twice as many in each decade as in
# the one below. The recipe: for e = 0..6 the decade [10^(e-7), 10^(e-6)] gets 2^e values, 10^(e-6) times the
# midpoints of `linspace(0.1, 1, 2^e + 1)`, and their negatives; then 0 and 1 are added. Large magnitudes get
# many levels, tiny ones few, and the range covers 7 decades:

# %%
print(f"{DYN.numel()} levels, from {DYN.min():.5f} to {DYN.max():.5f}; equal to bitsandbytes' create_dynamic_map(signed=True):",
      torch.equal(DYN, bnbF.create_dynamic_map(signed=True)))
positive = DYN[DYN > 0]
print(" e   decade               positive levels   smallest    largest")
for e in range(7):
    low, high = 10.0 ** (e - 7), 10.0 ** (e - 6)
    levels = positive[(positive > low) & (positive < high)]
    print(f" {e}   [{low:.0e}, {high:.0e}]   {levels.numel():15d}   {levels.min():.3e}   {levels.max():.3e}")
print(f"plus 0 and 1.0: {2 * positive[positive < 1].numel()} + 2 = {DYN.numel()}")
top = positive[positive > 0.1]
print(f"spacing in the top decade: {(top[1:] - top[:-1]).mean():.4f} (0.9 / 64 = {0.9 / 64:.4f})")

# %% [markdown]
# The largest negative level is -0.99297 (the midpoint of the last linspace step), the largest positive
# one is exactly 1: the signed map is slightly asymmetric. In the top decade, 64 levels sit 0.014 apart.
#
# A caveat about these 256 numbers: they come from `torch.linspace` in float32, and torch computes it with other
# instructions on other CPUs (vector code on an x86 with AVX2, scalar code elsewhere), which round some results
# differently in the last bit. bitsandbytes builds its map the same way, so on each machine its map and ours agree
# (the `True` above), but two machines need not. Counted here, by building the map again in a process that runs
# torch's scalar code (`ATEN_CPU_CAPABILITY=default`; the output depends on the machine):

# %%
# NBVAL_IGNORE_OUTPUT
import json
import subprocess

scalar_build = "import torch, qlora_ref; print(qlora_ref.dynamic_map(signed=True).tolist())"
scalar_map = subprocess.run([sys.executable, "-c", scalar_build], env=os.environ | {"ATEN_CPU_CAPABILITY": "default"},
                            capture_output=True, text=True, check=True).stdout
scalar_map = torch.tensor(json.loads(scalar_map))
print(f"torch's CPU code here: {torch.backends.cpu.get_cpu_capability()}; levels that its scalar code puts elsewhere: "
      f"{int((scalar_map != DYN).sum())} of {DYN.numel()}, by at most {(scalar_map - DYN).abs().max().item():.1e}")

# %% [markdown]
# ## 4. Subtract the mean first
#
# The absmax values are all positive. Quantized as they are, they only use the positive half of the map,
# and only its top decade, since each nested block is divided by its largest value. QLoRA subtracts their
# mean (the `offset`) first, so that they are centred on zero and use both halves. Both ways, in blocks of 256:

# %%
# The mean summed in float64: a float32 sum of 262,144 values ends in other bits on another CPU (more on that
# in section 5).
offset = absmax.double().mean().float()
mean_rel = []
for name, values in [("absmax as it is   ", absmax), ("absmax - mean     ", absmax - offset)]:
    q, st = quantize_blockwise(values, blocksize=256)
    restored = dequantize_blockwise(q, st) + (absmax - values)  # add the offset back where it was taken
    rel = ((restored - absmax).abs() / absmax).double()
    mean_rel.append(rel.mean().item())
    print(f"{name}: codes used {q.unique().numel():3d} of 256, relative error of absmax^: mean {rel.mean():.5f}, max {rel.max():.5f}")
print(f"offset = {offset:.4f}; centring divides the mean relative error by {mean_rel[0] / mean_rel[1]:.1f}")

# %% [markdown]
# Centring uses almost all 256 codes and cuts the mean relative error of the restored absmax by a factor
# of 3.6. The offset is one float32 for the whole tensor.
#
# ## 5. The nested state, field by field against bitsandbytes
#
# Double quantization, as `qlora_ref.double_quant.compress_absmax` does it:
#
#     offset           = mean(absmax)
#     qabsmax, state2  = 8-bit blockwise quantization of (absmax - offset), dynamic map, blocks of 256
#     absmax^          = DYN[qabsmax] * state2.absmax + offset      (when dequantizing)
#
# `quantize_4bit(W, double_quant=True)` stores qabsmax (uint8) where lesson 3 stored the float32 absmax,
# and keeps the offset and state2 (one float32 per 256 absmax values). Against bitsandbytes'
# `quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")`:

# %%
packed_dq, state_dq = quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
bnb_packed, bnb_state = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")

print(f"state.absmax: {state_dq.absmax.dtype}, {state_dq.absmax.numel():,} codes | state2.absmax: "
      f"{state_dq.state2.absmax.dtype}, {state_dq.state2.absmax.numel():,} values, mean {state_dq.state2.absmax.double().mean():.3f} | "
      f"offset {state_dq.offset.item():.4f}")
compare("packed 4-bit codes     ", packed_dq, bnb_packed)
compare("nested absmax (uint8)  ", state_dq.absmax, bnb_state.absmax)
compare("offset                 ", state_dq.offset, bnb_state.offset)
compare("state2.absmax          ", state_dq.state2.absmax, bnb_state.state2.absmax)
compare("state2.code            ", state_dq.state2.code, bnb_state.state2.code)
print(f"state2.blocksize        : ours {state_dq.state2.blocksize}, bitsandbytes {bnb_state.state2.blocksize}")
W_hat_dq = dequantize_4bit(packed_dq, state_dq)
_ = compare("dequantized weights    ", W_hat_dq, bnb_cpu.dequantize_4bit_portable(bnb_packed, bnb_state))

# %% [markdown]
# Every byte agrees (bitsandbytes' values from its portable decoder, lesson 0, section 4).
#
# One caveat, about bitsandbytes rather than about us: the offset is torch's float32 `mean`, and a float32 sum
# of 262,144 values ends in other bits when the additions run in another order, which they do with another
# number of threads or another CPU. So bitsandbytes' nested bytes for the same weight can differ from machine
# to machine, though ours and bitsandbytes' agree on each one (we take the same mean, on purpose). Here, with
# one thread against all of them (the output depends on the machine):

# %%
# NBVAL_IGNORE_OUTPUT
threads = torch.get_num_threads()
torch.set_num_threads(1)
_, state_one_thread = quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
torch.set_num_threads(threads)
changed = int((state_one_thread.absmax != state_dq.absmax).sum())
print(f"offset with {threads} threads {state_dq.offset.item():.9f}, with 1 thread {state_one_thread.offset.item():.9f}: "
      f"{changed:,} of {state_dq.absmax.numel():,} nested codes differ")

# %% [markdown]
# To get equal bytes, one detail of bitsandbytes had to be reproduced that a textbook quantizer would get
# "wrong".
#
# ## 6. bitsandbytes' CPU rounding is a lookup table, not the nearest code
#
# Lesson 3's rule picks the nearest level (ties to the lower one). bitsandbytes' 8-bit CPU kernel, which
# quantizes the nested absmax here, does something faster: it rounds u = x / absmax to a grid of 65536
# points on [-1, 1], `i = int((u + 1) / 2 * 65535 + 0.5)`, and reads the code from a table that holds,
# for every grid point, the level nearest to *that point*. When u lies within half a grid step
# (1.5e-5) of a midpoint between two levels, the grid point can fall on the other side of the midpoint.
#
# `quantize_blockwise(..., rounding="lut")` (the default) does this; `rounding="nearest"` is the true
# nearest code. Counted on the nested absmax above, and on 2^22 values of N(0, 1) in blocks of 256. (The shares
# are printed to two digits, not as counts: on another CPU some of the map's levels are one float32 step away,
# section 3, and a few values land on the other side of a midpoint.)

# %%
centred = state.absmax - offset
print(f"grid step 2/65535 = {2 / 65535:.2e}; half of it {1 / 65535:.2e}")
sample = torch.randn(2**22, generator=gen, dtype=torch.float64).float()  # float64 first, as W
for name, values in [("nested absmax (4096x4096 weight)", centred), ("2^22 values of N(0, 1)", sample)]:
    q_lut, st_lut = quantize_blockwise(values, blocksize=256, rounding="lut")
    q_near, _ = quantize_blockwise(values, blocksize=256, rounding="nearest")
    q_bnb, _ = bnbF.quantize_blockwise(values, blocksize=256)
    print(f"{name}: LUT and nearest differ on {100 * (q_lut != q_near).double().mean().item():.2g}% of the codes")
    compare("  bitsandbytes vs LUT    ", q_bnb, q_lut)
    print(f"  bitsandbytes vs nearest: equal {torch.equal(q_bnb, q_near)}")

# %% [markdown]
# One of the disagreements on the normal sample, step by step:

# %%
u = scale_to_unit(sample, st_lut.absmax, 256)
i = int((q_lut != q_near).nonzero()[0])
lo, hi = sorted([int(q_lut[i]), int(q_near[i])])
midpoint = (DYN[lo] + DYN[hi]) / 2
k = int((u[i].item() + 1.0) * 0.5 * 65535 + 0.5)
grid_point = -1.0 + 2.0 * k / 65535
print(f"u                  = {u[i].item():+.8f}")
print(f"candidate levels   : {DYN[lo].item():+.8f} (code {lo})  and  {DYN[hi].item():+.8f} (code {hi})")
print(f"midpoint           = {midpoint.item():+.8f}  -> u is {'below' if u[i] < midpoint else 'above'} it, nearest is code {int(q_near[i])}")
print(f"grid point {k:5d} = {grid_point:+.8f}  -> {'below' if grid_point < midpoint.item() else 'above'} the midpoint, the table gives code {int(q_lut[i])}")
print(f"|u - level|        : {abs(u[i] - DYN[q_lut[i].long()]).item():.8f} for the table's code, {abs(u[i] - DYN[q_near[i].long()]).item():.8f} for the nearest")

# %% [markdown]
# Near zero the levels are closer together than the grid's step (3e-5), so there the table can be off by
# several levels; the distribution of (LUT code - nearest code), and the mean error of both:

# %%
steps, counts = torch.unique(q_lut.long() - q_near.long(), return_counts=True)
print("LUT - nearest, in codes: share of the values")
for step, count in zip(steps.tolist(), counts.tolist()):
    percent = 100 * count / u.numel()
    print(f"  {step:+d}: {percent:.1f}%" if percent > 1 else f"  {step:+d}: {percent:.2g}%")
err_lut = (DYN[q_lut.long()] - u).double().abs().mean().item()
err_near = (DYN[q_near.long()] - u).double().abs().mean().item()
print(f"mean |u - level|: LUT {err_lut:.7f}, nearest {err_near:.7f} (relative difference {err_lut / err_near - 1:.1e})")

# %% [markdown]
# As a quantizer the table is as good as the nearest code: the mean error differs in the sixth digit. But
# the *bytes* differ, and each nested code scales a block of 64 weights. A nested state built with the
# nearest code instead of the table, dequantized and compared with bitsandbytes:

# %%
# The nested state's own offset (section 5's caveat: its last bits, and so the exact counts, depend on the
# machine; the shares printed are rounded well above that).
q_near_absmax, state2_near = quantize_blockwise(state.absmax - state_dq.offset, blocksize=256, rounding="nearest")
state_near = dataclasses.replace(state_dq, absmax=q_near_absmax, state2=state2_near)
codes_differ = (q_near_absmax != bnb_state.absmax).double().mean().item()
differ = dequantize_4bit(packed_dq, state_near) != bnb_cpu.dequantize_4bit_portable(bnb_packed, bnb_state)
print(f"nested codes that differ from bitsandbytes': {100 * codes_differ:.1g}%; dequantized weights that differ: "
      f"{100 * differ.double().mean().item():.1g}%, all of them in blocks whose nested code differs: "
      f"{bool((differ.reshape(-1, 64).any(dim=1) <= (q_near_absmax != bnb_state.absmax)).all())}")

# %% [markdown]
# So "bit-exact with bitsandbytes on a CPU" means reproducing its table, grid and all: `qlora_ref` does it
# in `qlora_ref.dynamic8bit.lut_code_index`. (On a GPU bitsandbytes runs a different kernel, a binary search over
# the code; this course checks the CPU bytes.)
#
# ## 7. The memory saved
#
# Per parameter, with blocks of B weights and nested blocks of 256 absmax values:
#
# - without double quantization: one float32 per block, **32/B** bits;
# - with it: one byte per block plus one float32 per 256 blocks, **8/B + 32/(256·B)** bits
#   (and one float32 offset per tensor, negligible).
#
# `qlora_ref.constant_bits_per_parameter` computes both; `constants_memory_table` turns them into GB
# (1 GB = 10^9 bytes):

# %%
plain = constant_bits_per_parameter(64, double_quant=False)
nested = constant_bits_per_parameter(64, double_quant=True)
print(f"B = 64: {plain} bits -> {nested:.6f} bits per parameter, saving {plain - nested:.6f}")
print()
print("  model   absmax float32   double quantized   saved")
for params, gb_plain, gb_nested, gb_saved in constants_memory_table((7e9, 13e9, 65e9, 70e9), blocksize=64):
    print(f"{params / 1e9:5.0f}B   {gb_plain:11.3f} GB   {gb_nested:13.3f} GB   {gb_saved:.3f} GB")

# %% [markdown]
# The same figure from the real state of section 5, whose `bits_per_parameter()` counts the stored bytes
# (codes, nested absmax, state2.absmax and the offset):

# %%
print(f"without double quantization: {state.bits_per_parameter():.6f} bits per parameter")
print(f"with double quantization:    {state_dq.bits_per_parameter():.6f} bits per parameter")
print(f"formula 4 + 8/64 + 32/(64*256) = {4 + nested:.6f}; the difference is the offset, 32 bits / {W.numel():,} = {32 / W.numel():.1e}")
print(f"saved: {state.bits_per_parameter() - state_dq.bits_per_parameter():.6f} bits per parameter")

# %% [markdown]
# The QLoRA paper (section 3) does the same sum: 32/64 = 0.5 bits down to 8/64 + 32/(64 · 256) = 0.127
# bits, a reduction of 0.373 bits per parameter, and puts it at about 3 GB for a 65B model. The course's
# source notes, next to the computed values:

# %%
saved = plain - nested
saved_65b = constants_memory_table((65e9,))[0][3]
for source, claim, value in [
    ("note 001: 'approximately 0.5 bits per parameter'", 0.5, saved),
    ("note 003: '~0.4 bits/parameter'", 0.4, saved),
    ("note 000: 'approximately 0.37 bits per parameter'", 0.37, saved),
    ("note 002: 'approximately 3GB' at 65B", 3.0, saved_65b),
]:
    print(f"{source:52s} claim {claim:<5} computed {value:.3f}  (off by {claim / value - 1:+.0%})")
print(f"the saving is {saved / plain:.0%} of what the constants cost without double quantization")

# %% [markdown]
# 0.5 bits is what the constants cost *before* double quantization, not what it saves: the saving is 0.373
# bits (75% of the constants' cost), and "~0.4" rounds it up by 7%. The 3 GB at 65B is right (3.03 GB).
#
# ## 8. What it costs in error
#
# The restored absmax^ is not the absmax: each block's scale is off by a small relative error, which
# multiplies all 64 of its dequantized weights. Measured on the weight of section 1:

# %%
absmax_hat = decompress_absmax(state_dq.absmax, state_dq.offset, state_dq.state2)
rel = ((absmax_hat - state.absmax).abs() / state.absmax).double()
print(f"absmax^ vs absmax: relative error mean {rel.mean():.2e}, max {rel.max():.2e}; "
      f"{(absmax_hat == state.absmax).float().mean():.1%} exact")
err = {}
for name, w_hat in [("without double quantization", dequantize_4bit(packed, state)), ("with double quantization   ", W_hat_dq)]:
    err[name] = quantization_error(W, w_hat)
    print(f"{name}: mean |W - W^| {err[name]['mae']:.6f}, rms {err[name]['rmse']:.6f}")
without, with_dq = err.values()
print(f"change in the mean error: {with_dq['mae'] / without['mae'] - 1:+.3%}, in the rms error: {with_dq['rmse'] / without['rmse'] - 1:+.3%}")
print(f"the 4-bit codes are the same either way: {torch.equal(packed, packed_dq)}")

# %% [markdown]
# The codes do not change (they are computed from the exact absmax); only the scale used to dequantize
# them does, by 0.16% on average, and the weights' mean error grows by about 0.1%. This is in line with
# the QLoRA paper, which observed no performance degradation from quantizing the constants to 8 bits.
#
# ## 9. Try it: block size and model size
#
# `overhead_figure` (in `qlora_ref/plots/double_quant.py`) draws the constants' bits per parameter for
# every block size, with and without double quantization, and the GB for a model of a given size. It
# returns the numbers of the chosen block size:

# %%
fig, row = overhead_figure(highlight=64, parameters=65e9)
print(f"B = {row['blocksize']}: {row['plain_bits']} -> {row['nested_bits']:.4f} bits per parameter; "
      f"65B parameters: {row['plain_gb']:.2f} GB -> {row['nested_gb']:.2f} GB, {row['saved_gb']:.2f} GB saved")
print(f"B = 256 without double quantization: {constant_bits_per_parameter(256, double_quant=False)} bits per parameter")
display(fig)

# %% [markdown]
# Double quantization lets QLoRA keep small blocks: at B = 64 with it, the constants cost about as much
# as at B = 256 without it (0.127 against 0.125 bits), with the error of B = 64 (lesson 3's table).

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import Dropdown, SelectionSlider, interact


def show(blocksize=64, parameters=65e9):
    fig, row = overhead_figure(highlight=blocksize, parameters=parameters)
    display(fig)


interact(
    show,
    blocksize=SelectionSlider(options=[32, 64, 128, 256, 512, 1024, 2048, 4096], value=64),
    parameters=Dropdown(options=[("7B", 7e9), ("13B", 13e9), ("65B", 65e9), ("70B", 70e9)], value=65e9),
);

# %% [markdown]
# ## Summary
#
# - The float32 absmax of blocks of 64 costs 0.5 bits per parameter (4.06 GB at 65B).
# - Double quantization subtracts the absmax mean (the offset) and quantizes the rest to 8 bits with the
#   dynamic map (256 levels in [-0.99297, 1], more levels for larger magnitudes), in blocks of 256.
# - Cost: 8/64 + 32/(64·256) = 0.127 bits per parameter; saved: 0.373 (3.03 GB at 65B); a real
#   4096 × 4096 state measures 4.127 bits per parameter in all.
# - The restored absmax is off by 0.16% on average; the weights' error barely moves.
# - bitsandbytes' CPU 8-bit quantizer uses a 65536-point lookup table that disagrees with the nearest code
#   on about 0.15-0.2% of values; byte-exactness means reproducing it. Our nested state equals
#   bitsandbytes' in every field.

# %% [markdown]
# ## Check your understanding
#
# 1. With blocks of 128 and double quantization, how many bits per parameter do the constants cost?
#    Check with `constant_bits_per_parameter`.
#
# <details><summary>Answer</summary>
#
# 8/128 + 32/(128 · 256) = 0.0625 + 0.00098 = 0.0635 bits per parameter, against 32/128 = 0.25 without
# double quantization.
#
# </details>

# %% [markdown]
# 2. Why would the absmax values, quantized without subtracting their mean, use so few of the 256 codes?
#
# <details><summary>Answer</summary>
#
# They are all positive, so the negative half of the map is never used. And each nested block is divided by
# its largest value, while the absmax values differ by a factor of only about 4 (section 2): every scaled
# value lies between about 0.2 and 1, inside the top decade, whose 64 positive levels (and 1.0) are all it
# can reach. Section 4 counts the codes actually used.
#
# </details>

# %% [markdown]
# 3. A nested absmax code is off by one level. How many weights does that affect, and by roughly how much
#    (relative), if the level is in the top decade of the dynamic map?
#
# <details><summary>Answer</summary>
#
# One nested code is the scale of one block: all 64 of its weights, each multiplied by the same wrong
# absmax^. One level in the top decade is 0.014 of the nested block's scale (`state2.absmax`, 1.56 on
# average in section 5), so absmax^ moves by about 0.014 × 1.56 ≈ 0.022, which is 0.8% of an absmax of
# 2.6 (section 2's mean). Every weight of the block is off by that same relative amount.
#
# </details>

# %% [markdown]
# 4. Would the table rounding of section 6 ever pick a level two steps away from u in the top decade
#    [0.1, 1]? (Compare the grid step with the spacing of the levels there.)
#
# <details><summary>Answer</summary>
#
# No. The grid point is within half a grid step (1.5e-5) of u, while the levels there are 0.014 apart.
# The table's code can differ from the nearest one only when u lies within 1.5e-5 of a midpoint, and then
# it is the level on the other side of that midpoint: a neighbour, one step away. Larger jumps happen only
# near zero, where the levels are closer together than the grid step.
#
# </details>

# %% [markdown]
# **Exercise:** [exercises/04_double_quantization.ipynb](../exercises/04_double_quantization.ipynb) (solution:
# [solutions/04_double_quantization.ipynb](../solutions/04_double_quantization.ipynb))
