"""What every benchmark in bench/ shares: the Llama weight shapes, the two clocks (do_bench's median and GPU time
alone), the host's cost of a call, and the results file (device, versions, date) in bench/results/.
"""

import datetime
import json
import re
from pathlib import Path

import torch

from qlora_ref.state import QuantState

LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (8192, 8192), (8192, 28672)]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEVICE = "cuda"


def state_from_bitsandbytes(bnb_state) -> QuantState:
    """qlora_ref's QuantState holding the same tensors as a bitsandbytes 4-bit QuantState (no copies)."""
    state = QuantState(
        absmax=bnb_state.absmax, shape=torch.Size(bnb_state.shape), code=bnb_state.code, dtype=bnb_state.dtype,
        blocksize=bnb_state.blocksize, quant_type=bnb_state.quant_type,
    )
    if bnb_state.nested:
        state.offset = bnb_state.offset
        state.state2 = QuantState(
            absmax=bnb_state.state2.absmax, shape=bnb_state.absmax.shape, code=bnb_state.state2.code,
            dtype=torch.float32, blocksize=bnb_state.state2.blocksize,
        )
    return state


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def median_ms(fn) -> float:
    """do_bench's median: CUDA events around each call, the L2 cache flushed (256 MB zeroed) before it."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


_FLUSH = {}


def device_ms(fn, out_bytes=0) -> float:
    """_device_ms, or NaN (with the error printed) if graph capture fails: the do_bench numbers still stand."""
    try:
        return _device_ms(fn, out_bytes)
    except Exception as error:  # noqa: BLE001 - a diagnostic column must not stop the benchmark
        print(f"device_ms failed: {error!r}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def _device_ms(fn, out_bytes=0) -> float:
    """GPU time of one call without the host: CUDA-graph replays of (L2 flush, fn) minus those of the flush alone.

    do_bench's numbers include the host's time whenever the Python side of a call (checks, argument
    handling, the launch) takes longer than its flush: then the GPU waits for the launch between the
    two events. A graph replays the calls with no Python in between. Fewer calls are captured for a
    large output, so that the graph's memory stays a few GB even if freed outputs were not reused.
    """
    if "cache" not in _FLUSH:
        _FLUSH["cache"] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=DEVICE)
    cache = _FLUSH["cache"]

    def flushed():
        cache.zero_()
        fn()

    flushed()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flushed()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 3
    calls = int(min(max(3, 30 / estimate), 200, max(3, 6e9 // max(out_bytes, 1))))

    def per_call(body):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        times = []
        for _ in range(7):
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
        del graph
        return sorted(times)[len(times) // 2]

    return max(per_call(flushed) - per_call(cache.zero_), 0.0)


def host_us(fn, calls=400) -> float:
    """Wall-clock microseconds per call for back-to-back calls on a tiny tensor: the host's cost of a call."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def gpu_run(tool: str) -> dict:
    """The start of a benchmark on a CUDA GPU: exits with a message if there is none, else prints and returns
    what every results file begins with: the device, the versions and the date (UTC)."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{tool} needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    print(f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions().items()), flush=True)
    return {"device": device, **versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_results(out_dir: Path, stem: str, results: dict) -> Path:
    """Write results (a dict from gpu_run, filled in) to <out_dir>/<stem>-<gpu>.json and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{slug(results['device'])}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def versions():
    import bitsandbytes
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__, "bitsandbytes": bitsandbytes.__version__,
            "cuda": torch.version.cuda}
