"""Benchmark of the fused ops of issue 23 against the unfused PyTorch they replace, on a CUDA GPU.

    python -m bench.fused [--out bench/results] [--tokens 512 2048]

For Llama-2-7B's and Llama-3-8B's shapes (d = 4096, f = 11008 or 14336, 32 heads of 128, 32 or 8 K/V heads,
V = 32000 or 128256), batch 1, bf16, each op's forward and backward, `out = op(inputs); out.backward(g)`:

    rms_norm   kernels/rmsnorm.rms_norm               vs llama.RMSNorm                  on [tokens, d]
    rope_qk    kernels/rope.rope_qk                    vs llama.apply_rope on q and k    on [1, heads, tokens, 128]
    swiglu     kernels/swiglu.swiglu                   vs F.silu(g) * u                  on [tokens, f]
    loss       fused.linear_cross_entropy (lm_head's   vs F.cross_entropy of the whole   on [tokens, d] x [V, d]
               weight frozen, as in QLoRA)                float32 logits

Each is timed as bench.layer times a layer (triton.testing.do_bench median with the L2 flushed, and GPU time
alone from CUDA-graph replays, bench.timing.device_ms), with its peak memory above the inputs, and checked: the
largest difference of output and input gradient between the two. Writes <out>/fused-<gpu-name>.json.
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from qlora_ref.fused import linear_cross_entropy
from qlora_ref.kernels.rmsnorm import rms_norm
from qlora_ref.kernels.rope import rope_qk
from qlora_ref.kernels.swiglu import swiglu
from qlora_ref.llama import RMSNorm, apply_rope, rope_cos_sin
from qlora_ref.model_shapes import PRESETS

from .timing import DEVICE, device_ms, gpu_run, median_ms, write_results

DTYPE = torch.bfloat16


def _inputs(shape, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=generator)


def cases(model: str, tokens: int) -> dict:
    """name -> (fused, unfused, leaves): two callables computing the same output from the same leaf tensors."""
    shape = PRESETS[model]
    d, f, heads, kv_heads = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, shape.num_key_value_heads
    norm = RMSNorm(d, 1e-5).to(DEVICE, DTYPE)
    x = _inputs((tokens, d), 0).requires_grad_()
    cos, sin = rope_cos_sin(tokens, shape.head_dim, 10000.0, DEVICE, DTYPE)
    q = _inputs((1, heads, tokens, shape.head_dim), 1).requires_grad_()
    k = _inputs((1, kv_heads, tokens, shape.head_dim), 2).requires_grad_()
    gate, up = _inputs((tokens, f), 3).requires_grad_(), _inputs((tokens, f), 4).requires_grad_()
    h = _inputs((tokens, d), 5).requires_grad_()
    head = 0.02 * _inputs((shape.vocab_size, d), 6)
    targets = torch.randint(0, shape.vocab_size, (tokens,), device=DEVICE,
                            generator=torch.Generator(device=DEVICE).manual_seed(7))
    return {
        "rms_norm": (lambda: rms_norm(x, norm.weight, norm.eps), lambda: norm(x), (x,)),
        "rope_qk": (lambda: torch.cat([t.flatten() for t in rope_qk(q, k, cos, sin)]),
                    lambda: torch.cat([apply_rope(q, cos, sin).flatten(), apply_rope(k, cos, sin).flatten()]), (q, k)),
        "swiglu": (lambda: swiglu(gate, up), lambda: F.silu(gate) * up, (gate, up)),
        "loss": (lambda: linear_cross_entropy(h, head, targets), lambda: F.cross_entropy((h @ head.T).float(), targets),
                 (h,)),
    }


def _step(op, leaves):
    out = op()
    out.backward(torch.ones_like(out))
    for leaf in leaves:
        leaf.grad = None


def _peak_bytes(op, leaves) -> int:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(op, leaves)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def _difference(fused, unfused, leaves) -> dict:
    outputs, grads = [], []
    for op in (fused, unfused):
        out = op()
        out.backward(torch.ones_like(out))
        outputs.append(out.detach().float())
        grads.append(leaves[0].grad.float())
        for leaf in leaves:
            leaf.grad = None
    return {"output": (outputs[0] - outputs[1]).abs().max().item(), "grad": (grads[0] - grads[1]).abs().max().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    args = parser.parse_args(argv)
    results = gpu_run("bench.fused")
    results.update({"dtype": "bf16", "timing": "out = op(); out.backward(ones): ms, do_bench median (L2 flushed); "
                    "device_ms, CUDA-graph replays (bench.timing.device_ms)", "rows": []})
    for model in ("Llama-2-7B", "Llama-3-8B"):
        for tokens in args.tokens:
            for name, (fused, unfused, leaves) in cases(model, tokens).items():
                row = {"model": model, "tokens": tokens, "op": name, "difference": _difference(fused, unfused, leaves)}
                for label, op in (("fused", fused), ("unfused", unfused)):
                    row[label] = {"ms": median_ms(lambda: _step(op, leaves)),
                                  "device_ms": device_ms(lambda: _step(op, leaves)),
                                  "peak_bytes": _peak_bytes(op, leaves)}
                row["speedup_device"] = row["unfused"]["device_ms"] / row["fused"]["device_ms"]
                row["peak_ratio"] = row["fused"]["peak_bytes"] / row["unfused"]["peak_bytes"]
                results["rows"].append(row)
                print(f"{model} {tokens:5d} {name:9s} fused {row['fused']['device_ms']:.3f} ms, unfused "
                      f"{row['unfused']['device_ms']:.3f} ms ({row['speedup_device']:.2f}x); peak "
                      f"{row['peak_ratio']:.2f}x; max difference {row['difference']}", flush=True)
                path = write_results(args.out, "fused", results)  # after every row: a timeout keeps the rest
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
