# %% [markdown]
# # Lesson 9 — The VRAM budget
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/09_vram_budget.ipynb)
#
# Will it fit? Every QLoRA tutorial has a table: "7B: 28 GB in FP32, 5-7 GB with QLoRA". This lesson
# builds that table from first principles, term by term, in bytes: the 4-bit weights and their
# constants, the 16-bit parts that are not quantized, the adapters, their gradients and optimizer
# states, the activations, the temporaries of the backward pass, and what CUDA itself takes. Each term
# is a formula from the architecture; the activation terms are checked by measuring what PyTorch keeps
# in a small model on the CPU. At the end, a calculator for any model, method, sequence length, batch,
# rank and GPU.
#
# **What you will learn**
# - to count a Llama model's parameters exactly from its config.json (Llama-2-7B has 6,738,415,616);
# - what each fine-tuning method stores per parameter: full fp32 and bf16, 16-bit LoRA, QLoRA with and
#   without double quantization, and AdamW, 8-bit AdamW and paged 8-bit AdamW;
# - which tensors autograd saves for the backward pass in a Llama block, with and without gradient
#   checkpointing, and how to measure them with `torch.autograd.graph.saved_tensors_hooks`;
# - where a training step peaks, and why the vocabulary size can decide it;
# - what the source documents' VRAM table gets right and what it leaves out;
# - how our QLoRA step compares, measured on an H100, with transformers + peft + bitsandbytes, what
#   `prepare_model_for_kbit_training` costs, and how an update inside the backward pass and a CUDA graph
#   make a step smaller and faster.
#
# **Prerequisites:** lessons 4 (double quantization), 6 (LoRA, `QLoRALinear`) and 7 (8-bit and paged
# optimizers); autograd (`loss.backward()`). Everything runs on a CPU.
#
# **Sources:** QLoRA (Dettmers et al. 2023, arXiv:2305.14314), section 2 and its memory figure;
# 8-bit optimizers (Dettmers et al. 2021, arXiv:2110.02861); gradient checkpointing (Chen et al. 2016,
# arXiv:1604.06174); Llama 2 (Touvron et al. 2023, arXiv:2307.09288) for the architectures.

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
if IN_COLAB:  # clone the course and install it next to Colab's own torch (lesson 0, "Troubleshooting")
    import importlib
    import subprocess
    from importlib.metadata import version

    COURSE = "/content/qlora-course"
    if not os.path.isdir(COURSE):
        url = "https://github.com/OWNER/qlora-course"
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "main", url, COURSE], check=True)
    # torch pinned to the version installed: pip keeps Colab's CUDA build instead of replacing it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", COURSE, "bitsandbytes==0.50.2", f"torch=={version('torch')}"],
                   check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir(f"{COURSE}/notebooks")  # the lessons run from notebooks/ (lesson 5 reads ../bench/results)

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
# section 8 measures it), and only the largest adapted linear's gradients are ever alive. For full fine-tuning they are as large as weights and gradients
# together. (torch's AdamW on bf16 weights keeps
# bf16 moments, 4 bytes a parameter, half of what float32 moments would take.) Paged states cost the GPU
# almost nothing between updates; they do not make the weights or gradients smaller.
#
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
#
# That is 20 d + 8 f + 28 r + 4 H + 8 bytes (with H d_h = d). Attention is PyTorch's
# `scaled_dot_product_attention`, whose flash and memory-efficient kernels keep the log-sum-exp of each
# row instead of the seq × seq probabilities: O(seq), not O(seq²). The first layer keeps 4d + 4 less:
# its input comes from the frozen embeddings and needs no gradient, so its first norm saves nothing.
# With gradient checkpointing a layer keeps only its input (c d) and is recomputed in the backward.
# After the layers: the final norm (4d + 4), the float32 log-probabilities of the loss (4V per predicted
# position) and the logits the forward returns (c V per token).
#
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
# the step of section 8 replayed as a CUDA graph; `bench/results/memory-*.json`): reserved + context,
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
# ## 8. Against the standard stack: transformers + peft + bitsandbytes
#
# How does our QLoRA step compare with the way practitioners train? The course's target for 7B (batch 1,
# 512 tokens, r = 64): **at least 1.3 times the baseline's tokens per second at no more than 0.85 times
# its peak memory**. Everything below was measured in one process on one H100
# (`python -m bench.baseline --recipes standard no_upcast qlora_ref qlora_ref_in_backward
# qlora_ref_graph`), with the same settings (NF4 + double quantization, LoRA on all seven linears,
# alpha = 2r, float32 adapters, gradient checkpointing, paged 8-bit AdamW, no gradient clipping, random
# token ids, 4 timed steps, tokens per second of the last 3) and the same protocol (peak statistics reset
# before the model is built or loaded, so the peaks include it):
#
# - **the baseline**: a random Llama-2-7B checkpoint loaded with `from_pretrained(...,
#   quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
#   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))`, then `get_peft_model` and
#   `bitsandbytes.optim.PagedAdamW8bit`, in two recipes. **standard** calls
#   `peft.prepare_model_for_kbit_training` first, as every QLoRA tutorial does: it casts every parameter
#   that is not 4-bit (embeddings, lm_head, norms) to float32. **no_upcast** skips it, so those stay in
#   bf16 as in ours: the closest to our setup.
# - **ours**, the model built in NF4 with `QLoRALinear` layers and our `PagedAdamW8bit` (lesson 7), its
#   step run three ways: **eager**, the baseline's loop (forward, backward, then the optimizer step);
#   **in backward**, each adapter updated inside the backward pass as soon as its gradient is complete
#   (`AdamW8bit.step_in_backward`); **graph**, that step recorded once as a CUDA graph and replayed
#   (`qlora_ref.cuda_graph.CapturedStep`).

