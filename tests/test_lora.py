"""Lesson 6's layers: LoRALinear and QLoRALinear against references, bitsandbytes, and the formulas.

Tolerances, and why each is what it is (fp32 on a CPU unless a test says otherwise):

- QLoRALinear vs a dense LoRALinear whose W0 is the dequantized W0^: EXACT (torch.equal), outputs and
  the gradients of x, A and B. Both run the same autograd node (qlora_ref.lora.LoRAMatmul) on the same
  operands, and dequantization is exact (W0^ is the float32 product code * absmax).
- QLoRALinear vs bitsandbytes' Linear4bit (nf4, compress_statistics=True, fp32) plus the same LoRA
  branch in plain PyTorch: EXACT for the output and the gradients of A and B. The packed bytes are equal
  (lessons 3-4), bitsandbytes' CPU path dequantizes and calls F.linear, and its backward is grad_out @ W0^,
  as ours. The layer there has rows of 256 inputs, whole blocks of 64: every CPU path of bitsandbytes'
  decoder reads the right scales for them (its AVX-512 loop misreads rows of 160, this file's IN:
  tests/test_bnb_cpu.py); alpha/r = 2 makes every scaling exact. The gradient of x: within 4 float32 ulps of the largest
  value. Ours adds s·(g B)A onto g W0^ inside one addmm (the BLAS may accumulate onto the existing sum);
  plain autograd rounds the two products separately and adds them (measured: 1 ulp, on 1 of 3 shapes).
- Autograd vs the closed-form gradients of the module docstring, both in float32: rtol 1e-5, atol 1e-6.
  The formulas put the scale alpha/r and the parentheses elsewhere (s·(g B)A vs ((s·g)B)A), so the
  roundings differ; each of these sums has at most 160 terms, and float32's eps is 1.2e-7, so the
  difference stays far below 1e-5 relative (measured: about 1e-7).
- Everything vs a float64 computation of the same formulas: relative max error below 1e-6, the size of
  float32 rounding on sums of this length.
- bf16 / fp16 compute: exact against the dense layer run in that dtype (same operations), and within
  2^-7 (bf16) / 2^-10 (fp16) relative of float32: one rounding of the output (8 and 11 significant bits)
  plus rounded inputs to the matmul.
"""

import math

import pytest
import torch
from torch import nn

import qlora_ref as Q
from qlora_ref.lora import DequantizeMatmul

IN, OUT, R, ALPHA = 160, 96, 8, 16


