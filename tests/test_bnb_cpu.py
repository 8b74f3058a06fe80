"""bitsandbytes 0.50.2's CPU paths (qlora_ref.bnb_cpu): which one each CPU takes, and that each computes what
the course says it computes, on this CPU and, under qemu, on a CPU without AVX-512.

The AVX-512 decoder's misread scales are asserted value for value against a model of that loop
(tests/parity.py), so on an AVX-512 machine these tests pin bitsandbytes' mistake exactly; elsewhere they assert
that its decoder gives our values bit for bit.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity import assert_equal, assert_same_bits, native_dequantize_4bit_expected, with_bitsandbytes_table

import qlora_ref as Q
from qlora_ref import bnb_cpu

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

AVX512 = {"machine": "x86_64", "avx512f": True, "avx512bf16": True, "torch": "AVX512"}
AVX2 = {"machine": "x86_64", "avx512f": False, "avx512bf16": False, "torch": "AVX2"}
ARM = {"machine": "aarch64", "avx512f": False, "avx512bf16": False, "torch": "DEFAULT"}
# Rows that straddle blocks (96, 160, 32 at blocksize 64), whole blocks (64, 128), rows not of 16 (100, 130),
# odd rows (333), one row (a 1-D weight).
SHAPES = [(4, 96), (4, 160), (3, 32), (130, 96), (16, 128), (96, 130), (4, 100), (3, 333), (1, 96), (96,)]


@pytest.mark.parametrize("features,shape,blocksize,path", [
    (AVX512, (4, 96), 64, "avx512"),
    (AVX512, (4, 100), 64, "scalar"),     # not a multiple of 16 values a row
    (AVX512, (3, 333), 64, "portable"),   # odd rows: bitsandbytes' Python fallback
    (AVX512, (4, 4096), 2048, "portable"),  # its "accuracy issues" fallback, keyed on torch's capability
    (AVX512 | {"torch": "AVX2"}, (4, 4096), 2048, "avx512"),  # ATEN_CPU_CAPABILITY=avx2 lifts that fallback
    (AVX2, (4, 96), 64, "scalar"),
    (AVX2, (4, 4096), 2048, "scalar"),
    (ARM, (4, 128), 64, "neon"),
    (ARM, (4, 96), 64, "scalar"),
])
def test_the_path_each_cpu_takes(monkeypatch, features, shape, blocksize, path):
    assert bnb_cpu.dequantize_4bit_path(shape, blocksize, features) == path
    monkeypatch.setattr(bnb_cpu, "cpu_features", lambda: features)
    assert bnb_cpu.dequantize_4bit_path(shape, blocksize) == path


def test_which_shapes_the_avx512_loop_reads_wrong():
    wrong = [shape for shape in SHAPES if bnb_cpu.avx512_reads_wrong_scales(shape, 64)]
    assert wrong == [(4, 96), (4, 160), (3, 32), (130, 96), (96, 130), (4, 100), (3, 333)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_native_decoder_computes_what_its_path_computes_here(shape, quant_type, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    packed, state = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type, double_quant=True)
    bnb_packed, bnb_state = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, bnb_packed)
    path = bnb_cpu.dequantize_4bit_path(shape, 64)
    assert_same_bits(f"{path} path", native_dequantize_4bit_expected(packed, state),
                     bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(shape))
    portable = bnb_cpu.dequantize_4bit_portable(bnb_packed, bnb_state)
    assert_same_bits("portable path", with_bitsandbytes_table(packed, state), portable)
    assert_equal("portable path, values", Q.dequantize_4bit(packed, state), portable)


def test_the_avx512_model_is_our_decoder_where_rows_are_whole_blocks_and_wrong_where_not():
    """The model must be able to fail: on rows of 96 it differs from the right values, by a lot."""
    for shape, misread in [((16, 128), False), ((4, 96), True)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
        packed, state = Q.quantize_4bit(x, blocksize=64, quant_type="nf4")
        right = Q.dequantize_4bit(packed, state)
        model = with_bitsandbytes_table(packed, state, misread=True)
        assert torch.equal(model, right) is not misread
        if misread:
            assert (model - x).abs().mean() > 1.5 * (right - x).abs().mean()


def test_linear4bit_trains_through_the_native_decoder():
    """Linear4bit's training forward is F.linear(x, dequantize_4bit(W)) + b: its output inherits the decoder's path."""
    torch.manual_seed(0)
    base = torch.nn.Linear(160, 96)
    layer = bnb.nn.Linear4bit(160, 96, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    layer.bias = torch.nn.Parameter(base.bias.detach().clone())
    layer = layer.to("cpu")
    packed, state = Q.quantize_4bit(base.weight.detach(), blocksize=64, quant_type="nf4", double_quant=True)
    x = torch.randn(5, 160, requires_grad=True)
    expected = torch.nn.functional.linear(x, native_dequantize_4bit_expected(packed, state), layer.bias)
    assert torch.equal(layer(x), expected)


QEMU_SCRIPT = """
import torch
from parity import assert_same_bits
import bitsandbytes.functional as bnbF
import qlora_ref as Q
from qlora_ref import bnb_cpu

features = bnb_cpu.cpu_features()
assert not features["avx512f"] and not features["avx512bf16"] and features["torch"] == "AVX2", features
for shape in [(4, 96), (4, 160), (130, 96), (16, 128)]:
    for quant_type in ("nf4", "fp4"):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        packed, state = Q.quantize_4bit(x, blocksize=64, quant_type=quant_type, double_quant=True)
        bnb_packed, bnb_state = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed, bnb_packed)
        assert bnb_cpu.dequantize_4bit_path(shape, 64) == "scalar"
        assert_same_bits(f"{shape} {quant_type}", Q.dequantize_4bit(packed, state),
                         bnbF.dequantize_4bit(bnb_packed, bnb_state).reshape(shape))
print("scalar decoder: our values, bit for bit")
"""


@pytest.mark.slow
def test_on_a_cpu_without_avx512_the_decoder_gives_our_values_bit_for_bit():
    """qemu-user emulates an x86-64 CPU without AVX-512 (`-cpu max`: every feature qemu's TCG has, which stops at
    AVX2), so the library's own CPUID check answers no and its scalar loop runs: about 30 s, most of it importing
    torch under emulation. CI installs qemu-user (tools/ci_setup.sh); elsewhere the test needs it too, unless
    it is missing outside CI."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or os.uname().machine != "x86_64":
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run this test: install qemu-user (tools/ci_setup.sh)")
        pytest.skip("needs qemu-x86_64 (Debian: apt install qemu-user) on an x86-64 machine")
    tests = Path(__file__).resolve().parent
    # The emulated CPU alone decides torch's kernels there, also under `make test CPU_PATHS=...`.
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                           "ONEDNN_MAX_CPU_ISA")}
    env |= {"TORCH_COMPILE_DISABLE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), env.get("PYTHONPATH")]))}
    done = subprocess.run([qemu, "-cpu", "max", sys.executable, "-c", QEMU_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "our values, bit for bit" in done.stdout


def test_the_native_decoder_report_names_the_path_and_says_when_it_misreads():
    report = bnb_cpu.native_decoder_report(torch.randn(4, 96, generator=torch.Generator().manual_seed(5)))
    path = bnb_cpu.dequantize_4bit_path((4, 96), 64)
    assert f"bitsandbytes' {path} path" in report
    assert ("misreads the scales: from bytes equal to ours" in report) == (path == "avx512"), report
    whole = bnb_cpu.native_decoder_report(torch.randn(16, 128, generator=torch.Generator().manual_seed(5)), "fp4")
    assert whole.endswith("gives our values from our bytes"), whole
