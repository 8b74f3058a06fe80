"""Benchmark of one QLoRA linear layer, forward plus backward, on a CUDA GPU.

    python -m qlora_ref.bench_layer [--out bench/results] [--tokens 4096] [--rank 16]

For each Llama weight (N x K = 4096x4096, 4096x14336, 8192x8192, 8192x28672), NF4 with double quantization,
blocksize 64, bf16 compute, LoRA rank 16, alpha 32, adapters in bf16, no dropout, and x of `tokens` rows that
needs its gradient (as inside a network), it times one forward and backward (y = layer(x); y.backward(g)):
  - bnb:   bitsandbytes Linear4bit plus a LoRA branch in plain PyTorch, as PEFT writes it:
           result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling
  - ours:  qlora_ref.QLoRALinear (one autograd node for the base and the adapters)
  - dense: a bf16 nn.Linear plus the same plain LoRA branch (the weight held dense: what 4 bits save memory on)
with triton.testing.do_bench (median, L2 flushed), the peak memory of one step above the inputs, and checks
that ours and bnb give the same output and gradients (the packed bytes are equal; see tests/test_lora_gpu.py).
Writes <out>/layer-<gpu-name>.json and prints a table.
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from .bench import LLAMA_SHAPES, gpu_run, host_us, median_ms, write_results

DEVICE = "cuda"
DTYPE = torch.bfloat16


class PlainLoRA(nn.Module):
    """A frozen base layer plus a LoRA branch written as PEFT writes it (the baseline)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(in_features, r, bias=False, device=DEVICE, dtype=DTYPE)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=DEVICE, dtype=DTYPE)
        self.lora_dropout = nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def layers(N, K, r, alpha):
    """(bnb, ours, dense) for one random weight, with the same adapters (B non-zero, as after training)."""
    import bitsandbytes as bnb

    from .lora import QLoRALinear

    g = torch.Generator(device=DEVICE).manual_seed(0)
    linear = nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, device=DEVICE, dtype=DTYPE, generator=g) * K ** -0.5)
    ours = QLoRALinear(linear, r=r, alpha=alpha, compute_dtype=DTYPE, adapter_dtype=DTYPE)
    base4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
    base4.load_state_dict({"weight": linear.weight.detach().cpu()})
    base4 = base4.to(DEVICE)
    with torch.no_grad():
        ours.lora_B.weight.copy_(torch.randn(N, r, device=DEVICE, dtype=DTYPE, generator=g) * 0.01)
    theirs = PlainLoRA(base4, K, N, r, alpha)
    dense = PlainLoRA(linear.requires_grad_(False), K, N, r, alpha)
    for other in (theirs, dense):
        other.lora_A.weight.data.copy_(ours.lora_A.weight.data)
        other.lora_B.weight.data.copy_(ours.lora_B.weight.data)
    return {"bnb": theirs, "ours": ours, "dense": dense}


def step(layer, x, g):
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    layer(x).backward(g)


def peak_bytes(layer, x, g) -> int:
    """Peak allocated during one step, above what was allocated before it (layer, x, g)."""
    step(layer, x, g)  # warm up: the first step allocates the .grad tensors
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(layer, x, g)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def overhead(tokens=16, size=512, r=16):
    """Microseconds per forward + backward of a 512x512 layer on 16 tokens: Python and launches, no GPU work."""
    modules = layers(size, size, r, 2 * r)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(tokens, size, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, size, device=DEVICE, dtype=DTYPE, generator=gen)
    return {name: host_us(lambda: step(layer, x, g), calls=200) for name, layer in modules.items()}


def case(N, K, tokens, r, alpha):
    modules = layers(N, K, r, alpha)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn(tokens, K, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, N, device=DEVICE, dtype=DTYPE, generator=gen)
    row = {"shape": [N, K], "tokens": tokens, "rank": r, "ms": {}, "peak_MB": {}, "agreement": {}}
    results = {}
    for name, layer in modules.items():
        step(layer, x, g)
        results[name] = (layer(x).detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(),
                         layer.lora_B.weight.grad.clone())
        row["ms"][name] = median_ms(lambda: step(layer, x, g))
        row["peak_MB"][name] = peak_bytes(layer, x, g) / 2**20
    for i, part in enumerate(("y", "grad_x", "grad_A", "grad_B")):
        a, b = results["ours"][i].float(), results["bnb"][i].float()
        row["agreement"][part] = {"equal": bool(torch.equal(a, b)), "max_abs": (a - b).abs().max().item(),
                                  "scale": b.abs().max().item()}
    row["ours_vs_bnb"] = row["ms"]["bnb"] / row["ms"]["ours"]
    row["ours_vs_dense"] = row["ms"]["dense"] / row["ms"]["ours"]
    del modules, x, g
    torch.cuda.empty_cache()
    return row


def table(results) -> str:
    lines = [f"{results['device']}, torch {results['torch']}, triton {results['triton']}, bitsandbytes "
             f"{results['bitsandbytes']}; {results['tokens']} tokens, bf16, NF4 + double quant, LoRA r={results['rank']}; "
             "forward + backward, do_bench median ms",
             "| weight NxK | bnb Linear4bit + LoRA | ours QLoRALinear | dense bf16 + LoRA | ours vs bnb "
             "| peak MB bnb / ours / dense | y, grad_x equal to bnb |",
             "|---|---|---|---|---|---|---|"]
    for r in results["layers"]:
        ms, mb, agree = r["ms"], r["peak_MB"], r["agreement"]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {ms['bnb']:.3f} | {ms['ours']:.3f} | {ms['dense']:.3f} "
                     f"| {r['ours_vs_bnb']:.2f}x | {mb['bnb']:.0f} / {mb['ours']:.0f} / {mb['dense']:.0f} "
                     f"| {agree['y']['equal']}, {agree['grad_x']['equal']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    results = gpu_run("qlora_ref.bench_layer")
    results.update({"timing": "triton.testing.do_bench median of y = layer(x); y.backward(g), L2 flushed",
                    "tokens": args.tokens, "rank": args.rank, "alpha": 2 * args.rank, "layers": []})
    for N, K in LLAMA_SHAPES:
        row = case(N, K, args.tokens, args.rank, 2 * args.rank)
        results["layers"].append(row)
        print(f"{N}x{K}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["ms"].items())
              + f"; ours vs bnb {row['ours_vs_bnb']:.2f}x", flush=True)
    results["host_us_512x512_16_tokens"] = overhead()
    print("host time per step, 512x512, 16 tokens: "
          + ", ".join(f"{k} {v:.0f} us" for k, v in results["host_us_512x512_16_tokens"].items()), flush=True)
    print(f"wrote {write_results(args.out, 'layer', results)}")
    print(table(results))


if __name__ == "__main__":
    main()
