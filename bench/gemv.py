"""Benchmark of the fused Triton 4-bit GEMV (qlora_ref.kernels.gemv_4bit) on a CUDA GPU.

    python -m bench.gemv [--out bench/results] [--quick] [--stem gemv]

For each Llama weight (N x K = 4096x4096, 4096x14336, 8192x8192, 8192x28672; NF4, blocksize 64, quantized
by bitsandbytes on the GPU, plain and nested) and one bf16 row x it times
  - triton: each setting of CONFIGS: "default" is the library's gemv_4bit_triton(x, packed, state), the others
            the variants of bench/experiments/gemv_variants.py ("tile (before)" = gemv_4bit_kernel, the default
            for one row until the row kernel)
  - bnb:    bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state) (its 1-row inference kernel)
  - dense:  x @ W.T with W dequantized to bf16 beforehand (cuBLAS reading 2 bytes per weight)
each twice: triton.testing.do_bench's median (L2 flushed before each call; the host launch is included
whenever it outlasts the flush) and the GPU time alone (bench.timing.device_ms: CUDA-graph replays,
L2 flushed). It records each one's error against the float32 reference x.float() @ dequantize_4bit(W).float().T
(max abs and RMS). GB/s counts the packed weight alone (N*K/2 bytes), the bytes that bound the kernel.
A few rows of x (M = 2, 4, 8: gemv_4bit_kernel, for the library's kernel takes one) are timed on two weights.
Writes <out>/<stem>-<gpu-name>.json and prints a table.
"""

import argparse
import math
from pathlib import Path

import torch

from .timing import LLAMA_SHAPES, device_ms, gpu_run, median_ms, state_from_bitsandbytes, write_results

DEVICE = "cuda"
# Keywords of bench.experiments.gemv_variants.gemv_variant; "default" (none) is the library's call: for one row of
# x, gemv_4bit_row_kernel (warp-shuffle lookups, 4 rows per program) with chunk_bytes and prefetch chosen per
# weight by gemv_4bit.row_defaults: "row c512 prefetch (before)", "row c512 prefetch W" or "row c1024 no prefetch".
# "row prmt" (fp16 codes by byte permutes), in bench/results/gemv-*.json, is dropped: bench/experiments/README.md.
CONFIGS = {
    "default": {},
    "row c512 prefetch (before)": {"chunk_bytes": 512, "prefetch": True},
    "row c512 prefetch W": {"chunk_bytes": 512, "prefetch": "weights"},
    "row c1024 no prefetch": {"chunk_bytes": 1024, "prefetch": False},
    "row c1024 prefetch": {"chunk_bytes": 1024, "prefetch": True},
    "row n2 w2": {"block_n": 2, "num_warps": 2},
    "row n8 (2 rows a warp)": {"block_n": 8, "chunk_bytes": 512, "prefetch": True},
    "row memory": {"lookup": "memory"},
    "tile (before)": {"row_kernel": False},
    "tile rounded": {"row_kernel": False, "scale_sums": False},
    "tile pair table": {"row_kernel": False, "pairs": True},
}


def errors(y, reference):
    d = (y.float() - reference).reshape(-1)
    return {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item(),
            "ref_rms": reference.pow(2).mean().sqrt().item()}


def case(N, K, nested, configs, dtype=torch.bfloat16):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qlora_ref.kernels.gemv_4bit import gemv_4bit_triton

    from .experiments.gemv_variants import gemv_variant

    g = torch.Generator(device=DEVICE).manual_seed(0)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype, generator=g)
    packed, bnb_state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    state = state_from_bitsandbytes(bnb_state)
    dense = F.dequantize_4bit(packed, bnb_state)
    del w
    x = torch.randn(1, K, device=DEVICE, dtype=dtype, generator=g)
    reference = x.float() @ dense.float().T
    row = {"shape": [N, K], "nested": nested, "dtype": str(dtype)[6:], "weight_bytes": N * K // 2, "triton": {}}
    y_bnb = bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)
    row["error_bnb"] = errors(y_bnb, reference)
    row["error_triton"] = errors(gemv_4bit_triton(x, packed, state), reference)
    for name, options in configs.items():
        if options:
            def run(options=options):
                return gemv_variant(x, packed, state, **options)
        else:  # the library's call itself, so that its host time is what a caller pays
            def run():
                return gemv_4bit_triton(x, packed, state)
        y = run()
        ms = median_ms(run)
        gpu_ms = device_ms(run)
        row["triton"][name] = {"ms": ms, "GBps": N * K / 2 / ms / 1e6, "device_ms": gpu_ms,
                               "max_abs_error": errors(y, reference)["max_abs"]}
    row["bnb_ms"] = median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state))
    row["bnb_device_ms"] = device_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state))
    row["dense_ms"] = median_ms(lambda: x @ dense.T)
    best = min(row["triton"], key=lambda k: row["triton"][k]["ms"])
    row["best"] = best
    for key in row["triton"]:
        t = row["triton"][key]
        t["vs_bnb"] = row["bnb_ms"] / t["ms"]
        t["device_vs_bnb"] = row["bnb_device_ms"] / t["device_ms"]
        t["vs_dense"] = row["dense_ms"] / t["ms"]
    row["bnb_GBps"] = N * K / 2 / row["bnb_ms"] / 1e6
    return row, (x, packed, state, dense, bnb_state)


