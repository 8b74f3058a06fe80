# %% [markdown]
# # Lesson 12 — Choosing QLoRA, LoRA or full fine-tuning
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/12_choosing.ipynb)
#
# The course built QLoRA piece by piece and measured each piece. This closing lesson puts those
# measurements side by side to answer the practical question: for *your* model, card and task, which
# method? Memory, speed and quality, each from the course's own numbers (computed here, or read from
# `bench/results/` at run time), then the three questions learners ask most, each answered with a
# computation, and a decision table.
#
# **What you will learn**
# - what full fine-tuning, 16-bit LoRA and QLoRA need on a GPU, for models from 360M to 70B parameters,
#   and which cards they fit;
# - what QLoRA costs in speed, measured on a CPU and on an H100;
# - what it costs in quality on the course's task over five seeds, beside what the QLoRA paper claims;
# - what a T4's float16 means for training, what merging an adapter into a 4-bit model loses, and when
#   4-bit weights save almost nothing.
#
# **Prerequisites:** lessons 6 (LoRA, `QLoRALinear`, merging), 8 (the trainer, the date task) and 9 (the
# VRAM estimator). On a CPU the notebook runs in one to two minutes; most of it is one fine-tuning run.
#
# **Sources:** QLoRA, Dettmers et al. 2023, arXiv:2305.14314 (abstract, section 4); LoRA, Hu et al. 2021,
# arXiv:2106.09685; mixed-precision training with loss scaling, Micikevicius et al. 2017, arXiv:1710.03740.

# %% [markdown]
# **The code of this lesson**: none of its own; it reads lesson 9's estimator and `bench/results`. For its
# demonstrations it also uses `qlora_ref/results.py`, `qlora_ref/plots/vram.py`, `qlora_ref/train.py`,
# `qlora_ref/adapters.py`, `qlora_ref/fourbit.py`.

