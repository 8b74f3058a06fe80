#!/usr/bin/env python3
"""Every lesson and solution, top to bottom, on a GPU: strict nbval against the committed outputs, each notebook in
a kernel of its own, with its wall time and the GPU memory it took at its peak.

    python tools/gpu_lessons.py [--jobs 4]          # as the GPU is
    python tools/gpu_lessons.py --t4 [--jobs 4]     # under a T4's limits (tools/gpu_site/sitecustomize.py):
                                                    # 14.75 GiB, no bfloat16; the course's kernels are also
                                                    # compiled ahead for sm_75

Writes bench/results/lessons-<gpu>[-t4].json: the device, the versions, and per notebook whether it passed, its
seconds and its peak memory: torch.cuda.max_memory_reserved in the notebook's kernel (what PyTorch's allocator
held at most; a card needs the CUDA context on top, a few hundred MiB). --jobs notebooks run at once, each its own
process; their wall times are then those of a shared GPU and CPU. Lesson 0 reads the --t4 file.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-cell-timeout=600",
         "--nbval-sanitize-with", str(ROOT / "notebooks" / "nbval_sanitize.cfg")]


def compile_for_t4() -> dict:
    """Each of the course's kernels compiled ahead for sm_75 in the dtypes a T4 uses: {kernel: "ok" or the error}."""
    import torch

    from qlora_ref.kernels import adamw_8bit, dequantize_4bit, gemv_4bit, quantize_4bit

    builds = {
        "dequantize_4bit fp16 plain": lambda: dequantize_4bit.compile_ahead(75, torch.float16, nested=False),
        "dequantize_4bit fp16 nested": lambda: dequantize_4bit.compile_ahead(75, torch.float16, nested=True),
        "quantize_4bit fp16": lambda: quantize_4bit.compile_ahead(75, torch.float16),
        "gemv_4bit fp16 plain": lambda: gemv_4bit.compile_ahead(75, torch.float16, nested=False),
        "gemv_4bit fp16 nested": lambda: gemv_4bit.compile_ahead(75, torch.float16, nested=True),
        "adamw_8bit fp32, fp16 gradients": lambda: adamw_8bit.compile_ahead(75, torch.float32, grad_dtype=torch.float16),
    }
    done = {}
    for name, build in builds.items():
        try:
            kernel = build()
            done[name] = "ok: " + re.search(r"\.target (\w+)", kernel.asm["ptx"]).group(1)
        except Exception as error:  # noqa: BLE001 - every failure is the result to record
            done[name] = f"{type(error).__name__}: {error}"[:300]
    return done


def run_notebook(path: Path, env: dict, scratch: Path) -> dict:
    peak_file = scratch / (path.parent.name + "-" + path.stem + ".json")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "--color=no", *NBVAL, str(path)], cwd=ROOT, env=dict(env, QLORA_PEAK_FILE=str(peak_file)),
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {"max_reserved": 0, "max_allocated": 0}
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr.strip()[-300:]
    return {"notebook": str(path.relative_to(ROOT)), "passed": result.returncode == 0, "summary": summary,
            "seconds": round(seconds, 1), "peak_reserved_mib": round(peak["max_reserved"] / 2**20),
            "peak_allocated_mib": round(peak["max_allocated"] / 2**20),
            "failures": [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "E "))][:20]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--t4", action="store_true", help="impose a T4's limits (tools/t4/sitecustomize.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at once")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb and solutions/*.ipynb")
    args = parser.parse_args()

    import torch
    import triton

    if not torch.cuda.is_available():
        sys.exit("gpu_lessons: no CUDA GPU here")
    gpu = torch.cuda.get_device_name(0)
    env = dict(os.environ, PYTHONHASHSEED="0", QLORA_T4="1" if args.t4 else "0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tools" / "gpu_site"), os.environ.get("PYTHONPATH")])))
    env.pop("MPLBACKEND", None)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb"))
    document = {"device": gpu, "date": date.today().isoformat(), "t4_limits": args.t4,
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "python": sys.version.split()[0], "jobs": args.jobs,
                "compiled_for_sm75": compile_for_t4() if args.t4 else None, "runs": []}
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(args.jobs) as pool:
        for run in pool.map(lambda path: run_notebook(path.resolve(), env, Path(scratch)), notebooks):
            document["runs"].append(run)
            print(f"{run['notebook']:45} {'pass' if run['passed'] else 'FAIL'} {run['seconds']:7.1f} s "
                  f"{run['peak_reserved_mib']:7,} MiB  {run['summary']}", flush=True)
    stem = "lessons-" + gpu.lower().replace(" ", "-") + ("-t4" if args.t4 else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out / stem}.json: {sum(r['passed'] for r in document['runs'])} of {len(document['runs'])} passed")


if __name__ == "__main__":
    main()
