"""Benchmarks on a CUDA GPU. `python -m bench.kernels run` times the Triton 4-bit dequantize and quantize kernels.

    python -m bench.kernels run [--out bench/results] [--quick] [--only quantize]
    python -m bench.kernels plot bench/results/kernels-<gpu>.json      # redraw the PNG from the JSON

For each weight it quantizes a random N(0, 1) matrix with bitsandbytes (NF4, blocksize 64, on the GPU),
checks that both dequantizers give the same bits, then times
  - triton: qlora_ref.kernels.dequantize_4bit_triton (one launch, double dequantization fused in), in
            each of the settings in VARIANTS ("default" is a call without options)
  - bnb:    bitsandbytes.functional.dequantize_4bit (for a nested state: 8-bit dequantize, + offset, 4-bit)
  - copy:   a device-to-device copy of a tensor of the output's size, the practical roofline
  - write:  zeroing a tensor of the output's size (a write-only stream, as the dequantizers mostly are)
with triton.testing.do_bench (median; the L2 cache is flushed before every call), and each dequantizer
also by its GPU time alone (CUDA-graph replays, see device_ms): do_bench counts the host's time too
when a call's Python takes longer than the flush, which happens for small weights.
GB/s counts the bytes each must move: the dequantizers read n/2 packed bytes and the absmax (and, nested,
the second-level absmax), and write n * itemsize; the copy reads and writes n * itemsize.

Weights: the Llama shapes 4096x4096, 4096x14336, 8192x8192, 8192x28672 (fp16 and bf16, with and without
double quantization), and the course's challenge shapes (bsz, qlen, hd, m, dtype), whose weight is hd x m.
Host time per call and a sweep of the kernel's other options on two weights come first. Then quantize:
qlora_ref.kernels.quantize_4bit_triton against bitsandbytes.functional.quantize_4bit (NF4, blocksize 64, with
and without double quantization) on the Llama weights, a tile sweep, and counted facts on how bitsandbytes'
CPU and CUDA bytes differ (key "quantize_facts"). Results go to
<out>/kernels-<gpu-name>.json, a PNG next to it (when matplotlib is installed) and tables on stdout.
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from qlora_ref.results import dequantize_summary, load_kernel_results
from qlora_ref.state import QuantState

from .timing import (DEVICE, DTYPE_NAMES, LLAMA_SHAPES, device_ms, host_us, median_ms, slug, state_from_bitsandbytes,
                     versions, write_results)

# (bsz, qlen, hd, m, dtype): the weight is hd x m.
CHALLENGE_SHAPES = [
    (2, 3333, 2048, 8192, torch.float16),
    (5, 777, 1024, 4096, torch.bfloat16),
    (3, 2048, 4096, 14336, torch.bfloat16),
]


def dequantize_bytes(state: QuantState) -> int:
    """Bytes a dequantizer must move at least: packed codes and constants read, values written."""
    n = state.numel
    moved = (n + 1) // 2 + n * state.dtype.itemsize + state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        moved += state.state2.absmax.numel() * 4 + 4
    return moved


def quantize_on_gpu(rows, cols, dtype, nested, seed=0):
    import bitsandbytes.functional as F

    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(rows, cols, device=DEVICE, dtype=dtype, generator=generator)
    packed, bnb_state = F.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    return packed, bnb_state


# Settings of dequantize_4bit_triton timed on every weight; "default" is what a call without options runs.
VARIANTS = {
    "default": {},
    "tile 512": {"tile_bytes": 512},
    "tile 1024": {"tile_bytes": 1024},
    "streaming": {"streaming": True},
    "tile 1024, streaming": {"tile_bytes": 1024, "streaming": True},
}


def time_case(rows, cols, dtype, nested, roofline_cache, variants=VARIANTS):
    """One weight: parity, then ms (do_bench median and GPU time) and GB/s of triton, bnb, copy, write."""
    import bitsandbytes.functional as F

    from qlora_ref.kernels.dequantize_4bit import dequantize_4bit_triton

    packed, bnb_state = quantize_on_gpu(rows, cols, dtype, nested)
    state = state_from_bitsandbytes(bnb_state)
    theirs = F.dequantize_4bit(packed, bnb_state)
    n = rows * cols
    key = (n, dtype)
    if key not in roofline_cache:  # copy and write-only rooflines depend only on the output's size
        source, target = theirs.clone(), torch.empty_like(theirs)
        roofline_cache[key] = {"copy": median_ms(lambda: target.copy_(source)), "write": median_ms(target.zero_)}
        del source, target
    moved = dequantize_bytes(state)
    result = {
        "shape": [rows, cols], "dtype": DTYPE_NAMES[dtype], "nested": nested, "n": n,
        "bytes": {"dequantize": moved, "copy": 2 * n * dtype.itemsize, "write": n * dtype.itemsize},
        "ms": {"bnb": median_ms(lambda: F.dequantize_4bit(packed, bnb_state)), **roofline_cache[key]},
        "device_ms": {"bnb": device_ms(lambda: F.dequantize_4bit(packed, bnb_state), n * dtype.itemsize)},
        "exact": {}, "options": {},
    }
    for name, options in variants.items():
        ours = dequantize_4bit_triton(packed, state, **options)
        result["exact"][name] = bool(torch.equal(ours, theirs))
        del ours
        result["options"][name] = options
        result["ms"][name] = median_ms(lambda: dequantize_4bit_triton(packed, state, **options))
        result["device_ms"][name] = device_ms(lambda: dequantize_4bit_triton(packed, state, **options), n * dtype.itemsize)
    del theirs
    nbytes = result["bytes"]
    result["gbps"] = {k: (nbytes[k] if k in ("copy", "write") else moved) / (v * 1e-3) / 1e9 for k, v in result["ms"].items()}
    result["device_gbps"] = {k: moved / (v * 1e-3) / 1e9 if v > 0 else None for k, v in result["device_ms"].items()}
    return result


SWEEP_CASES = [((8192, 28672), torch.bfloat16, True), ((4096, 4096), torch.bfloat16, False)]


def sweep_variants():
    """(label, options) of dequantize_4bit_triton's other knobs, compared on two weights."""
    return [
        ("default", {}),
        ("tile 2048, 2 warps", {"tile_bytes": 2048, "num_warps": 2}),
        ("tile 2048, 8 warps", {"tile_bytes": 2048, "num_warps": 8}),
        ("tile 4096", {"tile_bytes": 4096}),
        ("tile 8192", {"tile_bytes": 8192}),
        ("tile 512, 2 warps", {"tile_bytes": 512, "num_warps": 2}),
        ("wide rows (smem shuffle)", {"row_bytes": 1 << 20}),
        ("strided stores, no join", {"join": False}),
        ("bf16 rounded in software", {"soft_bf16": True}),
    ]


