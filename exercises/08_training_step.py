# %% [markdown]
# # Exercises 8 — A training step
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/08_training_step.ipynb)
#
# **What you will write**
# - `learning_rate(config, step)`: the warm-up and cosine schedule of lesson 8's runs;
# - `training_step(run)`: one optimizer step of QLoRA fine-tuning. It sets the learning rate, accumulates the
#   gradients of `grad_accum` micro-batches, clips them, steps the paged 8-bit AdamW of lesson 7 and gets the
#   run ready for the next step. It does what `qlora_ref.train.train_step` does, in the same order.
#
# **Prerequisites:** lesson 8 (`notebooks/08_qlora_finetuning.ipynb`), section 3 "One training step"; lessons 6
# (`QLoRALinear`, adapters) and 7 (`PagedAdamW8bit`). The papers: QLoRA (Dettmers et al. 2023,
# arXiv:2305.14314), LoRA (Hu et al. 2021, arXiv:2106.09685), cosine schedules (Loshchilov & Hutter 2016,
# arXiv:1608.03983), gradient clipping (Pascanu et al. 2013, arXiv:1211.5063).
#
# In `exercises/` the body of each function is replaced by `raise NotImplementedError(...)`: fill it in, then run
# the check below it. `check_learning_rate` compares your schedule with `qlora_ref.train.learning_rate` at every
# step of four schedules. `check_training_step` sets up two tiny QLoRA runs from the same seed, steps one with
# `train_step` and one with your function, and after every step compares the batches, the loss, the learning
# rate and the gradients that `optimizer.step()` receives, the adapters and the optimizer's state, bit for bit.
# Each check prints one line. `solutions/` holds the notebook solved. On a CPU it runs in about half a minute.

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
from torch import nn

from graders.lesson08 import check_learning_rate, check_training_step
from qlora_ref.adamw_step import adamw_update_
from qlora_ref.tasks import collate
from qlora_ref.train import TrainConfig, batch_indices, setup, train_step
from qlora_ref.model_shapes import PRESETS

# One thread: the same arithmetic in the same order on every run, so the figures below repeat exactly.
torch.set_num_threads(1)
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the runs here stay on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. A run
#
# `setup(config)` does everything before the first step: it loads the course's base model, replaces every linear
# layer but the output head with a `QLoRALinear` (NF4 + double quantization, frozen) carrying LoRA adapters, and
# builds the optimizer over the adapters. It returns a `Run`, which holds what a step needs: `run.config`,
# `run.model`, `run.tokenizer`, `run.optimizer`, `run.train_examples`, `run.trainable` (the parameters the
# optimizer updates), and where the run stands, `run.step` (steps done) and `run.losses` (one per step).
#
# A small run for this notebook: 512 dates, micro-batches of 8, two of them per step (`grad_accum=2`), no
# dropout (section 4 compares gradients, which dropout would make random).

# %%
SMALL = TrainConfig(n_train=512, n_eval=64, batch_size=8, grad_accum=2, steps=20, warmup_steps=4, r=8, alpha=16,
                    lr=3e-3, dropout=0.0, max_grad_norm=1.0, gradient_checkpointing=False, progress=False,
                    samples=0, device="cpu")
run = setup(SMALL)
trainable = sum(p.numel() for p in run.trainable)
print(f"{type(run.model.model.layers[0].self_attn.q_proj).__name__} layers; {len(run.trainable)} adapter tensors, "
      f"{trainable:,d} trainable parameters; optimizer {type(run.optimizer).__name__}")
print(f"run.step = {run.step}, run.losses = {run.losses}, {len(run.train_examples)} training examples")

# %% [markdown]
# ## 2. A micro-batch, and the loss on the answer only
#
# The data order is a pure function of the seed and a batch index: `batch_indices(n, batch_size, seed, index)` is
# the index-th slice of a permutation of the n examples drawn for its epoch. Step `s` (counting from 0) uses the
# batches `s * grad_accum + micro` for `micro = 0 .. grad_accum - 1`, so every step sees new examples and a run
# resumed from a checkpoint at step `s` sees the same ones as a run that never stopped.
#
# `collate` turns examples into `input_ids` ([BOS] prompt answer [EOS]) and `labels`: a copy of the ids on the
# answer and its EOS, -100 on BOS and the prompt. `run.model(input_ids=..., labels=...)` returns the mean of
# -log p(next token) over the positions whose label is not -100, the answer's tokens only. The prompt is given:
# its date is random, and no model can predict random digits, so scoring the prompt would only add noise to the
# gradient.

