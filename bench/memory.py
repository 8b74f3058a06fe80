"""Measured QLoRA training memory of 7B-, 13B- and 70B-shaped Llama models on a CUDA GPU (lesson 9).

    python -m bench.memory [--out bench/results] [--models Llama-2-7B Llama-2-13B Llama-2-70B]
                                     [--settings 512:16 ...] [--steps graph in_backward eager]

Each model is built directly in NF4 + double quantization, one linear at a time: its architecture on the
`meta` device (no memory), then every linear of every layer made on the GPU in bf16 with random weights
(N(0, 0.02^2), as Hugging Face initialises), quantized into a QLoRALinear and the bf16 copy freed. The
embeddings, norms and lm_head are bf16. The whole bf16 model is never held (a 70B one would not fit).
Then training steps with LoRA on all seven linears of every layer (alpha = 2r, float32 adapters as PEFT
keeps them), gradient checkpointing, paged 8-bit AdamW (states of >= 1e5 values in managed memory), batch 1
and random token ids, the step run as `--steps` says (timed_steps: by default "graph", the optimizer in the
backward and the whole step replayed as a CUDA graph), and for each (model, sequence length, rank, step):

    peak_allocated, peak_reserved   torch.cuda.max_memory_allocated / max_memory_reserved over the run,
                                    model included (paged states in managed memory count in neither)
    context_bytes                   what the device reports in use beyond the reserved memory
    tokens_per_second               of the timed steps after the first (the first eager one compiles and
                                    allocates; a graph's warm-up and capture come before them all)

Writes <out>/memory-<gpu-name>.json in the format qlora_ref.results.load_measurements reads.
"""

import argparse
import gc
import itertools
import time
from pathlib import Path

import torch
from torch import nn

from qlora_ref.cuda_graph import CapturedStep
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM
from qlora_ref.lora import QLoRALinear
from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.methods import LORA_TARGETS
from qlora_ref.model_shapes import PRESETS

from .timing import gpu_run, write_results

DEVICE = "cuda"


def parse_settings(values) -> list:
    """["512:64", ...] -> [(512, 64), ...]: sequence length and LoRA rank, both positive."""
    settings = []
    for value in values:
        parts = value.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"a setting is seq_len:rank with two positive integers, e.g. 512:64; got {value!r}")
        settings.append((int(parts[0]), int(parts[1])))
    return settings


def config_of(name: str, seq_len: int) -> LlamaConfig:
    shape = PRESETS[name]
    return LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                       num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                       max_position_embeddings=max(seq_len, 4096), tie_word_embeddings=False)


def build(config: LlamaConfig, r: int, generator: torch.Generator) -> LlamaForCausalLM:
    """The model with QLoRALinear layers on the GPU, built one linear at a time (see the module docstring)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, meta in list(parent.named_children()):
                if name not in LORA_TARGETS:
                    continue
                linear = nn.Linear(meta.in_features, meta.out_features, bias=False, device=DEVICE, dtype=torch.bfloat16)
                with torch.no_grad():
                    linear.weight.normal_(0.0, config.initializer_range, generator=generator)
                setattr(parent, name, QLoRALinear(linear, r=r, alpha=2 * r, compute_dtype=torch.bfloat16))
                del linear
    for module in model.modules():  # embeddings, norms, lm_head: still on meta
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                value = torch.empty(param.shape, device=DEVICE, dtype=torch.bfloat16)
                with torch.no_grad():
                    value.fill_(1.0) if param.dim() == 1 else value.normal_(0.0, config.initializer_range, generator=generator)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
    return model


STEPS = ("graph", "in_backward", "eager")


def timed_steps(model, optimizer, ids, steps: int, step: str = "graph") -> dict:
    """`steps` training steps on ids, each timed from a synchronize to the next: {"step_seconds", "loss"}.

    step = "eager": forward, backward, then optimizer.step() (every gradient alive at the end of backward);
    "in_backward": the same with optimizer.step_in_backward() (each update as soon as its gradient is done,
    so the gradients never all exist); "graph": that step captured once as a CUDA graph and replayed
    (qlora_ref.cuda_graph.CapturedStep: its two warm-up steps and the capture run before the timed steps).
    """
    if step not in STEPS:
        raise ValueError(f"step must be one of {STEPS}, got {step!r}")
    if step == "graph":
        captured = CapturedStep(model, optimizer, ids, ids)

        def one_step():
            return captured(ids, ids)
    else:
        if step == "in_backward":
            optimizer.step_in_backward()

        def one_step():
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = one_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"step_seconds": times, "loss": loss.item()}


def run(name: str, seq_len: int, r: int, steps: int = 4, step: str = "graph") -> dict:
    gc.collect()  # whatever of the last run sits in a reference cycle goes before the peaks are reset
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    config = config_of(name, seq_len)
    model = build(config, r, generator)
    model.gradient_checkpointing_enable()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW8bit(trainable, lr=1e-4, paging="managed")
    model_bytes = torch.cuda.memory_allocated()
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=DEVICE, generator=generator)
    result = timed_steps(model, optimizer, ids, steps, step)
    times = result["step_seconds"]
    free, total = torch.cuda.mem_get_info()
    row = {"model": name, "method": "qlora_nf4_dq", "optimizer": "paged_adamw_8bit", "step": step, "batch": 1,
           "seq_len": seq_len, "r": r, "gradient_checkpointing": True, "adapter_dtype": "float32",
           "peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
           "model_allocated": model_bytes, "context_bytes": total - free - torch.cuda.memory_reserved(),
           "trainable_parameters": sum(p.numel() for p in trainable), **result,
           "tokens_per_second": seq_len * (steps - 1) / sum(times[1:])}
    del model, optimizer, trainable
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--models", nargs="+", default=["Llama-2-7B", "Llama-2-13B", "Llama-2-70B"])
    parser.add_argument("--settings", nargs="+", default=["512:16", "512:64", "2048:16", "2048:64"],
                        help="seq_len:rank pairs")
    parser.add_argument("--steps", nargs="+", default=["graph"], choices=STEPS,
                        help="how the step runs (timed_steps); each is a run of its own")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    results = gpu_run("bench.memory")
    results.update({"total_bytes": torch.cuda.mem_get_info()[1], "runs": []})
    for name in args.models:
        for (seq_len, r), step in itertools.product(settings, args.steps):
            row = run(name, seq_len, r, step=step)
            results["runs"].append(row)
            print(f"{name} seq {seq_len} r {r} step {step}: peak allocated {row['peak_allocated'] / 2**30:.2f} GiB, reserved "
                  f"{row['peak_reserved'] / 2**30:.2f} GiB, model {row['model_allocated'] / 2**30:.2f} GiB, "
                  f"{row['tokens_per_second']:.0f} tokens/s", flush=True)
            path = write_results(args.out, "memory", results)  # after every run: a timeout keeps the rest
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
