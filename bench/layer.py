"""Benchmark of one QLoRA linear layer, forward plus backward, on a CUDA GPU.

    python -m bench.layer [--out bench/results] [--tokens 4096] [--rank 16]

For each Llama weight (N x K = 4096x4096, 4096x14336, 8192x8192, 8192x28672), NF4 with double quantization,
blocksize 64, bf16 compute, LoRA rank 16, alpha 32, adapters in bf16, no dropout, and x of `tokens` rows that
needs its gradient (as inside a network), it times one forward and backward (y = layer(x); y.backward(g)):
  - bnb:   bitsandbytes Linear4bit plus a LoRA branch in plain PyTorch, as PEFT writes it:
           result = base(x); result = result + lora_B(lora_A(dropout(x))) * scaling
           The weight is quantized from bf16, as transformers does when it loads a model with
           load_in_4bit and dtype=bfloat16: the QuantState's dtype is then bf16, and the backward
           dequantizes straight to bf16.
  - bnb_float32_state: the same, its weight quantized from float32 (nn.Linear's default dtype), as the
           first version of this benchmark built it: the backward then dequantizes to float32 and converts.
           Timed to show what that costs; not a baseline.
  - ours:  qlora_ref.QLoRALinear (one autograd node for the base and the adapters)
  - dense: a bf16 nn.Linear plus the same plain LoRA branch (the weight held dense: what 4 bits save memory on)
  - gemms: the two bf16 GEMMs alone, x W^T and g W with W dense (no adapters, no dequantization): every
           layer here runs them, so bnb / gemms is the most any 4-bit layer can gain on bnb with these GEMMs.
Each is timed two ways, in rounds that alternate between the layers (so that clock and temperature drift
reach all of them alike; the median over rounds is kept): triton.testing.do_bench (median, L2 flushed),
which includes the host's time where launching a step takes longer than running it, and the GPU time
alone (bench.timing.device_ms: CUDA-graph replays). Also recorded: the peak memory of one step above
the inputs, and whether ours and bnb give the same output and gradients (the packed bytes are equal; see
tests/test_lora_gpu.py). Writes <out>/layer-<gpu-name>.json and prints a table.
"""

import argparse
import statistics
from pathlib import Path

import torch
from torch import nn

from .timing import LLAMA_SHAPES, device_ms, gpu_run, host_us, median_ms, write_results

DEVICE = "cuda"
DTYPE = torch.bfloat16
ROUNDS = 5  # timing rounds, each over every layer in turn


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


class DenseProducts(torch.autograd.Function):
    """y = x W^T, and in the backward only dL/dx = g W: the two GEMMs of a frozen layer, nothing else."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return grad_out @ weight, None


class GemmsOnly(nn.Module):
    """The floor of the comparison: a frozen dense weight's forward and input-gradient GEMMs, no adapters."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x):
        return DenseProducts.apply(x, self.weight)


def layers(N, K, r, alpha):
    """{bnb, ours, bnb_float32_state, dense, gemms} for one random weight, with the same adapters (B non-zero, as
    after training)."""
    from qlora_ref.lora import QLoRALinear

    g = torch.Generator(device=DEVICE).manual_seed(0)
    linear = nn.Linear(K, N, bias=False, device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, device=DEVICE, dtype=DTYPE, generator=g) * K ** -0.5)
    ours = QLoRALinear(linear, r=r, alpha=alpha, compute_dtype=DTYPE, adapter_dtype=DTYPE)
    with torch.no_grad():
        ours.lora_B.weight.copy_(torch.randn(N, r, device=DEVICE, dtype=DTYPE, generator=g) * 0.01)
    modules = {"bnb": PlainLoRA(linear4bit(linear.weight, DTYPE), K, N, r, alpha), "ours": ours,
               "bnb_float32_state": PlainLoRA(linear4bit(linear.weight, torch.float32), K, N, r, alpha),
               "dense": PlainLoRA(linear.requires_grad_(False), K, N, r, alpha)}
    for other in modules.values():
        if other is not ours:
            other.lora_A.weight.data.copy_(ours.lora_A.weight.data)
            other.lora_B.weight.data.copy_(ours.lora_B.weight.data)
    return {**modules, "gemms": GemmsOnly(linear.weight.detach())}


