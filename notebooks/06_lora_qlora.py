# %% [markdown]
# # Lesson 6 — LoRA and the QLoRA linear layer
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/06_lora_qlora.ipynb)
#
# Lessons 2-4 stored a weight matrix in about 4.127 bits per weight: NF4 codes, one absmax per block of 64,
# and double-quantized absmax values. A 4-bit weight cannot be trained: there is no small step from one
# code to the next. QLoRA (Dettmers et al. 2023) does not train it: it freezes the quantized base weight and
# trains a small low-rank correction next to it, LoRA (Hu et al. 2021). This lesson builds that layer.
#
# **What you will learn**
# - LoRA's maths: W = W0 + (alpha/r) B A, drawn and then written out; why B starts at zero, how A is
#   initialised, what alpha/r does when you change r, and why a low rank is enough;
# - how few parameters train, for one 4096 × 4096 layer and a Llama-2-7B-shaped model;
# - how `QLoRALinear` holds its base weight (NF4 codes, no dense copy) and the autograd function that
#   dequantizes it in the forward *and again* in the backward;
# - how to check the gradients, and why `torch.autograd.gradcheck` cannot be used on the layer directly;
# - the memory of one layer, and saving, loading (PEFT) and merging adapters.
#
# **Prerequisites:** lessons 3 and 4 (`quantize_4bit`, double quantization) and PyTorch autograd.
#
# **Sources:** LoRA: Hu et al. 2021 (arXiv:2106.09685). QLoRA: Dettmers et al. 2023 (arXiv:2305.14314),
# sections 2-3. PEFT (huggingface/peft) for the initialisation and the file format; bitsandbytes'
# `Linear4bit` / `MatMul4Bit` for the 4-bit layer.

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/lora.py`, `qlora_ref/adapters.py`. For its
# demonstrations it also uses `qlora_ref/plots/lora.py`, `qlora_ref/llama.py`, `qlora_ref/tasks.py`.

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
import json
import math
import tempfile
import warnings
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
import torch.nn.functional as F
import transformers
from IPython.display import display
from safetensors import safe_open
from torch import nn

import qlora_ref
from qlora_ref import (
    LoRALinear,
    QLoRALinear,
    dequantize_4bit,
    merge_adapters,
    prepare_model,
    quantize_4bit,
    save_adapters,
)
from qlora_ref.compare import compare
from qlora_ref.llama import LlamaForCausalLM
from qlora_ref.lora import DequantizeMatmul
from qlora_ref.plots.lora import lora_diagram, spectrum_figure
from qlora_ref.tasks import collate, date_task

transformers.logging.set_verbosity_error()  # no download or deprecation chatter in the outputs
warnings.filterwarnings("ignore", category=FutureWarning)
_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
print("torch", torch.__version__, "| bitsandbytes", bnb.__version__, "| peft", peft.__version__,
      "| transformers", transformers.__version__)

# %% [markdown]
# ## 1. LoRA: a frozen weight plus a low-rank correction
#
# A linear layer computes y = x W0^T + b with W0 of shape [out, in]. Fine-tuning would change all
# out × in entries. LoRA keeps W0 frozen and learns a correction that is the product of two thin matrices,
# B (out × r) times A (r × in). Drawn to scale for a 64 × 64 layer and r = 8:

# %%
fig, _ = lora_diagram(out_features=64, in_features=64, r=8)
display(fig)

# %% [markdown]
# The grey square never changes. Only the two thin strips train, and their product B A is a full 64 × 64
# matrix again, but one of rank at most 8. As a formula:
#
# $$W = W_0 + \frac{\alpha}{r} B A, \qquad A: [r, \text{in}], \quad B: [\text{out}, r], \quad r \ll \min(\text{in}, \text{out})$$
#
# so y = x W0^T + b + (alpha/r) (x A^T) B^T. The product B A has rank at most r. In code, A and B are
# two small `nn.Linear` layers without bias, `lora_A` (in → r) and `lora_B` (r → out), named as in PEFT.
# The layer multiplies by A, then by B; it never forms the [out, in] matrix B A.
#
# A layer of 256 inputs and 128 outputs with r = 8 and alpha = 16:

# %%
IN, OUT, R, ALPHA = 256, 128, 8, 16
base = nn.Linear(IN, OUT)
lora = LoRALinear(base, r=R, alpha=ALPHA)
for name, p in lora.named_parameters():
    print(f"{name:14s} {str(list(p.shape)):11s} requires_grad={p.requires_grad}")
print(f"scaling = alpha / r = {ALPHA} / {R} = {lora.scaling}")

# %% [markdown]
# Only `lora_A` and `lora_B` train: 8 × 256 + 128 × 8 = 3,072 numbers instead of the 32,896 of the
# weight and bias.
#
# **B starts at zero.** Then B A = 0, and the layer computes exactly what the base computed: training
# starts from the pretrained model, not from a perturbed one. Not approximately: the correction term is
# a product with an all-zero matrix, which is exactly 0.

# %%
x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    print("nonzero entries of B:", torch.count_nonzero(lora.lora_B.weight).item())
    _ = compare("LoRA layer at init vs the base layer", lora(x), base(x))

# %% [markdown]
# **A starts random**, or B would never receive a gradient (dL/dB = (alpha/r) g^T (x A^T) is zero when
# A is). PEFT initialises A like a fresh `nn.Linear`: `kaiming_uniform_(A, a=sqrt(5))`. Kaiming's uniform
# init draws from U(-bound, bound) with
#
# gain = sqrt(2 / (1 + a²)) = sqrt(2/6) = 1/sqrt(3), std = gain / sqrt(fan_in), bound = sqrt(3) · std = 1 / sqrt(fan_in).
#
# With fan_in = in = 256 the bound is 1/16:

# %%
a = math.sqrt(5)
gain = math.sqrt(2 / (1 + a**2))
bound = math.sqrt(3) * gain / math.sqrt(IN)
A = lora.lora_A.weight.detach()
print(f"gain {gain:.4f}, bound {bound:.6f} (1/sqrt({IN}) = {1 / math.sqrt(IN):.6f})")
print(f"A: min {A.min():+.6f}, max {A.max():+.6f}, std {A.std():.5f} (uniform: bound/sqrt(3) = {bound / math.sqrt(3):.5f})")

# %% [markdown]
# (The LoRA paper says "random Gaussian initialization for A"; PEFT's default, and this course's, is the
# uniform one above. Both are zero-mean with a std of order 1/sqrt(in); B = 0 is what matters for the start.)
#
# ### The scale alpha/r
#
# Why multiply by alpha/r instead of letting B absorb any scale? Because of what happens when you change r.
# LoRA is trained with Adam, and Adam's first step moves every entry of B by about lr, whatever the size
# of its gradient (the update is lr · m/sqrt(v), and at step 1 that is lr · sign(gradient)). At the first
# step only B moves: dL/dA = (alpha/r) B^T g^T x is zero while B is. Each output of B A is a sum of r such
# steps times the entries of A, so without the scale the size of the first update grows with r. The LoRA
# paper divides by r, and then "tuning alpha is roughly the same as tuning the learning rate" and
# one alpha can be kept when r changes (Hu et al., section 4.1).
#
# Measured: one Adam step (lr 1e-3) on a mean-squared-error loss, from the same base, at r = 8 and
# r = 64, with the scale alpha/r (alpha = 16), with rsLoRA's alpha/sqrt(r) (below), and with no scale
# (s = 1). The size of the update is the change of the outputs on the training inputs, relative to the
# outputs, averaged over 10 draws of the data and of A.

# %%
def first_step_change(r, scaling, batch, seed):
    """Relative change of the outputs on the training batch after one Adam step from LoRA's init."""
    g = torch.Generator().manual_seed(seed)
    xb, target = torch.randn(batch, 512, generator=g), torch.randn(batch, 512, generator=g)
    torch.manual_seed(1000 + seed)
    layer = LoRALinear(step_base, r=r, alpha=ALPHA)
    layer.scaling = scaling  # overrides alpha/r for the other rows
    opt = torch.optim.Adam([layer.lora_A.weight, layer.lora_B.weight], lr=1e-3)
    with torch.no_grad():
        before = layer(xb)
    F.mse_loss(layer(xb), target).backward()
    opt.step()
    with torch.no_grad():
        return ((layer(xb) - before).norm() / before.norm()).item()


torch.manual_seed(4)
step_base = nn.Linear(512, 512, bias=False)
print("                           one example                32 examples")
print("scale             r=8      r=64   64 vs 8       r=8      r=64   64 vs 8")
for label, scale in [("alpha/r", lambda r: ALPHA / r), ("alpha/sqrt(r)", lambda r: ALPHA / math.sqrt(r)),
                     ("none (s = 1)", lambda r: 1.0)]:
    row = []
    for batch in (1, 32):
        c8, c64 = (sum(first_step_change(r, scale(r), batch, seed) for seed in range(10)) / 10 for r in (8, 64))
        row.append(f"{c8:7.3g}  {c64:7.3g}  {c64 / c8:6.2f}x")  # 3 digits: the float32 sums differ by CPU beyond
    print(f"{label:14s}  " + "    ".join(row))

# %% [markdown]
# Without a scale, going from r = 8 to r = 64 makes the first update 9.6 times larger on one example
# (close to 64/8: the r terms all push that example's output the same way and add up) and 4.1 times
# larger over 32 examples (there they add up less coherently). With alpha/r the factors are 1.2 and 0.5:
# the step stays within a factor of 2 while r grows 8-fold, so a learning rate tuned at one rank stays
# sensible at another. No fixed power of r makes it exactly flat for every batch. Over a batch alpha/r
# over-corrects (the update shrinks with r); that is the argument of rank-stabilized LoRA (Kalajdzievski
# 2023, arXiv:2312.03732), which scales by alpha/sqrt(r) (PEFT: `use_rslora=True`) and here gives 3.4
# and 1.45. This course uses the original alpha/r, PEFT's default.

# %% [markdown]
# ### Why a low rank is enough
#
# A rank-r product can only hold an update that is close to rank r. Is a real fine-tuning update like that?
# Measure one: fully fine-tune the course's small pretrained model (lesson 8's base, 4 layers, hidden size
# 128) on lesson 8's date task, every weight free, for 30 AdamW steps, in float64 so that every CPU computes
# the same. Then take each weight's change, W_ft - W0, and ask how much of it (its energy: the sum of its
# squared entries) the top r singular values hold. By the Eckart-Young theorem that share is exactly what the
# best rank-r matrix can capture. A random matrix of the same shape is the comparison: its energy is spread
# over all directions.

# %%
torch.manual_seed(0)
pretrained = LlamaForCausalLM.from_pretrained().double()
start = {name: p.detach().clone() for name, p in pretrained.named_parameters()}
dates, _ = date_task(n_train=32 * 30, n_eval=0)
full_ft = torch.optim.AdamW(pretrained.parameters(), lr=1e-3, weight_decay=0.0)
for step in range(30):
    loss = pretrained(**collate(dates[32 * step:32 * (step + 1)])).loss
    full_ft.zero_grad()
    loss.backward()
    full_ft.step()
print(f"full fine-tuning, 30 steps: loss {loss.item():.1f}")
q_proj = "model.layers.1.self_attn.q_proj.weight"
deltas = {"q_proj update, W_ft - W0": dict(pretrained.named_parameters())[q_proj].detach() - start[q_proj],
          "random 128 x 128": torch.randn(128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
fig, shares = spectrum_figure(deltas)
for name, share in shares.items():
    print(f"{name:25s} " + ", ".join(f"top {k}: {v:.0%}" for k, v in share.items()))
display(fig)

# %% [markdown]
# The update is far from random: its top 8 directions hold most of it, the random matrix's top 8 about a
# fifth. The other weights of the model look the same (try another name). LoRA's bet is that this holds for
# large models too, and Hu et al. tested it on GPT-3 (their section 7.2): adapting the attention weights with
# a rank as small as 1 already performed competitively. A rank-r
# adapter does not copy this update, it learns its own within rank r; the spectrum only says that the change
# a task asks for lives in few directions.
#
# ## 2. How many parameters train
#
# A LoRA adapter on an [out, in] layer has r · (in + out) parameters, against out · in for the weight.
# For one 4096 × 4096 projection:

# %%
for r in (8, 16, 64):
    n = r * (4096 + 4096)
    print(f"r = {r:2d}: {n:>9,} trainable of {4096 * 4096:,} weights = {n / 4096**2:.3%}")

# %% [markdown]
# A Llama-2-7B-shaped model has 32 decoder layers, each with seven linear layers: the attention
# projections q, k, v, o (4096 → 4096) and the MLP's gate and up (4096 → 11008) and down (11008 → 4096).
# QLoRA puts adapters on all of them ("all-linear"; the output head and the embeddings stay out).
# From the shapes alone:

# %%
HIDDEN, INTER, LAYERS, VOCAB = 4096, 11008, 32, 32000
shapes = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, HIDDEN), "v_proj": (HIDDEN, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
          "down_proj": (INTER, HIDDEN)}  # (in, out)
linear_weights = LAYERS * sum(i * o for i, o in shapes.values())
other = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # embeddings + output head, RMSNorm weights
print(f"linear weights in the decoder layers: {linear_weights:,}; with embeddings, head and norms: "
      f"{linear_weights + other:,}")
for r in (8, 16, 64):
    lora_params = LAYERS * sum(r * (i + o) for i, o in shapes.values())
    print(f"r = {r:2d}: {lora_params:>11,} LoRA parameters = {lora_params / linear_weights:.3%} of the linear "
          f"weights, {lora_params / (linear_weights + other):.3%} of the model")

# %% [markdown]
# 6,738,415,616 is the "7B" of Llama-2-7B. At r = 16 about 40 million numbers train, 0.59% of the model.
# `prepare_model` does this surgery on a real model: it replaces every targeted `nn.Linear` by a LoRA
# layer (`quantize=True`: a `QLoRALinear`, section 3) and freezes everything else. It can count the 7B
# model without allocating it: built on PyTorch's `meta` device, tensors have shapes but no memory.
# Its summary is PEFT's `print_trainable_parameters()` line, whose "all params" includes the adapters:

# %%
config_7b = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=VOCAB)
with torch.device("meta"):
    llama_7b = transformers.LlamaForCausalLM(config_7b)
print(f"parameters of the meta model: {sum(p.numel() for p in llama_7b.parameters()):,}")
print(prepare_model(llama_7b, r=16, alpha=32, target_modules="all-linear"))
del llama_7b

# %% [markdown]
# The same on a model that runs: a tiny Llama with random weights, built from a config (nothing is
# downloaded): hidden size 64, 2 layers, a vocabulary of 128. PEFT counts the same numbers.

# %%
def tiny_llama(seed=0):
    """The same small random LlamaForCausalLM for the same seed."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


model = tiny_llama()
summary = prepare_model(model, r=4, alpha=8, target_modules="all-linear")
print(summary)
reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
print("PEFT (trainable, all):", reference.get_nb_trainable_parameters(), "| ours:", (summary.trainable, summary.total))
print("LoRA layers:", sum(isinstance(m, LoRALinear) for m in model.modules()), "| mlp.gate_proj is now a",
      type(model.model.layers[0].mlp.gate_proj).__name__)

# %% [markdown]
# ## 3. Building QLoRALinear: the base only as NF4 codes
#
# QLoRA's layer is the LoRA layer with W0 replaced by its NF4 quantization W0^ (blocks of 64, double
# quantization: lessons 3-4). The adapters stay in 16 or 32 bits and train as before. `QLoRALinear`
# quantizes the base weight once, in its constructor, and keeps only the results, as **buffers** (saved
# in the state_dict, moved by `.to(device)`, never trained):

# %%
IN, OUT = 512, 256
torch.manual_seed(5)
base = nn.Linear(IN, OUT)
qlayer = QLoRALinear(base, r=R, alpha=ALPHA)  # nf4, blocksize 64, double_quant=True by default
print("buffers:")
for name, buf in qlayer.named_buffers():
    print(f"  {name:14s} {str(list(buf.shape)):10s} {str(buf.dtype):14s} {buf.numel() * buf.element_size():>7,} bytes")
print("parameters:")
for name, p in qlayer.named_parameters():
    print(f"  {name:14s} {str(list(p.shape)):10s} {str(p.dtype):14s} requires_grad={p.requires_grad}")

# %% [markdown]
# `weight_packed` holds 131,072 codes two per byte; `absmax` one 8-bit code per block of 64 (2,048
# blocks); `absmax_offset` and `absmax2` (one float32 per 256 absmax codes) undo the second
# quantization; `code` and `code2` are the NF4 table and the 8-bit dynamic map. No tensor of the layer
# has out × in floating-point values: the dense weight is gone once the constructor returns.

# %%
held = list(qlayer.parameters()) + list(qlayer.buffers())
print("floating-point tensors with out*in =", OUT * IN, "values:",
      [tuple(t.shape) for t in held if t.is_floating_point() and t.numel() == OUT * IN])
W_hat = qlayer.base_weight()  # a fresh dequantization, for the checks below
_ = compare("base_weight() vs dequantize_4bit(quantize_4bit(W0))", W_hat,
            dequantize_4bit(*quantize_4bit(base.weight.detach(), double_quant=True)))
print(f"W0^ differs from W0 by {(W_hat - base.weight).double().abs().mean():.5f} on average "
      f"(|W0| averages {base.weight.double().abs().mean():.5f})")

# %% [markdown]
# ### The autograd function
#
# The forward needs W0^ as a dense matrix for one product, and so does the backward:
# dL/dx = dL/dy · W0^. Plain autograd would *save* the dense W0^ between the two, and then a 4-bit
# model would hold its 16-bit weights during training after all. So the matmul is a custom
# `torch.autograd.Function` that saves only the codes and dequantizes again in the backward. W0^ gets no
# gradient: `backward` returns `None` for the codes and their state.
#
# One of the course's seed documents gets this backwards: it says that "the 4-bit weights ... are discarded
# immediately after the calculation". The 4-bit codes are never discarded: they are the model, kept for the
# whole of training. What is discarded is the dequantized 16-bit copy W0^, made for one product and freed,
# then made again in the backward. Written out, without the bias:

# %%
class MyDequantizeMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state):
        W = dequantize_4bit(packed, state).to(x.dtype)  # [out, in], a temporary: freed when forward returns
        ctx.state = state
        ctx.save_for_backward(packed)  # save the 4-bit codes, not W
        return F.linear(x, W)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        W = dequantize_4bit(packed, ctx.state).to(grad_out.dtype)  # dequantize again
        return grad_out @ W, None, None  # dL/dx; nothing for the codes or the state


x = torch.randn(3, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
mine = MyDequantizeMatmul.apply(x, qlayer.weight_packed, qlayer.quant_state())
(grad_mine,) = torch.autograd.grad(mine.sum(), x)
theirs = DequantizeMatmul.apply(x, qlayer.weight_packed, qlayer.quant_state(), None)  # the library's
(grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
_ = compare("forward, mine vs qlora_ref.lora.DequantizeMatmul", mine, theirs)
_ = compare("dL/dx,  mine vs qlora_ref.lora.DequantizeMatmul", grad_mine, grad_theirs)

# %% [markdown]
# The library's `DequantizeMatmul` adds the bias (and its gradient, if one is asked for). This is what
# bitsandbytes' `MatMul4Bit` does. The LoRA branch could be ordinary autograd through `lora_A` and
# `lora_B`, added to the output. `QLoRALinear` goes one step further with `qlora_ref.lora.LoRAMatmul`:
# one autograd node for the base *and* the adapters, whose backward is the formulas of section 1. Plain
# autograd would write s · B(A(x)) as a [tokens, out] tensor, add it to y, and in the backward scale
# dL/dy and read it again: four passes over the largest tensor of the layer. The node adds the low-rank
# product inside the GEMM instead (`addmm`, in place). On a GPU this matters (section 7); on a CPU the
# numbers are the same.
#
# What does autograd keep between forward and backward? `saved_tensors_hooks` sees every tensor saved:

# %%
saved = []
with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
    y = qlayer(x)
for t in saved:
    print(f"saved: {str(list(t.shape)):10s} {t.dtype}")
print("any dense [out, in] weight saved:", any(t.is_floating_point() and t.numel() == OUT * IN for t in saved))

# %% [markdown]
# The codes (uint8, 65,536 bytes), and for the LoRA branch its input x, the weights of A and B and x A^T.
# After a backward pass the adapters have gradients and the base has none:

# %%
y.sum().backward()
print("lora_A.weight.grad:", tuple(qlayer.lora_A.weight.grad.shape), "| lora_B.weight.grad:", tuple(qlayer.lora_B.weight.grad.shape))
print("weight_packed.grad:", qlayer.weight_packed.grad, "| bias.grad:", qlayer.bias.grad)
print(f"|grad A| = {qlayer.lora_A.weight.grad.abs().max():.1f} (B = 0, so dL/dA = 0 at init), "
      f"|grad B| = {qlayer.lora_B.weight.grad.abs().max():.3f}")

# %% [markdown]
# ## 4. Checking the gradients
#
# At init B = 0 hides every term that goes through B (dL/dA above is zero). For the checks, A and B get
# random values. The loss is sum(y · G) with a fixed random G, so that dL/dy = G, and x has two leading
# dimensions, [2, 5, in], like a batch of sequences. We compare the output and the gradients of x, A and B.

# %%
with torch.no_grad():
    gen = torch.Generator().manual_seed(7)
    qlayer.lora_A.weight.copy_(torch.randn(R, IN, generator=gen) * 0.1)
    qlayer.lora_B.weight.copy_(torch.randn(OUT, R, generator=gen) * 0.1)
X = torch.randn(2, 5, IN, generator=gen)
G = torch.randn(2, 5, OUT, generator=gen)


def run(layer, x):
    """Output and the gradients of x, A and B for the loss sum(layer(x) * G)."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    (y * G).sum().backward()
    return {"output": y.detach(), "grad x": x.grad, "grad A": layer.lora_A.weight.grad, "grad B": layer.lora_B.weight.grad}


ours = run(qlayer, X)

# %% [markdown]
# **Reference 1: a dense fp32 LoRA layer on the dequantized weight.** An ordinary `nn.Linear` holding
# W0^, wrapped in `LoRALinear` with copies of A and B, differentiated by plain autograd. It performs
# the same float32 operations in the same order, so the results must be equal bit for bit:

# %%
dense = nn.Linear(IN, OUT)
with torch.no_grad():
    dense.weight.copy_(qlayer.base_weight())
    dense.bias.copy_(qlayer.bias)
dense_lora = LoRALinear(dense, r=R, alpha=ALPHA)
dense_lora.load_state_dict({"lora_A.weight": qlayer.lora_A.weight, "lora_B.weight": qlayer.lora_B.weight}, strict=False)
for name, value in run(dense_lora, X).items():
    _ = compare(f"{name:6s} QLoRALinear vs dense fp32 LoRA on W0^", ours[name], value)

# %% [markdown]
# **Reference 2: the formulas, in float64.** With s = alpha/r and the leading dimensions flattened
# (X: [N, in], G: [N, out]):
#
# y = X W0^T + b + s (X A^T) B^T, dL/dx = G W0^ + s G B A, dL/dA = s B^T G^T X, dL/dB = s G^T (X A^T).
#
# Computed in float64 from the same (float32) values, these are the true gradients up to float64
# rounding; ours can differ only by float32 rounding, about 1e-7 relative:

# %%
W64, A64, B64 = (t.detach().double() for t in (qlayer.base_weight(), qlayer.lora_A.weight, qlayer.lora_B.weight))
b64, X64, G64, s = qlayer.bias.double(), X.reshape(-1, IN).double(), G.reshape(-1, OUT).double(), qlayer.scaling
formulas = {
    "output": (X64 @ W64.T + b64 + s * (X64 @ A64.T) @ B64.T).reshape(2, 5, OUT),
    "grad x": (G64 @ W64 + s * G64 @ B64 @ A64).reshape(2, 5, IN),
    "grad A": s * B64.T @ G64.T @ X64,
    "grad B": s * G64.T @ (X64 @ A64.T),
}
for name, value in formulas.items():
    _ = compare(f"{name:6s} QLoRALinear vs float64 formulas", ours[name], value, atol=1e-6 * value.abs().max().item())

# %% [markdown]
# The tolerance is relative to the *largest* value, not to each value: a float32 sum rounds at the size
# of its terms, so an entry that is small because its terms cancel (grad A and grad B have such entries)
# keeps an absolute error of that size, which is large relative to the entry itself. How far inside the
# tolerance they land depends on the order in which the BLAS adds, so on the CPU and the number of threads;
# here (the output depends on the machine) all four are a few float32 roundings away (float32 eps is 1.2e-7):

# %%
# NBVAL_IGNORE_OUTPUT
for name, value in formulas.items():
    print(f"{name:6s} largest |diff| / largest |value| = {(ours[name].double() - value).abs().max().item() / value.abs().max().item():.1e}")
#
# **Why not `torch.autograd.gradcheck`?** It compares autograd's gradients with finite differences,
# (f(θ + ε) - f(θ - ε)) / 2ε with ε = 1e-6, and it wants float64 inputs. In float32 each f is rounded to
# about 7 significant digits, so the difference of two nearly equal values keeps almost none of them:
# the quotient's error is about (float32 eps · |f|) / ε ≈ 1e-7 · |f| / 1e-6 = 0.1 · |f|, as large as the
# gradient itself or larger. Measured on one entry of A, with the loss of the layer above:

# %%
def loss_at(delta, dtype):
    """sum(y * G) with A[0, 0] moved by delta, computed in `dtype` from the formulas."""
    A_ = A64.clone()
    A_[0, 0] += delta
    Wd, Ad, Bd, bd, Xd, Gd = (t.to(dtype) for t in (W64, A_, B64, b64, X64, G64))
    return ((Xd @ Wd.T + bd + s * (Xd @ Ad.T) @ Bd.T) * Gd).sum().item()


eps, true = 1e-6, formulas["grad A"][0, 0].item()
loss = loss_at(0.0, torch.float64)
spacing = torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(abs(loss)))  # between float32s near the loss
fd64 = (loss_at(eps, torch.float64) - loss_at(-eps, torch.float64)) / (2 * eps)
print(f"the gradient: {true:+.4f}; float64 finite difference {fd64:+.4f}, within 1e-6 of it: {abs(fd64 - true) < 1e-6}")
print(f"the loss: {loss:.2f}; float32 numbers near it are {spacing:.1e} apart, while the change 2 ε · gradient is "
      f"{2 * eps * true:.1e}")
print(f"so a float32 finite difference is a whole number of steps of {spacing / (2 * eps):.2f}: the gradient is "
      f"{true / (spacing / (2 * eps)):.2f} of them")

# %% [markdown]
# A float32 finite difference can only be 0 or a whole number of those steps: which one depends on how each loss
# rounds, so on the order of the BLAS's additions, and none of them is the gradient. Here (the output depends on
# the machine):

# %%
# NBVAL_IGNORE_OUTPUT
fd32 = (loss_at(eps, torch.float32) - loss_at(-eps, torch.float32)) / (2 * eps)
print(f"float32 finite difference {fd32:+.6f} vs the gradient {true:+.6f}")

# %% [markdown]
# So gradcheck has to run in float64, and `QLoRALinear` computes only in float32, bfloat16 or float16
# (the dtypes of training). The layer is therefore checked against float64 *values* of the formulas
# instead, as above. The autograd function alone does accept a float64 input (it dequantizes to x's
# dtype), so gradcheck can check it directly on a small layer:

# %%
small = nn.Linear(48, 16)
packed_s, state_s = quantize_4bit(small.weight.detach(), double_quant=True)
x64 = torch.randn(2, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
print("gradcheck, DequantizeMatmul on float64:",
      torch.autograd.gradcheck(lambda x: DequantizeMatmul.apply(x, packed_s, state_s, None), (x64,)))

# %% [markdown]
# **Reference 3: bitsandbytes.** `bnb.nn.Linear4bit` with `quant_type="nf4"`, `compress_statistics=True`
# (double quantization) and fp32 compute is QLoRA's base layer as PEFT uses it. On a CPU it
# dequantizes and calls `F.linear`, and its backward is dL/dy · W0^, as ours. Add a LoRA branch in plain
# PyTorch with the same A and B: the output and the gradients of A and B must be equal bit for bit. dL/dx
# may differ in its last bits: ours adds s · (g B) A onto g W0^ inside one `addmm`, which accumulates onto
# the existing sum, while plain autograd rounds the two products separately and then adds them. Whether any
# bit differs depends on the BLAS and the number of threads, so dL/dx is held to 4 float32 roundings of its
# largest value:

# %%
bnb_layer = bnb.nn.Linear4bit(IN, OUT, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                              quant_type="nf4")
bnb_layer.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
bnb_layer.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
bnb_layer = bnb_layer.to("cpu")  # this quantizes the weight
_ = compare("packed NF4 bytes, ours vs bitsandbytes", qlayer.weight_packed, bnb_layer.weight.data.reshape(-1, 1))

A_ref = nn.Parameter(qlayer.lora_A.weight.detach().clone())
B_ref = nn.Parameter(qlayer.lora_B.weight.detach().clone())
x_ref = X.clone().requires_grad_(True)
y_ref = bnb_layer(x_ref) + (x_ref @ A_ref.T) @ B_ref.T * qlayer.scaling  # PEFT's order: B(A(x)) * scaling
(y_ref * G).sum().backward()
for name, value in [("output", y_ref.detach()), ("grad x", x_ref.grad), ("grad A", A_ref.grad), ("grad B", B_ref.grad)]:
    tolerance = {"atol": 4 * torch.finfo(torch.float32).eps * value.abs().max().item()} if name == "grad x" else {}
    _ = compare(f"{name:6s} QLoRALinear vs bnb Linear4bit + LoRA", ours[name], value, **tolerance)

# %% [markdown]
# ## 5. Memory of one layer
#
# One 4096 × 4096 projection (no bias, as in Llama) with r = 16 adapters in float32, every byte counted
# by `memory_breakdown()` from the layer's state_dict:

# %%
torch.manual_seed(9)
big = QLoRALinear(nn.Linear(4096, 4096, bias=False), r=16, alpha=32)
parts = big.memory_breakdown()
n = 4096 * 4096
for part, nbytes in parts.items():
    print(f"{part:14s} {nbytes:>12,} bytes  {8 * nbytes / n:7.4f} bits per base weight")
base_bytes = parts["total"] - parts["lora_A"] - parts["lora_B"]
print(f"{'4-bit base':14s} {base_bytes:>12,} bytes  {8 * base_bytes / n:7.4f} bits per base weight")
for label, bytes_per in [("bf16 nn.Linear", 2), ("fp32 nn.Linear", 4)]:
    print(f"{label:14s} {n * bytes_per:>12,} bytes  {8 * bytes_per:7.4f} bits per weight  "
          f"= {n * bytes_per / parts['total']:.2f} x the QLoRA layer")
del big

# %% [markdown]
# The frozen base costs 4.127 bits per weight (lesson 4's figure, plus 1,088 bytes of code tables that a
# real model would share between layers): 26% of bf16. The fp32 adapters add 0.25 bits per base weight at
# r = 16. What this table leaves out is training state: the adapters' gradients and Adam's two moments
# (three more arrays of the adapters' size: 2 × 65,536 values each here, 0.78% of the weight count) and
# the activations, which depend on the batch. The frozen base has neither gradients nor optimizer state, which is the point of LoRA.
#
# ## 6. Saving adapters, loading them with PEFT, merging
#
# Only A and B change in training, so only they are saved. `save_adapters` writes PEFT's format: an
# `adapter_config.json` and an `adapter_model.safetensors`. We train the tiny Llama of section 2 for two
# AdamW steps on random tokens (the first step moves B off zero; the second then moves A), and save:

# %%
tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
with torch.no_grad():
    print(f"loss before: {model(input_ids=tokens, labels=tokens).loss.item():.3f}")
for _ in range(2):
    opt.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
with torch.no_grad():
    logits_ours = model(input_ids=tokens).logits
    print(f"loss after:  {model(input_ids=tokens, labels=tokens).loss.item():.3f}")

tmp = tempfile.TemporaryDirectory()
adapter_dir = Path(tmp.name)
save_adapters(model, adapter_dir)
for path in sorted(adapter_dir.iterdir()):
    print(f"{path.name:28s} {path.stat().st_size:>7,} bytes")

# %% [markdown]
# The tensor names are those PEFT gives: `base_model.model.` + the module's path + `.lora_A.weight` or
# `.lora_B.weight`. safetensors stores raw tensors and a JSON header, nothing that runs code on loading
# (unlike a pickled `.bin`):

# %%
with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
    names = sorted(f.keys())
    print(len(names), "tensors, e.g.:")
    for name in names[:4]:
        print(f"  {name:55s} {list(f.get_slice(name).get_shape())}")
config = json.loads((adapter_dir / "adapter_config.json").read_text())
print({k: config[k] for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "target_modules")})

# %% [markdown]
# Now PEFT loads them onto a fresh base (the same random weights: the same seed) with
# `PeftModel.from_pretrained`, and computes logits. PEFT's `lora.Linear` does the same float32 operations
# as our `LoRALinear`, so the logits must be equal exactly:

# %%
loaded = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
with torch.no_grad():
    logits_peft = loaded(input_ids=tokens).logits
_ = compare("logits, ours vs PEFT with our saved adapters", logits_ours, logits_peft)
tmp.cleanup()

# %% [markdown]
# **Merging.** For inference the adapters can be folded into the weight: W = W0 + (alpha/r) B A, one
# plain `nn.Linear` per layer and no extra cost per token. `merge_adapters` does it (for a `QLoRALinear`
# the merged weight is W0^ + (alpha/r) B A in the compute dtype: the base is dequantized, the result is
# not 4-bit any more). The merged layer computes x (W0 + sBA)^T instead of x W0^T + s (x A^T) B^T: the
# same number, rounded differently, so close rather than exact:

# %%
merge_adapters(model)
print("LoRA layers left:", sum(isinstance(m, (LoRALinear, QLoRALinear)) for m in model.modules()),
      "| q_proj is now:", model.model.layers[0].self_attn.q_proj)
with torch.no_grad():
    logits_merged = model(input_ids=tokens).logits
_ = compare("logits, merged vs with adapters", logits_merged, logits_ours, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## 7. On a GPU: speed, measured
#
# Everything above ran on a CPU. On an H100, `python -m bench.layer` timed one layer's forward and backward
# over 4096 tokens (bf16, NF4 + double quantization, r = 16) against bitsandbytes' `Linear4bit` with a LoRA
# branch written as PEFT writes it, and against a dense bf16 `nn.Linear` with the same branch. The GPU's time
# alone (CUDA-graph replays), read from the results file:

# %%
layer = json.loads((Path("..") / "bench" / "results" / "layer-nvidia-h100-80gb-hbm3.json").read_text())
print(f"{layer['device']}, {layer['date'][:10]}: forward + backward, 4096 tokens, GPU ms")
print(f"{'weight (out x in)':>18} {'bnb + PEFT':>10} {'ours':>7} {'dense':>7} {'ours vs bnb':>11}")
for row in layer["layers"]:
    gpu = row["device_ms"]
    print(f"{row['shape'][0]:>8} x {row['shape'][1]:<7} {gpu['bnb']:10.3f} {gpu['ours']:7.3f} {gpu['dense']:7.3f} "
          f"{row['ours_vs_bnb_device_ms']:10.2f}x")

# %% [markdown]
# Ours is faster than bitsandbytes + PEFT on every weight, by 1.04-1.18x, and about as fast as the dense
# layer, which holds four times the weight memory: the one autograd node of section 3 saves passes over the
# largest tensors. The optional [lesson 11](11_performance.ipynb) reads the rest of these measurements: why the
# two GEMMs that every layer runs leave little more to win, a baseline built the wrong way, the one-token GEMV
# that `QLoRALinear` takes for decoding, and cells that time the layer and the GEMV on your GPU.

# %% [markdown]
# ## Summary
#
# - LoRA: W = W0 + (alpha/r) B A with A [r, in] and B [out, r]. B = 0 at init, so the layer starts
#   exactly at the base; A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform with a = sqrt(5)).
# - A real fine-tuning update is far from random: a few singular directions hold most of its energy, which
#   is why a low-rank correction can stand in for it.
# - alpha/r ties the scale to the rank: from r = 8 to r = 64 Adam's first update changed by 1.2x (one
#   example) and 0.5x (32 examples), against 9.6x and 4.1x without it.
# - Trainable parameters: r (in + out) per layer; 39,976,960 at r = 16 on all linear layers of a
#   Llama-2-7B-shaped model, 0.59% of its 6.74 billion.
# - `QLoRALinear` keeps the base only as NF4 codes and constants (4.127 bits per weight). Its autograd
#   function dequantizes in the forward and again in the backward: the 16-bit copy is what is discarded (not
#   the 4-bit weights, as a seed document says). It saves only the codes.
# - Checked: a dense fp32 reference and bitsandbytes' `Linear4bit` + LoRA bit for bit (dL/dx within 4 float32
#   roundings of the latter), float64 formulas within 1e-6 of their largest value.
# - PEFT loads the saved adapters and gives the same logits exactly; merging is equal up to rounding.
# - On an H100 a layer's forward + backward runs 1.04-1.18x as fast as bitsandbytes + PEFT (lesson 11: more).

# %% [markdown]
# **Exercise:** [exercises/06_qlora_backward.ipynb](../exercises/06_qlora_backward.ipynb) (solution:
# [solutions/06_qlora_backward.ipynb](../solutions/06_qlora_backward.ipynb))

# %% [markdown]
# ## Check your understanding
#
# 1. If A were initialised to zero and B randomly, would training still start at the base model? Would
#    the first Adam step change anything? (Look at dL/dA and dL/dB when A = 0.)
#
# <details><summary>Answer</summary>
#
# Yes, it starts at the base: B A = 0 whenever either factor is zero. The first step changes A only:
# dL/dB = s g^T (x A^T) is zero while A is, and dL/dA = s B^T g^T x is not, since B is random. After that step
# B A is no longer zero and both train. It is the mirror image of the usual init; PEFT and the paper pick B = 0.
#
# </details>

# %% [markdown]
# 2. How many trainable parameters does r = 16 add to one 11008 → 4096 `down_proj`, and what fraction
#    of its weights is that?
#
# <details><summary>Answer</summary>
#
# r (in + out) = 16 × (11008 + 4096) = 241,664, against 11008 × 4096 = 45,088,768 weights: 0.54%.
#
# </details>

# %% [markdown]
# 3. Why does the backward of `DequantizeMatmul` dequantize the codes again instead of saving W0^ from
#    the forward? Estimate what saving it would cost for all linear layers of the 7B model in bf16.
#
# <details><summary>Answer</summary>
#
# Saved tensors live from the forward until the backward, so every layer's 16-bit W0^ would be held at once:
# the model in 16 bits again, which 4-bit storage was meant to avoid. Section 2 counted 6,476,005,376 linear
# weights; at 2 bytes each that is about 13.0 GB (12.1 GiB), on top of the 4-bit codes. Dequantizing again
# costs one more pass over the weight per layer, small next to the layer's GEMMs at training batch sizes.
#
# </details>

# %% [markdown]
# 4. After `merge_adapters` on a `QLoRALinear` model, the merged weights are no longer 4-bit. What would
#    you lose if you quantized W0^ + (alpha/r) B A back to NF4?
#
# <details><summary>Answer</summary>
#
# Much of the adapter. (alpha/r) B A is a small correction, often smaller than the spacing between NF4 levels
# within a block (absmax times the gap between neighbouring codes), so rounding the sum back to the 16 levels
# moves many entries back to where W0^ already was, or one level away, and adds a new rounding error of the
# size of W0's own. The merged 4-bit model computes something between the base and the fine-tuned one; keeping
# the adapters separate (or merging into a 16-bit copy) keeps what training learned.
#
# </details>