def rows_case(N, K, tensors):
    """M = 1, 2, 4, 8 rows of x (one: the library's kernel; more: gemv_4bit_kernel, as gemv_variant takes them),
    against bnb.matmul_4bit (which dequantizes for M > 1)."""
    import bitsandbytes as bnb

    from .experiments.gemv_variants import gemv_variant

    _, packed, state, dense, bnb_state = tensors
    K = dense.shape[1]
    out = []
    for m in (1, 2, 4, 8):
        x = torch.randn(m, K, device=DEVICE, dtype=dense.dtype)
        reference = x.float() @ dense.float().T
        out.append({"shape": [N, K], "M": m, "ms": median_ms(lambda: gemv_variant(x, packed, state)),
                    "bnb_ms": median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)),
                    "max_abs_error": errors(gemv_variant(x, packed, state), reference)["max_abs"],
                    "bnb_max_abs_error": errors(bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state), reference)["max_abs"]})
    return out


def table(results) -> str:
    lines = [f"{results['device']}, torch {results['torch']}, triton {results['triton']}, bitsandbytes "
             f"{results['bitsandbytes']}; bf16 x (1 row), NF4 blocksize 64; do_bench median ms",
             "| weight NxK | nested | triton default | GB/s | best setting | best ms | GB/s | bnb matmul_4bit | GB/s "
             "| dense bf16 | default vs bnb | best vs bnb | max err triton / bnb |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["llama"]:
        d, b = r["triton"]["default"], r["triton"][r["best"]]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {'yes' if r['nested'] else 'no'} | {d['ms']:.4f} | {d['GBps']:.0f} "
            f"| {r['best']} | {b['ms']:.4f} | {b['GBps']:.0f} | {r['bnb_ms']:.4f} | {r['bnb_GBps']:.0f} | {r['dense_ms']:.4f} "
            f"| {d['vs_bnb']:.2f}x | {b['vs_bnb']:.2f}x | {r['error_triton']['max_abs']:.3g} / {r['error_bnb']['max_abs']:.3g} |")
    names = list(results["llama"][0]["triton"])
    lines += ["", "Every setting: us by do_bench / by GPU time alone (device_ms), speed-up over bitsandbytes' likewise timed "
              "(n: nested):",
              "| setting | " + " | ".join(f"{r['shape'][0]}x{r['shape'][1]}{' n' if r['nested'] else ''}"
                                        for r in results["llama"]) + " | geomean x |",
              "|---" * (len(results["llama"]) + 2) + "|",
              "| bnb | " + " | ".join(f"{r['bnb_ms'] * 1e3:.1f} / {r['bnb_device_ms'] * 1e3:.1f}"
                                      for r in results["llama"]) + " | 1 / 1 |"]
    for name in names:
        cells = [r["triton"][name] for r in results["llama"]]
        geomean = [math.exp(sum(math.log(c[key]) for c in cells) / len(cells)) for key in ("vs_bnb", "device_vs_bnb")]
        lines.append(f"| {name} | " + " | ".join(f"{c['ms'] * 1e3:.1f} / {c['device_ms'] * 1e3:.1f} "
                                                 f"x{c['vs_bnb']:.2f} / {c['device_vs_bnb']:.2f}" for c in cells)
                     + f" | {geomean[0]:.2f} / {geomean[1]:.2f} |")
    if results.get("rows"):
        lines += ["", "| weight | M | triton ms | bnb ms | max err triton / bnb |", "|---|---|---|---|---|"]
        for r in results["rows"]:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['M']} | {r['ms']:.4f} | {r['bnb_ms']:.4f} "
                         f"| {r['max_abs_error']:.3g} / {r['bnb_max_abs_error']:.3g} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="the default setting and the one before it only")
    parser.add_argument("--stem", default="gemv", help="the results file's name: <stem>-<gpu-name>.json")
    args = parser.parse_args(argv)
    results = gpu_run("bench.gemv")
    configs = {k: CONFIGS[k] for k in ("default", "tile (before)")} if args.quick else CONFIGS
    results.update({"timing": "triton.testing.do_bench median, L2 flushed before each call, host launch included",
               "GBps": "packed weight bytes (N*K/2) / time", "configs": configs, "llama": [], "rows": []})
    for N, K in LLAMA_SHAPES:
        for nested in (False, True):
            row, tensors = case(N, K, nested, configs)
            results["llama"].append(row)
            d = row["triton"]["default"]
            print(f"{N}x{K} nested={nested}: triton {d['ms']:.4f} ms (GPU {d['device_ms']:.4f}), best {row['best']} "
                  f"{row['triton'][row['best']]['ms']:.4f} ms, bnb {row['bnb_ms']:.4f} ms (GPU {row['bnb_device_ms']:.4f}), "
                  f"dense {row['dense_ms']:.4f} ms", flush=True)
            if nested and (N, K) in (LLAMA_SHAPES[0], LLAMA_SHAPES[-1]):
                results["rows"] += rows_case(N, K, tensors)
            del tensors
            torch.cuda.empty_cache()
    print(f"wrote {write_results(args.out, args.stem, results)}")
    print(table(results))


if __name__ == "__main__":
    main()