def make_base(in_features=IN, out_features=OUT, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def randomise_adapters(layer, seed=1):
    """B starts at zero, which would hide every B-dependent term: give both A and B random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return layer


def dense_reference(qlayer):
    """A LoRALinear on the dequantized base W0^ with a copy of qlayer's adapters: the fp32 reference."""
    base = nn.Linear(qlayer.in_features, qlayer.out_features, bias=qlayer.bias is not None,
                     dtype=qlayer.compute_dtype)
    with torch.no_grad():
        base.weight.copy_(qlayer.base_weight())
        if qlayer.bias is not None:
            base.bias.copy_(qlayer.bias)
    ref = Q.LoRALinear(base, qlayer.r, qlayer.alpha, qlayer.dropout_p)
    ref.load_state_dict({"lora_A.weight": qlayer.lora_A.weight, "lora_B.weight": qlayer.lora_B.weight},
                        strict=False)
    return ref


def run(layer, x, seed=7):
    """Output and the gradients of x, A and B for the loss sum(y * G) with a fixed random G."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    (y * g).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad, g


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------- init


@pytest.mark.parametrize("cls", [Q.LoRALinear, Q.QLoRALinear])
def test_init_is_peft_s_a_random_b_zero_so_the_layer_starts_as_the_base(cls):
    base = make_base()
    layer = cls(base, r=R, alpha=ALPHA)
    bound = 1 / math.sqrt(IN)  # kaiming_uniform(a=sqrt(5)): gain sqrt(2/(1+5)), bound gain*sqrt(3/fan_in)
    a = layer.lora_A.weight
    assert a.shape == (R, IN) and layer.lora_B.weight.shape == (OUT, R)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert layer.scaling == ALPHA / R
    x = torch.randn(5, IN)
    with torch.no_grad():
        expected = nn.functional.linear(x, layer.base_weight(), layer.bias)
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("cls", [Q.LoRALinear, Q.QLoRALinear])
def test_only_the_adapters_are_trainable(cls):
    layer = cls(make_base(), r=R, alpha=ALPHA)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}
    assert not layer.bias.requires_grad


# ------------------------------------------------------------------------------ QLoRA vs the references


@pytest.mark.parametrize("shape", [(1, IN), (4, IN), (3, 7, IN)], ids=["M=1", "M=4", "3x7"])
@pytest.mark.parametrize("bias", [True, False])
def test_qlora_equals_the_fp32_reference_on_the_dequantized_weight_exactly(shape, bias):
    q = randomise_adapters(Q.QLoRALinear(make_base(bias=bias), r=R, alpha=ALPHA))
    ref = dense_reference(q)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours, theirs = run(q, x), run(ref, x)
    for name, a, b in zip(["output", "grad x", "grad A", "grad B"], ours, theirs):
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item()}"


def test_the_closed_form_gradients_of_the_docstring():
    """y = x W0^T + b + s x A^T B^T; dL/dx = g W0 + s g B A; dL/dA = s B^T g^T x; dL/dB = s g^T (x A^T)."""
    q = randomise_adapters(Q.QLoRALinear(make_base(), r=R, alpha=ALPHA))
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(4))
    y, gx, ga, gb, g = run(q, x)
    W, A, B, b, s = q.base_weight(), q.lora_A.weight.detach(), q.lora_B.weight.detach(), q.bias.detach(), q.scaling
    X, G = x.reshape(-1, IN), g.reshape(-1, OUT)  # the formulas sum over every leading dimension
    formulas = {
        "output": (X @ W.T + b + s * (X @ A.T) @ B.T).reshape(y.shape),
        "grad x": (G @ W + s * G @ B @ A).reshape(x.shape),
        "grad A": s * B.T @ G.T @ X,
        "grad B": s * G.T @ (X @ A.T),
    }
    for (name, formula), autograd in zip(formulas.items(), [y, gx, ga, gb]):
        torch.testing.assert_close(autograd, formula, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # The same formulas in float64: float32 rounding only.
    Wd, Ad, Bd, Xd, Gd = W.double(), A.double(), B.double(), X.double(), G.double()
    exact = {
        "output": Xd @ Wd.T + b.double() + s * (Xd @ Ad.T) @ Bd.T,
        "grad x": Gd @ Wd + s * Gd @ Bd @ Ad,
        "grad A": s * Bd.T @ Gd.T @ Xd,
        "grad B": s * Gd.T @ (Xd @ Ad.T),
    }
    for (name, reference), autograd in zip(exact.items(), [y, gx, ga, gb]):
        assert rel_err(autograd.reshape(reference.shape), reference) < 1e-6, name


@pytest.mark.parametrize("M", [1, 4, 33])
def test_qlora_equals_bitsandbytes_linear4bit_plus_a_pytorch_lora_branch(M):
    bnb = pytest.importorskip("bitsandbytes")
    in_features = 256  # whole blocks: see the module docstring
    base = make_base(in_features)
    q = randomise_adapters(Q.QLoRALinear(base, r=R, alpha=ALPHA, compute_dtype=torch.float32))
    ref = bnb.nn.Linear4bit(in_features, OUT, bias=True, compute_dtype=torch.float32, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True)
    ref.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    ref = ref.to("cpu")  # quantizes the weight
    assert torch.equal(ref.weight.data.reshape(-1, 1), q.weight_packed), "same NF4 bytes (lessons 3-4)"
    A = nn.Parameter(q.lora_A.weight.detach().clone())
    B = nn.Parameter(q.lora_B.weight.detach().clone())

    x = torch.randn(M, in_features, generator=torch.Generator().manual_seed(5))
    y, gx, ga, gb, g = run(q, x)
    xr = x.clone().requires_grad_(True)
    yr = ref(xr) + (xr @ A.T) @ B.T * q.scaling  # PEFT's order: B(A(x)) * scaling
    (yr * g).sum().backward()
    for name, a, b in [("output", y, yr.detach()), ("grad A", ga, A.grad), ("grad B", gb, B.grad)]:
        assert torch.equal(a, b), f"{name}: max difference {(a - b).abs().max().item()}"
    ulp = torch.finfo(torch.float32).eps * xr.grad.abs().max()
    assert (gx - xr.grad).abs().max() <= 4 * ulp, f"grad x: max difference {(gx - xr.grad).abs().max().item()}"


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2**-7), (torch.float16, 2**-10)], ids=["bf16", "fp16"])
def test_half_precision_compute(dtype, tol):
    base = make_base()
    q = randomise_adapters(Q.QLoRALinear(base, r=R, alpha=ALPHA, compute_dtype=dtype))
    assert q.bias.dtype == dtype and q.lora_A.weight.dtype == torch.float32
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(6))
    y, gx, ga, gb, _ = run(q, x.to(dtype))
    assert y.dtype == dtype and gx.dtype == dtype and ga.dtype == torch.float32
    ref = dense_reference(q)
    for a, b in zip((y, gx, ga, gb), run(ref, x.to(dtype))):
        assert torch.equal(a, b)
    q32 = Q.QLoRALinear(base, r=R, alpha=ALPHA, compute_dtype=torch.float32)
    q32.load_state_dict(q.state_dict() | {"bias": q.bias.float()})
    assert rel_err(y, run(q32, x)[0]) < tol


def test_dropout_acts_on_the_lora_input_only():
    q = randomise_adapters(Q.QLoRALinear(make_base(), r=R, alpha=ALPHA, dropout=0.5))
    x = torch.randn(8, IN)
    q.train()
    torch.manual_seed(11)
    y = q(x)
    torch.manual_seed(11)
    dropped = nn.functional.dropout(x, p=0.5, training=True)
    with torch.no_grad():
        expected = nn.functional.linear(x, q.base_weight(), q.bias) + q.lora_B(q.lora_A(dropped)) * q.scaling
    assert torch.equal(y, expected)
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x), dense_reference(q).eval()(x))


@pytest.mark.parametrize("separate_h", [False, True], ids=["h is x", "h = dropout(x)"])
def test_lora_matmul_passes_gradcheck_in_float64(separate_h):
    """LoRAMatmul's hand-written backward against finite differences, for every input that takes a gradient."""
    from qlora_ref.lora import LoRAMatmul

    g = torch.Generator().manual_seed(12)
    W = torch.randn(6, 5, dtype=torch.float64, generator=g)
    x, h = (torch.randn(3, 5, dtype=torch.float64, generator=g).requires_grad_(True) for _ in range(2))
    bias, A, B = (torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_(True)
                  for shape in ((6,), (2, 5), (6, 2)))
    inputs = (x, h, bias, A, B) if separate_h else (x, bias, A, B)

    def f(*args):
        if separate_h:
            x_, h_, b_, A_, B_ = args
        else:
            (x_, b_, A_, B_), h_ = args, None
        return LoRAMatmul.apply(x_, h_, W, b_, A_, B_, 1.5)

    assert torch.autograd.gradcheck(f, inputs)


# ------------------------------------------------------------------------------ frozen base, training


def test_an_optimizer_step_changes_a_and_b_and_never_the_packed_base():
    q = Q.QLoRALinear(make_base(), r=R, alpha=ALPHA)
    frozen = {k: v.clone() for k, v in q.state_dict().items() if not k.startswith("lora_")}
    a0, b0 = q.lora_A.weight.detach().clone(), q.lora_B.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(16, IN), torch.randn(16, OUT)
    for _ in range(2):  # after step 1 B != 0, so step 2 moves A as well
        opt.zero_grad()
        nn.functional.mse_loss(q(x), target).backward()
        assert q.weight_packed.grad is None and not q.weight_packed.requires_grad
        assert q.bias.grad is None
        opt.step()
    for k, v in q.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"
    assert not torch.equal(q.lora_B.weight, b0) and not torch.equal(q.lora_A.weight, a0)


def test_a_bias_that_asks_for_a_gradient_gets_the_right_one():
    q = Q.QLoRALinear(make_base(), r=R, alpha=ALPHA)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 4, IN)
    q(x).sum().backward()
    assert torch.equal(q.bias.grad, torch.full((OUT,), 12.0))


