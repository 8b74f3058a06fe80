"""Lesson 10 on GPUs: QLoRA of a 7B/13B/70B-shaped Llama sharded by FSDP2, peak memory per GPU (NCCL).

    torchrun --standalone --nproc-per-node 1 -m bench.fsdp [--models Llama-2-7B] [--settings 2048:16]
             [--out bench/results] [--steps 4]

Each rank builds the model as lesson 9's benchmark does (bench.memory.build: NF4 + double quantization
one linear at a time, bf16 embeddings, norms and head, float32 adapters on the seven linears, alpha = 2r), then
shards it (qlora_ref.distributed.shard_qlora_model: one FSDP2 unit per decoder layer, the 4-bit bases as
Weight4bit) and trains `--steps` eager steps (forward, backward, ShardedAdamW8bit.step) with gradient
checkpointing on random token ids, batch 1 per rank. With one rank (--nproc-per-node 1) it first runs the same
model unsharded with lesson 9's eager step (bench.memory.run(step="eager"): PagedAdamW8bit, whose states in
managed memory count in no peak), so that the two peaks stand side by side on the same GPU.

Writes <out>/fsdp-<gpu-name>-x<world size>.json from rank 0, with each rank's peak_allocated.
"""

import argparse
import gc
import time
from pathlib import Path

import torch
import torch.distributed as dist

from qlora_ref.distributed import ShardedAdamW8bit, init_distributed, shard_qlora_model

from .memory import build, config_of, parse_settings, run, timed_steps
from .timing import gpu_run, write_results


def sharded_run(mesh, name: str, seq_len: int, r: int, steps: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    config = config_of(name, seq_len)
    start = time.perf_counter()
    model = build(config, r, generator)  # every rank quantizes the whole model, then keeps its shard
    model.gradient_checkpointing_enable()
    model.train()
    shard_qlora_model(model, mesh)
    gc.collect()
    torch.cuda.empty_cache()
    load_seconds = time.perf_counter() - start
    model_bytes = torch.cuda.memory_allocated()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = ShardedAdamW8bit(trainable, lr=1e-4)
    torch.cuda.reset_peak_memory_stats()  # the training peak: building held the whole quantized model once
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device="cuda", generator=generator)
    result = timed_steps(model, optimizer, ids, steps, "eager")
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved(), model_bytes],
                         device="cuda", dtype=torch.float64)
    gathered = [torch.zeros_like(peaks) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, peaks)
    times = result["step_seconds"]
    row = {"model": name, "method": "qlora_nf4_dq", "optimizer": "sharded_adamw8bit", "step": "eager",
           "world_size": dist.get_world_size(), "batch_per_rank": 1, "seq_len": seq_len, "r": r,
           "peak_allocated": [int(p[0]) for p in gathered], "peak_reserved": [int(p[1]) for p in gathered],
           "model_allocated": [int(p[2]) for p in gathered], "load_seconds": load_seconds, **result,
           "tokens_per_second": dist.get_world_size() * seq_len * (steps - 1) / sum(times[1:])}
    del model, optimizer, trainable
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--models", nargs="+", default=["Llama-2-7B"])
    parser.add_argument("--settings", nargs="+", default=["2048:16"], help="seq_len:rank pairs")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    mesh = init_distributed("cuda")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = gpu_run("bench.fsdp")
    results.update({"world_size": world_size, "total_bytes": torch.cuda.mem_get_info()[1], "runs": []})
    try:
        for name in args.models:
            for seq_len, r in settings:
                if world_size == 1:
                    row = {**run(name, seq_len, r, steps=args.steps, step="eager"), "world_size": 0}
                    results["runs"].append(row)  # world_size 0: not sharded, lesson 9's eager step
                    print(f"{name} seq {seq_len} r {r} unsharded: peak allocated {row['peak_allocated'] / 2**30:.3f} "
                          f"GiB, {row['tokens_per_second']:.0f} tokens/s", flush=True)
                row = sharded_run(mesh, name, seq_len, r, args.steps)
                results["runs"].append(row)
                if rank == 0:
                    peaks = ", ".join(f"{p / 2**30:.3f}" for p in row["peak_allocated"])
                    print(f"{name} seq {seq_len} r {r} FSDP2 x{world_size}: peak allocated per GPU {peaks} GiB, "
                          f"model {row['model_allocated'][0] / 2**30:.3f} GiB, {row['tokens_per_second']:.0f} "
                          f"tokens/s, loss {row['loss']:.4f}", flush=True)
                    path = write_results(args.out, f"fsdp-x{world_size}", results)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
