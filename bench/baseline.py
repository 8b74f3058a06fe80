"""The baseline of lesson 9: QLoRA training of a 7B-shaped Llama the standard way, with transformers + peft +
bitsandbytes, measured exactly as bench.memory measures ours (on a CUDA GPU).

    python -m bench.baseline [--out bench/results] [--settings 512:16 512:64 2048:16 2048:64]
                                       [--recipes standard no_upcast qlora_ref qlora_ref_in_backward
                                                  qlora_ref_graph qlora_ref_bnb_optimizer qlora_ref_fused
                                                  qlora_ref_fused_graph]

The model: transformers' LlamaForCausalLM with Llama-2-7B's shape (qlora_ref.model_shapes.PRESETS) and random weights
(transformers' own initialisation, N(0, 0.02^2), norms 1), built once on the GPU in bf16 and saved with
save_pretrained to a temporary folder, so that every run loads it the way a practitioner loads a checkpoint:

    AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
        bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, device_map={"": 0})

which turns the seven linears of every layer into bitsandbytes Linear4bit (NF4 + double quantization) and
leaves the embeddings, lm_head and norms in bf16, as ours. Then, per RECIPES:

    standard   peft.prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant":
               False}), the call every QLoRA tutorial makes. It freezes the base, casts every bf16 parameter that
               is not 4-bit to float32 (embeddings, lm_head, norms: 262 million numbers, +0.49 GiB), hooks the
               embeddings' output to require grad and turns on gradient checkpointing. The float32 embeddings
               and norm weights make the residual stream float32, and Linear4bit returns its input's dtype, so
               attention (SDPA in float32) and the logits run in float32 too: more activation bytes, slower.
    no_upcast  the same without prepare_model_for_kbit_training: embeddings, head and norms stay bf16, as in
               ours; gradient checkpointing turned on directly (non-reentrant, as ours). The closest to our setup.

Both: get_peft_model(LoraConfig(r, lora_alpha=2r, target_modules=the seven linears, lora_dropout=0,
bias="none", task_type="CAUSAL_LM")) (float32 adapters, PEFT's default), model.train(),
bitsandbytes.optim.PagedAdamW8bit(lr=1e-4) (states in managed memory), batch 1, random token ids, 4 steps.
use_reentrant=False is what torch asks for and transformers' own default; ours checkpoints the same way.

More recipes, not run by default, time OUR step (memory.build's model, checkpointing, batch 1) in the
same process, so that the ratios are side by side: qlora_ref (our PagedAdamW8bit, paging="managed", the
update after the backward, as the baseline; phase by phase, to see where the time goes),
qlora_ref_in_backward (the update inside the backward: AdamW8bit.step_in_backward), qlora_ref_graph (that
step captured as a CUDA graph and replayed: memory.timed_steps, one phase "step"),
qlora_ref_bnb_optimizer (bitsandbytes' PagedAdamW8bit instead of ours, after the backward), and
qlora_ref_fused, qlora_ref_fused_graph (qlora_ref and qlora_ref_graph with the fused RMSNorm, rotary embeddings, SwiGLU and loss of
LlamaForCausalLM.fused_kernels_enable, issue 23).

Measured per (recipe, sequence length, rank), as memory.run: peak stats reset before the model is
loaded, so the peaks include it and the loading; peak_allocated / peak_reserved over load and steps (also each
part alone, load_* and train_*), context_bytes, tokens_per_second of the steps after the first, and the time
of each step's forward, backward and optimizer step (a synchronize between them). start_allocated is what
PyTorch still held before the run (64 MiB after a first run on the H100): it sits in every run's peak, as in
bench/memory.py, whose runs share one process too.
Writes <out>/baseline-<gpu-name>.json (bench.write_results) after every run.
"""

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.methods import LORA_TARGETS
from qlora_ref.model_shapes import PRESETS

from .timing import gpu_run, write_results
from .memory import build, config_of, parse_settings, timed_steps

DEVICE = "cuda"
RECIPES = ("standard", "no_upcast")  # transformers + peft + bitsandbytes
OURS = ("qlora_ref", "qlora_ref_in_backward", "qlora_ref_graph", "qlora_ref_bnb_optimizer", "qlora_ref_fused",
        "qlora_ref_fused_graph")  # our model (see above)
GRAPHED = ("qlora_ref_graph", "qlora_ref_fused_graph")


def hf_config(name: str = "Llama-2-7B"):
    """transformers' LlamaConfig of a qlora_ref.vram preset (Llama-2's rms_norm_eps, no KV cache in training)."""
    from transformers import LlamaConfig

    shape = PRESETS[name]
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                       num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                       head_dim=shape.head_dim, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=shape.tie_word_embeddings, use_cache=False)


def save_random_checkpoint(config, folder: Path, seed: int = 0) -> Path:
    """A bf16 model with transformers' random initialisation, built on DEVICE, saved as safetensors in folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return folder


def load_qlora(folder: Path, r: int, recipe: str):
    """The checkpoint in folder loaded in NF4 + double quantization, prepared per recipe, with LoRA adapters."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    device = torch.cuda.current_device() if DEVICE == "cuda" else DEVICE
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": device}, attn_implementation="sdpa")
    checkpointing = {"use_reentrant": False}
    if recipe == "standard":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train()