# %%
GPU_NAME = "nvidia-h100-80gb-hbm3"
side_by_side = json.loads((RESULTS / f"baseline-{GPU_NAME}.json").read_text())
print(f"{side_by_side['device']}, {side_by_side['date']}, torch {side_by_side['torch']}, triton "
      f"{side_by_side['triton']}, bitsandbytes {side_by_side['bitsandbytes']}, transformers "
      f"{side_by_side['transformers']}, peft {side_by_side['peft']}")
RECIPES = {"standard": "standard", "no_upcast": "no_upcast", "ours, eager": "qlora_ref",
           "ours, in backward": "qlora_ref_in_backward", "ours, graph": "qlora_ref_graph"}
stacks = {name: {(run["seq_len"], run["r"]): run for run in side_by_side["runs"] if run["recipe"] == recipe}
          for name, recipe in RECIPES.items()}
SETTINGS = ((512, 64), (512, 16), (2048, 64), (2048, 16))
for setting in SETTINGS:
    standard = stacks["standard"][setting]
    print(f"\n{setting[0]} tokens, r = {setting[1]:<3d}{'':7s} {'peak allocated':>15s} {'peak reserved':>14s} "
          f"{'tokens/s':>9s}   / standard: {'tokens/s':>8s} {'allocated':>9s}")
    for name, runs in stacks.items():
        run = runs[setting]
        print(f"  {name:19s} {run['peak_allocated'] / GIB:11.2f} GiB {run['peak_reserved'] / GIB:10.2f} GiB "
              f"{run['tokens_per_second']:9.0f}{'':14s}{run['tokens_per_second'] / standard['tokens_per_second']:7.2f}x "
              f"{run['peak_allocated'] / standard['peak_allocated']:8.3f}x")

# %% [markdown]
# **Memory, the eager step.** Both stacks hold the same things: the same NF4 codes and double-quantized
# constants, the same float32 adapters and their gradients, paged optimizer states that PyTorch's
# allocator never sees. Against no_upcast, which differs from our eager step only in whose code runs, the
# peaks agree within 1.5%. What the standard recipe adds is `prepare_model_for_kbit_training`'s float32
# copies, and the float32 activations they bring: the embeddings hand float32 vectors to the first layer
# and every RMSNorm multiplies by a float32 weight, so the residual stream, attention and the logits run in
# float32. What the model holds, then the upcast measured (each loaded model minus what was allocated
# before it) and predicted from the parameter count:

# %%
ours, standard = stacks["ours, eager"][(512, 64)], stacks["standard"][(512, 64)]
parts = estimate("Llama-2-7B").parts  # section 1's budget: batch 1, 512 tokens, r = 64
held = {"NF4 codes + constants": parts["4-bit weights"] + parts["quantization constants"],
        "bf16 embeddings, head, norms": parts["16-bit weights"], "float32 adapters": parts["trainable weights"]}
print("the model both stacks hold: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in held.items()) +
      f"; sum {sum(held.values()) / GIB:.2f} GiB, ours measured "
      f"{(ours['model_allocated'] - ours['start_allocated']) / GIB:.2f} GiB")