def run_sweep():
    from qlora_ref.kernels.dequantize_4bit import dequantize_4bit_triton

    results = []
    for (rows, cols), dtype, nested in SWEEP_CASES:
        packed, bnb_state = quantize_on_gpu(rows, cols, dtype, nested)
        state = state_from_bitsandbytes(bnb_state)
        reference = dequantize_4bit_triton(packed, state)
        for label, options in sweep_variants():
            out = dequantize_4bit_triton(packed, state, **options)
            exact = bool(torch.equal(out, reference))
            del out
            ms = median_ms(lambda: dequantize_4bit_triton(packed, state, **options))
            dev = device_ms(lambda: dequantize_4bit_triton(packed, state, **options), rows * cols * dtype.itemsize)
            gbps = dequantize_bytes(state) / (ms * 1e-3) / 1e9
            results.append({"shape": [rows, cols], "dtype": DTYPE_NAMES[dtype], "nested": nested, "variant": label,
                            "options": options, "ms": ms, "device_ms": dev, "gbps": gbps, "exact": exact})
            print(f"sweep {rows}x{cols} {DTYPE_NAMES[dtype]} {'nested' if nested else 'plain':6} "
                  f"{label:26} {ms * 1e3:7.1f} us (GPU {dev * 1e3:6.1f} us) {gbps:6.0f} GB/s"
                  f"{'' if exact else '  NOT EXACT'}", flush=True)
        del packed, bnb_state, state, reference
        torch.cuda.empty_cache()
    return results


