# %% [markdown]
# # Lesson 9 — The VRAM budget
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/09_vram_budget.ipynb)
#
# Will it fit? Every QLoRA tutorial has a table: "7B: 28 GB in FP32, 5-7 GB with QLoRA". This lesson
# builds that table term by term, in bytes: 4-bit weights and their constants, the 16-bit parts, the
# adapters, their gradients and optimizer states, the activations and temporaries, and what CUDA takes.
# Each term is a formula from the architecture, checked by measuring a small model on the CPU.
#
# **What you will learn**
# - to count a Llama model's parameters exactly from its config.json (Llama-2-7B has 6,738,415,616);
# - what each fine-tuning method stores per parameter (full fp32 and bf16, 16-bit LoRA, QLoRA with and
#   without double quantization) and what AdamW, 8-bit AdamW and paged 8-bit AdamW keep;
# - which tensors autograd saves for the backward pass, with and without gradient checkpointing, and how
#   to measure them with `torch.autograd.graph.saved_tensors_hooks`;
# - where a training step peaks, and why the vocabulary size can decide it;
# - what the source documents' claims and VRAM table get right and what they leave out.
#
# **Prerequisites:** lessons 4 (double quantization), 6 (LoRA, `QLoRALinear`) and 7 (8-bit and paged
# optimizers); autograd (`loss.backward()`). Everything runs on a CPU; the GPU numbers are read from
# `bench/results/`.
#
# **Sources:** QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 2 and its memory figure;
# 8-bit optimizers (Dettmers et al. 2021, arXiv:2110.02861); gradient checkpointing (Chen et al. 2016,
# arXiv:1604.06174); Llama 2 (Touvron et al. 2023, arXiv:2307.09288) for the architectures.

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/model_shapes.py`, `qlora_ref/activations.py`,
# `qlora_ref/vram.py`. For its demonstrations it also uses `qlora_ref/results.py`.

# %%
import json
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
import torch
from IPython.display import display

from qlora_ref import QLoRALinear, constant_bits_per_parameter, prepare_model
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM
from qlora_ref.optim8bit import OPTIMIZERS, bytes_per_parameter
from qlora_ref.plots.vram import budget_figure, measurements_figure, methods_figure
from qlora_ref.results import load_measurements
from qlora_ref.activations import activations, measure_peak_bytes, measure_saved_bytes
from qlora_ref.methods import RECIPES
from qlora_ref.model_shapes import PRESETS, from_hf_config
from qlora_ref.vram import (
    ALLOCATOR_OVERHEAD,
    CUDA_CONTEXT_BYTES,
    GIB,
    GPUS,
    TRANSIENT_PARTS,
    estimate,
    estimate_for,
    matching_run,
    measurement_line,
    quantized_linear_bytes,
)

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
print("torch", torch.__version__)

# %% [markdown]
# ## 1. The whole budget first
#
# `qlora_ref.vram.estimate` adds up one training step's memory. Here is Llama-2-7B fine-tuned the QLoRA
# way (NF4 with double quantization, LoRA rank 64 on all seven linear layers of every block, paged 8-bit
# AdamW, gradient checkpointing) on one sequence of 512 tokens. The rest of the lesson derives every
# line. The two lines marked `*` are constants of the GPU and its software, measured once on an H100
# rather than derived from the model: section 6.

# %%
budget = estimate("Llama-2-7B", method="qlora_nf4_dq", optimizer="paged_adamw_8bit", batch=1, seq_len=512, r=64,
                  gradient_checkpointing=True)
print(budget.table("T4 (14.75 GiB)"))

# %% [markdown]
# A GiB is 2^30 bytes (what `nvidia-smi` and PyTorch report); a GB is 10^9 bytes. The source documents
# use GB.
#
# ## 2. Parameters, exactly
#
# A Llama decoder is fixed by a few config fields: vocabulary V, hidden size d, MLP size f, L layers,
# H attention heads and K key/value heads of d_h = head_dim numbers. Each layer has seven linear layers
# and two RMSNorm weights:
#
# | tensor | shape (in × out) |
# |---|---|
# | q_proj, o_proj | d × H d_h, H d_h × d |
# | k_proj, v_proj | d × K d_h (fewer than q when K < H: grouped-query attention) |
# | gate_proj, up_proj, down_proj | d × f, d × f, f × d |
# | 2 norms | d each |
#
# plus the embeddings (V × d), the output head `lm_head` (V × d, unless tied to the embeddings) and a
# final norm (d). The totals usually quoted for the released checkpoints:

# %%
QUOTED = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-2-70B": 68_976_648_192,
          "Llama-3-8B": 8_030_261_248}
print(f"{'model':12s} {'linear':>15s} {'embeddings':>13s} {'lm_head':>13s} {'norms':>9s} {'total':>15s} "
      f"{'linear':>7s}  quoted")
for name, shape in PRESETS.items():
    c = shape.parameter_counts()
    quoted = QUOTED.get(name)
    check = "—" if quoted is None else ("equal" if quoted == shape.parameter_count else f"DIFFERENT: {quoted:,}")
    print(f"{name:12s} {c['linear']:>15,} {c['embeddings']:>13,} {c['lm_head']:>13,} {c['norms']:>9,} "
          f"{shape.parameter_count:>15,} {c['linear'] / shape.parameter_count:7.1%}  {check}")

# %% [markdown]
# Most parameters sit in the linear layers, the ones QLoRA quantizes. Llama-3's vocabulary of 128,256
# makes its embeddings and head four times Llama-2's, and at 8B they are an eighth of the model: they
# stay in 16 bits.
#
# Any Llama-family config.json works: `from_hf_config` takes the file, its folder or the dict. Here is
# Llama-3-8B's, with the fields as published on the Hugging Face Hub (meta-llama/Meta-Llama-3-8B), and
# the model built from it by `qlora_ref.llama` on PyTorch's `meta` device (shapes, no memory), whose
# parameters we count one tensor at a time. (`tests/test_vram.py` also builds every preset with
# transformers' `LlamaForCausalLM`: the same counts.)

# %%
llama3_8b_config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "bfloat16",
}
shape = from_hf_config(llama3_8b_config, name="Llama-3-8B")
print(shape)
with torch.device("meta"):
    meta_model = LlamaForCausalLM(LlamaConfig.from_hf_dict(llama3_8b_config))
print(f"from the config: {shape.parameter_count:,} | the model's tensors: "
      f"{sum(p.numel() for p in meta_model.parameters()):,}")
del meta_model

# %% [markdown]
# ## 3. The weights: bytes per parameter
#
# Full fine-tuning stores every weight in fp32 (4 bytes) or bf16 (2). 16-bit LoRA keeps the frozen
# base in bf16. QLoRA stores the seven linears of every layer as NF4 codes, 4 bits each, plus their
# quantization constants: one float32 absmax per block of 64 (0.5 bits a weight), or with double
# quantization 8/64 + 32/(64·256) = 0.127 bits (lesson 4). The embeddings, the head and the norms stay in
# bf16 (bitsandbytes and transformers leave them unquantized).

# %%
for dq in (False, True):
    bits = 4 + constant_bits_per_parameter(64, double_quant=dq)
    print(f"NF4{' + double quantization' if dq else ''}: 4 + {constant_bits_per_parameter(64, dq):.4f} = "
          f"{bits:.4f} bits per quantized weight")
print()
print(f"{'weights, GiB':12s}" + "".join(f"{m:>14s}" for m in RECIPES))
for name in ("Llama-2-7B", "Llama-2-13B", "Llama-2-70B", "Llama-3-8B"):
    row = []
    for method in RECIPES:
        p = estimate(name, method=method).parts
        frozen_or_trained = p["16-bit weights"] + (p["trainable weights"] if RECIPES[method].trains_base else 0)
        row.append(p["4-bit weights"] + p["quantization constants"] + frozen_or_trained)
    print(f"{name:12s}" + "".join(f"{b / GIB:14.3f}" for b in row))

# %% [markdown]
# **A claim of the source documents: "approximately 4x".** One says QLoRA stores the weights in 4 bits,
# "reducing memory by approximately 4x compared to full-precision training"; another that 4-bit
# quantization "reduces memory by ~75%". Both read 16 bits → 4 bits as the whole story. Llama-2-7B's
# weights, in bf16 and the QLoRA way:

# %%
bf16_weights = 2 * PRESETS["Llama-2-7B"].parameter_count
p = estimate("Llama-2-7B", method="qlora_nf4_dq").parts
qlora_weights = p["4-bit weights"] + p["quantization constants"] + p["16-bit weights"]
bits = 4 + constant_bits_per_parameter(64, double_quant=True)
print(f"Llama-2-7B weights: bf16 {bf16_weights / GIB:.2f} GiB -> QLoRA {qlora_weights / GIB:.2f} GiB: "
      f"{bf16_weights / qlora_weights:.2f}x smaller, {1 - qlora_weights / bf16_weights:.0%} less")
print(f"one quantized linear: 16 -> {bits:.3f} bits a weight, {16 / bits:.2f}x")
print(f"left in bf16 (embeddings, lm_head, norms): {p['16-bit weights'] / GIB:.2f} GiB, "
      f"{p['16-bit weights'] / qlora_weights:.0%} of the QLoRA weights")

# %% [markdown]
# **Verdict: about 3.5x, not 4x (and 71%, not 75%).** Each quantized linear does shrink 3.88x, not 4x,
# because its constants add 0.127 bits to every 4-bit code. The whole model shrinks less again: the
# embeddings, the output head and the norms stay in 16 bits, and once the linears are small those few
# percent of the parameters are about a seventh of what is left. (Against full-precision *training*, which
# also holds gradients and optimizer states, the saving is far more than 4x: section 7.)
#
# The estimator counts the bytes of each layer as `QLoRALinear` stores them: the packed codes, the
# absmax (8-bit codes with double quantization), the second-level absmax and offset, and the code
# tables. A real layer, measured, for an awkward shape and for Llama-3-8B's k_proj (4096 → 1024):

# %%
for in_features, out_features, dq in ((1000, 333, False), (1000, 333, True), (4096, 1024, True)):
    layer = QLoRALinear(torch.nn.Linear(in_features, out_features, bias=False), r=8, double_quant=dq)
    stored = layer.memory_breakdown()
    stored_base = stored["total"] - stored["lora_A"] - stored["lora_B"]
    codes, constants = quantized_linear_bytes(in_features, out_features, 64, dq)
    print(f"{in_features} x {out_features}, double quant {dq!s:5}: stored {stored_base:>9,} bytes, "
          f"predicted {codes + constants:>9,}: {'equal' if stored_base == codes + constants else 'DIFFERENT'} "
          f"({8 * (codes + constants) / (in_features * out_features):.4f} bits a weight)")

# %% [markdown]
# (The small layer pays for its code tables: 16 + 256 float32 numbers, about 1 KB, whatever its size.)
#
# ## 4. What trains: adapters, gradients, optimizer states
#
# LoRA trains r (in + out) numbers per adapted linear (lesson 6). At r = 64 on all seven linears of
# Llama-2-7B, that is 160 million, stored in float32 (the default of PEFT and of `qlora_ref`: bf16
# adapters would halve this line). Each has a float32 gradient. The optimizer's states depend on its
# type (lesson 7): torch's AdamW keeps two moments in the parameter's dtype; 8-bit AdamW keeps one byte
# each plus a float32 absmax per block of 256; the paged version keeps the same bytes in unified memory,
# which only have to be on the GPU while their parameter is updated.

# %%
qlora = estimate("Llama-2-7B")
adapter_count = qlora.parts["trainable weights"] // 4
print(f"LoRA parameters (r = 64, 7 linears x 32 layers): {adapter_count:,}; as float32: "
      f"{qlora.parts['trainable weights'] / GIB:.3f} GiB, gradients the same")
print(f"8-bit AdamW: {bytes_per_parameter(8, 256)} bytes per parameter (fp32 AdamW: {bytes_per_parameter(32):.0f})")
for optimizer in OPTIMIZERS:
    b = estimate("Llama-2-7B", optimizer=optimizer)
    host = f", {b.optimizer_host_bytes / GIB:.3f} GiB may wait in host RAM" if b.optimizer_host_bytes else ""
    print(f"  {optimizer:16s} on the GPU: {b.parts['optimizer states'] / GIB:7.3f} GiB{host}")
for optimizer in OPTIMIZERS:
    b = estimate("Llama-2-7B", method="full_bf16", optimizer=optimizer)
    print(f"full bf16 fine-tuning, {optimizer:16s}: optimizer states on the GPU "
          f"{b.parts['optimizer states'] / GIB:6.2f} GiB")
inside = estimate("Llama-2-7B", optimizer_in_backward=True)
print(f"gradients alive at once: all {qlora.parts['gradients'] / GIB:.3f} GiB, or with the update in the backward "
      f"{inside.parts['gradients'] / 2**20:.1f} MiB (one MLP linear's A and B)")

# %% [markdown]
# For QLoRA the optimizer is a small term: its states are those of 0.16 billion adapters, and paging
# takes nearly all of them off the GPU. The gradients are not small (as large as the float32 adapters),
# but they need not all exist at once: an optimizer that updates each parameter inside the backward pass,
# as soon as its gradient is complete, frees it there (`estimate(..., optimizer_in_backward=True)`;
# [lesson 11](11_performance.ipynb) measures it), and only the largest adapted linear's gradients are ever
# alive. For full fine-tuning the optimizer states are as large as weights and gradients together. (torch's
# AdamW on bf16 weights keeps bf16 moments, 4 bytes a parameter, half of what float32 moments would take.)
# Paged states cost the GPU almost nothing between updates; they do not make the weights or gradients
# smaller.

# %% [markdown]
# ## 5. Activations: what autograd keeps
#
# For the backward pass, autograd keeps some tensors of the forward pass: the input of every linear layer
# whose weight (or adapter) needs a gradient, the input of every nonlinearity. Which ones is decided by
# `requires_grad`, and `qlora_ref.activations.activations` walks the same decisions for `qlora_ref.llama`.
# Per token and per layer, in bf16 (c = 2 bytes) with float32 adapters (a = 4) on all seven linears:
#
# | saved by | tensor | bytes per token |
# |---|---|---|
# | input_layernorm | its input in float32, and 1/rms | 4d + 4 |
# | q/k/v_proj (LoRA) | their shared input; x Aᵀ for each adapter | c d + 3 a r |
# | attention (SDPA) | q, k, v (k and v repeated to all H heads), output, log-sum-exp | 4 c H d_h + 4H |
# | o_proj (LoRA) | x Aᵀ (its input is the attention output, saved already) | a r |
# | post_attention_layernorm | input in float32, 1/rms | 4d + 4 |
# | gate/up_proj (LoRA) | shared input; x Aᵀ each | c d + 2 a r |
# | SwiGLU and down_proj | gate, silu(gate), up, their product; x Aᵀ | 4 c f + a r |

# %% [markdown]
# That is 20 d + 8 f + 28 r + 4 H + 8 bytes (with H d_h = d). Attention is PyTorch's
# `scaled_dot_product_attention`, whose flash and memory-efficient kernels keep the log-sum-exp of each
# row instead of the seq × seq probabilities: O(seq), not O(seq²). The first layer keeps 4d + 4 less:
# its input comes from the frozen embeddings and needs no gradient, so its first norm saves nothing.
# With gradient checkpointing a layer keeps only its input (c d) and is recomputed in the backward.
# After the layers: the final norm (4d + 4), the float32 log-probabilities of the loss (4V per predicted
# position) and the logits the forward returns (c V per token).

# %% [markdown]
# Now measured. `measure_saved_bytes` runs one forward pass under `torch.autograd.graph.saved_tensors_hooks`:
# every tensor autograd saves passes through its pack hook, and we add up the bytes of their storages
# (each once, leaving out parameters and buffers). A small `qlora_ref.llama` (hidden 96, MLP 256, 3
# layers, 6 heads sharing 2 K/V heads, vocabulary 300), prepared each way, 2 sequences of 37 tokens:

# %%
def small_model(method, checkpointing, r=4):
    """A small qlora_ref.llama in the method's dtype, prepared as the method trains it; and its shape."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    base, compute_bytes, trains, _ = RECIPES[method]
    model = LlamaForCausalLM(config).to(torch.float32 if compute_bytes == 4 else torch.bfloat16)
    if not trains:
        prepare_model(model, r=r, alpha=2 * r, quantize=base.startswith("nf4"), double_quant=base == "nf4_dq",
                      compute_dtype=torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), from_hf_config(config.to_hf_dict())


ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
for method in ("qlora_nf4_dq", "full_fp32"):
    for checkpointing in (False, True):
        model, small = small_model(method, checkpointing)
        measured = measure_saved_bytes(model, ids, labels)
        predicted = activations(small, method, batch=2, seq_len=37, r=4, gradient_checkpointing=checkpointing).saved
        print(f"{method:13s} checkpointing {checkpointing!s:5}: measured {measured:>9,} bytes, predicted "
              f"{predicted:>9,}: {'equal' if measured == predicted else f'off by {measured - predicted:+,}'}")

# %% [markdown]
# Every byte accounted for. (On a GPU, flash attention also saves its random-number state, a few bytes
# per layer.) `tests/test_vram.py` repeats this for every method, other adapter choices, batch 1, untied
# heads and other head counts.
#
# What autograd saves is not yet the peak. During the backward pass, gradients and temporaries come and
# go. `measure_peak_bytes` follows every tensor PyTorch creates in a forward and backward pass (a
# `TorchDispatchMode` adds each new storage's bytes, a weakref callback subtracts them when PyTorch frees
# it) and reports the most alive at once. The estimator predicts that peak as what stays through the
# backward (the layers' tensors, the logits) plus the larger of two moments: the loss's backward, with
# two float32 [tokens, V] gradients, or a layer's backward, with (when checkpointing) the recomputed
# layer and the gradients in flight. The parameters' gradients appear during the backward pass, so the
# prediction is given without them and with all of them:

# %%
for method, checkpointing in (("lora_bf16", False), ("lora_bf16", True)):
    model, small = small_model(method, checkpointing)
    measured = measure_peak_bytes(model, ids, labels)
    predicted = activations(small, method, batch=2, seq_len=37, r=4, gradient_checkpointing=checkpointing)
    gradients = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    moment = "loss" if predicted.loss_moment >= predicted.layer_moment else "layer"
    print(f"{method} checkpointing {checkpointing!s:5}: peak measured {measured:>9,} bytes; predicted "
          f"{predicted.peak:>9,} without gradients, {predicted.peak + gradients:>9,} with all "
          f"({moment} backward; measured / without: {measured / predicted.peak:.4f})")

# %% [markdown]
# When the loss's backward is the peak, it comes before any parameter has a gradient, and the
# measurement is the prediction without gradients (to 0.1%). When a layer's backward is, some gradients
# exist: the measurement falls between the two. The budget of section 1 counts all gradients, an upper
# bound; `tests/test_vram.py` checks other settings within 10%. With QLoRA the CPU would add its own
# dequantization temporaries (unpacked codes, float32 values) that the GPU kernel does not make; the GPU
# measurement will check that part.
#
# For Llama-2-7B: activation memory grows linearly with the number of tokens, and checkpointing divides
# what is saved by more than ten. If attention kept its probabilities (the "eager" path, e.g. with
# `output_attentions`), each layer would add H seq² bf16 numbers per sequence:

# %%
shape_7b = PRESETS["Llama-2-7B"]
print(f"{'batch x seq':>12s} {'saved, no ckpt':>15s} {'saved, ckpt':>12s} {'ratio':>6s} {'peak extra, ckpt':>17s} "
      f"{'eager probs':>12s}   (GiB)")
for batch, seq in ((1, 512), (1, 2048), (4, 2048), (1, 8192), (8, 4096)):
    plain = activations(shape_7b, batch=batch, seq_len=seq, gradient_checkpointing=False)
    ckpt = activations(shape_7b, batch=batch, seq_len=seq, gradient_checkpointing=True)
    eager = 2 * shape_7b.num_attention_heads * seq * seq * batch * shape_7b.num_hidden_layers
    print(f"{batch:>5d} x {seq:<5d} {plain.saved / GIB:15.2f} {ckpt.saved / GIB:12.2f} {plain.saved / ckpt.saved:6.1f} "
          f"{(ckpt.peak - ckpt.saved) / GIB:17.2f} {eager / GIB:12.1f}")

# %% [markdown]
# ## 6. Transients, and two constants of the GPU
#
# The peak of a step is one moment. For Llama-2 (V = 32,000) it is a layer's backward: the recomputed
# layer, the gradients in flight, and the dequantized weight — QLoRA dequantizes each linear to bf16 for
# the forward and again for the backward, one at a time, so the largest (4096 × 11008) costs 86 MiB.
# For Llama-3 (V = 128,256) the loss comes first: its float32 log-probabilities and gradients, 12 bytes per
# vocabulary entry and position, outweigh a whole layer at 512 tokens.

# %%
for name in ("Llama-2-7B", "Llama-3-8B"):
    b = estimate(name)
    moments = ", ".join(f"{k}: {v / GIB:.3f} GiB" for k, v in b.moments.items())
    print(f"{name}: peak at the {b.peak_moment} ({moments})")
print(f"dequantization workspace, Llama-2-7B: {estimate('Llama-2-7B').parts['dequantization workspace'] / GIB:.3f} GiB")

# %% [markdown]
# Two terms are not derived from the model, and are marked so everywhere: the CUDA context (the driver's
# and the libraries' memory, kernels' code included) and the caching allocator's overhead (PyTorch
# reserves memory in blocks and rounds sizes, so it holds more than its tensors). Both are properties of
# the GPU and its software, so they were measured: the medians of the twelve H100 runs of section 7
# (`bench/results/memory-*.json`). The context is what the device had in use beyond PyTorch's reservation,
# less the paged optimizer states on it; the overhead is reserved minus allocated at the peak, per byte of
# the step's activations and temporaries (the weights sit in a few large blocks and the gradients return
# at the same sizes every step, while activations come and go in many sizes and leave blocks that fit no
# later tensor). Another GPU, driver or PyTorch version gives other values.

# %%
print(f"measured on an H100 (torch 2.11, CUDA 13.0): CUDA context {CUDA_CONTEXT_BYTES / 2**20:.0f} MiB; allocator "
      f"overhead {ALLOCATOR_OVERHEAD:.3f} bytes per byte of {', '.join(TRANSIENT_PARTS)}")

# %% [markdown]
# ## 7. The source documents' table, checked
#
# One of the source documents has this table:
#
# | Model Size | FP32 VRAM (Base) | QLoRA VRAM (Fine-Tuning) | Required Hardware |
# |---|---|---|---|
# | 7B | 28 GB | ~5-7 GB | Consumer GPU (RTX 3060/4060) |
# | 13B | 52 GB | ~10-12 GB | Mid-range GPU (RTX 3090/4090) |
# | 70B | 280 GB | ~40-48 GB | Enterprise GPU (A6000 / A100 80GB) |
#
# Next to it: our count of FP32 weights, our estimate of full FP32 fine-tuning (torch AdamW), our QLoRA
# estimate (NF4 + double quantization, r = 64, paged 8-bit AdamW updating inside the backward,
# checkpointing, batch 1, 512 tokens) and its measurement on an H100 (`python -m bench.memory`,
# the step replayed as a CUDA graph, as lesson 11 explains; `bench/results/memory-*.json`): reserved + context,
# every paged state on the GPU, as a GPU with room keeps them:

# %%
SEEDS = {"Llama-2-7B": (28, (5, 7)), "Llama-2-13B": (52, (10, 12)), "Llama-2-70B": (280, (40, 48))}
RESULTS = Path("..") / "bench" / "results"
runs = load_measurements(RESULTS)
print(f"{'model':12s} {'FP32 GB':>8s} {'ours':>7s} {'full FP32 FT':>13s} {'QLoRA GB':>9s} {'ours':>6s} "
      f"{'(GiB)':>7s} {'measured':>9s}")
for name, (fp32_seed, (low, high)) in SEEDS.items():
    fp32_weights = 4 * PRESETS[name].parameter_count
    full = estimate(name, method="full_fp32", optimizer="adamw")
    ours = estimate(name, method="qlora_nf4_dq", optimizer="paged_adamw_8bit", batch=1, seq_len=512, r=64,
                    gradient_checkpointing=True, optimizer_in_backward=True)
    run = matching_run(ours, runs)
    measured = "not yet" if run is None else f"{(run['peak_reserved'] + run.get('context_bytes', 0)) / 1e9:.2f}"
    print(f"{name:12s} {fp32_seed:8d} {fp32_weights / 1e9:7.1f} {full.total / 1e9:13.1f} {f'{low}-{high}':>9s} "
          f"{ours.total / 1e9:6.2f} {ours.total / GIB:7.2f} {measured:>9s}")
print()
for name in SEEDS:
    ours = estimate(name, optimizer_in_backward=True)  # the QLoRA column's setting
    run = matching_run(ours, runs)
    print(f"{name}: " + ("no GPU run of this setting yet" if run is None else measurement_line(ours, run)))
if not runs:
    print("No GPU measurement yet: ../bench/results/ has no memory-*.json. The measured column fills in "
          "when the GPU runs are committed.")

# %% [markdown]
# Every run measured (three models, 512 and 2048 tokens, r = 16 and 64), against the estimate of its
# setting: what PyTorch allocated at the peak (nothing measured on a GPU goes into that estimate), and
# reserved + context (which uses section 6's two measured constants). Then the course's targets for the
# peak at batch 1, 512 tokens, r = 64:

# %%
worst = {"allocated": 0.0, "reserved + context": 0.0}
for run in runs:
    b = estimate_for(run)
    errors = {"allocated": b.allocated / run["peak_allocated"] - 1,
              "reserved + context": b.resident_total / (run["peak_reserved"] + run["context_bytes"]) - 1}
    worst = {k: max(worst[k], abs(v)) for k, v in errors.items()}
    print(f"{run['model']:12s} {run['seq_len']:5d} tokens r = {run['r']:2d}: allocated {run['peak_allocated'] / GIB:6.2f} "
          f"GiB ({errors['allocated']:+.1%}), reserved + context {(run['peak_reserved'] + run['context_bytes']) / GIB:6.2f} "
          f"GiB ({errors['reserved + context']:+.1%}), {run['tokens_per_second']:5.0f} tokens/s")
print("largest estimation error: " + ", ".join(f"{k} {v:.1%}" for k, v in worst.items()) + " (target: 10%)")
for name, limit_gb in (("Llama-2-7B", 6.0), ("Llama-2-13B", 10.0), ("Llama-2-70B", 44.0)):
    peak = matching_run(estimate(name, optimizer_in_backward=True), runs)["peak_allocated"]
    print(f"{name}: peak allocated {peak / 1e9:.2f} GB, target at most {limit_gb} GB: "
          f"{'met' if peak <= limit_gb * 1e9 else 'NOT met'}")

# %%
fig, _ = measurements_figure(runs)
display(fig)

# %% [markdown]
# **What holds.**
# - The FP32 column is parameters × 4 bytes with round parameter counts (7e9 × 4 = 28e9): within 4% of
#   the real models' counts.
# - The QLoRA column: for batch 1 and 512 tokens our estimates and measurements land inside the quoted
#   ranges, and the three peaks meet the course's targets.
#
# **What does not.**
# - "FP32 VRAM" is only the weights. *Fine-tuning* in FP32 with AdamW needs 16 bytes a parameter
#   (weight, gradient, two moments) before any activation: four times the column (the "full FP32 FT"
#   column above).
# - The QLoRA column has no setting. Memory grows with the tokens per step, and the ranges hold only
#   for short sequences; the table below moves them. The source's hardware column follows from the same
#   unstated setting.
# - Another source breaks the 7B case down as "base weights 7B × 0.5 bytes = 3.5 GB, adapters ~50M × 2
#   bytes = ~100 MB, gradients/activations ~2-4 GB". Side by side with ours:

# %%
b = estimate("Llama-2-7B")
p = b.parts
print(f"base weights      source 3.5 GB     ours {(p['4-bit weights'] + p['quantization constants']) / 1e9:.2f} GB "
      f"(4-bit codes + constants of the linears) + {p['16-bit weights'] / 1e9:.2f} GB of bf16 embeddings, head, norms")
print(f"adapters          source ~0.1 GB    ours {p['trainable weights'] / 1e9:.2f} GB "
      f"({p['trainable weights'] // 4 / 1e6:.0f}M float32 parameters at r = 64)")
transient = sum(p[part] for part in TRANSIENT_PARTS)
print(f"grads + activations source 2-4 GB  ours {(p['gradients'] + transient) / 1e9:.2f} GB "
      f"(gradients {p['gradients'] / 1e9:.2f}, activations and temporaries {transient / 1e9:.2f})")
print(f"not in the source: optimizer states {p['optimizer states'] / 1e9:.3f} GB on the GPU, CUDA context and "
      f"allocator {(p['CUDA context'] + p['allocator overhead']) / 1e9:.2f} GB (measured constants)")

# %% [markdown]
# Its total lands in the same range, but its parts do not: 7e9 × 0.5 bytes counts every parameter at 4
# bits, when the embeddings, head and norms stay at 16 and the constants add 0.127 bits to the rest; 50M
# adapters in 2 bytes is neither r = 64 on all seven linears nor the float32 they train in (and their
# gradients are as large again); and "2-4 GB" of activations is what much longer sequences cost. It
# leaves out the optimizer, which paging makes small here, and what CUDA itself takes.
#
# The sequence length and batch move everything: QLoRA for the three models, GiB, and which GPUs each fits:

# %%
for batch, seq in ((1, 512), (1, 2048), (4, 2048), (8, 4096)):
    cells = []
    for name in SEEDS:
        b = estimate(name, batch=batch, seq_len=seq)
        fits = [g for g in sorted(GPUS, key=GPUS.get) if b.fits(g)]  # smallest memory first
        cells.append(f"{name.split('-')[-1]}: {b.total / GIB:6.2f} ({fits[0] + '+' if fits else 'none'})")
    print(f"batch {batch} x {seq:<5d}  " + "   ".join(cells))

# %% [markdown]
# ("X+": the card of our list with the least memory that fits, and every larger one; the list is
# `qlora_ref.vram.GPUS`, in GiB. Fitting means the estimate is below the card's memory; how much margin a real
# run needs is what the GPU measurement will tell.) The source's hardware column gives no setting. Checked row by
# row at the two shortest settings above, each card it names against our estimate:

# %%
SEED_HARDWARE = {"Llama-2-7B": ("RTX 4060 (8 GiB)", "RTX 3060 (12 GiB)"),
                 "Llama-2-13B": ("RTX 3090 (24 GiB)", "RTX 4090 (24 GiB)"),
                 "Llama-2-70B": ("A6000 (48 GiB)", "A100 (80 GiB)")}
for name, cards in SEED_HARDWARE.items():
    for batch, seq in ((1, 512), (1, 2048)):
        b = estimate(name, batch=batch, seq_len=seq)
        verdicts = ", ".join(f"{card} {'fits' if b.fits(card) else 'does NOT fit'}" for card in cards)
        print(f"{name:11s} batch {batch} x {seq:<4d}: {b.total / GIB:6.2f} GiB -> {verdicts}")

# %% [markdown]
# At 512 tokens every card of the column fits its row. At 2,048 the smaller card of the 7B row and the A6000 of
# the 70B row no longer do: the column holds for short sequences only, and a 70B run on one 48 GiB card is a
# 512-token run.
#
# **A claim of the source documents: 70B "on a single high-end consumer GPU".** One says that dequantizing
# on the fly "allows for 70B models to be fine-tuned on a single high-end consumer GPU"; the same document
# puts consumer cards at 24 or 48 GB. Measured at the smallest setting above, and what a 24 GiB card holds:

# %%
consumer_card = "RTX 4090 (24 GiB)"
b70 = estimate("Llama-2-70B", optimizer_in_backward=True)
run70 = matching_run(b70, runs)
print(f"Llama-2-70B, batch 1, 512 tokens, r = 64: peak allocated {run70['peak_allocated'] / 1e9:.1f} GB measured "
      f"on an H100; its 4-bit weights and constants alone "
      f"{(b70.parts['4-bit weights'] + b70.parts['quantization constants']) / GIB:.1f} GiB")
for name in PRESETS:
    verdicts = []
    for seq in (512, 2048):
        b = estimate(name, seq_len=seq)  # the setting of the hardware check above
        verdicts.append(f"{seq} tokens {b.total / GIB:5.1f} GiB: {'fits' if b.fits(consumer_card) else 'does NOT fit'}")
    print(f"{consumer_card}, {name:11s}  " + ";  ".join(verdicts))
smallest = min((g for g in GPUS if estimate("Llama-2-70B").fits(g)), key=GPUS.get)
print(f"the smallest card of our list for Llama-2-70B at 512 tokens: {smallest}")

# %% [markdown]
# **Verdict: not on a single consumer card.** QLoRA fine-tuning of a 70B model needs about 42 GB even at
# batch 1 and 512 tokens; its 4-bit weights alone overflow a 24 GB RTX 3090 or 4090. Such a card fits 7B,
# 8B and 13B, at 2,048 tokens too. 70B takes a 48 GB workstation card (an A6000, which the seeds' own table
# calls enterprise) for short sequences, or an 80 GB one. Whether two 24 GB cards can share it is
# [lesson 10](10_fsdp2_qlora.ipynb)'s question.
#
# **Against transformers + peft + bitsandbytes.** How does the course's step compare with the way
# practitioners train? Measured in one process on one H100 (`python -m bench.baseline`), Llama-2-7B at the
# setting above: the standard stack in two recipes, **standard** (with `peft.prepare_model_for_kbit_training`,
# which casts the embeddings, head and norms to float32) and **no_upcast** (without it), against our step run
# eagerly, with each adapter updated **in backward** as soon as its gradient is complete, and replayed as a
# CUDA **graph**. Our eager step takes about no_upcast's bytes: the same work in the same order takes the same
# memory, and what the standard recipe adds is its float32 upcast. Updating inside the backward frees the
# adapters' gradients before the peak; the graph removes the host's kernel launches, which bound the eager
# step's speed. [Lesson 11](11_performance.ipynb) measures each change, at other lengths and ranks too.

# %%
side_by_side = json.loads((RESULTS / "baseline-nvidia-h100-80gb-hbm3.json").read_text())
RECIPE_OF = {"standard": "standard", "no_upcast": "no_upcast", "ours, eager": "qlora_ref",
           "ours, in backward": "qlora_ref_in_backward", "ours, graph": "qlora_ref_graph"}
at_512 = {name: next(run for run in side_by_side["runs"]
                     if run["recipe"] == recipe and (run["seq_len"], run["r"]) == (512, 64))
          for name, recipe in RECIPE_OF.items()}
print(f"{side_by_side['device']}, Llama-2-7B, batch 1, 512 tokens, r = 64; ratios to the standard recipe")
print(f"{'':19s} {'peak allocated':>15s} {'tokens/s':>9s} {'memory':>7s} {'speed':>6s}")
for name, run in at_512.items():
    print(f"{name:19s} {run['peak_allocated'] / GIB:11.2f} GiB {run['tokens_per_second']:9.0f} "
          f"{run['peak_allocated'] / at_512['standard']['peak_allocated']:6.2f}x "
          f"{run['tokens_per_second'] / at_512['standard']['tokens_per_second']:5.1f}x")

# %% [markdown]
# ## 8. Try it
#
# `budget_figure` draws one setting as a stacked bar against a GPU's memory, and returns the breakdown;
# `methods_figure` puts the five methods side by side:

# %%
fig, breakdown = budget_figure("Llama-2-13B", "qlora_nf4_dq", seq_len=1024, batch=2, r=16, gpu="RTX 3060 (12 GiB)")
print(breakdown.table("RTX 3060 (12 GiB)"))
display(fig)

# %%
fig, breakdowns = methods_figure("Llama-2-7B", seq_len=512, batch=1, r=64, optimizer="adamw")
print(", ".join(f"{method}: {b.total / GIB:.1f} GiB" for method, b in breakdowns.items()))
display(fig)

# %% [markdown]
# Choose a model, a method, the optimizer (and whether it updates inside the backward), the tokens per
# step, the rank and a GPU:

# %%
# NBVAL_IGNORE_OUTPUT
from ipywidgets import Checkbox, Dropdown, IntSlider, interact


def show(model="Llama-2-7B", method="qlora_nf4_dq", optimizer="paged_adamw_8bit", seq_len=512, batch=1, r=64,
         gpu="T4 (14.75 GiB)", gradient_checkpointing=True, optimizer_in_backward=False):
    fig, breakdown = budget_figure(model, method, seq_len, batch, r, gpu, optimizer, gradient_checkpointing,
                                   optimizer_in_backward)
    display(fig)
    print(breakdown.table(gpu))


_ = interact(
    show,
    model=Dropdown(options=list(PRESETS), value="Llama-2-7B"),
    method=Dropdown(options=list(RECIPES), value="qlora_nf4_dq"),
    optimizer=Dropdown(options=list(OPTIMIZERS), value="paged_adamw_8bit"),
    seq_len=Dropdown(options=[256, 512, 1024, 2048, 4096, 8192], value=512),
    batch=IntSlider(min=1, max=16, value=1),
    r=Dropdown(options=[8, 16, 32, 64, 128], value=64),
    gpu=Dropdown(options=list(GPUS), value="T4 (14.75 GiB)"),
    gradient_checkpointing=Checkbox(value=True),
    optimizer_in_backward=Checkbox(value=False),
)

# %% [markdown]
# How long a sequence fits a T4? The longest, in steps of 512 tokens, at batch 1 (QLoRA, r = 64, paged 8-bit
# AdamW, checkpointing), and the estimate at the first length that does not fit:

# %%
T4 = "T4 (14.75 GiB)"
for name in PRESETS:
    lengths = range(512, 65537, 512)
    too_long = next(seq for seq in lengths if not estimate(name, seq_len=seq).fits(T4))
    longest = f"{too_long - 512:5d} tokens" if too_long > 512 else "none     "
    b = estimate(name, seq_len=too_long)
    print(f"{name:11s} longest on a T4: {longest}; at {too_long:5d}: {b.total / GIB:6.2f} GiB, peak at the "
          f"{b.peak_moment}")

# %% [markdown]
# This lesson has no exercise notebook: section 8, *Try it*, is its practice. Try your own model and card.
#
# ## Summary
#
# - Parameter counts follow exactly from a config.json: Llama-2-7B has 6,738,415,616, of which 96% are
#   in the linear layers QLoRA quantizes; the embeddings and head stay in 16 bits.
# - QLoRA's base costs 4.127 bits a quantized weight (4.5 without double quantization): 3.88x smaller per
#   linear, 3.5x for the whole 7B model's weights (12.55 → 3.60 GiB), not the sources' "4x". The adapters,
#   their float32 gradients and the optimizer states are small at r = 64 (about 1.2 GiB for 7B), and a
#   paged optimizer keeps its states off the GPU between updates.
# - Activations are O(tokens) with PyTorch's SDPA; we predict what autograd saves to the byte (measured
#   with `saved_tensors_hooks`) and the peak of a step; checkpointing cuts what is saved more than
#   tenfold; a large vocabulary can make the loss the peak.
# - The source table's FP32 column is weights only; its QLoRA column holds at batch 1 and short
#   sequences. Measured on an H100 (batch 1, 512 tokens, r = 64), QLoRA peaks at
#   5.0 GB allocated for 7B, 9.2 GB for 13B and 42.0 GB for 70B: 70B does not fit a 24 GB consumer card.
# - Against transformers + peft + bitsandbytes, the same step takes the same bytes; the standard recipe's
#   float32 upcast, the gradients held until the optimizer runs and the host's kernel launches are what
#   [lesson 11](11_performance.ipynb) removes.

# %% [markdown]
# ## Check your understanding
#
# 1. Llama-2-70B has 64 query heads but 8 key/value heads. How many parameters does that save per layer
#    compared with 64 K/V heads? Check with `ModelShape`.
#
# <details><summary>Answer</summary>
#
# k_proj and v_proj are d × K d_h each, so 8 instead of 64 heads saves 2 d (H − K) d_h per layer:
# 2 · 8192 · 56 · 128 = 117,440,512 parameters, about 9.4 billion over 80 layers.
# `dataclasses.replace(PRESETS["Llama-2-70B"], num_key_value_heads=64).parameter_count` minus the preset's
# count gives the same. The 64 query heads are unchanged.
#
# </details>
#
# 2. Why does the first layer save 4d + 4 bytes per token less than the others in QLoRA, but not in full
#    fine-tuning?
#
# <details><summary>Answer</summary>
#
# Its first RMSNorm saves its float32 input and 1/rms only if something upstream or its own weight needs a
# gradient. In QLoRA the embeddings and the norm's weight are frozen, so nothing before the first adapter
# needs a gradient and the norm saves nothing. In full fine-tuning the norm's weight trains (and the
# embeddings too), so the norm must keep its input to compute those gradients.
#
# </details>

# %% [markdown]
# 3. With bf16 adapters (`estimate(..., adapter_bytes=2)`), which lines of the 7B budget change, and by
#    how much?
#
# <details><summary>Answer</summary>
#
# The adapters and their gradients halve: section 4 prints 0.596 GiB each in float32, so half of that in
# bf16. The 8-bit optimizer states do not change (one byte a moment whatever the adapters' dtype). The
# saved x Aᵀ tensors halve too, but they are small. Because the layer's backward shrinks, the peak can
# move to the loss's backward, which changes the transient lines and the allocator overhead: compare the
# two tables with `print(estimate("Llama-2-7B", adapter_bytes=2).table())`.
#
# </details>
#
# 4. At what sequence length does Llama-2-7B's QLoRA step (batch 1, checkpointing) stop fitting a T4?
#    Find it with `estimate` and explain which term grows.
#
# <details><summary>Answer</summary>
#
# The last cell of section 8 finds it: 7,680 tokens fit, 8,192 do not. Everything that scales with the
# tokens grows, but the loss's backward grows fastest: float32 log-probabilities and their gradients, 12
# bytes per vocabulary entry (32,000) and position, with the allocator's overhead on top. The weights and
# adapters do not change with the length.
#
# </details>

# %% [markdown]
# 5. Why can the update move into the backward pass for AdamW but not when gradients are clipped by
#    their global norm? What would gradient accumulation over two micro-batches need instead?
#
# <details><summary>Answer</summary>
#
# AdamW updates each parameter from its own gradient and state, so it can run as soon as that gradient is
# complete. Clipping by the global norm scales every gradient by a factor that depends on all of them,
# known only when the whole backward pass has finished. Accumulation must keep every gradient from the first
# micro-batch's backward and add the second's before updating: the update could run inside the second
# backward only, and all the gradients are alive in between, which is the memory the update in the backward
# was meant to save.
#
# </details>
#
# 6. A source says QLoRA reduces memory "~75%". Would the weights of Llama-3-8B shrink more or less than
#    Llama-2-7B's 3.5x, and why?
#
# <details><summary>Answer</summary>
#
# Less: section 3's table gives 14.958 GiB in bf16 (lora_bf16) against 5.311 GiB for QLoRA, about 2.8x.
# Llama-3's vocabulary of 128,256 makes its embeddings and head, which stay in 16 bits, an eighth of the
# model (section 2), so a larger part of the weights is not quantized.
#
# </details>
