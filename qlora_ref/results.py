"""What the benchmarks in bench/ measured on a GPU, read back for the lessons from the files they wrote
(bench/results/). Each loader takes the path: the package does not know where the course keeps its results.
"""

import json
from pathlib import Path

__all__ = ["MEASURED_KEYS", "SETUP_KEYS", "dequantize_summary", "load_kernel_results", "load_measurements"]


def load_kernel_results(path) -> dict:
    """bench/kernels.py's results file (kernels-<gpu>.json): the device, the versions and one result per weight."""
    return json.loads(Path(path).read_text())


def dequantize_summary(result: dict, variant: str = "default") -> dict:
    """One weight of load_kernel_results: one variant of the Triton dequantizer against bitsandbytes and the copy."""
    ms, dev = result["ms"], result["device_ms"]
    return {
        "ms": ms[variant], "bnb_ms": ms["bnb"], "copy_ms": ms["copy"],
        "gbps": result["gbps"][variant], "bnb_gbps": result["gbps"]["bnb"], "copy_gbps": result["gbps"]["copy"],
        "write_gbps": result["gbps"]["write"],
        "speedup_vs_bnb": ms["bnb"] / ms[variant], "fraction_of_copy": result["gbps"][variant] / result["gbps"]["copy"],
        "device_ms": dev[variant], "bnb_device_ms": dev["bnb"],
        "device_speedup_vs_bnb": dev["bnb"] / dev[variant] if dev[variant] else None,
        "exact": result["exact"][variant],
    }


# Lesson 9: bench/memory.py's runs, each the setup of qlora_ref.vram.estimate and the bytes it measured.
SETUP_KEYS = ("model", "method", "optimizer", "batch", "seq_len", "r", "gradient_checkpointing",
              "optimizer_in_backward")
MEASURED_KEYS = ("peak_allocated", "peak_reserved")


def load_measurements(directory) -> list:
    """Every run of every memory-*.json in `directory` (bench/results/), as dicts; [] when there is none yet.

    A file: {"device": "NVIDIA H100 80GB HBM3", "runs": [run, ...]} (other top-level keys are kept on
    each run). A run: the setup of `estimate` (model, method, optimizer, batch, seq_len, r,
    gradient_checkpointing) and the measured bytes peak_allocated (torch.cuda.max_memory_allocated over
    one training step), peak_reserved (torch.cuda.max_memory_reserved), and optionally context_bytes
    (device memory in use once CUDA is initialised, before any tensor). Paged optimizer states in unified
    memory appear in neither peak: PyTorch's allocator does not hand them out.
    """
    runs = []
    for path in sorted(Path(directory).glob("memory-*.json")):
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or not isinstance(document.get("runs"), list):
            raise ValueError(f"{path} must hold a dict with a list 'runs'")
        common = {k: v for k, v in document.items() if k != "runs"}
        for i, run in enumerate(document["runs"]):
            # bench/memory.py's "step": "eager" (the update after the backward), "in_backward" or "graph" (in it)
            run = {"optimizer_in_backward": run.get("step", "eager") != "eager", **run}
            missing = [k for k in SETUP_KEYS + MEASURED_KEYS if k not in run]
            if missing:
                raise ValueError(f"{path}: run {i} lacks {missing}")
            runs.append({**common, **run, "file": path.name})
    return runs