# %%
first = [run.train_examples[i] for i in batch_indices(len(run.train_examples), SMALL.batch_size, SMALL.seed, 0)]
batch = collate(first, run.tokenizer)
print(first[0])
print("input_ids:", batch["input_ids"][0].tolist())
print("labels:   ", batch["labels"][0].tolist())
with torch.no_grad():
    out = run.model(input_ids=batch["input_ids"], labels=batch["labels"])
    targets = batch["labels"][:, 1:]  # the logits at position i predict the token at i + 1
    scored = targets != -100
    log_p = out.logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    by_hand = -log_p[scored].mean()
print(f"{int(scored.sum())} of {scored.numel()} positions scored ({int(scored[0].sum())} a row: 12 answer tokens "
      f"and the EOS); model loss {float(out.loss):.4f}, mean -log p over them {float(by_hand):.4f}, "
      f"equal within float32 rounding: {torch.isclose(out.loss, by_hand, rtol=1e-6).item()}")

# %% [markdown]
# ## 3. The schedule
#
# The learning rate warms up linearly, then follows half a cosine down to a floor. With `lr`, `warmup_steps`,
# `steps` and `m = min_lr_ratio` from the config, at step `s` (counting from 0):
#
#     s < warmup_steps:   lr * (s + 1) / warmup_steps
#     otherwise:          lr * (m + (1 - m) * 0.5 * (1 + cos(pi * progress)))
#                         progress = (s - warmup_steps) / max(1, steps - 1 - warmup_steps)
#
# The first step trains at `lr / warmup_steps` (not 0, which would waste it), the last warm-up step and the first
# cosine step at `lr`, the last step, `steps - 1`, at `lr * m`. The `max(1, ...)` covers a cosine of a single
# step. A warm-up keeps the first updates small while AdamW's second moment, estimated from few gradients, is
# still noisy; the decay lets the last steps settle.
#
# Write it in this order of operations: `check_training_step` compares weights bit for bit, and a rearranged
# formula changes the last bits of the rate.

