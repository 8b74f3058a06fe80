# %% [markdown]
# # Lesson 7 — Optimizer memory: 8-bit AdamW and paged optimizers
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/07_optimizers.ipynb)
#
# Adam keeps two numbers for every trained weight. In float32 those two moments weigh twice as much as
# the weights themselves, and they sit in GPU memory for the whole run although each is used once per
# step. This lesson shrinks them to one byte each (8-bit AdamW, Dettmers et al. 2021) and then moves
# them out of the GPU whenever something else needs the room (paged optimizers, QLoRA section 3).
# QLoRA trains only the adapters, so their moments are small; what it needs paging for is the
# memory spike of a long batch.

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/adamw_step.py`, `qlora_ref/optim8bit.py`,
# `qlora_ref/pager.py`, `qlora_ref/paging.py`. For its demonstrations it also uses `qlora_ref/spike.py`,
# `qlora_ref/managed_memory.py`.

# %% [markdown]
# **What you will learn**
# - what full fine-tuning of a 7B-shaped model keeps per parameter (weights, gradients, Adam's m and v),
#   computed, and which of the course's source notes get it wrong; what QLoRA keeps instead: the
#   adapters' moments at rank 64, float32 against 8-bit;
# - the 8-bit dynamic map, signed and unsigned: why Adam's second moment takes the unsigned one, and how
#   it beats a linear 8-bit map on Adam-like moments, blockwise in blocks of 256;
# - `qlora_ref.optim8bit.AdamW8bit` against bitsandbytes' `AdamW8bit` over 100 steps on a CPU: the
#   moments byte for byte, the parameters to a few float32 roundings (and why), its NaN/Inf rule;
# - paging: why QLoRA needs it (long sequences under gradient checkpointing), a `Pager` under a byte budget,
#   and a training step with a memory spike that runs out of memory without paging and completes with it;
# - what bitsandbytes does on a GPU instead (`cudaMallocManaged`, `cudaMemPrefetchAsync`), and why a
#   capped PyTorch allocator does not see those states.
#
# Every demonstration runs on a CPU. Each has a GPU variant, which runs only where CUDA is available and
# otherwise prints what it shows.
#
# **Prerequisites:** lesson 4 (the dynamic map, `quantize_blockwise`, bitsandbytes' CPU lookup-table
# rounding); Adam's update (Kingma & Ba 2014, arXiv:1412.6980) at the level of its two formulas.
#
# **Sources:** 8-bit optimizers: Dettmers et al. 2021, arXiv:2110.02861; the dynamic map: Dettmers 2015,
# arXiv:1511.04561; paged optimizers: QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3;
# AdamW's decoupled weight decay: Loshchilov & Hutter 2017, arXiv:1711.05101.

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
import inspect
import math
import re

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from IPython.display import display

import qlora_ref
from qlora_ref import QuantState, dequantize_blockwise, dynamic_map, quantize_blockwise
from qlora_ref.compare import compare
from qlora_ref.adamw_step import adamw_update_
from qlora_ref.optim8bit import OPTIMIZERS, AdamW8bit, bytes_per_parameter, optimizer_state_bytes, predicted_state_bytes
from qlora_ref.pager import Pager
from qlora_ref.spike import simulate_spike
from qlora_ref.plots.optimizers import error_by_decade_figure, linear_code, resolution_figure
from qlora_ref.plots.paging import page_traffic_figure, spike_timeline_figure
from qlora_ref.results import load_measurements
from qlora_ref.model_shapes import PRESETS
from qlora_ref.vram import GIB, estimate

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
gen = torch.Generator().manual_seed(0)
# The tensors here are small (at most 70,000 values): on them a second CPU thread costs more than it saves.
torch.set_num_threads(1)
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
GPU = device.type == "cuda"  # the GPU variants below run only then

# %%
# NBVAL_IGNORE_OUTPUT
print("torch", torch.__version__, "| bitsandbytes", bnb.__version__, "| device", device,
      f"({torch.cuda.get_device_name(device)})" if GPU else "")

# %% [markdown]
# ## 1. Why optimizer states dominate
#
# Full fine-tuning with AdamW keeps four numbers per parameter on the GPU: the weight, its gradient,
# and Adam's two moments m (a running mean of the gradient) and v (a running mean of its square).
# In float32 that is 4 + 4 + 4 + 4 = 16 bytes. 8-bit AdamW stores m and v as one byte each plus one
# float32 absmax per block of 256 values and moment: 2 + 8/256 = 2.03125 bytes
# (`bytes_per_parameter()`). Tensors with fewer than 4096 values keep float32 moments
# (bitsandbytes' `min_8bit_size`); `predicted_state_bytes` counts that exactly, tensor by tensor.
#
# A Llama-2-7B-shaped model, from its shapes (as in lesson 6): 32 layers with seven linear layers and
# two RMSNorm weights each, the embeddings, the final norm and the output head.

# %%
HIDDEN, INTER, LAYERS, VOCAB = 4096, 11008, 32, 32000
per_layer = [HIDDEN * HIDDEN] * 4 + [HIDDEN * INTER] * 3 + [HIDDEN] * 2  # q k v o; gate up down; 2 norms
sizes_7b = [VOCAB * HIDDEN] + per_layer * LAYERS + [HIDDEN, VOCAB * HIDDEN]  # embeddings, layers, norm, head
N = sum(sizes_7b)
adam8_bytes = predicted_state_bytes(sizes_7b)
print(f"{len(sizes_7b)} tensors, {N:,} parameters; the smallest has {min(sizes_7b):,} values "
      f"(min_8bit_size is 4096, so every tensor gets 8-bit moments)")
print(f"8-bit AdamW state: {adam8_bytes:,} bytes = {adam8_bytes / N} bytes per parameter "
      f"(bytes_per_parameter() = {bytes_per_parameter()})")
print()
print(f"{'full fine-tuning, per parameter':34s} {'weights':>8s} {'grads':>6s} {'m + v':>8s} {'total':>9s} "
      f"{'7B-shaped':>10s} {'m + v share':>12s}")
recipes = {"fp32 weights, fp32 AdamW": (4, 4, bytes_per_parameter(32)),
           "fp32 weights, 8-bit AdamW": (4, 4, adam8_bytes / N)}
for name, (w, g, s) in recipes.items():
    total = w + g + s
    print(f"{name:34s} {w:>8d} {g:>6d} {s:>8.5f} {total:>9.5f} {total * N / 1e9:>7.1f} GB {s / total:>12.1%}")
print("(GB = 1e9 bytes; activations come on top of this: lesson 9)")

# %% [markdown]
# With float32 AdamW the moments are half of everything full fine-tuning keeps (8 of 16 bytes), twice
# the weights. 8-bit moments cut them to a quarter (2.03 / 8), the total from 16 to 10.03 bytes per
# parameter.
#
# The course's source notes put "28 GB" next to a 7B model four times. Computed:

# %%
print(f"4 bytes x 7e9 parameters           = {4 * 7e9 / 1e9:.1f} GB: float32 weights alone "
      f"({4 * N / 1e9:.2f} GB for the {N / 1e9:.2f}B shape above)")
print(f"fp32 AdamW fine-tuning, 16 x 7e9     = {16 * 7e9 / 1e9:.1f} GB; for the 7B shape {16 * N / 1e9:.1f} GB "
      f"= {16 * N / 28e9:.1f} x 28 GB")
print(f"8-bit AdamW fine-tuning, 7B shape    = {(8 * N + adam8_bytes) / 1e9:.1f} GB")

# %% [markdown]
# - Notes 003 and 004 ("FP32, 32 bits, 28 GB") and note 000's table ("FP32 VRAM (Base): 28 GB") are right:
#   they count the weights alone (note 000's 13B and 70B rows, 52 and 280 GB, are the same count).
# - Note 001 says "Traditional full-precision fine-tuning of a 7B parameter model requires ~28GB VRAM":
#   wrong. 28 GB only holds the float32 weights. Fine-tuning them with float32 AdamW needs 16 bytes per
#   parameter, **107.8 GB** for the 7B shape before a single activation, 3.9 times the note's figure.
#
# The same count on a real optimizer: the GPU variant measures the three optimizers of section 3 with
# `torch.cuda.memory_allocated`.

# %%
# NBVAL_IGNORE_OUTPUT
if GPU:
    shapes = [(4096, 1024), (4096,), (1024, 4096)]
    for name, make in {"torch AdamW": lambda ps: torch.optim.AdamW(ps, foreach=False),
                       "ours AdamW8bit": AdamW8bit, "bnb AdamW8bit": bnb.optim.AdamW8bit}.items():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        optimizer = make(params)
        for p in params:
            p.grad = torch.randn_like(p)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        optimizer.step()
        torch.cuda.synchronize()
        grown = torch.cuda.memory_allocated() - before
        print(f"{name:15s}: memory_allocated grew by {grown:>10,} bytes; optimizer_state_bytes "
              f"{optimizer_state_bytes(optimizer):>10,} (the allocator rounds each tensor up to 512 bytes)")
        del params, optimizer
else:
    print("no GPU here: the GPU variant measures the first step of torch AdamW, ours and bitsandbytes' AdamW8bit "
          "on CUDA tensors with torch.cuda.memory_allocated, next to optimizer_state_bytes; no H100 run of it "
          "is stored in the course")

# %% [markdown]
# ### In QLoRA: only the adapters have moments
#
# QLoRA freezes the 4-bit base: it has no gradients and no optimizer state. Adam's m and v exist only
# for the LoRA adapters, A (r × in) and B (out × r) on each linear layer. Counted as in lesson 6, for
# the same Llama-2-7B shape (`PRESETS`) at rank 64 on all seven linear layers of each block, and checked
# against the adapters that `bench/memory.py` trained on an H100 (read from `bench/results`):

# %%
LLAMA_7B, RANK = PRESETS["Llama-2-7B"], 64
adapter_sizes = [RANK * n for i, o in LLAMA_7B.linear_shapes().values() for n in (i, o)] * LLAMA_7B.num_hidden_layers
n_adapters = sum(adapter_sizes)
measured = [run for run in load_measurements("../bench/results") if run["model"] == "Llama-2-7B" and run["r"] == RANK]
print(f"{len(adapter_sizes)} adapter tensors, {n_adapters:,} parameters ({n_adapters / N:.2%} of the model); "
      f"the H100 run trained {measured[0]['trainable_parameters']:,}")
adapter_states = {"float32 AdamW": bytes_per_parameter(32) * n_adapters, "8-bit AdamW": predicted_state_bytes(adapter_sizes)}
for name, nbytes in adapter_states.items():
    print(f"{name:14s} m + v of the adapters: {nbytes / 1e9:.3f} GB ({nbytes / n_adapters:.5f} bytes per parameter)")
print(f"saved by 8-bit moments: {(adapter_states['float32 AdamW'] - adapter_states['8-bit AdamW']) / 1e9:.2f} GB; "
      f"full fine-tuning's float32 m + v: {8 * N / 1e9:.1f} GB")
print()
for optimizer in OPTIMIZERS:  # lesson 9's estimate of the whole step: batch 1, 512 tokens, checkpointing
    budget = estimate(LLAMA_7B, optimizer=optimizer, r=RANK, seq_len=512)
    print(f"QLoRA step with {optimizer:17s}: {budget.total / GIB:5.2f} GiB on the GPU, of which optimizer states "
          f"{budget.parts['optimizer states'] / GIB:.2f} GiB (+ {budget.optimizer_host_bytes / GIB:.2f} GiB that may sit in host RAM)")

# %% [markdown]
# The adapters are 2.37% of the parameters, so their float32 moments take 1.279 GB instead of full
# fine-tuning's 53.9 GB. 8-bit moments save another 0.95 GB: worth having on a 16 or 24 GB card, but no
# longer the term that decides whether a 7B model fits. The paged optimizer keeps on the GPU only the
# small states and one parameter's large ones at a time: the rest may leave. Section 4 says why they
# must be able to.

# %% [markdown]
# ## 2. The dynamic 8-bit map
#
# ### Signed and unsigned
#
# Lesson 4 built the signed dynamic map (Dettmers 2015): for e = 0..6, the decade [10^(e-7), 10^(e-6)]
# gets 2^e levels, their negatives get as many, and 0 and 1 are added: 256 levels. The *unsigned* map
# (`dynamic_map(signed=False)`) has no negative half, so it spends the sign bit on the fraction:
# 2^(e+1) levels per decade, twice as many. Both equal bitsandbytes' tables:

# %%
SIGNED, UNSIGNED = dynamic_map(signed=True), dynamic_map(signed=False)
compare("signed map   vs bnb create_dynamic_map(signed=True) ", SIGNED, bnbF.create_dynamic_map(signed=True))
compare("unsigned map vs bnb create_dynamic_map(signed=False)", UNSIGNED, bnbF.create_dynamic_map(signed=False))
for name, code in [("signed  ", SIGNED), ("unsigned", UNSIGNED)]:
    print(f"{name}: {code.numel()} levels in [{code.min():.5f}, {code.max():.1f}]: {int((code < 0).sum())} negative, "
          f"{int((code == 0).sum())} zero, {int((code > 0).sum())} positive")
print()
print(" e   decade               positive levels: signed  unsigned")
for e in range(7):
    low, high = 10.0 ** (e - 7), 10.0 ** (e - 6)
    counts = [int(((code > low) & (code < high)).sum()) for code in (SIGNED, UNSIGNED)]
    print(f" {e}   [{low:.0e}, {high:.0e}]   {counts[0]:22d} {counts[1]:9d}")

# %% [markdown]
# Adam's second moment v is a running mean of g², never negative. Stored with the signed map, its
# codes could only use the positive half: the 127 negative levels would be wasted on values that
# never occur. bitsandbytes stores m (signed: the mean gradient has both signs) with the signed map
# and v with the unsigned one, which resolves each decade twice as finely.
#
# ### Resolution near 0 and near 1
#
# What matters for rounding is the gap between neighbouring levels *relative to the level*: a value is
# rounded to the nearer level, so its relative error is at most about half that gap. A linear 8-bit
# map (lesson 1's int8 absmax, levels k/127; or k/255 unsigned) has equal absolute gaps, so its
# relative gap is 1/k: fine near 1, useless near 0, where everything below half a step rounds to 0.
# (`linear_code` in `qlora_ref/plots/optimizers.py` writes those linear maps as 256-level codes, so
# `quantize_blockwise` can use them like the dynamic map.)

# %%
LINEAR_S, LINEAR_U = linear_code(signed=True), linear_code(signed=False)
maps = {"dynamic, signed (m)": SIGNED, "dynamic, unsigned (v)": UNSIGNED,
        "linear int8, k/127": LINEAR_S, "linear unsigned, k/255": LINEAR_U}
fig, spacings = resolution_figure(maps)
print(f"{'relative gap at the level nearest x':36s}" + "".join(f"{x:>9.0e}" for x in (0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)))
for name, (levels, spacing) in spacings.items():
    row = []
    for x in (0.5, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
        if x < levels[0] / 2:  # below half the smallest positive level: rounds to 0
            row.append(f"{'to 0':>9s}")
        else:
            row.append(f"{float(spacing[(levels - x).abs().argmin()]):9.3f}")
    print(f"{name:36s}" + "".join(row))
display(fig)

# %% [markdown]
# At 0.5 all four maps have gaps of 1-3%. Down the scale a linear map's relative gap grows tenfold per
# decade: 100% (int8) or 33% (k/255) at 0.01, and below half its first step (1/254 of the block's absmax
# for int8, 1/510 for k/255) everything rounds to 0. The dynamic maps' gap only doubles per decade (each
# decade has half the levels of the one above), and they still have levels at 10^-6 of the absmax.
#
# ### Adam-like moments: dynamic against linear
#
# Real moment tensors span several decades: some rows (neurons, embedding rows of rare tokens) get
# gradients a thousand times smaller than others. A simulation: 64 rows of 256 values, each row with
# its own gradient scale between 10^-3 and 1 (log-uniform), each column a log-normal factor, then
# 100 steps of Adam's running means (β1 = 0.9, β2 = 0.999). Each moment quantized in blocks of 256
# (one block per row) with each map, nearest rounding:

# %%
rows, cols = 64, 256
scale = 10 ** (-3 * torch.rand(rows, 1, generator=gen)) * torch.exp(torch.randn(1, cols, generator=gen)) * 1e-2
m, v = torch.zeros(rows, cols), torch.zeros(rows, cols)
for _ in range(100):
    g = torch.randn(rows, cols, generator=gen) * scale
    m.mul_(0.9).add_(g, alpha=0.1)
    v.mul_(0.999).addcmul_(g, g, value=0.001)
print(f"|m| from {m.abs().min():.1e} to {m.abs().max():.1e}; v from {v.min():.1e} to {v.max():.1e} "
      f"({math.log10(v.max() / v.min()):.0f} decades)")


def round_trip(x, code, blocksize=256):
    codes, state = quantize_blockwise(x, code, blocksize, rounding="nearest")
    return codes, dequantize_blockwise(codes, state)


print(f"{'moment, map':28s} {'mean rel. error':>15s} {'median':>7s} {'stored as 0':>12s} {'codes used':>11s}")
restored = {}
for name, x, code in [("m, dynamic signed", m, SIGNED), ("m, linear int8", m, LINEAR_S),
                      ("v, dynamic unsigned", v, UNSIGNED), ("v, dynamic signed", v, SIGNED),
                      ("v, linear unsigned k/255", v, LINEAR_U), ("v, linear int8", v, LINEAR_S)]:
    codes, restored[name] = round_trip(x, code)
    rel = ((restored[name] - x).abs() / x.abs()).double()
    print(f"{name:28s} {rel.mean():15.4f} {rel.median():7.4f} {(restored[name] == 0).double().mean():12.2%} "
          f"{codes.unique().numel():11d}")

# %% [markdown]
# The unsigned map halves the signed map's error on v: it uses 208 different codes on it, the signed map
# 114, since only its positive half can be reached. The linear maps store 7.8% of m and 27-42% of v as
# exactly 0. Decade by decade, relative to the tensor's largest value:

# %%
fig, tables = error_by_decade_figure(v, {k: restored[k] for k in ("v, dynamic unsigned", "v, dynamic signed",
                                                                   "v, linear unsigned k/255")},
                                     decades=9, title="second moment v: mean relative error by decade")
print("decade of |v| / max |v|:          " + "  ".join(f"{'1e-' + str(k + 1):>7s}" for k in range(9)))
print("values in it:                     " + "  ".join(f"{c:7d}" for c in tables["v, dynamic unsigned"]["count"]))
for name, table in tables.items():
    print(f"{name:33s} " + "  ".join(f"{e:7.3f}" for e in table["mean_relative_error"]))
display(fig)

# %% [markdown]
# Why a zero v is a disaster rather than a small error: Adam divides by √v. Where v was stored as 0 but
# m was not, the step is m / ε with ε = 1e-8. The bias-corrected update u = m̂ / (√v̂ + ε) of every
# element, from the stored moments:

# %%
c1, c2 = 1 - 0.9**100, math.sqrt(1 - 0.999**100)
update = (m / c1) / (v.sqrt() / c2 + 1e-8)
for name, (m_name, v_name) in {"dynamic maps": ("m, dynamic signed", "v, dynamic unsigned"),
                               "linear maps ": ("m, linear int8", "v, linear unsigned k/255")}.items():
    u_hat = (restored[m_name] / c1) / (restored[v_name].sqrt() / c2 + 1e-8)
    err = (u_hat - update).abs().double()
    print(f"{name}: max |u| {update.abs().max():.2f} -> {u_hat.abs().max():.3g}; mean |u^ - u| {err.mean():.3g}; "
          f"elements off by more than 1: {int((err > 1).sum()):,} of {update.numel():,}")

# %% [markdown]
# With the dynamic maps every update stays within its normal range (Adam's |u| is of order 1); with
# linear 8-bit states, thousands of weights would be pushed by ~10^5 learning rates in one step. This
# is the instability that the 8-bit optimizers paper avoids with dynamic quantization (Dettmers et al.
# 2021).
#
# ### Blockwise, 256 values per block
#
# Each block has its own absmax, so a block of small values is not scaled by a distant large one. Small
# blocks cost more absmax bytes (`bytes_per_parameter(8, B)` = 2 + 8/B) and fit the data better. The
# paper describes blocks of 2048 values; bitsandbytes' optimizers use 256 (section 3 reads it off
# bitsandbytes' own state). On the simulated moments:

# %%
print(f"{'block size':>10s} {'bytes/param':>12s} {'m mean rel. error':>18s} {'v mean rel. error':>18s}")
for blocksize in (64, 256, 2048, 4096):
    errors = [float(((round_trip(x, code, blocksize)[1] - x).abs() / x.abs()).double().mean()) for x, code in ((m, SIGNED), (v, UNSIGNED))]
    print(f"{blocksize:10d} {bytes_per_parameter(8, blocksize):12.5f} {errors[0]:18.4f} {errors[1]:18.4f}")

# %% [markdown]
# From 256 to 2048 the error of v grows almost tenfold here: a block of 2048 spans 8 rows of different
# scales, and its smaller rows fall into the map's coarse lower decades. Blocks of 256 cost 0.027 bytes
# per parameter more than blocks of 2048.
#
# The GPU variant: on a CUDA tensor, `quantize_blockwise` runs the Triton kernel of lesson 5, which
# gives the bytes of bitsandbytes' CUDA kernel (a binary search over the map, not the CPU's lookup table).

# %%
# NBVAL_IGNORE_OUTPUT
if GPU:
    for name, x, code in [("m, signed map", m, SIGNED), ("v, unsigned map", v, UNSIGNED)]:
        ours_codes, ours_state = quantize_blockwise(x.cuda(), code.cuda(), 256)
        bnb_codes, bnb_state = bnbF.quantize_blockwise(x.cuda(), code=code.cuda(), blocksize=256)
        compare(f"{name}: codes on the GPU, ours vs bnb ", ours_codes, bnb_codes)
        compare(f"{name}: absmax on the GPU, ours vs bnb", ours_state.absmax, bnb_state.absmax)
        cpu_codes, _ = quantize_blockwise(x, code, 256)
        print(f"{name}: GPU codes differ from the CPU's lookup-table codes on "
              f"{int((ours_codes.cpu() != cpu_codes).sum())} of {x.numel():,} values")
else:
    gpu_log = "../bench/results/gpu-tests-nvidia-h100-80gb-hbm3.log"
    passed = re.search(r"(\d+) passed", open(gpu_log).read()).group(1)
    print("no GPU here: the GPU variant (these moments quantized on the GPU by qlora_ref's Triton kernel and by "
          "bitsandbytes' CUDA kernel) shows equal codes and absmax: tests/test_triton_quantize_gpu.py checks that "
          f"on an H100, among the GPU tests of {gpu_log[3:]}: {passed} passed")

# %% [markdown]
# ## 3. 8-bit AdamW against bitsandbytes
#
# ### The update
#
# `qlora_ref.adamw_step.adamw_update_` is one AdamW step on float32 moments, in the order of
# bitsandbytes' CUDA kernel; `AdamW8bit.step` decodes m and v (code[q] · absmax), calls it, and
# re-encodes them blockwise (new absmax = the new moments' own maximum per block). Its docstring:

# %%
print(inspect.getdoc(adamw_update_))

# %% [markdown]
# c1 and c2 are the bias corrections: at step 1, m = (1 - β1) g and v = (1 - β2) g², so m̂ / √v̂ =
# g / |g| and every weight moves by about lr, whatever its gradient's size. By hand, lr = 0.1:

# %%
p = torch.tensor([1.0, -2.0, 3.0])
g = torch.tensor([0.5, -4.0, 0.0])
m1, v1 = torch.zeros(3), torch.zeros(3)
adamw_update_(p, g, m1, v1, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
print(f"g = {g.tolist()}  ->  p = {[round(x, 6) for x in p.tolist()]}, m = {[round(x, 6) for x in m1.tolist()]}, "
      f"v = {[round(x, 6) for x in v1.tolist()]}")

# %% [markdown]
# ### NaN and Inf gradients
#
# One NaN in a block would make the block's new absmax NaN (or Inf) and take all 256 stored moments of
# the block with it. bitsandbytes' CUDA kernel skips such elements: their m and v are set to 0 and the
# weight is left alone. `AdamW8bit` does the same (`skip_nonfinite=True`), on every device.
# bitsandbytes 0.50.2's *CPU* path has no such rule. The same gradients to both, one NaN and one Inf at
# step 3, then three ordinary steps:

# %%
x0 = torch.randn(4097, generator=gen)
p_ours, p_bnb = torch.nn.Parameter(x0.clone()), torch.nn.Parameter(x0.clone())
opt_ours, opt_bnb = AdamW8bit([p_ours]), bnb.optim.AdamW8bit([p_bnb])
bad = [5, 300]  # in blocks 0 and 1 of 256
for t in range(1, 7):
    g = torch.randn(4097, generator=gen) * 0.01
    if t == 3:
        g[bad[0]], g[bad[1]] = float("nan"), float("inf")
        before = p_ours.detach()[bad].clone()
    p_ours.grad, p_bnb.grad = g.clone(), g.clone()
    opt_ours.step()
    opt_bnb.step()
    if t == 3:
        state = opt_ours.state[p_ours]
        m_dec = dequantize_blockwise(state["state1"], QuantState(state["absmax1"], p_ours.shape, SIGNED, torch.float32, 256))
        print(f"ours after the bad step: p there unchanged: {torch.equal(p_ours.detach()[bad], before)}, "
              f"|m| there {m_dec[bad].abs().max():.1e} (the code nearest 0), absmax finite: "
              f"{bool(state['absmax1'].isfinite().all() and state['absmax2'].isfinite().all())}")
        print(f"bnb (CPU) after the bad step: absmax1 of blocks 0, 1 = "
              f"{', '.join(f'{a:.3g}' for a in opt_bnb.state[p_bnb]['absmax1'][:2].tolist())}")
for name, q in [("ours", p_ours), ("bnb (CPU)", p_bnb)]:
    nan_per_block = q.detach().isnan().reshape(-1)[:4096].reshape(16, 256).sum(1)
    print(f"{name:9s} 3 steps later: {int(q.isnan().sum()):3d} NaN weights; per block of 256: {nan_per_block[:4].tolist()} ...")

# %% [markdown]
# On bitsandbytes' CPU path the Inf turns its block's absmax into Inf, and three steps later all 256
# weights of that block are NaN (plus the NaN's own element). (Its CUDA kernel skips them as we do:
# `tests/test_optim8bit_gpu.py` checks it on a GPU.)
#
# ### 100 steps against bitsandbytes
#
# The same initial parameters and the same 100 gradients to both optimizers: an awkward 8-bit tensor
# (4097 values: 17 blocks, the last of one value), a 48 × 125 matrix, and 100 values, which stay in
# float32 (fewer than 4096). weight_decay = 0 first:

# %%
shapes = [(4097,), (48, 125), (100,)]
init = [torch.randn(s, generator=gen) for s in shapes]
grads = [[torch.randn(s, generator=gen) * 0.01 for s in shapes] for _ in range(101)]


def run_both(weight_decay, steps=100):
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    opt_o = AdamW8bit(ours, weight_decay=weight_decay)
    opt_t = bnb.optim.AdamW8bit(theirs, weight_decay=weight_decay)
    for gs in grads[:steps]:
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_o.step()
        opt_t.step()
    return ours, opt_o, theirs, opt_t


ours, opt_o, theirs, opt_t = run_both(weight_decay=0.0)
grouping = 100 * 6 * 2**-23 * 4 * 1e-3  # 6 float32 roundings of the largest update (4 lr) per step, for 100 steps
for p, q in zip(ours, theirs):
    mine, ref = opt_o.state[p], opt_t.state[q]
    eight_bit = "absmax1" in mine
    keys = ("state1", "absmax1", "state2", "absmax2") if eight_bit else ("state1", "state2")
    print(f"{str(tuple(p.shape)):10s} {mine['state1'].dtype} moments, step {mine['step']} (bnb {ref['step']})")
    for key in keys:
        compare(f"    {key:8s}", mine[key], ref[key])
    compare("    p       ", p, q, **({"rtol": 100 * 2**-23, "atol": grouping} if eight_bit else {}))
print(f"absmax values of the 4097-value tensor in bnb's state: {opt_t.state[theirs[0]]['absmax1'].numel()} "
      f"= ceil(4097 / 256) = {math.ceil(4097 / 256)}: bitsandbytes' block size is 256")

# %% [markdown]
# The moments agree byte for byte, codes and absmax: they never depend on the parameters, and every
# float32 operation that makes them is the same, down to the CPU's lookup-table rounding (lesson 4).
# The float32 tensor's parameters agree exactly too. The 8-bit tensors' parameters are held to a tolerance,
# an ulp of p and 6 roundings of the update per step (`tests/test_optim8bit.py` derives it), because
# bitsandbytes' CPU path groups the same step differently:
#
#     ours (the CUDA kernel's order):   p + (-lr c2 / c1) · m / (√v + c2 ε)
#     bitsandbytes' CPU path:           p - (lr / c1) · m / (√v / c2 + ε)
#
# Equal in exact arithmetic, rounded differently in float32. One more step from *identical* inputs
# (bitsandbytes' own p and state) shows that this grouping is the whole difference: written by hand,
# bitsandbytes' formula reproduces its result bit for bit, ours lands a rounding away.

# %%
q, state = theirs[0], opt_t.state[theirs[0]]
g = grads[100][0]
lr, (beta1, beta2), eps, step = 1e-3, (0.9, 0.999), 1e-8, state["step"] + 1
m_before = dequantize_blockwise(state["state1"], QuantState(state["absmax1"], q.shape, SIGNED, torch.float32, 256))
v_before = dequantize_blockwise(state["state2"], QuantState(state["absmax2"], q.shape, UNSIGNED, torch.float32, 256))
m_t = m_before.clone().mul_(beta1).add_(g, alpha=1 - beta1)  # the moments: the same operations in both
v_t = v_before.clone().mul_(beta2).addcmul_(g, g, value=1 - beta2)
c1, c2 = 1 - beta1**step, math.sqrt(1 - beta2**step)
by_hand = q.detach().clone().addcdiv_(m_t, v_t.sqrt() / c2 + eps, value=-lr / c1)  # bitsandbytes' CPU grouping
ours_grouping = q.detach().clone()
adamw_update_(ours_grouping, g, m_before.clone(), v_before.clone(), step, lr, beta1, beta2, eps, weight_decay=0.0)
q.grad = g.clone()
opt_t.step()
compare("bnb's step vs its formula by hand    ", q, by_hand)
_ = compare("bnb's step vs ours (kernel grouping) ", q, ours_grouping, rtol=2**-23)

# %% [markdown]
# Exact by hand; ours within one float32 step of p. How many of the 4097 weights move depends on how the CPU
# rounds (here, the output depends on the machine):

# %%
# NBVAL_IGNORE_OUTPUT
print(f"{int((q != ours_grouping).sum())} of {q.numel():,} weights a rounding apart, by at most "
      f"{(q - ours_grouping).abs().max().item():.1e}")

# %% [markdown]
# One step moves a few of the 4097 weights by one float32 rounding. Over 100 steps these roundings add
# up like a random walk: `tests/test_optim8bit.py` bounds the drift (one ulp of p and 6 ulps of the
# update per step) and measured at most 2 ulps of the largest |p| after 100 steps.
#
# With weight decay (bitsandbytes' default, 0.01) a second difference appears: decoupled weight decay
# p ← p(1 - lr·wd) comes *after* the step in the CUDA kernel (and here), *before* it on bitsandbytes'
# CPU path: p(1 - lr·wd) + u against (p + u)(1 - lr·wd), a difference of lr·wd·|u| ≤ lr²·wd·4 per step
# (|u| ≤ 4 lr for Adam). Over 100 steps that adds up to at most 4e-6, on top of the groupings' rounding
# (`tests/test_optim8bit.py`: 6 float32 ulps of 4 lr per step, 2.9e-7 over 100 steps, and an ulp of p per
# step). The moments are still byte-equal:

# %%
ours_wd, opt_o_wd, theirs_wd, opt_t_wd = run_both(weight_decay=1e-2)
decay_order = 100 * 1e-3**2 * 1e-2 * 4
for p, q in zip(ours_wd[:2], theirs_wd[:2]):
    for key in ("state1", "absmax1", "state2", "absmax2"):
        compare(f"{str(tuple(p.shape)):10s} {key:8s}", opt_o_wd.state[p][key], opt_t_wd.state[q][key])
    compare(f"{str(tuple(p.shape)):10s} p       ", p, q, rtol=100 * 2**-23, atol=decay_order + grouping)
print(f"tolerance for p: {decay_order:.0e} (order of the decay) + {grouping:.1e} (grouping) + 100 ulps of p")

# %% [markdown]
# Measured here (the output depends on the machine), the largest difference in p with and without weight decay:

# %%
# NBVAL_IGNORE_OUTPUT
for label, pairs in [("weight decay 0.01", zip(ours_wd[:2], theirs_wd[:2])), ("weight decay 0   ", zip(ours[:2], theirs[:2]))]:
    print(f"{label}: " + ", ".join(f"{str(tuple(p.shape))} {(p - q).abs().max().item():.1e}" for p, q in pairs))

# %% [markdown]
# ### The memory, measured
#
# `optimizer_state_bytes` adds up the bytes of every tensor an optimizer keeps in `optimizer.state`
# (shared tensors once). After one step on a few tensors, two of them under 4096 values:

# %%
shapes = [(512, 64), (512,), (64, 512), (64,), (4097,)]
params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
n = [p.numel() for p in params]
optimizers = {"torch AdamW (fp32)": torch.optim.AdamW(params), "ours AdamW8bit": AdamW8bit(params),
              "bnb AdamW8bit": bnb.optim.AdamW8bit(params)}
for p in params:
    p.grad = torch.randn(p.shape, generator=gen)
predicted = {"torch AdamW (fp32)": 8 * sum(n) + 4 * len(params),  # m and v, and a 0-d float32 step per tensor
             "ours AdamW8bit": predicted_state_bytes(params),
             "bnb AdamW8bit": predicted_state_bytes(params) + 2 * 256 * 4}  # + its two code tables, shared
print(f"{sum(n):,} parameters in {len(params)} tensors; {sum(k for k in n if k >= 4096):,} of them in tensors "
      f"of at least 4096 values")
print(f"{'optimizer':20s} {'measured':>9s} {'predicted':>10s} {'bytes/param':>12s}")
for name, optimizer in optimizers.items():
    optimizer.step()
    measured = optimizer_state_bytes(optimizer)
    print(f"{name:20s} {measured:9,} {predicted[name]:10,} {measured / sum(n):12.4f}")
qmaps = {id(optimizers["bnb AdamW8bit"].state[p]["qmap1"]) for p in params if p.numel() >= 4096}
print(f"bnb's qmap1 is one tensor shared by its {sum(k >= 4096 for k in n)} 8-bit parameters: {len(qmaps) == 1}")

# %% [markdown]
# 2.1 bytes per parameter here instead of 2.03 because the two small tensors keep float32 moments
# (8 bytes each). On the 7B shape of section 1 every tensor is 8-bit.
#
# The GPU variant: the same 100 steps on CUDA tensors, against bitsandbytes' CUDA kernel.

# %%
# NBVAL_IGNORE_OUTPUT
if GPU:
    ours_gpu = [torch.nn.Parameter(x.cuda()) for x in init]
    theirs_gpu = [torch.nn.Parameter(x.cuda()) for x in init]
    opt_o_gpu, opt_t_gpu = AdamW8bit(ours_gpu), bnb.optim.AdamW8bit(theirs_gpu)
    for gs in grads[:100]:
        for p, q, g in zip(ours_gpu, theirs_gpu, gs):
            p.grad, q.grad = g.cuda(), g.cuda()
        opt_o_gpu.step()
        opt_t_gpu.step()
    for p, q in zip(ours_gpu, theirs_gpu):
        mine, ref = opt_o_gpu.state[p], opt_t_gpu.state[q]
        for key in ("state1", "absmax1", "state2", "absmax2") if "absmax1" in mine else ("state1", "state2"):
            compare(f"{str(tuple(p.shape)):10s} {key:8s} on the GPU", mine[key], ref[key])
        print(f"{str(tuple(p.shape)):10s} p on the GPU: max |ours - bnb| {float((p - q).detach().abs().max()):.2g}")
else:
    print("no GPU here: the GPU variant (these 100 steps on CUDA tensors against bitsandbytes' CUDA kernel) shows "
          "8-bit codes and absmax byte-equal, float32 moments (tensors under 4096 values) a few ulps apart (the "
          "kernel's own fused multiply-adds) and parameters within 2.2e-6 after 100 steps (its fast __powf and "
          "square root), as measured on an H100 in tests/test_optim8bit_gpu.py")

# %% [markdown]
# ## 4. Paging: states leave the GPU while it needs the room
#
# 8-bit moments sit on the GPU all the time, although each parameter's state is used once per step, in
# `optimizer.step()`. Training memory is not flat: activations grow with the sequence length, and a
# dataset of mixed lengths now and then batches long ones. The QLoRA paper introduces *paged optimizers*
# "to prevent memory spikes during gradient checkpointing from causing out-of-memory errors" (section 3):
# the states leave the GPU during such a spike and come back for the update. Lesson 9's estimate of one
# QLoRA step at rank 64 shows the spike's size:

# %%
print(f"{'model':12s} {'tokens':>6s} {'adamw_8bit':>11s} {'growth over 512 tokens':>23s} {'8-bit states':>13s} "
      f"{'paged_adamw_8bit':>17s}  (GiB, batch 1)")
for model in ("Llama-2-7B", "Llama-2-70B"):
    usual = estimate(model, optimizer="adamw_8bit", r=RANK, seq_len=512).total
    for seq_len in (512, 2048, 4096):
        fixed, paged = (estimate(model, optimizer=o, r=RANK, seq_len=seq_len) for o in ("adamw_8bit", "paged_adamw_8bit"))
        print(f"{model:12s} {seq_len:6d} {fixed.total / GIB:11.2f} {(fixed.total - usual) / GIB:23.2f} "
              f"{fixed.parts['optimizer states'] / GIB:13.2f} {paged.total / GIB:17.2f}")

# %% [markdown]
# Even with gradient checkpointing, the activations, the logits and the backward's working set grow with
# the tokens: 4096 of them need 4.10 GiB more than 512 on the 7B shape, 12.07 GiB more on the 70B one. A
# run sized for its usual batches meets the long one rarely, but once is enough to end it. Paging lets
# the states give up their room at that moment: 0.30 GiB (7B) or 1.57 GiB (70B) of 8-bit states. That
# decides a run near the edge of its GPU; a larger spike still needs a smaller batch or shorter sequences.
#
# What does paging cost? Section 4 of the QLoRA paper gives no hard measurements, "since the paging only
# occurs when processing mini-batches with long sequence lengths, which is rare"; its runtime analysis of
# 65B models on 48 GB GPUs finds that with a batch size of 16 "paged optimizers provide the same training
# speed as regular optimizers", and it leaves to future work when paging slows training down.

# %% [markdown]
# ### A pager by hand
#
# `qlora_ref.pager.Pager` makes the moves explicit. A page is a group of tensors (one parameter's
# optimizer state); it lives in host memory and is *fetched* to the device before use; when the
# device's budget is full, the least recently used page is *evicted* (copied home). On a CPU the
# "device" is simulated: a separate buffer, with every byte accounted for. Four pages, a budget of
# 1000 bytes, and a reservation of 700 bytes for something else (activations) in the middle:

# %%
pager = Pager(budget_bytes=1_000)
for name, nbytes in [("a", 300), ("b", 400), ("c", 500), ("d", 200)]:
    pager.add(name, {"codes": torch.full((nbytes,), ord(name), dtype=torch.uint8)})
for step, action in enumerate(["a", "b", "c", "a", "d", "reserve 700", "release 700", "b"]):
    pager.step = step
    if action.startswith("reserve"):
        pager.reserve(700, "activations")
    elif action.startswith("release"):
        pager.release(700)
    else:
        pager.fetch(action)
    moves = [f"{e.page} {e.direction}" for e in pager.events if e.step == step]
    print(f"{step}: {action:12s} moves: {', '.join(moves) or '-':22s} resident {pager.resident_bytes:4d} "
          f"+ reserved {pager.reserved_bytes:3d} <= {pager.budget_bytes}")
page = pager.fetch("d")
print(f"page d's bytes survived the trip: {bool((page['codes'] == ord('d')).all())}")
fig, residency = page_traffic_figure(pager.events, pager.pages)
display(fig)

# %% [markdown]
# Each fetch that does not fit evicts the least recently used page first; the reservation pushed out
# pages until 700 bytes were free, and those pages came back only when asked for. The top panel shows
# each page's residence event by event, the bottom one the resident bytes.
#
# ### A memory spike, simulated
#
# `simulate_spike` trains a small MLP (4 linear layers, 8 parameter tensors, so 8 pages) for 5 steps on
# a simulated device. Step 2 gets a batch 16 times longer than the others: the spike. Activations are
# reserved as autograd saves them (forward) and released after backward; weights and gradients stay on
# the device throughout. The default budget holds everything in an ordinary step, but at the spike's
# peak only about a third of the optimizer states fit beside the activations:

# %%
run = simulate_spike()
states = sum(run.page_bytes.values())
peak = max(run.points, key=lambda point: point.activation_bytes)
print(f"budget {run.budget_bytes:,} bytes: weights + gradients {run.fixed_bytes:,}, the spike's activations "
      f"{peak.activation_bytes:,}, and {run.budget_bytes - run.fixed_bytes - peak.activation_bytes:,} of the "
      f"{states:,} bytes of optimizer states (8 pages)")
for step in range(5):
    points = [point for point in run.points if point.step == step]
    outs = sum(e.direction == "out" for e in run.events if e.step == step)
    ins = sum(e.direction == "in" for e in run.events if e.step == step)
    print(f"step {step}: peak activations {max(pt.activation_bytes for pt in points):7,} bytes, "
          f"fewest resident state bytes {min(pt.state_bytes for pt in points):6,}, pages out {outs}, in {ins}")
print(f"at the spike's peak: activations {peak.activation_bytes:,} bytes on the device, optimizer states "
      f"{peak.state_bytes:,} of {states:,} on the device")

# %% [markdown]
# Step 0 fetches every page once; steps 1, 3 and 4 move nothing. At the spike, pages go out while the
# forward pass saves activations and come back one by one for their updates. The same budget without
# paging (plain `AdamW8bit`, whose states stay on the device):

# %%
try:
    simulate_spike(paging=False, budget_bytes=run.budget_bytes)
except torch.OutOfMemoryError as error:
    print(f"{type(error).__name__} (a torch.OutOfMemoryError): {error}")

# %% [markdown]
# The timeline of the paged run: weights and gradients at the bottom, the resident optimizer states,
# the activations on top, the budget as a dashed line, evictions in red:

# %%
fig, series = spike_timeline_figure(run)
print(f"{len(run.points)} moments; the highest total {max(series['total']):,} bytes <= budget {series['budget']:,}; "
      f"evictions {sum(series['evictions'])}, all in the spike step: points {series['spike'][0]}..{series['spike'][1]}")
display(fig)

# %%
fig, residency = page_traffic_figure(run.events, run.page_bytes)
print(f"{len(run.events)} page moves; every page on the device at the end: {bool(residency[:, -1].all())}")
display(fig)

# %% [markdown]
# Paging moves bytes and never changes them. The weights after 5 paged steps against a run with plain
# `AdamW8bit` and an unlimited budget:

# %%
unpaged = simulate_spike(paging=False, budget_bytes=10**12)
print(f"all {len(run.parameters)} parameters torch.equal to the unpaged run: "
      f"{all(torch.equal(run.parameters[k], unpaged.parameters[k]) for k in run.parameters)}")

# %% [markdown]
# Note 002 describes the paged optimizer as a feature "which offloads memory spikes to system RAM".
# It is the other way round: the spike (the activations) stays on the device, where the backward pass
# needs it; what goes to host memory are the optimizer states, which nothing needs until
# `optimizer.step()`. Computed above: every one of the run's page moves is an optimizer-state page,
# and at the spike's peak all the activation bytes were on the device while most state pages were out.

# %% [markdown]
# ### On a GPU: unified memory, and why a capped allocator does not see it
#
# bitsandbytes' paged optimizers (`bnb.optim.PagedAdamW8bit`, and `PagedAdamW8bit(paging="managed")`
# here) do not run an explicit pager. They allocate each large state (≥ 100,000 values) with
# **`cudaMallocManaged`**: unified memory, one address valid on the CPU and on the GPU. The driver
# keeps each page of it (4 KB to 2 MB) where it was last used and migrates it on a page fault; when
# the GPU runs out of memory, it evicts managed pages to host RAM by itself. Before each parameter's
# update, **`cudaMemPrefetchAsync`** queues a bulk migration of that parameter's states to the GPU
# on the compute stream, so the update kernel does not fault them in page by page. (bitsandbytes
# prefetches only on GPUs with concurrent managed access, Pascal and later on Linux; so does
# `qlora_ref.managed_memory.prefetch`.)
#
# `torch.cuda.set_per_process_memory_fraction(f)` caps **PyTorch's caching allocator**: the memory
# that tensors allocated through `torch` take. `cudaMallocManaged` and pinned host memory
# (`cudaHostAlloc`, the pager's homes) are allocated beside that allocator, so they do not count
# against the cap: under a cap that fits weights, gradients and the spike but not float32 Adam states
# too, `torch.optim.AdamW` runs out of memory at the spike and the paged optimizers do not. (Without a
# cap, what counts is the GPU's physical memory, and the driver evicts managed pages when it runs out.)
# The GPU variant:

# %%
# NBVAL_IGNORE_OUTPUT
if GPU:
    from qlora_ref.managed_memory import concurrent_managed_access, is_managed
    from qlora_ref.paging import PagedAdamW8bit

    def mlp(width=1024, layers=32):
        torch.manual_seed(0)
        blocks = []
        for _ in range(layers):
            linear = torch.nn.Linear(width, width, bias=False, device="cuda")
            torch.nn.init.normal_(linear.weight, std=width**-0.5)
            blocks += [linear, torch.nn.Tanh()]
        return torch.nn.Sequential(*blocks[:-1])

    def train(make_optimizer, done, width=1024, spike_step=2, steps=4):
        model = mlp(width)
        optimizer = make_optimizer(model)
        for step in range(steps):
            generator = torch.Generator(device="cuda").manual_seed(step)
            rows = 3 * width if step == spike_step else width // 8  # the spike: 24 times the rows
            x, y = (torch.randn(rows, width, device="cuda", generator=generator) for _ in range(2))
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            optimizer.step()
            done.append(step)
            del x, y, loss
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in model.parameters()], optimizer

    print("concurrent managed access:", concurrent_managed_access(torch.cuda.current_device()))
    reference, _ = train(lambda model: AdamW8bit(model.parameters()), [])
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    paged_weights, paged = train(lambda model: PagedAdamW8bit(model.parameters(), paging="managed"), [])
    peak = torch.cuda.max_memory_allocated() - baseline
    print("managed states:", all(is_managed(t) for s in paged.state.values() for k, t in s.items() if k.startswith("state")))
    print("uncapped, managed paging == AdamW8bit:", all(torch.equal(a, b) for a, b in zip(paged_weights, reference)))
    del paged
    import gc

    gc.collect()  # frees the managed states
    torch.cuda.empty_cache()
    weights = 32 * 1024 * 1024 * 4
    fraction = (torch.cuda.memory_reserved() + peak + weights) / torch.cuda.mem_get_info()[1]
    for name, make in {"torch AdamW": lambda model: torch.optim.AdamW(model.parameters(), foreach=False),
                       "PagedAdamW8bit (managed)": lambda model: PagedAdamW8bit(model.parameters(), paging="managed"),
                       "bnb PagedAdamW8bit": lambda model: bnb.optim.PagedAdamW8bit(model.parameters())}.items():
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction)
        done = []
        try:
            result, _ = train(make, done)
            differ = max(float((a - b).abs().max()) for a, b in zip(result, reference))
            print(f"{name:25s} under the cap: steps {done} completed; max |weight - uncapped AdamW8bit's| {differ:.2g}")
        except torch.OutOfMemoryError as error:
            print(f"{name:25s} under the cap: steps {done} completed, then {str(error).splitlines()[0][:90]}")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
else:
    print("no GPU here: the GPU variant (a 32-layer MLP and a spike step of 24 times the rows, under "
          "set_per_process_memory_fraction) shows torch AdamW running out of memory at the spike while "
          "PagedAdamW8bit(paging='managed') completes with parameters torch.equal to an uncapped AdamW8bit run, "
          "and bitsandbytes' PagedAdamW8bit completes too: tests/test_paging_gpu.py asserts this on an H100")

# %% [markdown]
# ## Summary
#
# - Full fine-tuning with float32 AdamW keeps 16 bytes per parameter (weights 4, gradients 4, m and v 8):
#   107.8 GB for a 7B-shaped model before activations, not the "~28 GB" of note 001 (the float32 weights
#   alone). 8-bit AdamW stores m and v in 2.03125 bytes per parameter.
# - QLoRA has moments only for the adapters: at rank 64 on the 7B shape, 1.279 GB in float32, 0.325 GB in
#   8 bits.
# - The dynamic map's relative gap only doubles per decade towards 0 (a linear map's grows tenfold); the
#   unsigned map, for v ≥ 0, is twice as fine. A linear 8-bit map stores much of a small v as 0, and
#   Adam's step m / (√v + ε) then explodes. Blocks of 256 keep rows of different scales apart.
# - `qlora_ref.optim8bit.AdamW8bit` matches bitsandbytes' `AdamW8bit` byte for byte in its moments over
#   100 steps on a CPU; parameters differ by a few float32 roundings (a different grouping of the same
#   step). NaN/Inf gradient elements are skipped, as in bitsandbytes' CUDA kernel.
# - Paging moves optimizer states off the device during a memory spike (a batch of long sequences) and
#   back for the update: the simulated spike runs out of memory without paging and completes with it,
#   bit for bit the same weights. The QLoRA paper found no loss of speed at batch size 16 (65B, 48 GB).
#
# **Exercise:** [exercises/07_optimizers.ipynb](../exercises/07_optimizers.ipynb) (solution:
# [solutions/07_optimizers.ipynb](../solutions/07_optimizers.ipynb)): write one AdamW step and the pager's
# least-recently-used bookkeeping.

# %% [markdown]
# ## Check your understanding
#
# 1. A Llama-2-13B-shaped model has 40 layers, hidden size 5120, intermediate size 13824 and the same
#    vocabulary. How many GB do float32 AdamW states take, and 8-bit ones? (Build its `sizes` list and use
#    `predicted_state_bytes`.)
#
# <details><summary>Answer</summary>
#
# As `sizes_7b` with the 13B numbers: `[VOCAB * 5120] + per_layer_13b * 40 + [5120, VOCAB * 5120]`, where
# `per_layer_13b` holds four 5120 × 5120 projections, three 5120 × 13824 ones and two norms of 5120.
# Float32 states are `8 * sum(sizes_13b)` bytes, 8-bit ones `predicted_state_bytes(sizes_13b)`. Every
# tensor has more than 4096 values, so the 8-bit states are 2.03125 / 8 of the float32 ones, as for 7B.
#
# </details>
#
# 2. With the linear map, why does Adam's step explode rather than vanish when a small v is stored as 0?
#    Would storing m as 0 be as bad?
#
# <details><summary>Answer</summary>
#
# The step divides by √v + ε. With v stored as 0 the divisor is ε = 1e-8, so a small but nonzero m gives
# a step of m / 1e-8: tens of thousands of learning rates. An m stored as 0 gives a step of 0: the weight
# misses one update, a small loss rather than a jump.
#
# </details>

# %% [markdown]
# 3. In `simulate_spike`, what is the smallest budget with which the spike step still completes with
#    paging? (What must be on the device at the peak of the spike's forward pass, and what during an update?)
#
# <details><summary>Answer</summary>
#
# At the peak of the spike's forward pass: the weights and gradients (717,440 bytes, printed above) and all
# the activations saved so far (688,128); every state page can be out. During an update the activations
# are gone and one page must come in, far less. So `run.fixed_bytes + peak.activation_bytes` =
# 1,405,568 bytes: `simulate_spike(budget_bytes=1_405_568)` completes, one byte less runs out of memory.
#
# </details>
#
# 4. Why does bitsandbytes page only states of at least 100,000 values, and why can a paged optimizer's
#    update be slower than an unpaged one's even when nothing is ever evicted?
#
# <details><summary>Answer</summary>
#
# Unified memory moves whole pages (4 KB to 2 MB) and each paged tensor costs a driver call per step:
# for small states the bookkeeping outweighs the bytes it could free, and all of them together are
# little. Even without evictions, each update first queues `cudaMemPrefetchAsync` for its states, a
# driver call an unpaged optimizer does not make; with evictions, the pages also cross PCIe.
#
# </details>
