"""QLoRA against LoRA and full fine-tuning on lesson 8's date task, over several seeds and two step budgets (lesson 8).

    python -m bench.qlora_vs_lora [--out bench/results] [--seeds 0 1 2 3 4] [--budgets 150 300] [--processes N]

Each run is lesson 8's configuration (the course's base model, r 16, alpha 32, batches of 32, paged 8-bit AdamW,
warm-up and cosine decay; full fine-tuning at lr 6e-4) with its own seed, which draws the adapters' initial A
and the order of the batches, on a CPU in float32, one thread a run, evaluated every 10 steps on the 200
held-out dates. The runs are independent, so they go to a pool of processes. One run of one seed is chaos in
miniature (a float's last bit on another CPU sends it elsewhere): what carries is the spread over seeds.

Writes <out>/qlora-vs-lora-cpu.json: the machine, the versions, and per run its evaluations (step, exact
match, eval loss) and its training losses. Lesson 8 reads it with qlora_ref.results.
"""

import argparse
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

import torch

from qlora_ref.train import TrainConfig, train

LESSON = TrainConfig(steps=150, batch_size=32, r=16, alpha=32, lr=3e-3, warmup_steps=10, eval_every=10,
                     gradient_checkpointing=False, progress=False, samples=0, device="cpu")
METHODS = {"QLoRA": LESSON, "LoRA": replace(LESSON, method="lora"), "full": replace(LESSON, method="full", lr=6e-4)}


def one_run(label: str, steps: int, seed: int) -> dict:
    torch.set_num_threads(1)
    config = replace(METHODS[label], steps=steps, seed=seed)
    start = time.perf_counter()
    result = train(config)
    return {"method": label, "steps": steps, "seed": seed, "seconds": round(time.perf_counter() - start, 1),
            "evals": result.evals, "losses": result.losses, "config": asdict(config)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[150, 300])
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    jobs = [(label, steps, seed) for steps in args.budgets for seed in args.seeds for label in METHODS]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.processes) as pool:
        runs = list(pool.map(one_run, *zip(*jobs)))
    document = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.processes} processes of one thread",
                "date": date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
                "seconds": round(time.perf_counter() - start, 1), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "qlora-vs-lora-cpu.json"
    path.write_text(json.dumps(document) + "\n")
    print(f"wrote {path}: {len(runs)} runs in {document['seconds']} s")


if __name__ == "__main__":
    main()
