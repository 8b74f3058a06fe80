"""The fused training path (qlora_ref.fused, kernels/rmsnorm.py, kernels/swiglu.py) against the unfused PyTorch it
replaces: forward and backward within the unfused ops' own error against float64, the loss without the whole
logits, the trainer's losses, exact resume, clear errors, and the kernels compiled for a T4."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from qlora_ref.fused import linear_cross_entropy
from qlora_ref.kernels.rmsnorm import compile_ahead as rms_norm_compile_ahead
from qlora_ref.kernels.rmsnorm import rms_norm
from qlora_ref.kernels.rope import compile_ahead as rope_compile_ahead
from qlora_ref.kernels.rope import rope_qk
from qlora_ref.kernels.swiglu import compile_ahead as swiglu_compile_ahead
from qlora_ref.kernels.swiglu import swiglu
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM, RMSNorm, apply_rope, rope_cos_sin
from qlora_ref.train import TrainConfig, setup, train, train_step

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float32 rounding of sums taken in another order: a few units in the last place of the largest value
ULPS = {torch.float32: 8 * 2**-23, torch.bfloat16: 2 * 2**-7, torch.float16: 2 * 2**-10}


def _no_worse(fused, unfused, exact, dtype):
    """fused is as close to the float64 value as the unfused op is, up to a few units in the last place."""
    scale = exact.abs().max().item()
    fused_error = (fused.double() - exact).abs().max().item()
    unfused_error = (unfused.double() - exact).abs().max().item()
    assert fused_error <= 1.25 * unfused_error + ULPS[dtype] * scale, (fused_error, unfused_error, scale)


def _rms_norm_float64(x, w, eps, dtype):
    """The unfused module's function in float64, with its one rounding (x^ to the input's dtype) kept."""
    x = x.double()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w.double() * (x_hat.to(dtype).double() + (x_hat - x_hat.detach()))  # rounded value, exact gradient


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, d", [(1, 64), (37, 96), (70, 100)])
def test_rms_norm_matches_the_module_forward_and_backward(dtype, rows, d):
    torch.manual_seed(rows + d)
    module = RMSNorm(d, 1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * torch.randn(d))
    x = (3 * torch.randn(2, rows, d)).to(dtype).requires_grad_()
    dy = torch.randn(2, rows, d).to(dtype)

    unfused = module(x)
    unfused.backward(dy)
    unfused_grads = x.grad, module.weight.grad
    x.grad = module.weight.grad = None
    fused = rms_norm(x, module.weight, 1e-5)
    fused.backward(dy)
    assert fused.dtype == unfused.dtype and fused.shape == unfused.shape

    x64, w64 = x.detach().double().requires_grad_(), module.weight.detach().double().requires_grad_()
    exact = _rms_norm_float64(x64, w64, 1e-5, dtype)
    exact.backward(dy.double())
    _no_worse(fused, unfused, exact.detach(), dtype)
    _no_worse(x.grad, unfused_grads[0], x64.grad, dtype)
    _no_worse(module.weight.grad, unfused_grads[1], w64.grad, dtype)


def test_rms_norm_with_a_float32_weight_returns_float32_as_the_module():
    """Full fine-tuning keeps float32 weights next to 16-bit activations: torch promotes weight * x^ to float32."""
    x, w = torch.randn(5, 64).to(torch.bfloat16), torch.rand(64) + 0.5
    module = RMSNorm(64, 1e-6)
    with torch.no_grad():
        module.weight.copy_(w)
    assert rms_norm(x, w, 1e-6).dtype == module(x).dtype == torch.float32
    torch.testing.assert_close(rms_norm(x, w, 1e-6), module(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_silu_times_up_forward_and_backward(dtype):
    torch.manual_seed(0)
    gate = (4 * torch.randn(3, 41, 176)).to(dtype).requires_grad_()  # 21,648 values: not a multiple of the block
    up = torch.randn(3, 41, 176).to(dtype).requires_grad_()
    dh = torch.randn(3, 41, 176).to(dtype)

    unfused = F.silu(gate) * up
    unfused.backward(dh)
    unfused_grads = gate.grad, up.grad
    gate.grad = up.grad = None
    fused = swiglu(gate, up)
    fused.backward(dh)

    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    exact = F.silu(g64) * u64
    exact.backward(dh.double())
    _no_worse(fused, unfused, exact.detach(), dtype)
    _no_worse(gate.grad, unfused_grads[0], g64.grad, dtype)
    _no_worse(up.grad, unfused_grads[1], u64.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_qk_matches_apply_rope_on_q_and_k_forward_and_backward(dtype):
    """Grouped K/V heads (4 query heads, 2 key/value heads): q and k have different shapes, one launch turns both."""
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(37, 32, 10000.0, dtype=dtype)
    q = torch.randn(2, 4, 37, 32).to(dtype).requires_grad_()
    k = torch.randn(2, 2, 37, 32).to(dtype).requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    unfused = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.autograd.backward(unfused, (dq, dk))
    unfused_grads = q.grad, k.grad
    q.grad = k.grad = None
    fused = rope_qk(q, k, cos, sin)
    torch.autograd.backward(fused, (dq, dk))

    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    exact = apply_rope(q64, cos.double(), sin.double()), apply_rope(k64, cos.double(), sin.double())
    torch.autograd.backward(exact, (dq.double(), dk.double()))
    for ours, theirs, truth in zip((*fused, q.grad, k.grad), (*unfused, *unfused_grads),
                                   (*(e.detach() for e in exact), q64.grad, k64.grad)):
        _no_worse(ours, theirs, truth, dtype)


def _unfused_loss(h, weight, targets):
    return F.cross_entropy((h @ weight.T).float(), targets, ignore_index=-100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_linear_cross_entropy_equals_the_loss_on_whole_logits(dtype, chunk):
    torch.manual_seed(chunk)
    h = torch.randn(50, 32).to(dtype).requires_grad_()
    weight = (0.3 * torch.randn(300, 32)).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (50,))
    targets[::3] = -100  # the prompt's positions: not predicted

    unfused = _unfused_loss(h, weight, targets)
    unfused.backward()
    unfused_grads = h.grad, weight.grad
    h.grad = weight.grad = None
    fused = linear_cross_entropy(h, weight, targets, chunk=chunk)
    fused.backward()

    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(fused, unfused, **tolerance)
    torch.testing.assert_close(h.grad, unfused_grads[0], **tolerance)
    torch.testing.assert_close(weight.grad, unfused_grads[1], **tolerance)


def test_linear_cross_entropy_skips_the_weight_gradient_of_a_frozen_head():
    h = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(40, 16)  # lm_head of a LoRA or QLoRA model: frozen
    linear_cross_entropy(h, weight, torch.randint(0, 40, (10,)), chunk=3).backward()
    assert h.grad is not None and weight.grad is None


def _tiny_model(fused: bool):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    return model.fused_kernels_enable(fused)


def test_the_fused_model_computes_the_same_loss_and_gradients():
    ids = torch.randint(0, 120, (2, 33), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    out = {}
    for fused in (False, True):
        model = _tiny_model(fused)
        result = model(ids, labels=labels)
        assert (result.logits is None) == fused  # the fused loss never builds the whole logits
        result.loss.backward()
        out[fused] = result.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert _tiny_model(True)(ids).logits.shape == (2, 33, 120)  # without labels: logits, as before


# Triton's interpreter runs the kernels on a CPU at about a tenth of a second a launch: a few steps here, the 50-step
# comparison on a GPU (tests/test_fused_gpu.py).
SETTINGS = {"method": "qlora", "steps": 6, "warmup_steps": 2, "eval_every": 0, "progress": False, "samples": 0,
            "n_train": 64, "n_eval": 8, "batch_size": 8}


@pytest.fixture(scope="module")
def six_steps():
    return {fused: train(TrainConfig(**SETTINGS, fused=fused)).losses for fused in (False, True)}


def test_qlora_steps_fused_and_unfused_lose_the_same(six_steps):
    unfused, fused = torch.tensor(six_steps[False]), torch.tensor(six_steps[True])
    assert len(fused) == len(unfused) == 6 and unfused[-1] < unfused[0]
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=0.0)


def test_a_stopped_and_resumed_fused_run_equals_an_uninterrupted_one(tmp_path, six_steps):
    config = TrainConfig(**SETTINGS, save_every=3, fused=True, output_dir=str(tmp_path))
    train(config, stop_after=3)
    resumed = train(replace(config, resume=True))
    assert resumed.losses == six_steps[True]  # floats compared exactly: the same arithmetic in the same order


def test_fused_refuses_what_it_does_not_run(tmp_path):
    with pytest.raises(ValueError, match="fused runs the LoRA and QLoRA step"):
        setup(TrainConfig(method="full", fused=True))
    with pytest.raises(TypeError, match="leave lm_head out of target_modules"):
        model = _tiny_model(False)
        model.lm_head = torch.nn.Sequential(model.lm_head)
        model.fused_kernels_enable()
    with pytest.raises(ValueError, match="weight must be 1-D"):
        rms_norm(torch.randn(3, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="rope_qk takes q"):
        rope_qk(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="gate and up must share"):
        swiglu(torch.randn(3, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long), chunk=0)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"fused": "yes"}))
    with pytest.raises(TypeError, match="fused must be True or False"):
        setup(TrainConfig.from_file(path))


def test_one_fused_step_runs_through_the_trainer():
    run = setup(TrainConfig(**{**SETTINGS, "steps": 3}, fused=True))
    assert run.model.fused and run.model.model.norm.fused
    assert 0 < train_step(run) < 10


@pytest.mark.parametrize("compile_ahead", [rms_norm_compile_ahead, swiglu_compile_ahead, rope_compile_ahead])
def test_the_fused_kernels_compile_for_a_t4(compile_ahead):
    """sm_75, float16 (a T4 has no bfloat16): what a Colab learner's GPU runs, compiled here without a GPU."""
    kernels = compile_ahead(75, torch.float16)
    for kernel in kernels if isinstance(kernels, tuple) else (kernels,):
        assert ".target sm_75" in kernel.asm["ptx"] and kernel.asm["cubin"]