# %%
def learning_rate(config, step):
    """The rate of step `step` (from 0): a linear warm-up over warmup_steps, then a cosine to lr * min_lr_ratio."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in learning_rate")


# %%
lr_ok = check_learning_rate(learning_rate)

# %%
if lr_ok:
    steps = (0, 1, 3, 4, 10, 19)
    print(f"SMALL's schedule at steps {steps}:", [f"{learning_rate(SMALL, s):.2e}" for s in steps])
else:
    print("run this cell after check_learning_rate prints OK")

# %% [markdown]
# ## 4. Why each line of the step
#
# One optimizer step, with `k = grad_accum` micro-batches:
#
# 1. set every param group's `lr` to `learning_rate(config, run.step)`;
# 2. for each micro-batch: its batch (section 2), a forward pass with labels, `(loss / k).backward()`;
# 3. clip the gradient norm of the trainable parameters to `max_grad_norm` (when it is > 0);
# 4. `run.optimizer.step()`, then `run.optimizer.zero_grad(set_to_none=True)`;
# 5. `run.step += 1`, and append the mean of the k losses (a float) to `run.losses`.
#
# **Why micro-batches, and why `loss / k`.** `backward()` adds each micro-batch's gradient to `.grad`. With every
# loss divided by k, the sum is the gradient of the mean loss over all k micro-batches: the step of one batch k
# times larger, with the activations of only one micro-batch in memory at a time. (Every answer here has 13
# scored tokens, so the mean of the micro-batches' means is the mean over all their tokens. With answers of
# different lengths it weighs the tokens a little unequally.) The two micro-batches of step 0, as one batch of 16
# and accumulated:

# %%
def gradients(batches, scale, max_norm=None, clip_each=False):
    """The trainable gradients after backward() on loss * scale of each batch in turn (clipped to max_norm after
    each batch, or once at the end); the .grad fields are emptied again afterwards."""
    for b in batches:
        (run.model(input_ids=b["input_ids"], labels=b["labels"]).loss * scale).backward()
        if max_norm is not None and clip_each:
            nn.utils.clip_grad_norm_(run.trainable, max_norm)
    if max_norm is not None and not clip_each:
        nn.utils.clip_grad_norm_(run.trainable, max_norm)
    grads = torch.cat([p.grad.reshape(-1) for p in run.trainable])
    run.optimizer.zero_grad(set_to_none=True)
    return grads


ids = [batch_indices(len(run.train_examples), SMALL.batch_size, SMALL.seed, index) for index in (0, 1)]
micro = [collate([run.train_examples[i] for i in part], run.tokenizer) for part in ids]
whole = collate([run.train_examples[i] for part in ids for i in part], run.tokenizer)
one_batch = gradients([whole], 1.0)
accumulated = gradients(micro, 1 / 2)
summed = gradients(micro, 1.0)
same = torch.allclose(accumulated, one_batch, rtol=0, atol=1e-5 * one_batch.abs().max().item())
print(f"gradient norm, one batch of 16: {one_batch.norm():.4f}; two micro-batches of 8, loss / 2: "
      f"{accumulated.norm():.4f} (equal within 1e-5 of the largest gradient: {same})")
print(f"without the / 2: norm {summed.norm():.4f}, {float(summed.norm() / one_batch.norm()):.4f} times as large")

# %% [markdown]
# Equal up to float32 rounding: the same sums, grouped differently (how many bits differ depends on the CPU). Without the `/ k`, the gradient is k
# times too large. AdamW nearly forgives that: it divides by the root of the second moment, so a gradient scaled
# by k gives almost the same update (only eps tells them apart), which is why the mistake survives in real code.
# The clipping does not forgive it: its threshold applies to k times the true gradient, so a run clips more the
# more it accumulates, and `grad_accum`, which should only trade memory for time, changes the training. A first
# AdamW step (lesson 7's update) from each gradient, and what clipping at `SMALL.max_grad_norm` = 1.0 does to each:

# %%
def first_adamw_update(g):
    p, m, v = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
    adamw_update_(p, g, m, v, 1, SMALL.lr, 0.9, 0.999, 1e-8, 0.0)
    return p


update, update_doubled = first_adamw_update(accumulated), first_adamw_update(summed)
print(f"first AdamW update from the gradient and from twice it: they differ by "
      f"{float((update_doubled - update).norm() / update.norm()):.2%} of the update's norm")
for name, g in (("with / 2", accumulated), ("without", summed)):
    print(f"{name:>8}: norm {g.norm():.4f}, clipping at 1.0 scales it by {min(1.0, 1.0 / float(g.norm())):.4f}")
#
# Both gradients exceed the threshold here and are clipped to the same norm, 1.0. A step whose true gradient
# norm lay between 0.5 and 1.0 would be clipped only without the `/ 2`.
#
# **Why clip after the last micro-batch.** `clip_grad_norm_(params, max_norm)` scales all the gradients by one
# factor, `max_norm / ||g||` when the joint norm `||g||` exceeds `max_norm`. It is meant for the step's gradient.
# Clipping the partial sum after each micro-batch scales the first micro-batch's share by a different factor than
# the second's: the direction changes, and depends on `grad_accum` again. At a threshold of 0.4, below the
# micro-batch gradients' norms:

# %%
reference = gradients([whole], 1.0, max_norm=0.4)
after = gradients(micro, 1 / 2, max_norm=0.4)
each = gradients(micro, 1 / 2, max_norm=0.4, clip_each=True)
cosine = float(each @ reference / (each.norm() * reference.norm()))
tolerance = 1e-5 * reference.abs().max().item()
print(f"the batch of 16, clipped to 0.4: norm {reference.norm():.4f}")
print(f"clipped once after both micro-batches: equal within 1e-5 of the largest gradient: "
      f"{torch.allclose(after, reference, rtol=0, atol=tolerance)}")
print(f"clipped after each micro-batch: max |difference| {(each - reference).abs().max():.1e}, "
      f"norm {each.norm():.4f}, cosine with the batch's direction {cosine:.4f}")

# %% [markdown]
# **Why `zero_grad(set_to_none=True)` after the step.** `backward()` adds to `.grad`; nothing empties it but
# you. A step that left its gradients would add them to the next step's, a mistake that stays silent, since the
# loss still goes down. `set_to_none=True` frees the gradient tensors instead of filling them with zeros: between
# steps (during an evaluation or a checkpoint) they take no memory, and the next `backward()` allocates them anew
# rather than adding to zeros. Here that is little; with r = 16 adapters on every linear layer of Llama-2-7B it is
# the float32 gradients of every adapter (computed below). Zeroing at the start of the step works too; lesson 8's
# `train_step` empties them at the end so that nothing is held between steps.

# %%
once = gradients(micro[:1], 1.0)
for _ in range(2):  # two backward passes of the same micro-batch, without emptying .grad in between
    run.model(input_ids=micro[0]["input_ids"], labels=micro[0]["labels"]).loss.backward()
twice = torch.cat([p.grad.reshape(-1) for p in run.trainable])
print(f"after two backward passes, .grad is twice one pass's gradient: {torch.equal(twice, 2 * once)}")
held = sum(p.grad.nbytes for p in run.trainable)
run.optimizer.zero_grad(set_to_none=True)
print(f"gradients held: {held:,d} bytes; after zero_grad(set_to_none=True): "
      f"{sum(p.grad.nbytes for p in run.trainable if p.grad is not None):,d} bytes, .grad is {run.trainable[0].grad}")
llama7b = PRESETS["Llama-2-7B"]
adapters_7b = llama7b.num_hidden_layers * sum(16 * (i + o) for i, o in llama7b.linear_shapes().values())
print(f"Llama-2-7B, r = 16 on every linear layer: {adapters_7b:,d} adapter gradients, {4 * adapters_7b / 1e6:.0f} MB "
      f"in float32")

# %% [markdown]
# ## 5. Write it
#
# Use your `learning_rate` from section 3 and the imported `batch_indices` and `collate`. The run is on the CPU
# in float32 here; `train_step` also handles the two cases this exercise leaves out: autocast (`run.autocast()`,
# for full fine-tuning in 16 bits) and float16's gradient scaler (`run.scaler`, on a T4).

# %%
def training_step(run):
    """One optimizer step of `run`: schedule, grad_accum micro-batches, clipping, AdamW; returns the mean loss."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in training_step")