def host_overheads():
    """Host microseconds per call (64x64 weight: the GPU work is negligible)."""
    import bitsandbytes.functional as F

    from qlora_ref.kernels import launch
    from qlora_ref.kernels.dequantize_4bit import dequantize_4bit_triton

    out = {}
    for nested in (False, True):
        packed, bnb_state = quantize_on_gpu(64, 64, torch.bfloat16, nested)
        state = state_from_bitsandbytes(bnb_state)
        label = "nested" if nested else "plain"
        out[f"triton {label}"] = host_us(lambda: dequantize_4bit_triton(packed, state))
        launch.FAST_LAUNCH = False
        try:
            out[f"triton {label}, kernel[grid] launch"] = host_us(lambda: dequantize_4bit_triton(packed, state))
        finally:
            launch.FAST_LAUNCH = True
        out[f"bnb {label}"] = host_us(lambda: F.dequantize_4bit(packed, bnb_state))
    empty = torch.empty(0, device=DEVICE)
    out["torch empty_like (floor)"] = host_us(lambda: torch.empty_like(empty))
    return out


# ---------------------------------------------------------------------------------------------------------
# Quantize: the Triton 4-bit quantize kernel (qlora_ref.kernels.quantize_4bit) against bitsandbytes' CUDA one.

QUANTIZE_SWEEP = [{"tile_values": t, "num_warps": w} for t in (2048, 4096, 8192, 16384) for w in (4, 8)]


def quantize_bytes(n, dtype, blocksize=64) -> int:
    """Bytes a 4-bit quantizer must move at least: n values read, n/2 packed bytes and the absmax written."""
    return n * dtype.itemsize + (n + 1) // 2 + -(-n // blocksize) * 4


def same_4bit(packed, state, bnb_packed, bnb_state) -> bool:
    ok = torch.equal(packed, bnb_packed) and torch.equal(state.absmax, bnb_state.absmax)
    if bnb_state.nested:
        ok = ok and torch.equal(state.offset.reshape(()), bnb_state.offset.reshape(()))
        ok = ok and torch.equal(state.state2.absmax, bnb_state.state2.absmax)
    return bool(ok)


def time_quantize_case(rows, cols, dtype, nested, roofline_cache):
    """One weight: parity of every field, then ms / GB/s of bnb quantize_4bit and of ours (checked, unchecked)."""
    import bitsandbytes.functional as F

    from qlora_ref.kernels.quantize_4bit import quantize_4bit_triton

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(rows, cols, device=DEVICE, dtype=dtype, generator=generator)
    n = rows * cols
    bnb_packed, bnb_state = F.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4")
    packed, state = quantize_4bit_triton(x, 64, "nf4", nested)
    exact = same_4bit(packed, state, bnb_packed, bnb_state)
    del packed, state, bnb_packed, bnb_state
    key = (n, dtype)
    if key not in roofline_cache:
        target = torch.empty_like(x)
        roofline_cache[key] = {"copy": median_ms(lambda: target.copy_(x)), "write": median_ms(target.zero_)}
        del target
    calls = {
        "bnb": lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=nested, quant_type="nf4"),
        "triton": lambda: quantize_4bit_triton(x, 64, "nf4", nested),
        "triton unchecked": lambda: quantize_4bit_triton(x, 64, "nf4", nested, check=False),
    }
    moved = quantize_bytes(n, dtype)
    result = {"shape": [rows, cols], "dtype": DTYPE_NAMES[dtype], "nested": nested, "n": n, "exact": exact,
              "bytes": {"quantize": moved, "copy": 2 * n * dtype.itemsize}, "ms": dict(roofline_cache[key]),
              "device_ms": {}}
    for name, fn in calls.items():
        result["ms"][name] = median_ms(fn)
        if name == "triton unchecked":  # graph capture: not the checked call (it syncs), not bnb (it launches
            result["device_ms"][name] = device_ms(fn, n)  # on the legacy default stream, which capture refuses)
    result["gbps"] = {k: (result["bytes"]["copy"] if k == "copy" else n * dtype.itemsize if k == "write" else moved)
                      / (v * 1e-3) / 1e9 for k, v in result["ms"].items()}
    result["speedup_vs_bnb"] = {k: result["ms"]["bnb"] / result["ms"][k] for k in ("triton", "triton unchecked")}
    return result


