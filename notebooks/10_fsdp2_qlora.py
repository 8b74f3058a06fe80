# %% [markdown]
# # Lesson 10 — QLoRA across GPUs with FSDP2
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/10_fsdp2_qlora.ipynb)
#
# Lesson 9 ends where learners most want QLoRA: Llama-2-70B in NF4 does not fit one 24 GB card (section 1
# computes by how much). Two cards hold it only if no card holds the whole model. PyTorch's FSDP2
# (`torch.distributed.fsdp.fully_shard`) does exactly that for ordinary weights: every parameter is cut by
# rows into N shards, one per process ("rank"); before a layer computes, its rows are all-gathered from
# every rank, and after it they are freed again. This lesson makes a 4-bit weight shardable the same way,
# byte for byte, and runs QLoRA training in two processes on your CPU.
#
# **What you will learn**
# - what FSDP2 shards, all-gathers and frees, and when: a memory timeline of one training step;
# - why a 4-bit weight needs hooks of its own (`fsdp_pre_all_gather` / `fsdp_post_all_gather`), and which
#   shard boundaries keep its bytes exactly those of the single-process quantization;
# - that data-parallel training over N processes computes the single-process step, up to the order of
#   float32 sums;
# - what each GPU holds, and whether 70B fits two 24 GB cards.

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/sharded_4bit.py`, `qlora_ref/distributed.py`. For
# its demonstrations it also uses `qlora_ref/fsdp_demo.py`, `qlora_ref/plots/fsdp.py`.

# %% [markdown]
# **Prerequisites:** lessons 3 and 4 (the 4-bit bytes and their constants), 6 (`QLoRALinear`), 7 (8-bit
# AdamW), 8 (the trainer) and 9 (the estimator). Everything runs on a CPU: the processes talk through
# gloo, PyTorch's CPU backend (on GPUs the same code uses NCCL).
#
# **Sources:** PyTorch's FSDP2 (`fully_shard`) documentation and the FSDP paper (Zhao et al. 2023,
# arXiv:2304.11277); ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054); torchao's `NF4Tensor`, the first
# 4-bit weight with FSDP2 hooks; Answer.AI's fsdp_qlora (FSDP1, bitsandbytes' weights stored as bf16).

# %%
import logging
import os
import sys
from pathlib import Path

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

import matplotlib.pyplot as plt
import torch
from IPython.display import display

from qlora_ref import dequantize_4bit, quantize_4bit
from qlora_ref.distributed import run_on_cpus
from qlora_ref.fsdp_demo import LESSON_SETTINGS, lesson_run
from qlora_ref.plots.fsdp import per_gpu_figure
from qlora_ref.sharded_4bit import Weight4bit, check_rows_shardable
from qlora_ref.train import TrainConfig, setup, sharded_train_step, train_step
from qlora_ref.vram import GIB, estimate

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
print("torch", torch.__version__)

# %% [markdown]
# ## 1. One GPU is not enough
#
# Lesson 9's estimator, for Llama-2-70B, QLoRA (NF4 + double quantization) at rank 16, one sequence of
# 2,048 tokens, 8-bit AdamW: on one GPU, and on each of two under FSDP2 (`n_gpus=2`, this lesson's
# addition to the estimator, section 6).

# %%
for n in (1, 2):
    b = estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=16, n_gpus=n)
    print(f"{n} GPU{'s' if n > 1 else ' '}: {b.total / GIB:5.1f} GiB per GPU, of which 4-bit weights "
          f"{b.parts['4-bit weights'] / GIB:4.1f} GiB")

# %% [markdown]
# The 4-bit weights alone are 32 GiB: no 24 GB card holds them. Halved, they fit, and what else a GPU holds
# then decides. Two things must hold for that:
#
# 1. no rank ever holds the whole model: each keeps 1/N of every weight, and a layer is whole only while it
#    computes (its forward, and again its backward);
# 2. the sharded run computes what one process computes: the gathered bytes are the single-process
#    quantization's, and the gradients are those of the whole batch.

# %% [markdown]
# ## 2. Why a 4-bit weight needs hooks of its own
#
# FSDP2 cuts a parameter of shape [R, C] along dim 0: rank k of N keeps rows k R/N to (k+1) R/N. For a
# dense weight those rows are simply bytes, and all-gathering the N shards end to end gives the weight back.
# A 4-bit weight is not one tensor but three byte streams of different lengths and dtypes (lessons 3, 4):
# the packed codes (n/2 uint8), one absmax per block of 64 values (uint8 codes of it with double
# quantization), one float32 absmax per 256 of those, and one offset for the whole weight.
#
# `Weight4bit` is a tensor subclass that looks like the [R, C] weight and holds the streams. Cut at row
# r, every stream is cut at the same place: codes at r C / 2, absmax at r C / 64, nested absmax at
# r C / 16384. So a shard of whole rows is itself a complete quantization of its rows, as long as each cut
# falls between nested blocks, (R/N) C a multiple of 64 x 256 = 16,384 values (of 64 without double
# quantization). The offset, 4 bytes, every rank keeps.

# %%
W = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
packed, state = quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
whole = Weight4bit.from_quantized(packed, state)
print(whole)
for name, stream in zip(("codes", "absmax codes", "nested absmax"), whole.streams()):
    print(f"{name:14s} {stream.dtype}, {stream.numel():6d} values")
shards = torch.chunk(whole, 4)  # what FSDP2 does to a parameter for 4 ranks
reference = dequantize_4bit(packed, state)
print("each shard dequantizes to its own rows, exactly:",
      all(torch.equal(s.dequantize(), reference[64 * k:64 * (k + 1)]) for k, s in enumerate(shards)))
print("the shards' streams end to end are the single-process bytes:",
      all(torch.equal(torch.cat([s.streams()[i] for s in shards]), whole.streams()[i]) for i in range(3)))

# %% [markdown]
# FSDP2 asks a tensor subclass two things, and these hooks are the whole interface:
#
# - `fsdp_pre_all_gather`: which tensors to all-gather. Ours hands over its three local streams (FSDP2
#   packs tensors of several dtypes into one byte buffer for the collective);
# - `fsdp_post_all_gather`: how to make the whole parameter from the gathered tensors. Ours wraps the
#   gathered streams, which are rank 0's bytes followed by rank 1's, as the whole `Weight4bit`, without a
#   copy. FSDP2 keeps those buffers and refills them in place at every later all-gather.
#
# `ShardableQLoRALinear` is lesson 6's `QLoRALinear` with its base held as one such parameter; its forward
# dequantizes whatever `self.weight` is when it runs: the whole weight that FSDP2 has just gathered.
#
# Shapes that do not cut into whole nested blocks stop with the world sizes that would work. The course's
# own model has 128 x 128 projections, 16,384 values: one nested block, which cannot be split.

# %%
try:
    check_rows_shardable((128, 128), blocksize=64, nested=True, world_size=2, name="q_proj")
except ValueError as error:
    print(error)

# %% [markdown]
# Every other operation on a `Weight4bit` is refused by name. Two of the failures users of 4-bit weights
# under FSDP report come from the opposite choice: a 4-bit parameter that quietly turns into a plain dense
# parameter after unsharding (the memory saving gone), and uint8 storage that FSDP treats as numbers to
# average or to cast (training with loss 0, or a crash). Here nothing but the sharding operations and
# `dequantize()` work on the bytes, and the parameter is frozen (no gradient, so nothing is reduced).

# %%
try:
    whole + 1
except NotImplementedError as error:
    print(error)

# %% [markdown]
# ## 3. What FSDP2 gathers and when: a memory timeline
#
# `run_on_cpus(fn, 2)` starts two fresh Python processes, joins them with gloo and runs `fn(rank, 2)` in
# each (`fn` must be importable: the processes import it by name). `lesson_run` does two things in each
# rank: it shards a four-layer Llama of width 256 (QLoRA on all seven linears, double quantization) with
# `shard_qlora_model`, which makes every decoder layer an FSDP2 unit, runs one forward and backward, and at
# each QLoRA layer's forward and backward (and after each decoder layer's forward) records the bytes of
# whole 4-bit weights the rank holds; then it
# trains the course's model for three steps (section 4). Starting the processes takes a few seconds each.

# %%
results = run_on_cpus(lesson_run, 2)
timeline = results[0]["timeline"]
events = timeline["events"]
print(f"rank 0 keeps {timeline['shard_bytes']:,} bytes of 4-bit weights (its shards), of the model's "
      f"{timeline['whole_bytes']:,}")
print(f"gathered: at most {max(e[2] for e in events):,} bytes at once, one decoder layer; after the step: "
      f"{timeline['after']:,}")
print("both ranks saw the same timeline:", results[0]["timeline"]["events"] == results[1]["timeline"]["events"])

# %%
figure, axis = plt.subplots(figsize=(9, 3.4))
x = list(range(len(events)))
kept = timeline["shard_bytes"] / 1e3
axis.step(x, [kept] * len(events), where="post", label="its shards (kept)")
axis.step(x, [kept + e[2] / 1e3 for e in events], where="post", label="+ layers gathered whole (then freed)")
axis.axhline(timeline["whole_bytes"] / 1e3, color="grey", linestyle="--", label="the whole model's 4-bit bytes")
split = max(i for i, e in enumerate(events) if e[0] == "forward")
axis.axvline(split + 0.5, color="black", linewidth=0.8)
starts = [i for i, e in enumerate(events) if e[1].endswith("q_proj" if e[0] == "forward" else "down_proj")]
axis.set_xticks(starts, [f"layer {events[i][1].split('.')[2]}\n{events[i][0]}" for i in starts], fontsize=7)
axis.set_ylabel("kB of 4-bit weights, rank 0")
axis.set_title("a QLoRA layer's forward or backward at each step of the line; forward left, backward right")
axis.set_ylim(0, 1.2 * timeline["whole_bytes"] / 1e3)
axis.legend(fontsize=8, loc="upper left", ncols=3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Each layer is gathered for its forward, freed after it, and gathered again for its backward: the
# `reshard_after_forward` of FSDP2, which trades a second all-gather per layer for never holding two layers
# at once. FSDP2 may issue the next layer's all-gather before this layer is done (prefetching, to overlap the
# communication with the computation), so a GPU can hold two layers for a while; the estimate (section 6)
# counts two. With gradient checkpointing (the
# trainer's default) the backward first recomputes the layer's forward, with the weights gathered once for
# both.
#
# ## 4. The same step, in two processes
#
# Data parallelism: every step's batch of 8 examples is cut in two, and each rank computes its 4. The
# loss of a batch is the mean over all its answer tokens, T of them; rank k computes the mean l_k over its
# own T_k. FSDP2 averages the ranks' gradients (sums them and divides by N), so each rank
# back-propagates N (T_k / T) l_k, whose average over the ranks is the batch's mean loss. The adapters'
# gradients are reduce-scattered: summed over the ranks, and each rank receives only its rows of the sum.
# Each rank's 8-bit AdamW (`ShardedAdamW8bit`) then updates its rows and keeps only their moments.
# The trainer's step of one rank, next to lesson 8's `train_step`:

# %%
print(inspect.getsource(sharded_train_step))

# %% [markdown]
# The same three steps in this process, unsharded, and the sharded run's losses beside them:

# %%
single = setup(TrainConfig(**LESSON_SETTINGS))
single_losses = [train_step(single) for _ in range(3)]
sharded = [r["training"] for r in results]
print("both ranks report the same losses:", sharded[0]["losses"] == sharded[1]["losses"])
print("the losses equal one process's to float32 rounding (relative 1e-6):",
      all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(sharded[0]["losses"], single_losses)))
adapters = sum(p.nbytes for p in single.trainable)
moments = sum(t.nbytes for s in single.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
print(f"adapters: {adapters:,} bytes in one process, {sharded[0]['adapter_bytes']:,} on each rank")
print(f"8-bit AdamW's moments: {moments:,} bytes in one process, {sharded[0]['optimizer_bytes']:,} on each rank")

# %%
# NBVAL_IGNORE_OUTPUT
print("one process:", [f"{x:.7f}" for x in single_losses])
print("two ranks:  ", [f"{x:.7f}" for x in sharded[0]["losses"]])

# %% [markdown]
# Not equal to the bit, and not because anything is wrong: each rank sums the gradients over its own
# examples, and the two sums are then added. A float32 sum in another order ends in other bits (lesson 0,
# "On another CPU"). With one rank the order is the single process's, and so are the bits
# (`tests/test_distributed_train.py` checks both: 1 rank exactly, 2 and 4 ranks to 1e-6 in the loss and
# 1e-5 in the gradients).
#
# The 8-bit moments stay exact per block only if a shard starts on a block of 256 moments: each rank then
# quantizes the same blocks the single process does. `ShardedAdamW8bit.shard_blocks_aligned()` says
# whether they do.

# %% [markdown]
# ## 5. From the command line
#
# The trainer of lesson 8 runs under `torchrun`, which starts the processes and tells each its rank:
#
# ```bash
# torchrun --standalone --nproc-per-node 2 -m qlora_ref.train \
#     --set double_quant=false optimizer=adamw_8bit batch_size=32 output_dir=runs/dates-x2
# ```
#
# On CPUs the processes use gloo, on GPUs NCCL (one GPU each). Only rank 0 prints. What changes from one
# process, each with a message naming the setting to change: the batch must divide over the ranks; the
# paged optimizer pages whole tensors, so the sharded run uses `adamw_8bit`; every 4-bit weight must cut
# into whole blocks (the course's model: `double_quant=false`, as here); `--merge` needs the whole model
# in one process.
#
# A checkpoint holds `sharded/`, written by every rank at once with `torch.distributed.checkpoint` (the
# adapters as the sharded tensors they are, each rank's 8-bit moments and random state), and, written by
# rank 0, the adapters gathered whole in PEFT's layout: `load_adapters` (and PEFT) load them in a single
# process, as in lesson 8. `resume=true` continues bit for bit, with as many processes as wrote the
# checkpoint; another number stops with a message: the adapters would reshard, but the 8-bit moments are
# quantized per shard, and cut elsewhere they are other numbers.

