"""Lesson 9 settles two seed claims in prose ("about 3.5x, not 4x (and 71%, not 75%)", 3.88x per linear, 70B
"about 42 GB"): the prose must keep agreeing with the estimator and the stored H100 measurement."""
import re
from pathlib import Path

from qlora_ref import constant_bits_per_parameter
from qlora_ref.results import load_measurements
from qlora_ref.model_shapes import PRESETS
from qlora_ref.vram import estimate, matching_run

ROOT = Path(__file__).resolve().parents[1]
LESSON = (ROOT / "notebooks" / "09_vram_budget.py").read_text()


def _verdict(claim: str) -> str:
    match = re.search(rf"\*\*Verdict: {claim}.*?(?=\n\n|\n#\n)", LESSON, re.S)
    assert match, f"lesson 9 lost its verdict starting {claim!r}"
    return match.group(0)


def test_the_4x_verdict_matches_the_estimator():
    parts = estimate("Llama-2-7B", method="qlora_nf4_dq").parts
    qlora = parts["4-bit weights"] + parts["quantization constants"] + parts["16-bit weights"]
    ratio = 2 * PRESETS["Llama-2-7B"].parameter_count / qlora
    per_linear = 16 / (4 + constant_bits_per_parameter(64, double_quant=True))
    verdict = _verdict("about")
    assert f"about {ratio:.1f}x, not 4x" in verdict
    assert f"{1 - 1 / ratio:.0%}, not 75%" in verdict
    assert f"{per_linear:.2f}x" in verdict


def test_the_70b_verdict_matches_the_measurement():
    runs = load_measurements(ROOT / "bench" / "results")
    run = matching_run(estimate("Llama-2-70B", optimizer_in_backward=True), runs)
    assert run is not None, "the 70B H100 run of lesson 9's setting is missing from bench/results"
    assert f"about {run['peak_allocated'] / 1e9:.0f} GB" in _verdict("not on a single consumer card")
    assert not estimate("Llama-2-70B").fits("RTX 4090 (24 GiB)")
