"""Benchmark of the fused Triton 4-bit GEMV (qlora_ref.kernels.gemv_4bit) on a CUDA GPU.

    python -m qlora_ref.bench_gemv [--out bench/results] [--quick]

For each Llama weight (N x K = 4096x4096, 4096x14336, 8192x8192, 8192x28672; NF4, blocksize 64, quantized
by bitsandbytes on the GPU, plain and nested) and one bf16 row x it times, with triton.testing.do_bench
(median, L2 flushed before each call):
  - triton: gemv_4bit_triton(x, packed, state) in each setting of CONFIGS ("default" = no options)
  - bnb:    bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state) (its 1-row inference kernel)
  - dense:  x @ W.T with W dequantized to bf16 beforehand (cuBLAS reading 2 bytes per weight)
and records each one's error against the float32 reference x.float() @ dequantize_4bit(W).float().T
(max abs and RMS). GB/s counts the packed weight alone (N*K/2 bytes), the bytes that bound the kernel.
A few rows of x (M = 2, 4, 8) are timed for the default setting on two weights.
Writes <out>/gemv-<gpu-name>.json and prints a table.
"""

import argparse
from pathlib import Path

import torch

from .bench import LLAMA_SHAPES, gpu_run, median_ms, state_from_bitsandbytes, write_results

DEVICE = "cuda"
# Settings of gemv_4bit_triton; "default" is what a call without options runs (scaled sums, prefetch).
CONFIGS = {
    "default": {},
    "n8 c256 w4 rounded": {"block_n": 8, "chunk_bytes": 256, "num_warps": 4, "scale_sums": False, "prefetch": False},
    "n8 c512 w4 rounded": {"block_n": 8, "chunk_bytes": 512, "num_warps": 4, "scale_sums": False, "prefetch": False},
    "n8 c512 w4 scaled": {"block_n": 8, "chunk_bytes": 512, "num_warps": 4, "prefetch": False},
    "n8 c512 w4 rounded prefetch": {"block_n": 8, "chunk_bytes": 512, "num_warps": 4, "scale_sums": False},
    "n8 c512 w4 pair table": {"block_n": 8, "chunk_bytes": 512, "num_warps": 4, "pairs": True},
    "n8 c512 w4 strided x": {"block_n": 8, "chunk_bytes": 512, "num_warps": 4, "split_x": False},
    "n4 c512 w4": {"block_n": 4, "chunk_bytes": 512, "num_warps": 4},
    "n4 c256 w2": {"block_n": 4, "chunk_bytes": 256, "num_warps": 2},
    "n8 c1024 w4": {"block_n": 8, "chunk_bytes": 1024, "num_warps": 4},
    "n8 c1024 w8": {"block_n": 8, "chunk_bytes": 1024, "num_warps": 8},
    "n16 c512 w8": {"block_n": 16, "chunk_bytes": 512, "num_warps": 8},
    "n4 c1024 w4": {"block_n": 4, "chunk_bytes": 1024, "num_warps": 4},
    "n2 c2048 w4": {"block_n": 2, "chunk_bytes": 2048, "num_warps": 4},
    "n8 c2048 w8": {"block_n": 8, "chunk_bytes": 2048, "num_warps": 8},
    "n16 c1024 w8": {"block_n": 16, "chunk_bytes": 1024, "num_warps": 8},
}


def errors(y, reference):
    d = (y.float() - reference).reshape(-1)
    return {"max_abs": d.abs().max().item(), "rms": d.pow(2).mean().sqrt().item(),
            "ref_rms": reference.pow(2).mean().sqrt().item()}


def case(N, K, nested, configs, dtype=torch.bfloat16):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from .kernels.gemv_4bit import gemv_4bit_triton

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
        y = gemv_4bit_triton(x, packed, state, **options)
        ms = median_ms(lambda: gemv_4bit_triton(x, packed, state, **options))
        row["triton"][name] = {"ms": ms, "GBps": N * K / 2 / ms / 1e6, "max_abs_error": errors(y, reference)["max_abs"]}
    row["bnb_ms"] = median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state))
    row["dense_ms"] = median_ms(lambda: x @ dense.T)
    best = min(row["triton"], key=lambda k: row["triton"][k]["ms"])
    row["best"] = best
    for key in ("default", best):
        ms = row["triton"][key]["ms"]
        row["triton"][key]["vs_bnb"] = row["bnb_ms"] / ms
        row["triton"][key]["vs_dense"] = row["dense_ms"] / ms
    row["bnb_GBps"] = N * K / 2 / row["bnb_ms"] / 1e6
    return row, (x, packed, state, dense, bnb_state)


def rows_case(N, K, tensors):
    """Default setting with M = 1, 2, 4, 8 rows of x, against bnb.matmul_4bit (which dequantizes for M > 1)."""
    import bitsandbytes as bnb

    from .kernels.gemv_4bit import gemv_4bit_triton

    _, packed, state, dense, bnb_state = tensors
    K = dense.shape[1]
    out = []
    for m in (1, 2, 4, 8):
        x = torch.randn(m, K, device=DEVICE, dtype=dense.dtype)
        reference = x.float() @ dense.float().T
        out.append({"shape": [N, K], "M": m, "ms": median_ms(lambda: gemv_4bit_triton(x, packed, state)),
                    "bnb_ms": median_ms(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)),
                    "max_abs_error": errors(gemv_4bit_triton(x, packed, state), reference)["max_abs"],
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
    if results.get("rows"):
        lines += ["", "| weight | M | triton ms | bnb ms | max err triton / bnb |", "|---|---|---|---|---|"]
        for r in results["rows"]:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['M']} | {r['ms']:.4f} | {r['bnb_ms']:.4f} "
                         f"| {r['max_abs_error']:.3g} / {r['bnb_max_abs_error']:.3g} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="the default setting only")
    args = parser.parse_args(argv)
    results = gpu_run("qlora_ref.bench_gemv")
    configs = {"default": {}} if args.quick else CONFIGS
    results.update({"timing": "triton.testing.do_bench median, L2 flushed before each call, host launch included",
               "GBps": "packed weight bytes (N*K/2) / time", "configs": configs, "llama": [], "rows": []})
    for N, K in LLAMA_SHAPES:
        for nested in (False, True):
            row, tensors = case(N, K, nested, configs)
            results["llama"].append(row)
            print(f"{N}x{K} nested={nested}: triton {row['triton']['default']['ms']:.4f} ms, best {row['best']} "
                  f"{row['triton'][row['best']]['ms']:.4f} ms, bnb {row['bnb_ms']:.4f} ms, dense {row['dense_ms']:.4f} ms",
                  flush=True)
            if nested and (N, K) in (LLAMA_SHAPES[0], LLAMA_SHAPES[-1]):
                results["rows"] += rows_case(N, K, tensors)
            del tensors
            torch.cuda.empty_cache()
    print(f"wrote {write_results(args.out, 'gemv', results)}")
    print(table(results))


if __name__ == "__main__":
    main()