# %%
step_ok = check_training_step(training_step)

# %% [markdown]
# ## 6. Your step trains
#
# 20 steps of `SMALL` with your `training_step`, and 20 with `train_step`, each from a fresh `setup` (no dropout
# here, so the random state plays no part):

# %%
if step_ok:
    yours, library = setup(SMALL), setup(SMALL)
    for _ in range(SMALL.steps):
        training_step(yours)
        train_step(library)
    print("loss at steps 1, 5, 10, 15, 20:", [round(yours.losses[s - 1], 3) for s in (1, 5, 10, 15, 20)])
    same = sum(a == b for a, b in zip(yours.losses, library.losses))
    adapters = all(torch.equal(a, b) for a, b in zip(yours.trainable, library.trainable))
    print(f"losses equal to train_step's, bit for bit: {same} of {SMALL.steps}; adapters equal: {adapters}")
else:
    print("run this cell after check_training_step prints OK")

# %% [markdown]
# 320 examples in 20 steps take the loss on the answers from about 3.3 nats a token to about 1.4; lesson 8's runs
# (150 steps of 32) go on until the model writes the dates exactly.
#
# ## 7. What the checker catches
#
# `train_step` itself, with the optimizer's `zero_grad` turned into a no-op for the step (no code from you): the
# gradients of step 1 stay in `.grad`, and step 2 adds its own to them. Step 1 is right; the checker stops at
# step 2, names the first tensor whose gradient differs, and why.

# %%
def train_step_keeping_gradients(run):
    """qlora_ref's train_step with run.optimizer.zero_grad disabled during the step."""
    zero_grad = run.optimizer.zero_grad
    run.optimizer.zero_grad = lambda set_to_none=True: None
    try:
        return train_step(run)
    finally:
        run.optimizer.zero_grad = zero_grad


_ = check_training_step(train_step_keeping_gradients)

# %% [markdown]
# ## Summary
#
# - A training step is short: the rate from the schedule, k micro-batches of forward and `backward()` on
#   `loss / k`, one clip of the joint gradient norm, one optimizer step, then empty `.grad` and count the step.
# - The loss is the mean -log p of the answer's tokens only (labels -100 on the prompt).
# - Dividing by k makes the accumulated gradient that of one batch k times larger (equal up to float32 rounding);
#   clipping after the last micro-batch keeps it so, clipping each partial sum does not.
# - `zero_grad(set_to_none=True)` after the step: the next step starts from nothing, and no gradient memory is
#   held in between.
# - Batches that are a pure function of (seed, step) and one step that changes the run only through the
#   optimizer are what let lesson 8's checkpoints resume bit for bit.
#
# **Questions**
# 1. With `grad_accum = 4` and `batch_size = 8`, which batch indices does step 10 use? Which examples would a run
#    resumed at step 10 from a checkpoint see?
# 2. Section 4 found the accumulated gradient equal to the batch's only up to rounding. Which sums are grouped
#    differently?
# 3. Section 4 found AdamW's first update nearly unchanged by a gradient twice as large, and both gradients clipped
#    to the same norm. At which steps does forgetting `/ k` still change the run, and how?
# 4. `run.losses` holds `loss.item()`, a float. What would it keep alive if it held the loss tensors instead?
# 5. Why does the first step train at `lr / warmup_steps` and not at 0? What would a step at lr 0 do to AdamW's
#    moments?
