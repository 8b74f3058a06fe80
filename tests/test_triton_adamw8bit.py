"""The fused 8-bit AdamW kernel (qlora_ref.kernels.adamw_8bit) on a CPU, in Triton's interpreter.

No GPU is needed. The kernel is checked against adamw_step.adamw8bit_update_ with kernel=True, the
PyTorch step that rounds as bitsandbytes' CUDA kernel (cuda_semantics' search, explicit fmas, IEEE
sqrt and division), run on CPU tensors: every byte equal (codes, absmax, the parameter), step after
step, on odd sizes, short last blocks, every dtype, NaN/Inf gradients, all-zero blocks, tiny and
huge gradients. On the CPU both use the correctly rounded reciprocal where the GPU has MUFU.RCP;
tests/test_optim8bit_gpu.py compares the compiled kernel with PyTorch and bitsandbytes on a GPU.
Then: the optimizer's backend switch, bad input, and ahead-of-time compilation for sm_75/80/90.
Shapes stay small: the interpreter runs each program's tile through NumPy.
"""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")

from qlora_ref import backend  # noqa: E402
from qlora_ref.kernels import adamw_8bit as K  # noqa: E402
from qlora_ref.kernels.adamw_8bit import adamw8bit_update_triton, compile_ahead  # noqa: E402
from qlora_ref.adamw_step import adamw8bit_update_  # noqa: E402
from qlora_ref.optim8bit import AdamW8bit  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def zero_state(shape, blocksize):
    """AdamW8bit's state before the first step: zero codes in the parameter's shape, zero absmax per block."""
    blocks = -(-torch.Size(shape).numel() // blocksize)
    return {"state1": torch.zeros(shape, dtype=torch.uint8), "state2": torch.zeros(shape, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks), "absmax2": torch.zeros(blocks)}


def assert_same(name, mine, theirs):
    """Byte equality (NaN and the sign of zero included), naming the first difference."""
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (name, mine.dtype, theirs.dtype)
    a, b = mine.reshape(-1), theirs.reshape(-1)
    if a.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
        a, b = a.view(bits), b.view(bits)
    if not torch.equal(a, b):
        i = int((a != b).nonzero()[0])
        raise AssertionError(f"{name}: {int((a != b).sum())} of {a.numel()} differ, first at {i}: "
                             f"{mine.reshape(-1)[i].item()!r} vs {theirs.reshape(-1)[i].item()!r}")


def run_both(p0, grads, blocksize, weight_decay, **kernel_options):
    """The kernel and the PyTorch reference from the same start through the same gradients; compared after
    every step."""
    p_ref, p_kernel = p0.clone(), p0.clone()
    s_ref, s_kernel = zero_state(p0.shape, blocksize), zero_state(p0.shape, blocksize)
    for step, g in enumerate(grads, start=1):
        adamw8bit_update_(p_ref, g, s_ref, step, weight_decay=weight_decay, blocksize=blocksize, kernel=True, **HYPER)
        adamw8bit_update_triton(p_kernel, g, s_kernel, step, weight_decay=weight_decay, blocksize=blocksize,
                                **HYPER, **kernel_options)
        for key in s_ref:
            assert_same(f"step {step} {key}", s_kernel[key], s_ref[key])
        assert_same(f"step {step} p", p_kernel, p_ref)
    return p_kernel, s_kernel


def gradients(n, dtype, steps, seed, scale=0.01):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator) * scale).to(dtype) for _ in range(steps)]


CASES = [(1025, 256, torch.float32, 1e-2), (1000, 64, torch.bfloat16, 0.0), (589, 128, torch.float16, 1e-2),
         (33, 32, torch.float32, 0.0), (2048 + 5, 2048, torch.bfloat16, 1e-2)]


@pytest.mark.parametrize("n,blocksize,dtype,weight_decay", CASES,
                         ids=[f"{n}-{b}-{str(d)[6:]}-wd{w}" for n, b, d, w in CASES])
def test_kernel_equals_pytorch_step(n, blocksize, dtype, weight_decay):
    """Four steps; step 3 has NaN, +Inf and -Inf gradients; the last block is short (n is not a multiple)."""
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    grads = gradients(n, dtype, 4, seed=n)
    grads[2][:: 37] = float("nan")
    grads[2][5] = float("inf")
    grads[2][-1] = -float("inf")
    p, _ = run_both(p0, grads, blocksize, weight_decay)
    assert not torch.equal(p, p0) and bool(torch.isfinite(p).all())


def test_zero_blocks_denormals_and_many_programs():
    """Block 0 gets zero gradients (m = v = 0: absmax 0, 0 * inf = NaN in the search, code 0 whose level -1.0
    has the wrong sign for m = +0.0, so m's code is nudged to 255; v's code stays 0); block 1 float32 denormal
    gradients (g^2 underflows); tile_values 128 at blocksize 64: two blocks a program, a masked last one."""
    n, blocksize = 64 * 9 + 11, 64
    grads = gradients(n, torch.float32, 3, seed=1)
    for g in grads:
        g[:64] = 0.0
        g[64:128] = torch.linspace(-1e-39, 1e-39, 64)
    _, state = run_both(torch.randn(n, generator=torch.Generator().manual_seed(2)), grads, blocksize, 0.0,
                        tile_values=128)
    assert float(state["absmax1"][0]) == 0 and bool((state["state1"][:64] == 255).all())
    assert float(state["absmax2"][0]) == 0 and bool((state["state2"][:64] == 0).all())


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 1500), blocksize=st.sampled_from([32, 64, 128, 256]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), log_scale=st.floats(-5, 3),
       seed=st.integers(0, 2**16))