print(f"adapter numbers: ours {ours['trainable_parameters']:,}, baseline {standard['trainable_parameters']:,}")
counts = PRESETS["Llama-2-7B"].parameter_counts()
upcast = counts["embeddings"] + counts["lm_head"] + counts["norms"]
loaded = {name: stacks[name][(512, 64)]["model_allocated"] - stacks[name][(512, 64)]["start_allocated"]
          for name in ("standard", "no_upcast")}
print(f"loaded model, standard - no_upcast: {(loaded['standard'] - loaded['no_upcast']) / GIB:.3f} GiB measured; "
      f"{upcast:,} numbers x 2 more bytes = {2 * upcast / GIB:.3f} GiB predicted")
print(f"eager: ours / no_upcast peak {ours['peak_allocated'] / stacks['no_upcast'][(512, 64)]['peak_allocated']:.3f}x, "
      f"ours / standard {ours['peak_allocated'] / standard['peak_allocated']:.3f}x")

# %% [markdown]
# So our eager step is about 10% smaller than the standard recipe only because it does not upcast: the
# same work in the same order takes the same bytes. To do better, the step has to hold less at its peak.
#
# **Memory, the update in the backward.** At 512 tokens the eager step peaks at the end of the backward
# pass, when every adapter has its float32 gradient (0.60 GiB at r = 64) and the optimizer has not yet
# run. But AdamW updates each parameter from its own gradient and state alone, so the update can run as
# soon as that gradient is complete, inside the backward pass, and free it: a post-accumulate-grad hook per
# parameter (`step_in_backward`). The numbers are those of backward-then-step, byte for byte
# (tests/test_optim8bit.py); the gradients never all exist at once. The price: no clipping by the global
# gradient norm and no gradient accumulation, which need every gradient before any update. What it saves,
# measured against what the gradients weigh:

# %%
inside = stacks["ours, in backward"]
for setting in ((512, 64), (512, 16), (2048, 64)):
    saved = stacks["ours, eager"][setting]["peak_allocated"] - inside[setting]["peak_allocated"]
    gradients = 4 * inside[setting]["trainable_parameters"]
    moment = estimate("Llama-2-7B", seq_len=setting[0], r=setting[1]).peak_moment
    print(f"{setting[0]} tokens, r = {setting[1]}: peak {saved / GIB:+.3f} GiB lower; the adapters' gradients "
          f"{gradients / GIB:.3f} GiB; the estimator's peak moment: the {moment}")

# %% [markdown]
# At 512 tokens and r = 64 the peak drops by three quarters of the gradients' bytes: it is still a layer's
# backward, now without them. At r = 16 the gradients are a quarter as large, smaller than what a layer's
# backward itself allocates, and the peak barely moves. At 2048 tokens it does not move at all: there the
# peak is the loss's backward (two float32 [tokens, 32000] gradients), which comes before any adapter has a
# gradient. The estimator has the same switch (`estimate(..., optimizer_in_backward=True)`), and section
# 7's measured runs use it.
#
# **Speed.** The eager step runs at about the standard recipe's speed, and not because the GPU is busy.
# A profile of 4 such layers (forward and backward, 512 tokens;
# bench/results/profile-qlora-4layers-512-*.log) took 52 ms of wall time for 16 ms of GPU work: some 350
# kernel launches a layer (the checkpointed forward twice, the backward once), each costing the host
# 10-30 µs of Python and driver work, longer than many of the kernels run. The GPU waits for the host.
# A CUDA graph removes the host from the step: `CapturedStep` records every launch of one step (forward,
# loss, backward and the updates inside it) once, and each replay issues them all with one call. That
# needs fixed shapes and addresses (each batch is copied into the same buffers), nothing that reads a
# GPU value back during the step, no random numbers (checkpointing would recompute different ones), and an
# optimizer whose per-step numbers (bias corrections, learning rate) come from GPU memory, rewritten
# before each replay, since a replayed launch cannot take new arguments. Its replays give the eager step's
# bytes (tests/test_cuda_graph_gpu.py). The targets, ours / standard in every setting measured:

# %%
SPEED_TARGET, MEMORY_TARGET = 1.3, 0.85
for name in ("ours, eager", "ours, in backward", "ours, graph"):
    print(name)
    for setting in SETTINGS:
        run, standard = stacks[name][setting], stacks["standard"][setting]
        speed = run["tokens_per_second"] / standard["tokens_per_second"]
        memory = run["peak_allocated"] / standard["peak_allocated"]
        both = speed >= SPEED_TARGET and memory <= MEMORY_TARGET
        print(f"  {setting[0]:4d} tokens, r = {setting[1]:2d}: tokens/s {speed:.2f}x, peak allocated {memory:.3f}x: "
              f"{'both met' if both else 'not both met'}" + ("  <- the target's setting" * (setting == (512, 64))))
spread = max(max(runs[(512, 64)]["step_seconds"][1:]) / min(runs[(512, 64)]["step_seconds"][1:]) - 1
             for runs in stacks.values())
print(f"the 3 timed steps of a run differ by up to {spread:.0%} at 512 tokens, r = 64")

# %% [markdown]
# With the update in the backward and the step replayed as a graph, both targets are met where the course
# sets them (512 tokens, r = 64): four times the standard recipe's tokens per second at 0.83 times its peak
# memory. Each change alone meets one target: the update in the backward the memory, the graph the speed.
# At 2048 tokens the GPU has more work per launch, the eager steps are less host-bound, and the graph's
# gain is smaller; the memory ratio there, and at r = 16, is mostly the upcast's (the update in the
# backward saves little when the gradients are small or the loss is the peak). The graph also reserves
# more than the eager step: its private memory pool keeps every block the step used (section 6's
# allocator overhead).
#
# What the graph is not: a different computation. The same kernels run in the same order on the same
# numbers; only the host stops issuing them one by one. Lesson 8's trainer keeps the eager step, because it
# clips gradients by their global norm and accumulates them, and changes sequence lengths between batches.
#
# ## 9. Try it
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
# ## Summary
#
# - Parameter counts follow exactly from a config.json: Llama-2-7B has 6,738,415,616, of which 96% are
#   in the linear layers QLoRA quantizes; the embeddings and head stay in 16 bits.
# - QLoRA's base costs 4.127 bits a quantized weight (4.5 without double quantization); the adapters,
#   their float32 gradients and the optimizer states are small at r = 64 (about 1.2 GiB for 7B), and a
#   paged optimizer keeps its states off the GPU between updates.
# - Activations are O(tokens) with PyTorch's SDPA; we predict what autograd saves to the byte (measured
#   with `saved_tensors_hooks`) and the peak of a step on the CPU (within 0.1% when the loss is the peak,
#   within the adapters' gradients otherwise). Checkpointing cuts what is saved more than tenfold. A
#   large vocabulary can make the loss the peak.
# - The source table's FP32 column is weights only; its QLoRA column holds at batch 1 and short
#   sequences, and says neither. Measured on an H100 (batch 1, 512 tokens, r = 64), QLoRA peaks at
#   5.0 GB allocated for 7B, 9.2 GB for 13B and 42.0 GB for 70B; the estimator is within 5% of all twelve
#   runs, using two constants of the GPU measured from them (CUDA context, allocator overhead).
# - Against transformers + peft + bitsandbytes (7B, batch 1, 512 tokens, r = 64, one run on an H100):
#   the same step in the same loop takes the same bytes, 0.90x the standard recipe's peak only because
#   `prepare_model_for_kbit_training` upcasts to float32, and runs at about its speed, bound by the host's
#   kernel launches. Updating each adapter inside the backward pass frees the gradients (0.82x), and
#   replaying the whole step as a CUDA graph removes the host (4.0x the tokens per second at 0.83x the
#   peak): the same numbers, computed with less held and nothing waiting on Python.
#
# ## Check your understanding
#
# 1. Llama-2-70B has 64 query heads but 8 key/value heads. How many parameters does that save per layer
#    compared with 64 K/V heads? Check with `ModelShape`.
# 2. Why does the first layer save 4d + 4 bytes per token less than the others in QLoRA, but not in full
#    fine-tuning?
# 3. With bf16 adapters (`estimate(..., adapter_bytes=2)`), which lines of the 7B budget change, and by
#    how much?
# 4. At what sequence length does Llama-2-7B's QLoRA step (batch 1, checkpointing) stop fitting a T4?
#    Find it with `estimate` and explain which term grows.
# 5. Why can the update move into the backward pass for AdamW but not when gradients are clipped by
#    their global norm? What would gradient accumulation over two micro-batches need instead?
# 6. A CUDA graph replays its kernels with the arguments they were recorded with. Name three things in a
#    training step that change from one step to the next, and how `CapturedStep` handles each.