# %% [markdown]
# ## 6. What each GPU holds
#
# `estimate(..., n_gpus=N)` gives one GPU's share under FSDP2. Divided by N: the 4-bit weights and their
# constants (but each weight's offset and code tables), the 16-bit weights, the adapters, their gradients
# and the 8-bit moments. Not divided: each GPU's own activations (its own sequence), the dequantized
# weight of one linear, the CUDA context. Added: the layers FSDP2 holds whole for a while. Per GPU, at
# 2,048 tokens and rank 16 (8-bit AdamW, not paged):

# %%
print(f"{'GPUs':>5s}" + "".join(f"{m:>14s}" for m in ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B")))
for n in (1, 2, 4, 8):
    row = [estimate(m, optimizer="adamw_8bit", seq_len=2048, r=16, n_gpus=n).total / GIB
           for m in ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B")]
    print(f"{n:5d}" + "".join(f"{v:10.1f} GiB" for v in row))

# %% [markdown]
# The same per GPU, part by part, against 24, 48 and 80 GB cards (the bar marked x1 is one GPU without FSDP2):

# %%
fig, _ = per_gpu_figure(seq_len=2048, r=16, optimizer="adamw_8bit")
display(fig)

# %% [markdown]
# Choose the tokens per GPU, the rank and the optimizer:

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import Dropdown, interact


def show(seq_len=2048, r=16, optimizer="adamw_8bit"):
    display(per_gpu_figure(seq_len=seq_len, r=r, optimizer=optimizer)[0])


_ = interact(show, seq_len=Dropdown(options=[256, 512, 1024, 2048, 4096], value=2048),
             r=Dropdown(options=[8, 16, 32, 64, 128], value=16), optimizer=Dropdown(options=["adamw_8bit", "adamw"]))

# %% [markdown]
# And the question of the source documents: Llama-2-70B, 2,048 tokens, batch 1, two 24 GB cards, no CPU
# offload (Answer.AI's fsdp_qlora reaches it only by offloading the weights to about 128 GB of host RAM).
# A 24 GB card offers about 22.5 GiB to PyTorch.

# %%
b = estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=16, n_gpus=2)
print(b.table())
print(f"against 22.5 GiB: {(b.total - 22.5 * GIB) / GIB:.1f} GiB short")
fits = [r for r in (1, 2, 4, 8, 16, 32, 64)
        if estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=r, n_gpus=2).total <= 22.5 * GIB]
print("ranks that fit at 2,048 tokens:", fits or "none")
for seq_len in (1024, 512):
    fits = [r for r in (1, 2, 4, 8, 16, 32, 64)
            if estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=seq_len, r=r, n_gpus=2).total <= 22.5 * GIB]
    print(f"at {seq_len:,} tokens, the largest rank that fits: {max(fits) if fits else 'none'}")