def linear4bit(weight: torch.Tensor, dtype: torch.dtype):
    """bitsandbytes' Linear4bit (NF4, double quantization, bf16 compute) of `weight` quantized from `dtype`:
    as transformers builds it, Params4bit of the weight, quantized when moved to the GPU."""
    import bitsandbytes as bnb

    N, K = weight.shape
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.detach().to("cpu", dtype), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer = layer.to(DEVICE)
    assert layer.weight.quant_state.dtype == dtype, layer.weight.quant_state.dtype
    return layer


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
    row = {"shape": [N, K], "tokens": tokens, "rank": r, "ms": {}, "device_ms": {}, "rounds": {}, "peak_MB": {},
           "agreement": {}}
    results = {}
    for name in ("bnb", "ours"):
        layer = modules[name]
        step(layer, x, g)
        results[name] = (layer(x).detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(),
                         layer.lora_B.weight.grad.clone())
    for name, layer in modules.items():
        row["peak_MB"][name] = peak_bytes(layer, x, g) / 2**20
        row["rounds"][name] = {"ms": [], "device_ms": []}
    for _ in range(ROUNDS):
        for name, layer in modules.items():
            row["rounds"][name]["ms"].append(median_ms(lambda: step(layer, x, g)))
            row["rounds"][name]["device_ms"].append(device_ms(lambda: step(layer, x, g)))
    for name, rounds in row["rounds"].items():
        row["ms"][name] = statistics.median(rounds["ms"])
        row["device_ms"][name] = statistics.median(rounds["device_ms"])
    for i, part in enumerate(("y", "grad_x", "grad_A", "grad_B")):
        a, b = results["ours"][i].float(), results["bnb"][i].float()
        row["agreement"][part] = {"equal": bool(torch.equal(a, b)), "max_abs": (a - b).abs().max().item(),
                                  "scale": b.abs().max().item()}
    for clock in ("ms", "device_ms"):
        times = row[clock]
        row[f"ours_vs_bnb_{clock}"] = times["bnb"] / times["ours"]
        row[f"ceiling_vs_bnb_{clock}"] = times["bnb"] / times["gemms"]  # bnb over the two GEMMs alone
        row[f"float32_state_cost_{clock}"] = times["bnb_float32_state"] / times["bnb"] - 1
    del modules, x, g
    torch.cuda.empty_cache()
    return row


def table(results) -> str:
    lines = [f"{results['device']}, torch {results['torch']}, triton {results['triton']}, bitsandbytes "
             f"{results['bitsandbytes']}; {results['tokens']} tokens, bf16, NF4 + double quant, LoRA r={results['rank']}; "
             f"forward + backward, ms: do_bench median / GPU time, median of {results['rounds']} alternating rounds",
             "| weight NxK | bnb Linear4bit + LoRA | ours QLoRALinear | dense bf16 + LoRA | the two GEMMs alone "
             "| ours vs bnb | ceiling (bnb / GEMMs) | peak MB bnb / ours / dense | y, grad_x equal to bnb |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["layers"]:
        ms, dev, mb, agree = r["ms"], r["device_ms"], r["peak_MB"], r["agreement"]
        both = {name: f"{ms[name]:.3f} / {dev[name]:.3f}" for name in ms}
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {both['bnb']} | {both['ours']} | {both['dense']} "
                     f"| {both['gemms']} | {r['ours_vs_bnb_ms']:.2f}x / {r['ours_vs_bnb_device_ms']:.2f}x "
                     f"| {r['ceiling_vs_bnb_ms']:.2f}x / {r['ceiling_vs_bnb_device_ms']:.2f}x "
                     f"| {mb['bnb']:.0f} / {mb['ours']:.0f} / {mb['dense']:.0f} "
                     f"| {agree['y']['equal']}, {agree['grad_x']['equal']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    results = gpu_run("bench.layer")
    results.update({"timing": "y = layer(x); y.backward(g): ms, triton.testing.do_bench median (L2 flushed); "
                              "device_ms, GPU time of CUDA-graph replays (bench.timing.device_ms); each the median "
                              "of alternating rounds over the layers",
                    "rounds": ROUNDS, "tokens": args.tokens, "rank": args.rank, "alpha": 2 * args.rank,
                    "baseline_quant_state_dtype": str(DTYPE), "layers": []})
    for N, K in LLAMA_SHAPES:
        row = case(N, K, args.tokens, args.rank, 2 * args.rank)
        results["layers"].append(row)
        print(f"{N}x{K}: " + ", ".join(f"{k} {v:.3f} / {row['device_ms'][k]:.3f} ms" for k, v in row["ms"].items())
              + f"; ours vs bnb {row['ours_vs_bnb_ms']:.2f}x / {row['ours_vs_bnb_device_ms']:.2f}x", flush=True)
    results["host_us_512x512_16_tokens"] = overhead()
    print("host time per step, 512x512, 16 tokens: "
          + ", ".join(f"{k} {v:.0f} us" for k, v in results["host_us_512x512_16_tokens"].items()), flush=True)
    print(f"wrote {write_results(args.out, 'layer', results)}")
    print(table(results))


if __name__ == "__main__":
    main()