def run_quantize_sweep():
    from qlora_ref.kernels.quantize_4bit import quantize_4bit_triton

    rows, cols, dtype = 8192, 28672, torch.bfloat16
    x = torch.randn(rows, cols, device=DEVICE, dtype=dtype, generator=torch.Generator(device=DEVICE).manual_seed(0))
    reference = quantize_4bit_triton(x, 64, "nf4")[0]
    out = []
    for options in QUANTIZE_SWEEP:
        exact = bool(torch.equal(quantize_4bit_triton(x, 64, "nf4", **options)[0], reference))
        ms = median_ms(lambda: quantize_4bit_triton(x, 64, "nf4", check=False, **options))
        gbps = quantize_bytes(rows * cols, dtype) / (ms * 1e-3) / 1e9
        out.append({"shape": [rows, cols], "dtype": "bf16", "options": options, "ms": ms, "gbps": gbps, "exact": exact})
        print(f"quantize sweep {rows}x{cols} bf16 {options}: {ms * 1e3:7.1f} us {gbps:6.0f} GB/s"
              f"{'' if exact else '  NOT EXACT'}", flush=True)
    return out


def _nibbles_differ(a, b) -> int:
    a, b = a.reshape(-1).cpu(), b.reshape(-1).cpu()
    return int(((a >> 4) != (b >> 4)).sum() + ((a & 15) != (b & 15)).sum())


def cpu_vs_cuda_facts():
    """How bitsandbytes' CPU and CUDA bytes differ (and our two PyTorch models of them), on fixed inputs."""
    import bitsandbytes.functional as F

    import qlora_ref as Q

    from qlora_ref.kernels import cuda_semantics as C
    from qlora_ref.kernels.quantize_4bit import hardware_reciprocal

    facts = {}
    significands = (torch.arange(2**23, dtype=torch.int32, device=DEVICE) + 0x3F800000).view(torch.float32)
    differ = hardware_reciprocal(significands) != 1.0 / significands
    facts["mufu_rcp_vs_correctly_rounded"] = {"significands": 2**23, "differ": int(differ.sum())}
    x = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))  # N(0, 1), float32, no zero blocks
    xz = x.clone()
    xz.view(-1)[:64 * 100] = 0  # 100 all-zero blocks of 64
    for label, data in (("randn 1024x4096", x), ("randn 1024x4096, 100 zero blocks", xz)):
        for quant_type in ("nf4", "fp4"):
            cpu_packed, cpu_state = F.quantize_4bit(data, blocksize=64, quant_type=quant_type, compress_statistics=True)
            gpu_packed, gpu_state = F.quantize_4bit(data.cuda(), blocksize=64, quant_type=quant_type,
                                                    compress_statistics=True)
            ref_packed, ref_state = Q.quantize_4bit(data, 64, quant_type, double_quant=True, backend="torch")
            sem_packed, sem_state = C.quantize_4bit(data, 64, quant_type, double_quant=True)  # CPU: IEEE reciprocal
            facts[f"{label} {quant_type} blocksize 64 nested"] = {
                "values": data.numel(),
                "codes differ, bnb cpu vs cuda": _nibbles_differ(cpu_packed, gpu_packed),
                "absmax codes differ, bnb cpu vs cuda": int((cpu_state.absmax != gpu_state.absmax.cpu()).sum()),
                "offset cpu - cuda": float(cpu_state.offset) - float(gpu_state.offset),
                "codes differ, qlora_ref (torch) vs bnb cpu": _nibbles_differ(ref_packed, cpu_packed),
                "codes differ, cuda_semantics on cpu vs bnb cuda": _nibbles_differ(sem_packed, gpu_packed),
                "absmax codes differ, cuda_semantics on cpu vs bnb cuda":
                    int((sem_state.absmax != gpu_state.absmax.cpu()).sum()),
            }
        cpu_q, _ = F.quantize_blockwise(data, blocksize=256)
        gpu_q, _ = F.quantize_blockwise(data.cuda(), blocksize=256)
        facts[f"{label} 8-bit blocksize 256"] = {
            "values": data.numel(), "codes differ, bnb cpu vs cuda": int((cpu_q != gpu_q.cpu()).sum()),
            "codes differ, cuda_semantics on cpu vs bnb cuda":
                int((C.quantize_blockwise(data, blocksize=256)[0] != gpu_q.cpu()).sum()),
        }
    for k, v in facts.items():
        print(f"fact {k}: {v}", flush=True)
    return facts