# %% [markdown]
# By this estimate, not at 2,048 tokens: 16 of the 22.5 GiB are the 4-bit weights' half, 2.5 the
# checkpointed inputs of 80 layers, and 3.8 the allocator's overhead, lesson 9's constant measured on an
# H100 with CUDA graphs (an eager step may waste less). Four GPUs fit at rank 64. Two GPUs need the
# measurement that the estimate cannot replace: the overhead term decides.
#
# **Exercise:** [exercises/10_fsdp_shards.ipynb](../exercises/10_fsdp_shards.ipynb) (solution:
# [solutions/10_fsdp_shards.ipynb](../solutions/10_fsdp_shards.ipynb)): cut a 4-bit weight's three streams into
# one rank's shard, and weight each rank's loss.

# %% [markdown]
# ## Summary
#
# - FSDP2 cuts every parameter by rows over N processes, all-gathers a layer for its forward and again for
#   its backward, frees it after each, and reduce-scatters the gradients.
# - A 4-bit weight is three byte streams; `Weight4bit` cuts them at the same rows, so each shard is a whole
#   quantization of its rows when the cuts fall on nested blocks (16,384 values), and its two FSDP2 hooks
#   hand the streams over and wrap them back: the gathered bytes are the single-process bytes.
# - Data-parallel training with each rank's loss weighted by its share of the tokens computes the
#   single-process step, to float32 rounding (exactly with one rank).
# - Each GPU holds 1/N of the weights, adapters, gradients and moments, plus a layer or two whole; 70B at
#   2,048 tokens needs more than two 24 GB cards by this estimate.