# ------------------------------------------------------------------------------------------- memory


def dense_sized_float_tensors(tensors, out_features, in_features):
    return [t for t in tensors if t.is_floating_point() and t.numel() == out_features * in_features]


def test_no_dense_weight_is_held_or_saved_for_backward():
    out_features, in_features = 256, 384
    q = Q.QLoRALinear(make_base(in_features, out_features), r=R, alpha=ALPHA)
    held = list(q.state_dict().values()) + list(q.parameters()) + list(q.buffers())
    assert not dense_sized_float_tensors(held, out_features, in_features)
    assert not [v for v in vars(q).values() if isinstance(v, torch.Tensor)], "no tensor hidden in attributes"
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(torch.randn(2, in_features, requires_grad=True))
    assert saved and not dense_sized_float_tensors(saved, out_features, in_features)
    y.sum().backward()


def test_memory_breakdown_is_the_bytes_of_the_state_dict():
    out_features, in_features, r = 512, 768, 16
    q = Q.QLoRALinear(make_base(in_features, out_features, bias=False, dtype=torch.bfloat16), r=r, alpha=32,
                      compute_dtype=torch.bfloat16)
    parts = q.memory_breakdown()
    n, blocks = out_features * in_features, out_features * in_features // 64
    assert parts == {
        "packed_weight": n // 2,  # two 4-bit codes a byte
        "absmax": blocks,  # one uint8 code per block of 64 (double quantization)
        "absmax_offset": 4,  # one float32
        "absmax2": 4 * math.ceil(blocks / 256),  # one float32 per 256 absmax codes
        "code_tables": 4 * (16 + 256),  # NF4 table and the 8-bit dynamic map
        "lora_A": 4 * r * in_features,  # float32 adapters
        "lora_B": 4 * out_features * r,
        "total": sum(t.numel() * t.element_size() for t in q.state_dict().values()),
    }
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # Bits per base weight for codes plus constants: lesson 4's 4.127 (plus the shared code tables).
    base_bits = 8 * (parts["packed_weight"] + parts["absmax"] + parts["absmax_offset"] + parts["absmax2"]) / n
    assert abs(base_bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3
    base_bytes = parts["total"] - parts["lora_A"] - parts["lora_B"]
    assert base_bytes < 0.26 * n * 2  # 4.127 of the bf16 nn.Linear's 16 bits a weight, plus the tables


def test_state_dict_round_trip_gives_the_same_layer():
    q = randomise_adapters(Q.QLoRALinear(make_base(), r=R, alpha=ALPHA))
    other = Q.QLoRALinear(make_base(seed=99), r=R, alpha=ALPHA)
    other.load_state_dict(q.state_dict())
    x = torch.randn(4, IN)
    with torch.no_grad():
        assert torch.equal(other(x), q(x))


def test_plain_quantization_without_double_quant_and_fp4():
    for kwargs in ({"double_quant": False}, {"quant_type": "fp4"}):
        q = randomise_adapters(Q.QLoRALinear(make_base(), r=R, alpha=ALPHA, **kwargs))
        x = torch.randn(4, IN)
        for a, b in zip(run(q, x), run(dense_reference(q), x)):
            assert torch.equal(a, b)
    assert "absmax2" not in Q.QLoRALinear(make_base(), double_quant=False).memory_breakdown()


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("cls", [Q.LoRALinear, Q.QLoRALinear])
def test_wrong_input_width_names_expected_and_got(cls):
    layer = cls(make_base(), r=R, alpha=ALPHA)
    with pytest.raises(ValueError, match=rf"in_features={IN}.*\(2, 5, 100\).*last dimension 100"):
        layer(torch.randn(2, 5, 100))


def test_dtype_mismatch_says_how_to_fix_it():
    q = Q.QLoRALinear(make_base(), r=R, alpha=ALPHA, compute_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"computes in torch.bfloat16 but the input is torch.float32"):
        q(torch.randn(2, IN))
    dense = Q.LoRALinear(make_base(), r=R, alpha=ALPHA)
    with pytest.raises(TypeError, match=r"computes in torch.float32 but the input is torch.float16"):
        dense(torch.randn(2, IN, dtype=torch.float16))
    with pytest.raises(TypeError, match="torch.Tensor"):
        dense([[1.0] * IN])


@pytest.mark.parametrize("cls", [Q.LoRALinear, Q.QLoRALinear])
@pytest.mark.parametrize("kwargs,error,message", [
    ({"r": 0}, ValueError, "r .* >= 1, got 0"),
    ({"r": -4}, ValueError, "r .* >= 1, got -4"),
    ({"r": 8.0}, TypeError, "must be an int, got float 8.0"),
    ({"r": True}, TypeError, "must be an int, got bool"),
    ({"alpha": 0}, ValueError, "alpha must be a positive"),
    ({"alpha": -16}, ValueError, "alpha must be a positive"),
    ({"alpha": float("nan")}, ValueError, "alpha must be a positive"),
    ({"dropout": 1.0}, ValueError, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, ValueError, r"dropout must be a probability in \[0, 1\)"),
])
def test_bad_hyperparameters(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(make_base(), **({"r": R, "alpha": ALPHA} | kwargs))


def test_bad_layer_settings():
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        Q.QLoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="compute_dtype"):
        Q.QLoRALinear(make_base(), compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="quant_type"):
        Q.QLoRALinear(make_base(), quant_type="int8")
    with pytest.raises(ValueError, match="blocksize"):
        Q.QLoRALinear(make_base(), blocksize=48)
    with pytest.raises(TypeError, match="double_quant must be True or False, got str 'no'"):
        Q.QLoRALinear(make_base(), double_quant="no")
    for cls in (Q.LoRALinear, Q.QLoRALinear):
        with pytest.raises(TypeError, match="adapter_dtype must be a floating-point torch.dtype .* got torch.int32"):
            cls(make_base(), adapter_dtype=torch.int32)


def test_dequantize_matmul_alone_matches_f_linear():
    """The autograd function by itself: forward F.linear(x, W0^, b), backward g @ W0^, nothing for the codes."""
    W = torch.randn(OUT, IN)
    packed, state = Q.quantize_4bit(W, double_quant=True)
    W_hat = Q.dequantize_4bit(packed, state)
    x = torch.randn(5, IN, requires_grad=True)
    y = DequantizeMatmul.apply(x, packed, state, None)
    assert torch.equal(y, nn.functional.linear(x.detach(), W_hat))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ W_hat)