def test_random_sizes_and_gradient_scales(n, blocksize, dtype, log_scale, seed):
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    run_both(p0, gradients(n, dtype, 2, seed, scale=10.0**log_scale), blocksize, 1e-2)


def test_float32_parameter_with_bf16_gradient():
    """The kernel's fma for v follows the gradient's dtype, not the parameter's."""
    p0 = torch.randn(700, generator=torch.Generator().manual_seed(3))
    run_both(p0, gradients(700, torch.bfloat16, 3, seed=3), 128, 0.0)


# ---------------------------------------------------------------------------------------------------------
# The optimizer's backend switch


def two_parameters(seed):
    generator = torch.Generator().manual_seed(seed)
    big = torch.nn.Parameter(torch.randn(45, 31, generator=generator).t())  # 1395 values, not contiguous
    small = torch.nn.Parameter(torch.randn(30, generator=generator))  # below min_8bit_size: float32 moments
    return [big, small]


def test_backend_triton_runs_the_kernel_on_cpu_tensors():
    """AdamW8bit(backend="triton") on a CPU: the interpreted kernel for 8-bit moments (a transposed, non-
    contiguous parameter too: updated through a contiguous copy), equal to the PyTorch step with kernel=True;
    float32 moments take the PyTorch path as before."""
    params, reference = two_parameters(0), two_parameters(0)
    opt = AdamW8bit(params, backend="triton", min_8bit_size=1000)
    ref_state = zero_state(reference[0].shape, 256)
    ref_small = AdamW8bit([reference[1]], backend="torch", min_8bit_size=1000)
    for step in range(1, 4):
        for p, q in zip(params, reference):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.01
            q.grad = p.grad.clone()
        opt.step()
        adamw8bit_update_(reference[0], reference[0].grad, ref_state, step, weight_decay=1e-2, kernel=True, **HYPER)
        ref_small.step()
    assert params[0].stride() == (1, 31)  # still the transposed view
    assert_same("p", params[0].detach(), reference[0].detach())
    for key in ref_state:
        assert_same(key, opt.state[params[0]][key], ref_state[key])
    assert_same("float32 moments' p", params[1].detach(), reference[1].detach())


def test_auto_backend_on_cpu_is_pytorch(monkeypatch):
    """backend="auto" keeps the PyTorch step (bitsandbytes' CPU bytes) for CPU tensors: the kernel is never called."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel ran for CPU tensors under backend='auto'")

    monkeypatch.setattr(K, "adamw8bit_update_triton", refuse)
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    AdamW8bit([p]).step()
    with pytest.raises(AssertionError, match="the Triton kernel ran"):
        AdamW8bit([p], backend="triton").step()


def test_bad_backend_names_the_problem(monkeypatch):
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="backend must be one of"):
        AdamW8bit([p], backend="cuda")
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the triton package"):
        AdamW8bit([p], backend="triton")


def test_bad_input_is_refused():
    p, g, state = torch.randn(300), torch.randn(300), zero_state((300,), 64)
    with pytest.raises(ValueError, match="gradient has shape"):
        adamw8bit_update_triton(p, torch.randn(301), state, 1, blocksize=64, weight_decay=0.0, **HYPER)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        adamw8bit_update_triton(p.double(), g.double(), state, 1, blocksize=64, weight_decay=0.0, **HYPER)
    with pytest.raises(ValueError, match=r"state\['absmax1'\] must be a contiguous torch.float32 tensor of 2 values"):
        adamw8bit_update_triton(p, g, state, 1, blocksize=256, weight_decay=0.0, **HYPER)  # 2 blocks, 5 given
    with pytest.raises(ValueError, match=r"state\['state2'\] must be a contiguous torch.uint8"):
        adamw8bit_update_triton(p, g, {**state, "state2": torch.zeros(300)}, 1, blocksize=64, weight_decay=0.0,
                                **HYPER)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        adamw8bit_update_triton(p, g, state, 1, blocksize=100, weight_decay=0.0, **HYPER)
    with pytest.raises(ValueError, match="tile_values must be a power of two"):
        adamw8bit_update_triton(p, g, state, 1, blocksize=64, weight_decay=0.0, tile_values=1000, **HYPER)


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation (no GPU, no driver: the ptxas inside the triton wheel)

AOT_TARGETS = [(75, torch.float32), (75, torch.float16), (80, torch.bfloat16), (90, torch.float32)]


@pytest.mark.parametrize("capability,dtype", AOT_TARGETS, ids=[f"sm_{c}-{str(d)[6:]}" for c, d in AOT_TARGETS])
def test_compiles_ahead_of_time(capability, dtype):
    kernel = compile_ahead(capability, dtype)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    assert len(kernel.asm["cubin"]) > 0
    instructions = set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))
    # the kernel's three fmas, written out; nothing else fused (enable_fp_fusion=False)
    assert [i for i in instructions if i.startswith("fma")] == ["fma.rn.f32"]
    assert {"sqrt.rn.f32", "div.rn.f32", "rcp.approx.ftz.f32"} <= instructions  # IEEE sqrt and division, MUFU.RCP
    assert not any(i.startswith(("sqrt.approx", "div.full", "div.approx")) for i in instructions)
    if capability == 75:
        assert "bf16" not in ptx


def test_interpreter_twin():
    assert K._twin(interpret=True).INTERPRETED
    assert not K.INTERPRETED or K._twin(True) is K