def quantize_table(results) -> str:
    lines = [
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}, bitsandbytes {results['bitsandbytes']}",
        "",
        "| weight | dtype | nested | triton ms | triton unchecked ms | bnb ms | triton GB/s | unchecked GB/s | bnb GB/s "
        "| copy GB/s | vs bnb | unchecked vs bnb | GPU-only ms, unchecked | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["quantize"]:
        ms, g, d = r["ms"], r["gbps"], r["device_ms"]
        lines.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['dtype']} | {'yes' if r['nested'] else 'no'} | {ms['triton']:.4f} | "
            f"{ms['triton unchecked']:.4f} | {ms['bnb']:.4f} | {g['triton']:.0f} | {g['triton unchecked']:.0f} | "
            f"{g['bnb']:.0f} | {g['copy']:.0f} | {r['speedup_vs_bnb']['triton']:.2f}x | "
            f"{r['speedup_vs_bnb']['triton unchecked']:.2f}x | {d['triton unchecked']:.4f} | "
            f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def quantize_results(roofline_cache, quick=False):
    """The quantize part of `kernels`: Llama weights (fp16, bf16; plain, nested), a tile sweep, the facts."""
    rows = []
    shapes = LLAMA_SHAPES[:1] + LLAMA_SHAPES[-1:] if quick else LLAMA_SHAPES
    for r, c in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for nested in (False, True):
                result = time_quantize_case(r, c, dtype, nested, roofline_cache)
                rows.append(result)
                print(f"quantize {r}x{c} {DTYPE_NAMES[dtype]} {'nested' if nested else 'plain '}: "
                      f"triton {result['ms']['triton'] * 1e3:7.1f} us, unchecked {result['ms']['triton unchecked'] * 1e3:7.1f} us, "
                      f"bnb {result['ms']['bnb'] * 1e3:7.1f} us, x{result['speedup_vs_bnb']['triton']:.2f} "
                      f"({result['gbps']['triton']:.0f} GB/s){'' if result['exact'] else ', NOT EXACT'}", flush=True)
                torch.cuda.empty_cache()
    sweep = [] if quick else run_quantize_sweep()
    return {"quantize": rows, "quantize_sweep": sweep, "quantize_facts": cpu_vs_cuda_facts(),
            "quantize_note": "quantize GB/s counts n*itemsize read + n/2 packed + 4 bytes per block of 64 written "
                             "(nested too); 'triton' checks finiteness (one flag read back: a host sync), "
                             "'triton unchecked' is check=False; bnb: bitsandbytes.functional.quantize_4bit(nf4, 64)"}