# %%
import copy
import json
import os
import sys
from pathlib import Path
from statistics import median

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # clone the course, install it beside Colab's own torch (tools/colab_install.sh), run from notebooks/
    import importlib
    import subprocess

    subprocess.run(["sh", "-c", "[ -d qlora-course ] || git clone -q --depth 1 -b main https://github.com/OWNER/qlora-course; "
                    f"sh qlora-course/tools/colab_install.sh {sys.executable}"], cwd="/content", check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir("/content/qlora-course/notebooks")

# %matplotlib inline
import torch
from IPython.display import display

from qlora_ref import dequantize_4bit, merge_adapters, quantize_4bit
from qlora_ref.adapters import lora_layers
from qlora_ref.compare import compare
from qlora_ref.hf import SMOLLM2_360M
from qlora_ref.plots.vram import methods_figure
from qlora_ref.results import SETUP_KEYS, load_measurements
from qlora_ref.tasks import collate
from qlora_ref.train import TrainConfig, evaluate, train
from qlora_ref.model_shapes import PRESETS
from qlora_ref.vram import GIB, GPUS, estimate

# One thread: the same arithmetic in the same order on every run, so the figures below repeat exactly.
torch.set_num_threads(1)
_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr out of the output
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's runs stay on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
RESULTS = Path("..") / "bench" / "results"

# %% [markdown]
# ## 1. Memory: what each method keeps on the GPU
#
# Lesson 9's estimator, for one step of Llama-2-7B (batch 1 x 512 tokens, r = 16, gradient checkpointing,
# 8-bit AdamW for every method so that only the base differs). Each bar stacks the parts; the dashed red
# lines are cards. Full fine-tuning pays for gradients and optimizer states of every weight; LoRA freezes
# the base in 16 bits; QLoRA stores it in 4 bits.

# %%
SETUP = dict(optimizer="adamw_8bit", batch=1, seq_len=512, r=16)
figure, _ = methods_figure("Llama-2-7B", seq_len=512, batch=1, r=16, optimizer="adamw_8bit")
display(figure)

# %% [markdown]
# The same for four models and the three methods that matter in practice, with the smallest card of the
# estimator's list (`vram.GPUS`, lesson 9) that holds each step. SmolLM2-360M is the real small model of
# lesson 8.

# %%
COMPARED = ("full_bf16", "lora_bf16", "qlora_nf4_dq")
CARDS = sorted(GPUS, key=GPUS.get)  # smallest first


def smallest_card(breakdown):
    return next((card for card in CARDS if breakdown.fits(card)), "none of them")


print(f"{'model':<14}" + "".join(f"{m:>32}" for m in COMPARED))
for model in (SMOLLM2_360M, PRESETS["Llama-2-7B"], PRESETS["Llama-2-13B"], PRESETS["Llama-2-70B"]):
    cells = []
    for method in COMPARED:
        b = estimate(model, method=method, **SETUP)
        cells.append(f"{b.total / GIB:8.2f} GiB, {smallest_card(b)}")
    print(f"{model.name:<14}" + "".join(f"{c:>32}" for c in cells))

# %% [markdown]
# QLoRA moves each model down the list of cards. Llama-2-7B: full fine-tuning needs an A100 40 GiB, 16-bit
# LoRA just fits a T4, QLoRA an 8 GiB card. Llama-2-13B: from an A100 40 GiB (LoRA) to a 12 GiB card.
# Llama-2-70B fits one card only with QLoRA, and at this setting (r = 16) that card is an A100 40 GiB, not a
# 24 GiB consumer card (one of the seed documents' claims; lesson 9, at r = 64, finds a 48 GiB A6000). For the 360M model the three differ little: question 4c below.
#
# Are the estimates right? `bench/memory.py` measured QLoRA steps of 7B, 13B and 70B on an H100 (the update
# inside the backward, the step as a CUDA graph, paged 8-bit AdamW: lesson 9, section 8). Measured here means
# PyTorch's reserved peak plus the CUDA context:

# %%
runs = load_measurements(RESULTS)
print(f"{len(runs)} runs, {runs[0]['device']}, {runs[0]['date'][:10]}")
print(f"{'model':<12}{'tokens':>7}{'r':>4}{'measured GiB':>14}{'estimated GiB':>15}")
worst = 0.0
for run in runs:
    measured = run["peak_reserved"] + run["context_bytes"]
    estimated = estimate(**{key: run[key] for key in SETUP_KEYS}).resident_total
    print(f"{run['model']:<12}{run['seq_len']:>7}{run['r']:>4}{measured / GIB:>14.2f}{estimated / GIB:>15.2f}")
    worst = max(worst, abs(estimated / measured - 1))
print(f"the estimates are within {worst:.0%} of the measurements")

# %% [markdown]
# (`resident_total` counts the paged optimizer states as on the GPU, as the H100, with room to spare, kept
# them.) No run of full fine-tuning or 16-bit LoRA at these sizes is in `bench/results/`: for those
# methods the table above is the estimator's alone, whose terms lesson 9 checked one by one.
#
# ## 2. Speed: what the 4-bit base costs per step
#
# **On a CPU.** `bench/qlora_vs_lora.py` (lesson 8) timed every run of its five seeds, one thread each.
# The seconds include an evaluation every 10 steps, and the machine was shared, so the median over seeds is
# the figure to read:

# %%
seeds = json.loads((RESULTS / "qlora-vs-lora-cpu.json").read_text())
print(f"{seeds['machine']}, torch {seeds['torch']}, {seeds['date']}")
by_setting = {}
for r in seeds["runs"]:
    by_setting.setdefault((r["steps"], r["method"]), []).append(r)
cpu_ms = {}
for (steps, method), group in sorted(by_setting.items()):
    cpu_ms[steps, method] = median(1000 * r["seconds"] / r["steps"] for r in group)
    print(f"{steps} steps, {method:<6} {cpu_ms[steps, method]:5.0f} ms a step (median of {len(group)} seeds)")
for steps in sorted({s for s, _ in by_setting}):
    print(f"{steps} steps: QLoRA takes {cpu_ms[steps, 'QLoRA'] / cpu_ms[steps, 'LoRA']:.2f}x LoRA's time a step")

# %% [markdown]
# **On an H100.** Lesson 6 timed one layer's forward and backward at 4096 tokens (bf16, r = 16): the
# course's `QLoRALinear`, bitsandbytes' `Linear4bit` with a PEFT-style LoRA branch, and a dense bf16 layer
# with the same branch, which is 16-bit LoRA. GPU time, CUDA-graph replays:

# %%
layer = json.loads((RESULTS / "layer-nvidia-h100-80gb-hbm3.json").read_text())
print(f"{layer['device']}, torch {layer['torch']}, {layer['date'][:10]}; {layer['tokens']} tokens, r = {layer['rank']}")
print(f"{'weight':>14}{'16-bit LoRA ms':>16}{'ours ms':>9}{'bnb ms':>8}{'ours / 16-bit':>15}{'bnb / 16-bit':>14}")
for row in layer["layers"]:
    t = row["device_ms"]
    print(f"{row['shape'][0]:>6} x {row['shape'][1]:<6}{t['dense']:>16.3f}{t['ours']:>9.3f}{t['bnb']:>8.3f}"
          f"{t['ours'] / t['dense']:>15.2f}{t['bnb'] / t['dense']:>14.2f}")
for name in ("ours", "bnb"):
    ratios = [row["device_ms"][name] / row["device_ms"]["dense"] for row in layer["layers"]]
    print(f"{name}: {min(ratios):.2f}x to {max(ratios):.2f}x the 16-bit LoRA layer's time")

# %% [markdown]
# At 4096 tokens the two matrix products dominate every layer, so dequantizing adds little on the GPU: ours
# is within a few percent of the 16-bit layer either way, bitsandbytes' a few percent slower. On the CPU, where
# the model is tiny and dequantizing is plain PyTorch, QLoRA took 8-23% longer a step than LoRA. So the seed
# documents' "full precision is ~10-20% faster per step" holds on this CPU and not on an H100 at this size.
# A whole step of 7B QLoRA on the same H100, ours and the transformers stack's (no 16-bit LoRA step of 7B
# was measured):

# %%
def step_ms(run):
    return 1000 * median(run["step_seconds"][1:])  # the first step allocates and compiles


baseline = json.loads((RESULTS / "baseline-nvidia-h100-80gb-hbm3.json").read_text())["runs"]
whole = [("qlora_ref, CUDA graph", r) for r in runs if r["model"] == "Llama-2-7B"]
whole += [(f"{r['stack']}", r) for r in baseline if r["recipe"] == "standard"]
for label, r in whole:
    print(f"Llama-2-7B, {r['seq_len']:>4} tokens, r {r['r']:>2}: {step_ms(r):6.0f} ms a step ({label})")

# %% [markdown]
# ## 3. Quality: QLoRA against LoRA on the course's task
#
# Lesson 8's five seeds, read again: the date task at 150 and 300 steps, exact match on 200 held-out
# dates and the eval loss at the end, and how many seeds reach exact match 0.9 within the budget.

# %%
def first_step_at(evals, threshold=0.9):
    return next((e["step"] for e in evals if e["exact_match"] >= threshold), None)


print(f"{'steps':>5} {'method':<6}{'exact match (mean)':>20}{'seeds at 0.9':>14}{'eval loss (mean)':>18}")
for (steps, method), group in sorted(by_setting.items()):
    exact = [r["evals"][-1]["exact_match"] for r in group]
    loss = [r["evals"][-1]["eval_loss"] for r in group]
    reached = sum(first_step_at(r["evals"]) is not None for r in group)
    print(f"{steps:>5} {method:<6}{sum(exact) / len(exact):>20.3f}{f'{reached} of {len(group)}':>14}"
          f"{sum(loss) / len(loss):>18.4f}")

# %% [markdown]
# The QLoRA paper claims (section 4) that 4-bit QLoRA with NF4 matches 16-bit LoRA and 16-bit full
# fine-tuning on GLUE, Super-NaturalInstructions and MMLU, each trained to the end of its schedule; its
# abstract says QLoRA preserves "full 16-bit finetuning task performance". On the course's 0.9M-parameter model that holds *with enough steps*: at 300 steps QLoRA
# and LoRA end level, in exact match and eval loss. At 150 steps the quantized base learns more slowly, and
# one seed of five does not reach 0.9. Full
# fine-tuning reaches the lowest eval loss. So: budget a little more training for QLoRA than for LoRA, and
# compare at the end of training, not on the way.
#
# ## 4. Three questions learners ask
#
# One QLoRA run of lesson 8 (150 steps, r = 16, on the CPU in float32) gives a trained adapter to answer them
# with. It takes about a minute.

# %%
QUESTIONS = TrainConfig(steps=150, batch_size=32, r=16, alpha=32, lr=3e-3, warmup_steps=10, eval_every=0,
                        gradient_checkpointing=False, progress=False, samples=0, device="cpu")
trained = train(QUESTIONS)
run = trained.run
print(f"{run.step} steps; exact match on the held-out dates {trained.evals[-1]['exact_match']:.3f}")

# %% [markdown]
# ### 4a. "My T4 has no bfloat16. What changes?"
#
# bfloat16 needs compute capability 8.0 (Ampere); a T4 is 7.5, so the course computes in float16 there
# (lesson 0). Both have 16 bits, split differently:

# %%
print(f"{'dtype':<10}{'mantissa bits':>14}{'largest':>14}{'smallest normal':>17}{'step at 1.0':>13}")
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    info = torch.finfo(dtype)
    mantissa = -int(torch.log2(torch.tensor(info.eps)).item())
    print(f"{str(dtype)[6:]:<10}{mantissa:>14}{info.max:>14.3g}{info.smallest_normal:>17.3g}{info.eps:>13.3g}")

# %% [markdown]
# float16 is *finer* (10 mantissa bits to bfloat16's 7) but *narrower*: nothing above 65504, and values
# below 6.1e-5 lose precision (subnormals) or become 0. Dequantized weights sit well inside that range (an
# NF4 value is at most its block's absmax); activations usually do (question 2 below is the exception).
# Gradients are the risk: many are tiny. Here are the adapters' gradients of the trained
# run on one batch, cast to each type, as they would be with and without loss scaling (PyTorch's
# `GradScaler`, which the course's trainer uses for float16, starts by multiplying the loss by 2^16):

# %%
batch = collate(run.train_examples[:32], run.tokenizer)
run.model.zero_grad()
run.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
grads = torch.cat([p.grad.flatten().double() for p in run.trainable])
grads = grads[grads != 0]
print(f"{grads.numel():,d} non-zero adapter gradients")


def share(fraction):
    """Coarsely: the exact share moves a little with the CPU that trained the adapters."""
    return "under 0.1%" if fraction < 0.001 else f"about {round(fraction, 1):.0%}"


for dtype in (torch.bfloat16, torch.float16):
    for scale in (1.0, 2.0**16):
        cast = (grads * scale).to(dtype)
        lost = (cast.abs() < torch.finfo(dtype).smallest_normal).double().mean().item()
        overflow = cast.isinf().any().item()
        print(f"{str(dtype)[6:]:<9} loss x {scale:>7,.0f}: {share(lost):>10} below the smallest normal "
              f"(rounded coarsely or to 0); overflow: {overflow}")
run.model.zero_grad()

# %% [markdown]
# Without scaling, float16 would blur about half of these gradients; with it, almost none, and
# nothing overflows. When a step does overflow, `GradScaler` skips that update and halves the scale, so a
# float16 run on a T4 trains like a bfloat16 one. What a T4 cannot run is code that asks for bfloat16
# arithmetic (kernels compiled for it fail with an error naming sm_80); the fix is lesson 0's line that picks
# float16 on cards below compute capability 8.0.
#
# ### 4b. "Can I merge the adapter into the 4-bit model?"
#
# Merging (lesson 6) replaces W0^ and B A by one weight W0^ + (alpha/r) B A. Kept in 16 or 32 bits, that is
# the same function. Quantized back to NF4, to keep the 4-bit size, it is not: the sum is rounded to the
# 16 levels of each block, and part of what the adapter learned falls between them. Three versions of the
# trained model:

# %%
def with_model(model):
    """The run's evaluation (eval loss, exact match) of another model."""
    kept, run.model = run.model, model
    try:
        return evaluate(run)
    finally:
        run.model = kept


merged = merge_adapters(copy.deepcopy(run.model))  # W0^ + (alpha/r) B A, float32
requantized = copy.deepcopy(merged)
for name in lora_layers(run.model):
    linear = requantized.get_submodule(name)
    with torch.no_grad():
        linear.weight.copy_(dequantize_4bit(*quantize_4bit(linear.weight, blocksize=64, double_quant=True)))
versions = {"adapters (unmerged)": run.model, "merged, float32": merged, "merged, back to NF4": requantized}
scores = {label: with_model(model) for label, model in versions.items()}
for label, score in scores.items():
    print(f"{label:<21} exact match {score['exact_match']:.3f}")
probe = batch["input_ids"][:8]
with torch.no_grad():
    logits = {label: model(input_ids=probe).logits for label, model in versions.items()}
_ = compare("merged float32 vs adapters, logits", logits["merged, float32"], logits["adapters (unmerged)"], atol=1e-4)
print("merged NF4 vs adapters, logits: largest difference above 1e-4:",
      (logits["merged, back to NF4"] - logits["adapters (unmerged)"]).abs().max().item() > 1e-4)

# %% [markdown]
# The eval losses, to four digits (float32 training: these digits are this machine's):

# %%
# NBVAL_IGNORE_OUTPUT
for label, score in scores.items():
    print(f"{label:<21} eval loss {score['eval_loss']:.4f}")
print(f"re-quantizing raises the eval loss {scores['merged, back to NF4']['eval_loss'] / scores['adapters (unmerged)']['eval_loss']:.2f}x")

# %% [markdown]
# Here the task survives, because on this tiny model, trained hard, the update is large against W0^:

# %%
with torch.no_grad():
    ratios = [(layer.delta_weight().norm() / layer.base_weight().norm()).item() for layer in lora_layers(run.model).values()]
print(f"|(alpha/r) B A| / |W0^| over the {len(ratios)} layers: {min(ratios):.1f} to {max(ratios):.1f}")

# %% [markdown]
# How much of an update survives depends on that ratio, because NF4's rounding error is about the same
# whatever the update. To see it without depending on this run's last bits, take the first `q_proj`'s W0^
# and a random rank-16 update drawn in float64, at four sizes; re-quantize W0^ + update, and measure the
# error and how much of the update the new weight still carries (its projection on the update):

# %%
w0 = next(iter(lora_layers(run.model).values())).base_weight().double()
generator = torch.Generator().manual_seed(0)
direction = torch.randn(w0.shape[0], 16, generator=generator, dtype=torch.float64) @ torch.randn(
    16, w0.shape[1], generator=generator, dtype=torch.float64)
direction *= w0.norm() / direction.norm()  # |direction| = |W0^|
print(f"{'|update| / |W0^|':>17}{'error / |update|':>18}{'share of the update kept':>26}")
for size in (0.3, 0.1, 0.03, 0.01):
    update = size * direction
    requantized_weight = dequantize_4bit(*quantize_4bit((w0 + update).float(), blocksize=64, double_quant=True)).double()
    error = (requantized_weight - (w0 + update)).norm() / update.norm()
    kept = ((requantized_weight - w0) * update).sum() / (update * update).sum()  # projection on the update
    print(f"{size:>17}{error.item():>18.0%}{kept.item():>26.0%}")

# %% [markdown]
# Large updates survive; at a hundredth of |W0^| almost nothing of the update is left, and the error is as
# large as the update. Fine-tuning a large model gently gives small updates. So: merge into the 16-bit
# weights (dequantize, add, keep bf16; `merge_adapters` does that), or keep the adapter unmerged on the
# 4-bit base. To serve in 4 bits, quantize the merged 16-bit model with a method built for inference (GPTQ,
# AWQ: see `from_here.md`), or train with QA-LoRA, whose adapters merge into the quantized weights exactly.
#
# ### 4c. "When does 4-bit save nothing?"
#
# 4 bits shrink the frozen weights and nothing else. When something else dominates, the saving shrinks. Our
# estimator never finds QLoRA above 16-bit LoRA in total, but it finds the saving vanishing:

# %%
for model in (SMOLLM2_360M, PRESETS["Llama-2-7B"]):
    print(f"{model.name}: the linear layers' weights take {2 * model.parameter_counts()['linear'] / GIB:.2f} GiB in 16 bits")
print(f"{'model':<14}{'batch x tokens':>15}{'checkpointing':>14}{'QLoRA GiB':>11}{'LoRA GiB':>10}{'saved':>7}")
for model in (SMOLLM2_360M, PRESETS["Llama-2-7B"]):
    for batch_size, tokens, checkpointing in ((1, 512, True), (8, 2048, True), (8, 2048, False)):
        setting = dict(optimizer="adamw_8bit", batch=batch_size, seq_len=tokens, r=16,
                       gradient_checkpointing=checkpointing)
        q = estimate(model, method="qlora_nf4_dq", **setting).total
        lo = estimate(model, method="lora_bf16", **setting).total
        print(f"{model.name:<14}{f'{batch_size} x {tokens}':>15}{'on' if checkpointing else 'off':>14}"
              f"{q / GIB:>11.2f}{lo / GIB:>10.2f}{1 - q / lo:>7.1%}")
grid = [(m, b, t, c) for m in (SMOLLM2_360M, *PRESETS.values()) for b in (1, 8, 64) for t in (128, 2048, 8192)
        for c in (True, False)]
above = [g for g in grid if estimate(g[0], method="qlora_nf4_dq", optimizer="adamw_8bit", batch=g[1], seq_len=g[2],
                                     r=16, gradient_checkpointing=g[3]).total
         > estimate(g[0], method="lora_bf16", optimizer="adamw_8bit", batch=g[1], seq_len=g[2], r=16,
                    gradient_checkpointing=g[3]).total]
print(f"settings of {len(grid)} (6 models, batch 1-64, 128-8192 tokens) where QLoRA exceeds LoRA: {len(above)}")

# %% [markdown]
# SmolLM2-360M's 16-bit linears are under a GiB, while 8 sequences of 2048 tokens keep many GiB of activations
# and logits (its vocabulary is 49,152): the saving drops to a few percent, and QLoRA then only costs speed.
# For 7B the weights are large enough that QLoRA still saves many GiB, though a smaller share.
#
# There is also a moment where the 4-bit layer *does* use more memory: while it computes, it dequantizes its
# weight into a 16-bit temporary, so during its step it holds the codes and a full 16-bit copy. Lesson 6
# measured that step's peak above the inputs and weights on an H100:

# %%
BITS_NF4_DQ = 4 + 8 / 64 + 32 / (64 * 256)  # code + 8-bit absmax per 64 + float32 per 256 blocks (lesson 4)
print(f"NF4 with double quantization: {BITS_NF4_DQ:.3f} bits a weight")
print(f"{'':>14}{'weight MiB':>20}{'step peak MiB':>20}{'weight + peak MiB':>20}")
print(f"{'weight':>14}" + f"{'16-bit':>10}{'4-bit':>10}" * 3)
for row in layer["layers"]:
    n = row["shape"][0] * row["shape"][1]
    weight = {"dense": 2 * n / 2**20, "ours": n * BITS_NF4_DQ / 8 / 2**20}
    peak = row["peak_MB"]  # MiB above the layer, its input and the output's gradient
    print(f"{row['shape'][0]:>6} x {row['shape'][1]:<6}"
          + "".join(f"{d:>10.0f}{o:>10.0f}" for d, o in ((weight["dense"], weight["ours"]),
                                                       (peak["dense"], peak["ours"]),
                                                       (weight["dense"] + peak["dense"], weight["ours"] + peak["ours"]))))

# %% [markdown]
# During its step the 4-bit layer peaks as high as the 16-bit one or higher; weight and peak together it
# still comes out lower on every row here, and only one layer computes at a time, so over a whole model the
# 4-bit storage of all the other layers wins (lesson 9 counts the temporary as the "dequantization
# workspace"). A run that keeps several dequantized weights alive at once (a compiler fusing across layers,
# say) would lose that margin.

# %% [markdown]
# ## 5. Choosing
#
# | your situation | choose | why (section) |
# |---|---|---|
# | the 16-bit model does not fit your card for LoRA | QLoRA | 4-bit weights move it down a card class (1) |
# | it fits with LoRA, and time matters | 16-bit LoRA | no dequantization a step (2), learns a little faster at a short budget (3) |
# | small model, long sequences or large batches | LoRA or full | activations dominate: 4 bits save little (4c) |
# | the task is far from pretraining, and memory allows | full fine-tuning | every weight free: the lowest eval loss here (3) |
# | a T4 | QLoRA or LoRA in float16 with loss scaling | no bfloat16 on sm_75 (4a) |
# | you will serve in 4 bits | keep the adapter, or merge in 16 bits and quantize for inference | re-quantizing a merge loses part of the update (4b) |
#
# Whatever you choose, estimate first (lesson 9), and compare methods at the end of training, over more than
# one seed (lesson 8).

# %% [markdown]
# ## Check your understanding
#
# 1. In section 4c, why does QLoRA save almost nothing for SmolLM2-360M at batch 8 x 2048 tokens, while
#    it saves many GiB for Llama-2-7B in the same setting?
#
# <details><summary>Answer</summary>
#
# 4 bits shrink only the frozen linear weights. SmolLM2-360M's are small (well under a GiB in 16 bits), while
# activations, logits over its 49,152-token vocabulary and the CUDA context take many GiB at that batch: section
# 4c prints a saving of a few percent. Llama-2-7B's linears take about 12 GiB in 16 bits, so storing them at about
# 4.1 bits (4.127) still saves many GiB: a smaller share of a larger total.
#
# </details>

# %% [markdown]
# 2. Your QLoRA run on a T4 shows the loss scale falling at every step and the loss not moving. What is
#    happening, and what is the first thing to check?
#
# <details><summary>Answer</summary>
#
# `GradScaler` halves the scale and skips the update each time the float16 gradients overflow (become inf or
# NaN). If every step overflows, nothing trains. Overflow that scaling cannot fix comes from the forward pass
# itself: an activation above float16's 65504 (section 4a's table). Check for inf or NaN in the loss and the
# activations; a lower learning rate, or keeping the parts that overflow (often the norms and the loss) in
# float32, are the usual fixes. bfloat16 would not overflow there, but a T4 has none.
#
# </details>

# %% [markdown]
# 3. Section 4b's re-quantized merge kept exact match here. Why is that weak evidence that re-quantizing is
#    safe for your fine-tune of a 7B model?
#
# <details><summary>Answer</summary>
#
# The damage depends on the update's size against NF4's rounding error. On the course's tiny model, trained
# hard, the update is a large fraction of |W0^| (section 4b prints it), so most of it survives. A gentle
# fine-tune of a large model changes the weights far less; 4b's last table shows that for small updates the
# rounding error is as large as the update itself and the re-quantized weight keeps almost none of it: what
# was learned is largely lost, and exact match on one easy task would not reveal it early.
#
# </details>
#
# **From here:** the glossary ([glossary.md](glossary.md)) defines the course's terms, and
# [from_here.md](from_here.md) lists where to go next: LoftQ, DoRA, QA-LoRA, HQQ, GPTQ and AWQ, FP8 training.