# %% [markdown]
# ## Check your understanding
#
# 1. Why must a shard boundary fall on a nested block of 16,384 values and not only on a block of 64?
#    What would the rank holding half a nested block be missing?
#
# <details><summary>Answer</summary>
#
# With double quantization the absmax of each block of 64 is stored as an 8-bit code, and 256 such codes
# share one float32 nested absmax: 64 x 256 = 16,384 values. Cut inside that group, and one rank gets the
# codes of some blocks but not the nested absmax they are decoded with (it sits in the other rank's
# stream). Its shard would no longer be a complete quantization of its rows, and making it one would mean
# other bytes than the single process's.
#
# </details>
#
# 2. FSDP2 averages the ranks' gradients. Why does each rank multiply its loss by N T_k / T rather than
#    simply use its own mean loss? When would the two give the same gradient?
#
# <details><summary>Answer</summary>
#
# The batch's loss is the mean over all T answer tokens, Σ_k (T_k / T) l_k. FSDP2 computes (1/N) Σ_k of the
# ranks' gradients, so rank k must back-propagate N (T_k / T) l_k for that average to be the batch's
# gradient. Each rank's own mean would weight every rank equally, so a token on a rank with few answer
# tokens would count more than one on a rank with many. The two agree when every rank has the same
# number of answer tokens, T_k = T / N.
#
# </details>

# %% [markdown]
# 3. Why are 8-bit moments not reshardable to another number of processes, while the adapters are?
#
# <details><summary>Answer</summary>
#
# The adapters are plain float32 tensors: cut at any row, their numbers are the same numbers, so a
# checkpoint can hand them to any number of ranks. The 8-bit moments are quantized per shard, in blocks of
# 256 with an absmax each. Cut at other rows, the blocks hold other moments, and they would have to be
# dequantized and quantized again: other bytes, and a resume that is no longer bit for bit.
#
# </details>
#
# 4. With `reshard_after_forward=False` a layer stays gathered from its forward to its backward. How much
#    would that add per GPU for 70B, and what would it save?
#
# <details><summary>Answer</summary>
#
# After the forward every layer would be whole on every GPU: the whole model's 4-bit weights instead of
# this GPU's shard. On two GPUs that is the other half, about 16 GiB more per GPU (section 1: 31.9 GiB
# for the whole model, 15.9 per GPU). It would save the second all-gather of every layer, the one before
# its backward (and its recomputed forward): half of the step's all-gathers.
#
# </details>