def train(model, optimizer, ids, steps: int) -> dict:
    """steps training steps on ids; seconds of each step's forward, backward and optimizer step, and the loss."""
    phases = {"forward": [], "backward": [], "optimizer": []}
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        sync()
        forward = time.perf_counter()
        loss.backward()
        sync()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        phases["forward"].append(forward - start)
        phases["backward"].append(backward - forward)
        phases["optimizer"].append(time.perf_counter() - backward)
    return {"phase_seconds": phases, "loss": loss.item()}


def setup(recipe: str, seq_len: int, r: int, folder: Path = None):
    """The model (train mode, checkpointing on) and the paged 8-bit AdamW of one run."""
    import bitsandbytes as bnb

    if recipe in OURS:
        generator = torch.Generator(device=DEVICE).manual_seed(0)
        model = build(config_of("Llama-2-7B", seq_len), r, generator)
        model.gradient_checkpointing_enable()
        model.fused_kernels_enable("fused" in recipe)
        model.train()
    else:
        model = load_qlora(folder, r, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if recipe in OURS and recipe != "qlora_ref_bnb_optimizer":
        return model, PagedAdamW8bit(trainable, lr=1e-4, paging="managed")
    return model, bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)


def run(folder: Path, seq_len: int, r: int, recipe: str, steps: int = 4) -> dict:
    gc.collect()  # the last run's model, if a reference cycle still holds it
    torch.cuda.empty_cache()
    start_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, optimizer = setup(recipe, seq_len, r, folder)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    load_seconds = time.perf_counter() - start
    load_peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    model_bytes = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # the peak of the whole run is the larger of the two parts' peaks
    config = model.config
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=DEVICE,
                        generator=torch.Generator(device=DEVICE).manual_seed(0))
    if recipe in GRAPHED:  # one phase: the replayed graph
        timed = timed_steps(model, optimizer, ids, steps, "graph")
        result = {"phase_seconds": {"step": timed["step_seconds"]}, "loss": timed["loss"]}
    else:
        if recipe == "qlora_ref_in_backward":
            optimizer.step_in_backward()
        result = train(model, optimizer, ids, steps)
    train_peaks = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    free, total = torch.cuda.mem_get_info()
    steps_seconds = [sum(t) for t in zip(*result["phase_seconds"].values())]
    base = model if recipe in OURS else model.get_base_model()
    row = {"model": "Llama-2-7B", "stack": "qlora_ref" if recipe in OURS else "transformers+peft+bitsandbytes",
           "recipe": recipe, "method": "qlora_nf4_dq", "optimizer": "paged_adamw_8bit", "batch": 1,
           "seq_len": seq_len, "r": r, "gradient_checkpointing": True,
           "adapter_dtype": sorted({str(p.dtype).removeprefix("torch.") for p in trainable}),
           "embedding_dtype": str(base.model.embed_tokens.weight.dtype).removeprefix("torch."),
           "lm_head_dtype": str(base.lm_head.weight.dtype).removeprefix("torch."),
           "peak_allocated": max(load_peaks[0], train_peaks[0]), "peak_reserved": max(load_peaks[1], train_peaks[1]),
           "load_peak_allocated": load_peaks[0], "load_peak_reserved": load_peaks[1],
           "train_peak_allocated": train_peaks[0], "train_peak_reserved": train_peaks[1],
           "start_allocated": start_bytes, "model_allocated": model_bytes,
           "context_bytes": total - free - torch.cuda.memory_reserved(),
           "trainable_parameters": sum(p.numel() for p in trainable), "load_seconds": load_seconds,
           "step_seconds": steps_seconds, "tokens_per_second": seq_len * (steps - 1) / sum(steps_seconds[1:]),
           **result}
    del model, base, optimizer, trainable
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--settings", nargs="+", default=["512:16", "512:64", "2048:16", "2048:64"],
                        help="seq_len:rank pairs")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES + OURS)
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    results = gpu_run("bench.baseline")
    import accelerate
    import peft
    import transformers

    transformers.logging.disable_progress_bar()
    results.update({"transformers": transformers.__version__, "peft": peft.__version__,
                    "accelerate": accelerate.__version__, "total_bytes": torch.cuda.mem_get_info()[1], "runs": []})
    folder = Path(tempfile.mkdtemp(prefix="llama-2-7b-random-"))
    try:
        if set(args.recipes) & set(RECIPES):
            start = time.perf_counter()
            save_random_checkpoint(hf_config("Llama-2-7B"), folder)
            print(f"saved a random bf16 Llama-2-7B to {folder} in {time.perf_counter() - start:.0f} s", flush=True)
        for seq_len, r in settings:
            for recipe in args.recipes:
                row = run(folder, seq_len, r, recipe)
                results["runs"].append(row)
                phases = ", ".join(f"{k} {sum(v[1:]) / len(v[1:]):.3f}" for k, v in row["phase_seconds"].items())
                print(f"{recipe} seq {seq_len} r {r}: peak allocated {row['peak_allocated'] / 2**30:.2f} GiB "
                      f"(load {row['load_peak_allocated'] / 2**30:.2f}), reserved {row['peak_reserved'] / 2**30:.2f} "
                      f"GiB, model {row['model_allocated'] / 2**30:.2f} GiB, {row['tokens_per_second']:.0f} tokens/s "
                      f"(s per step: {phases}), loaded in {row['load_seconds']:.0f} s", flush=True)
                path = write_results(args.out, "baseline", results)  # after every run: a timeout keeps the rest
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