def kernels(out_dir: Path, quick=False, only=None):
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.cuda.get_device_name()
    print(f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
    if only == "quantize":  # add the quantize results to an existing JSON of this GPU
        path = out_dir / f"kernels-{slug(device)}.json"
        results = json.loads(path.read_text()) if path.exists() else {"device": device, **versions()}
        results.update(quantize_results({}, quick))
        results["quantize_date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {path}")
        print(quantize_table({**results, **versions(), "device": device}))
        return

    host = host_overheads()
    print("host us per call: " + ", ".join(f"{k} {v:.1f}" for k, v in host.items()), flush=True)
    sweep = [] if quick else run_sweep()
    roofline_cache = {}
    llama = []
    shapes = LLAMA_SHAPES[:1] + LLAMA_SHAPES[-1:] if quick else LLAMA_SHAPES
    for rows, cols in shapes:
        for dtype in (torch.float16, torch.bfloat16):
            for nested in (False, True):
                result = time_case(rows, cols, dtype, nested, roofline_cache)
                llama.append(result)
                print(_line(result), flush=True)
                torch.cuda.empty_cache()
    challenge = []
    for bsz, qlen, hd, m, dtype in CHALLENGE_SHAPES:
        for nested in (False, True):
            result = time_case(hd, m, dtype, nested, roofline_cache)
            result["challenge"] = {"bsz": bsz, "qlen": qlen, "hd": hd, "m": m, "dtype": DTYPE_NAMES[dtype]}
            challenge.append(result)
            print(_line(result), flush=True)
            torch.cuda.empty_cache()

    results = {
        "what": "4-bit dequantize: Triton kernel vs bitsandbytes vs device-to-device copy",
        "device": device, **versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quant": "nf4, blocksize 64, random N(0,1) weights quantized by bitsandbytes on the GPU",
        "timing": "ms: triton.testing.do_bench median (L2 flushed before each call; includes host time when the "
                  "call's Python outlasts the flush); device_ms: CUDA-graph replay of (flush, call) minus (flush)",
        "bytes": "dequantize: packed n/2 + absmax (+ nested absmax) read, n*itemsize written; copy: 2*n*itemsize; "
                 "write (zero_): n*itemsize",
        "variants": VARIANTS, "host_us_per_call": host,
        "llama": llama, "challenge": challenge, "sweep": sweep,
    }
    results.update(quantize_results(roofline_cache, quick))
    path = write_results(out_dir, "kernels", results)
    print(f"wrote {path}")
    try:
        print(f"wrote {plot(results, path.with_suffix('.png'))}")
    except ImportError as error:
        print(f"no plot ({error}); redraw later with: python -m bench.kernels plot {path}")
    print()
    print(variant_table(results))
    print()
    print(table(results))
    print()
    print(quantize_table(results))


def _line(r, variant="default"):
    v = dequantize_summary(r, variant)
    return (f"{r['shape'][0]}x{r['shape'][1]} {r['dtype']} {'nested' if r['nested'] else 'plain '}: "
            f"triton {v['ms'] * 1e3:6.1f} us (GPU {v['device_ms'] * 1e3:6.1f}), bnb {v['bnb_ms'] * 1e3:6.1f} us "
            f"(GPU {v['bnb_device_ms'] * 1e3:6.1f}), copy {v['copy_ms'] * 1e3:6.1f} us, x{v['speedup_vs_bnb']:.2f} vs bnb, "
            f"{100 * v['fraction_of_copy']:.0f}% of copy" + ("" if all(r["exact"].values()) else ", NOT EXACT"))


def _name(r):
    name = f"{r['shape'][0]}x{r['shape'][1]}"
    if "challenge" in r:
        c = r["challenge"]
        name += f" (challenge {c['bsz']},{c['qlen']})"
    return name


def table(results, variant="default") -> str:
    """The Llama and challenge rows for one variant, as a Markdown table."""
    lines = [
        f"{results['device']}, torch {results['torch']}, triton {results['triton']}, bitsandbytes "
        f"{results['bitsandbytes']}; triton options {results['variants'][variant] or 'default'}",
        "",
        "| weight | dtype | nested | triton ms | bnb ms | copy ms | triton GB/s | bnb GB/s | copy GB/s | write GB/s "
        "| vs bnb | of copy | GPU-only ms triton / bnb | exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["llama"] + results["challenge"]:
        v = dequantize_summary(r, variant)
        lines.append(
            f"| {_name(r)} | {r['dtype']} | {'yes' if r['nested'] else 'no'} | {v['ms']:.4f} | {v['bnb_ms']:.4f} | "
            f"{v['copy_ms']:.4f} | {v['gbps']:.0f} | {v['bnb_gbps']:.0f} | {v['copy_gbps']:.0f} | {v['write_gbps']:.0f} | "
            f"{v['speedup_vs_bnb']:.2f}x | {100 * v['fraction_of_copy']:.0f}% | {v['device_ms']:.4f} / {v['bnb_device_ms']:.4f} | "
            f"{'yes' if v['exact'] else 'NO'} |"
        )
    return "\n".join(lines)


def variant_table(results) -> str:
    """Speed-up over bnb (do_bench, then GPU-only) of every variant on every weight."""
    names = list(results["variants"])
    lines = ["| weight | dtype | nested | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in results["llama"] + results["challenge"]:
        cells = []
        for name in names:
            v = dequantize_summary(r, name)
            device = f"{v['device_speedup_vs_bnb']:.2f}" if v["device_speedup_vs_bnb"] else "-"
            cells.append(f"{v['speedup_vs_bnb']:.2f} / {device}")
        lines.append(f"| {_name(r)} | {r['dtype']} | {'yes' if r['nested'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path: Path, variant="default") -> Path:
    """Grouped bars of GB/s (triton, bitsandbytes, copy) per weight, plain and nested side by side."""
    from matplotlib.figure import Figure

    rows = results["llama"] + results["challenge"]
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 1, sharey=True)
    colours = {"triton": "tab:blue", "bnb": "tab:orange", "copy": "tab:gray"}
    for ax, nested in zip(axes, (False, True)):
        chosen = [r for r in rows if r["nested"] == nested]
        labels = [f"{r['shape'][0]}x{r['shape'][1]}\n{r['dtype']}" + ("\nchallenge" if "challenge" in r else "")
                  for r in chosen]
        for k, (name, colour) in enumerate(colours.items()):
            xs = [i + (k - 1) * 0.27 for i in range(len(chosen))]
            key = {"triton": variant}.get(name, name)
            ax.bar(xs, [r["gbps"][key] for r in chosen], width=0.27, color=colour,
                   label={"triton": "Triton kernel", "bnb": "bitsandbytes", "copy": "copy (roofline)"}[name])
        ax.set_xticks(range(len(chosen)), labels, fontsize=8)
        ax.set_ylabel("GB/s (read + write)")
        ax.set_title("double quantization" if nested else "plain absmax")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(loc="upper left")
    fig.suptitle(f"4-bit dequantize on {results['device']} (triton {results['triton']}, bitsandbytes {results['bitsandbytes']})")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("run", help="time the Triton dequantize kernel against bitsandbytes and a copy")
    k.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON and PNG")
    k.add_argument("--quick", action="store_true", help="fewer shapes and sweep variants")
    k.add_argument("--only", choices=["quantize"], help="run only the quantize part, merged into the existing JSON")
    p = sub.add_parser("plot", help="draw the PNG of a results JSON (next to it)")
    p.add_argument("json", type=Path)
    p.add_argument("--table", action="store_true", help="also print the tables")
    p.add_argument("--variant", default="default", help="which of the Triton variants to draw (default: default)")
    args = parser.parse_args(argv)
    if args.command == "run":
        kernels(args.out, args.quick, args.only)
    else:
        results = load_kernel_results(args.json)
        print(plot(results, args.json.with_suffix(".png"), args.variant))
        if args.table:
            print(variant_table(results))
            print()
            print(table(results, args.variant))


if __name__ == "__main__":
    main()
