"""qlora_ref.optim8bit against bitsandbytes 0.50.2's AdamW8bit on the CPU (its Python CPU path,
backends/cpu/ops.py, run eagerly: conftest sets TORCH_COMPILE_DISABLE=1).

What is bit-exact and what is not, and why:
  * The moments (8-bit codes and absmax, or float32 below min_8bit_size) are byte-equal: m and v come
    from the same float32 operations in the same order, and re-encoding uses the same 65536-point
    table (qlora_ref rounding="lut"). They do not depend on the parameters, so nothing below leaks in.
  * The parameters: byte-equal for the float32 moments (bitsandbytes' 32-bit CPU path groups the step
    as the CUDA kernel does, as we do). For 8-bit moments its CPU path groups the same step as
        p - (lr / c1) * m / (sqrt(v) / c2 + eps)     against the kernel's     p - (lr c2 / c1) * m / (sqrt(v) + c2 eps)
    Equal in exact arithmetic, rounded differently in float32 (5 roundings against 7, half an ulp
    each): the two updates u differ by at most 6 ulps of |u|, and p + u may round to neighbouring
    float32 numbers, one ulp of p apart. Per step the parameters can drift apart by one ulp of p plus
    6 ulps of |u| <= R lr (R = 4 bounds |m^ / sqrt(v^)|: <= (1 - beta1) / sqrt(1 - beta2) = 3.16 for
    Adam, Kingma & Ba section 2.1, plus room for the 8-bit rounding of m and v); rounding_tolerance
    is that worst case times the number of steps. The drift is a random walk, far below the bound:
    after 100 steps we measured at most 2.4e-7 (2 ulps of the largest |p|) and 1.9e-9 near p = 0.
  * weight_decay > 0: bitsandbytes' CPU path decays p before the step, the kernel (and we) after:
    p(1 - lr wd) + u against (p + u)(1 - lr wd), a difference of lr wd |u| <= lr^2 wd R per step.
  * NaN/Inf gradients: bitsandbytes' CPU path does not skip them (the NaN spreads through the block's
    absmax); its CUDA kernel, and we, set that element's m = v = 0 and leave p. The test checks that
    against bitsandbytes' CPU optimizer fed what the kernel computes instead: a zero gradient there and
    zero moments (the code of 0.0) before the step.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

bnb = pytest.importorskip("bitsandbytes")

from parity import make_optimizer_pair, step_both  # noqa: E402
from qlora_ref.paging import PagedAdamW8bit  # noqa: E402
from qlora_ref.adamw_step import adamw_update_  # noqa: E402
from qlora_ref.float32 import fma  # noqa: E402
from qlora_ref.optim8bit import AdamW8bit, bytes_per_parameter, optimizer_state_bytes, predicted_state_bytes  # noqa: E402
from qlora_ref.optimizer_state import load_optimizer_state_tensors, optimizer_state_tensors  # noqa: E402

ULP = 2.0**-23  # float32's relative rounding step (one ulp of a number in [1, 2))
LR = 1e-3
R = 4  # |update| <= R lr (see the module docstring)
SHAPES = [(4097,), (5000, 3), (70000,), (100,), (33, 7)]  # 8-bit: 4097, 15000, 70000 values; 32-bit: 100, 231
STEPS = 100


def rounding_tolerance(steps, lr=LR):
    """The two groupings' worst-case drift after `steps` steps: an ulp of p and 6 ulps of R lr per step."""
    return dict(rtol=steps * ULP, atol=steps * 6 * ULP * R * lr)


def moments_equal(opt_ours, ours, opt_theirs, theirs):
    for p, q in zip(ours, theirs):
        mine, ref = opt_ours.state[p], opt_theirs.state[q]
        assert mine["step"] == ref["step"]
        keys = ["state1", "state2"] + (["absmax1", "absmax2"] if "absmax1" in mine else [])
        assert ("absmax1" in mine) == ("absmax1" in ref), f"8-bit vs 32-bit moments differ for {tuple(p.shape)}"
        for key in keys:
            assert mine[key].dtype == ref[key].dtype
            assert torch.equal(mine[key].view(torch.uint8), ref[key].view(torch.uint8)), f"{key} of {tuple(p.shape)}"


@pytest.fixture(scope="module")
def hundred_steps():
    """Both optimizers after 100 steps on the same gradients (weight_decay=0), run once for several tests."""
    ours, opt_ours, theirs, opt_theirs = make_optimizer_pair(SHAPES, weight_decay=0.0)
    for _ in range(STEPS):
        step_both(ours, opt_ours, theirs, opt_theirs, [torch.randn(p.shape) * 0.01 for p in ours])
    return ours, opt_ours, theirs, opt_theirs


def test_moments_byte_equal_after_100_steps(hundred_steps):
    ours, opt_ours, theirs, opt_theirs = hundred_steps
    moments_equal(opt_ours, ours, opt_theirs, theirs)
    assert [opt_ours.state[p]["state1"].dtype for p in ours] == [torch.uint8] * 3 + [torch.float32] * 2


def test_parameters_after_100_steps(hundred_steps):
    ours, _, theirs, _ = hundred_steps
    for p, q in zip(ours, theirs):
        if p.numel() < 4096:  # float32 moments: the same grouping as bitsandbytes' 32-bit CPU path
            assert torch.equal(p, q), tuple(p.shape)
        else:
            torch.testing.assert_close(p, q, **rounding_tolerance(STEPS))
            assert not torch.equal(p, q)  # the groupings do round differently: the tolerance is needed


def nonfinite_gradients(shape, step, seed):
    """Gradients with NaN, +Inf and -Inf at a few scattered places (none before step 3)."""
    g = torch.randn(shape) * 0.01
    if step >= 3 and step % 3 == 0:
        flat = g.view(-1)
        flat[seed % 7::97] = float("nan")
        flat[(seed + 3) % 11::101] = float("inf")
        flat[50::263] = -float("inf")
    return g


def test_nonfinite_gradients_8bit_follow_the_kernel():
    ours, opt_ours, theirs, opt_theirs = make_optimizer_pair([(4097,), (5000, 3)], seed=1, weight_decay=0.0)
    zero_code = {"state1": int((bnb.functional.create_dynamic_map(signed=True) == 0).nonzero()), "state2": 0}
    for t in range(1, 16):
        grads = [nonfinite_gradients(p.shape, t, i) for i, p in enumerate(ours)]
        before = [p.detach().clone() for p in ours]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.clone()
            bad = ~torch.isfinite(g)
            q.grad = torch.where(bad, 0.0, g)
            if opt_theirs.state[q]:
                for key, code in zero_code.items():
                    opt_theirs.state[q][key][bad] = code
        opt_ours.step()
        opt_theirs.step()
        for p, old, g in zip(ours, before, grads):
            bad = ~torch.isfinite(g)
            assert torch.equal(p[bad], old[bad])  # p untouched where the gradient was NaN/Inf
            assert torch.isfinite(p).all()
    moments_equal(opt_ours, ours, opt_theirs, theirs)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **rounding_tolerance(15))


def test_nonfinite_gradients_32bit_propagate_as_in_bitsandbytes():
    ours, opt_ours, theirs, opt_theirs = make_optimizer_pair([(300,)], seed=2, weight_decay=0.0)
    for t in range(1, 8):
        step_both(ours, opt_ours, theirs, opt_theirs, [nonfinite_gradients((300,), t, 0)])
    assert ours[0].isnan().any()
    assert torch.equal(ours[0].view(torch.int32), theirs[0].view(torch.int32))
    moments_equal(opt_ours, ours, opt_theirs, theirs)


def test_weight_decay_after_the_step():
    weight_decay, steps = 1e-2, 40
    ours, opt_ours, theirs, opt_theirs = make_optimizer_pair([(4097,), (100,)], seed=3, weight_decay=weight_decay)
    for _ in range(steps):
        step_both(ours, opt_ours, theirs, opt_theirs, [torch.randn(p.shape) * 0.01 for p in ours])
    moments_equal(opt_ours, ours, opt_theirs, theirs)  # the moments never see p
    order = steps * LR * weight_decay * R * LR  # lr wd |u| per step (module docstring)
    for p, q in zip(ours, theirs):
        tolerance = rounding_tolerance(steps)
        # (Leaving the decay out would move p by about steps lr wd |p| = 4e-4 |p|, far outside this.)
        torch.testing.assert_close(p, q, rtol=tolerance["rtol"], atol=tolerance["atol"] + order)


@settings(max_examples=12, deadline=None)
@given(log_scale=st.floats(-6, 3), n=st.sampled_from([4096, 4097, 4353, 6000]), seed=st.integers(0, 2**16))
def test_random_gradient_scales(log_scale, n, seed):
    """Adam is scale-free: whatever the gradients' magnitude, the moments stay byte-equal."""
    ours, opt_ours, theirs, opt_theirs = make_optimizer_pair([(n,)], seed=seed, weight_decay=0.0)
    scale = 10.0**log_scale
    for _ in range(4):
        step_both(ours, opt_ours, theirs, opt_theirs, [torch.randn(n) * scale])
    moments_equal(opt_ours, ours, opt_theirs, theirs)
    torch.testing.assert_close(ours[0], theirs[0], **rounding_tolerance(4))


def test_low_precision_parameters():
    """bf16 / fp16 parameters: updated in float32 and rounded once, as bitsandbytes does."""
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(4)
        init = torch.randn(5000).to(dtype)
        p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
        opt_ours, opt_theirs = AdamW8bit([p], weight_decay=0.0), bnb.optim.AdamW8bit([q], weight_decay=0.0)
        for _ in range(10):
            step_both([p], opt_ours, [q], opt_theirs, [torch.randn(5000).to(dtype) * 0.01])
        moments_equal(opt_ours, [p], opt_theirs, [q])
        # One rounding to bf16/fp16 per step: the groupings' float32 difference (a few float32 ulps)
        # flips it only when p + u lies that close to a midpoint between two neighbours of dtype.
        mine, ref = p.detach().float(), q.detach().float()
        spacing = torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(ref), torch.frexp(ref).exponent - 1)
        assert float(((mine - ref).abs() / spacing).max()) <= 1, dtype  # measured: 0 (all equal)


def test_32bit_path_is_torch_adamw():
    """Below min_8bit_size the same formula with float32 moments: torch's AdamW up to rounding
    (torch groups the step as bitsandbytes' CPU 8-bit path does, and decays p before it)."""
    torch.manual_seed(5)
    init = torch.randn(40, 50)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_ours = AdamW8bit([p], min_8bit_size=10**9, weight_decay=0.0)
    opt_torch = torch.optim.AdamW([q], weight_decay=0.0)
    for _ in range(20):
        step_both([p], opt_ours, [q], opt_torch, [torch.randn(40, 50)])
    assert opt_ours.state[p]["state1"].dtype == torch.float32
    torch.testing.assert_close(p, q, **rounding_tolerance(20))


def nearest_float32(x: Fraction) -> float:
    """The float32 nearest to the rational x, ties to even, found exactly (not through float64)."""
    guess = np.float32(float(x))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.int32)) & 1)))


def test_fma_rounds_once():
    """The kernel flavour's fused multiply-add rounds a * b + c once. Through float64 it would round twice:
    1 + 2^-23 + 2^-24 - 2^-64 lies just below a midpoint of float32 but rounds onto it in float64."""
    a, b, c = torch.tensor([1 + 2**-20]), torch.tensor([(1 - 2**-20) * 2**-24]), torch.tensor([1 + 2**-23])
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    assert nearest_float32(exact) == 1 + 2**-23
    assert float((a.double() * b.double() + c.double()).float()) == 1 + 2**-22  # rounded twice: the other neighbour
    assert float(fma(a, b, c)) == 1 + 2**-23
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, generator=generator), torch.randn(2000, generator=generator)
    c = torch.randn(2000, generator=generator) * 10.0 ** torch.randint(-8, 8, (2000,), generator=generator)
    for scalar in (None, 0.10000000149011612):  # b as a tensor, and as a float32 number (1 - beta1)
        mine = fma(a, b if scalar is None else scalar, c)
        for i in range(2000):
            y = float(b[i]) if scalar is None else scalar
            assert float(mine[i]) == nearest_float32(Fraction(float(a[i])) * Fraction(y) + Fraction(float(c[i]))), i


def test_adamw_update_first_step_by_hand():
    """At step 1, m = (1 - b1) g and v = (1 - b2) g^2, so p moves by lr * g / (|g| + eps): about lr."""
    p = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, -4.0, 0.0])
    m, v = torch.zeros(3), torch.zeros(3)
    adamw_update_(p, g, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.0)
    torch.testing.assert_close(m, 0.1 * g)
    torch.testing.assert_close(v, 0.001 * g * g)
    torch.testing.assert_close(p, torch.tensor([0.9, -1.9, 3.0]))


def test_resume_from_state_dict_continues_identically():
    torch.manual_seed(6)
    init = [torch.randn(5000, 3), torch.randn(100)]
    grads = [[torch.randn(x.shape) for x in init] for _ in range(12)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    straight = [torch.nn.Parameter(x.clone()) for x in init]
    opt_straight = AdamW8bit(straight)
    run(straight, opt_straight, grads)

    first = [torch.nn.Parameter(x.clone()) for x in init]
    opt_first = AdamW8bit(first)
    run(first, opt_first, grads[:6])
    saved = opt_first.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt_resumed = AdamW8bit(resumed, lr=0.5)  # the saved lr must win
    opt_resumed.load_state_dict(saved)
    assert opt_resumed.param_groups[0]["lr"] == 1e-3
    run(resumed, opt_resumed, grads[6:])
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
    moments_equal(opt_straight, straight, opt_resumed, resumed)


def test_load_state_dict_keeps_state_dtypes_for_bf16_parameters():
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.bfloat16))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    other = AdamW8bit([q])
    other.load_state_dict(opt.state_dict())  # torch's loader would cast codes and absmax to bf16
    for key in ("state1", "state2", "absmax1", "absmax2"):
        assert other.state[q][key].dtype == opt.state[p][key].dtype
        assert torch.equal(other.state[q][key], opt.state[p][key])
        assert other.state[q][key] is not opt.state[p][key]


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(7)
    init = [torch.randn(4100), torch.randn(7, 3)]
    grads = [[torch.randn(x.shape) for x in init] for _ in range(12)]
    a = [torch.nn.Parameter(x.clone()) for x in init]
    b = [torch.nn.Parameter(x.clone()) for x in init]
    opt_a = AdamW8bit(a, lr=2e-3, betas=(0.8, 0.99), weight_decay=0.1)
    opt_b = AdamW8bit(b)
    for gs in grads[:6]:
        for p, g in zip(a, gs):
            p.grad = g.clone()
        opt_a.step()
    tensors = optimizer_state_tensors(opt_a)
    assert tensors["state.0.step"].dtype == torch.int64 and tensors["state.0.step"].shape == ()
    assert tensors["state.0.state1"].dtype == torch.uint8 and tensors["state.1.state1"].dtype == torch.float32
    save_file(tensors, tmp_path / "optimizer.safetensors")
    for p, q in zip(a, b):
        q.data.copy_(p.data)
    load_optimizer_state_tensors(opt_b, load_file(tmp_path / "optimizer.safetensors"))
    assert opt_b.param_groups[0]["betas"] == (0.8, 0.99) and opt_b.param_groups[0]["lr"] == 2e-3
    for gs in grads[6:]:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    moments_equal(opt_a, a, opt_b, b)


def test_state_tensors_of_named_parameters():
    """torch keeps the names of model.named_parameters() in the param group: not a hyperparameter."""
    model = torch.nn.Linear(80, 60)
    opt = AdamW8bit(model.named_parameters())
    model(torch.randn(2, 80)).sum().backward()
    opt.step()
    tensors = optimizer_state_tensors(opt)
    assert "param_groups.0.param_names" not in tensors
    assert tensors["state.0.state1"].dtype == torch.uint8 and tensors["state.1.state1"].dtype == torch.float32
    opt.param_groups[0]["schedule"] = "cosine"
    with pytest.raises(ValueError, match="'schedule'.*not a number"):
        optimizer_state_tensors(opt)


def test_load_optimizer_state_tensors_errors():
    opt = AdamW8bit([torch.nn.Parameter(torch.randn(5000))])
    with pytest.raises(ValueError, match="not a name optimizer_state_tensors writes"):
        load_optimizer_state_tensors(opt, {"exp_avg": torch.zeros(3)})
    with pytest.raises(ValueError, match="more parameters than this one"):
        load_optimizer_state_tensors(opt, {"state.3.step": torch.tensor(1)})
    bad = {"state.0.step": torch.tensor(1), "state.0.state1": torch.zeros(5000), "state.0.state2": torch.zeros(5000)}
    with pytest.raises(ValueError, match="has keys"):
        load_optimizer_state_tensors(opt, bad)


def stepped_optimizer(cls=AdamW8bit):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
    options = dict(paging="pager", budget_bytes=1 << 20) if cls is PagedAdamW8bit else {}
    opt = cls(params, **options)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("cls", [AdamW8bit, PagedAdamW8bit])
@pytest.mark.parametrize("name, value, message", [
    ("param_groups.0.betas", torch.tensor([1.5, 0.999], dtype=torch.float64),
     r"param_groups.0: betas\[0\] must be a finite number in \[0, 1\), got 1.5"),
    ("param_groups.0.eps", torch.tensor(math.nan, dtype=torch.float64),
     r"param_groups.0: eps must be a finite number > 0 .* got nan"),
    ("param_groups.0.lr", torch.tensor(math.inf, dtype=torch.float64), "param_groups.0: lr must be a finite number"),
    ("param_groups.0.lr", torch.tensor(1), "param_groups.0.lr: a hyperparameter is saved as a float64 number"),
    ("state.0.state1", torch.zeros(3, dtype=torch.uint8),
     r"state.0.state1: saved shape \(3,\) and dtype torch.uint8, this optimizer expects \(5000,\) torch.uint8"),
    ("state.0.absmax1", torch.zeros(20, dtype=torch.float64), r"state.0.absmax1: saved .* dtype torch.float64"),
    ("state.0.absmax2", torch.full((20,), math.nan), "state.0.absmax2 holds NaN or Inf"),
    ("state.1.state2", torch.full((10,), math.inf), "state.1.state2 holds NaN or Inf"),
    ("state.1.step", torch.tensor(-1), r"state.1.step must be an int >= 0 \(the steps taken\)"),
    ("state.1.step", torch.tensor(2.0), "state.1.step must be an int >= 0"),
])
def test_a_damaged_state_is_named_and_nothing_is_loaded(cls, name, value, message):
    saved = optimizer_state_tensors(stepped_optimizer(cls))
    opt = cls([torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(10))],
              **(dict(paging="pager", budget_bytes=1 << 20) if cls is PagedAdamW8bit else {}))
    before = {k: v.clone() for k, v in optimizer_state_tensors(opt).items()}
    with pytest.raises(ValueError, match=message):
        load_optimizer_state_tensors(opt, {**{k: v.clone() for k, v in saved.items()}, name: value})
    after = optimizer_state_tensors(opt)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    load_optimizer_state_tensors(opt, saved)  # the undamaged state loads
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 1


def test_load_state_dict_checks_too():
    opt = stepped_optimizer()
    state_dict = opt.state_dict()
    state_dict["param_groups"][0]["eps"] = math.inf
    with pytest.raises(ValueError, match=r"param_groups\[0\]: eps must be a finite number"):
        AdamW8bit(opt.param_groups[0]["params"]).load_state_dict(state_dict)


def test_memory_measured_equals_predicted():
    shapes = [(4096, 4), (4097,), (70000,), (100,), (33, 7)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ours, torch_adamw = AdamW8bit(params), torch.optim.AdamW(params)
    theirs = bnb.optim.AdamW8bit(params)
    for p in params:
        p.grad = torch.randn_like(p)
    ours.step()
    theirs.step()
    torch_adamw.step()
    n = [p.numel() for p in params]
    assert optimizer_state_bytes(ours) == predicted_state_bytes(params)
    assert predicted_state_bytes(params) == sum(2 * k + 8 * math.ceil(k / 256) for k in n[:3]) + 8 * sum(n[3:])
    # bitsandbytes holds the same state plus its two code tables, 2 x 256 float32, shared by all parameters
    assert optimizer_state_bytes(theirs) == predicted_state_bytes(params) + 2 * 256 * 4
    # torch: two float32 moments per value, and a 0-d float32 step per parameter
    assert optimizer_state_bytes(torch_adamw) == 8 * sum(n) + 4 * len(params)
    big = [p for p in params if p.numel() % 256 == 0 and p.numel() >= 4096]
    assert optimizer_state_bytes(AdamW8bit(big)) == 0  # nothing before the first step
    assert predicted_state_bytes(big) / sum(p.numel() for p in big) == bytes_per_parameter() == 2.03125
    assert bytes_per_parameter(32) == 8.0 and bytes_per_parameter(8, 64) == 2.125


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(lr=-1e-3), ValueError, "lr must be a finite number >= 0, got -0.001"),
        (dict(lr=math.inf), ValueError, "lr must be a finite number >= 0, got inf"),
        (dict(lr=math.nan), ValueError, "lr must be a finite number >= 0, got nan"),
        (dict(lr="1e-3"), ValueError, "lr must be a finite number >= 0, got '1e-3'"),
        (dict(lr=True), ValueError, "lr must be a finite number >= 0, got True"),
        (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be a finite number in \[0, 1\), got 1.0"),
        (dict(betas=(-0.1, 0.999)), ValueError, r"betas\[0\] must be a finite number in \[0, 1\)"),
        (dict(betas=(math.nan, 0.999)), ValueError, r"betas\[0\] must be a finite number in \[0, 1\), got nan"),
        (dict(betas=0.9), ValueError, "betas must be a pair"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=math.inf), ValueError, "eps must be a finite number > 0 .* got inf"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite number >= 0"),
        (dict(weight_decay=math.inf), ValueError, "weight_decay must be a finite number >= 0, got inf"),
        (dict(blocksize=100), ValueError, "blocksize must be one of"),
        (dict(min_8bit_size=-1), ValueError, "min_8bit_size must be a non-negative int"),
    ],
)
def test_bad_hyperparameters(options, error, message):
    """Non-finite values included: lr or weight_decay inf made the parameters non-finite in one step, eps inf froze
    them. The paged optimizer is an AdamW8bit and refuses the same."""
    with pytest.raises(error, match=message):
        AdamW8bit([torch.nn.Parameter(torch.randn(10))], **options)
    with pytest.raises(error, match=message):
        PagedAdamW8bit([torch.nn.Parameter(torch.randn(10))], **options, paging="pager", budget_bytes=1 << 20)


def test_bad_parameters_and_gradients():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16 parameters.*torch.int64"):
        AdamW8bit([torch.zeros(10, dtype=torch.long)])
    with pytest.raises(TypeError, match="torch.float64"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))])
    opt = AdamW8bit([torch.nn.Parameter(torch.randn(10))])
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "betas": (0.9, 2.0)})
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = AdamW8bit(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


def _small_qlora_model(seed=0, device="cpu", r=4):
    from qlora_ref import prepare_model
    from qlora_ref.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    prepare_model(model, r=r, alpha=2 * r, target_modules="all-linear", quantize=True)
    model.gradient_checkpointing_enable()
    model.train()
    return model


@pytest.mark.parametrize("make", [
    lambda params: AdamW8bit(params, lr=1e-2, min_8bit_size=0),
    lambda params: AdamW8bit(params, lr=1e-2, min_8bit_size=300),  # 8-bit and float32 moments
    lambda params: PagedAdamW8bit(params, lr=1e-2, min_8bit_size=0, paging="pager", budget_bytes=3000),
], ids=["8bit", "mixed", "paged"])
def test_step_in_backward_equals_step_after_backward(make):
    """The optimizer run inside the backward gives the bytes of backward-then-step, step after step (a learning
    rate change between steps included), and leaves no gradient behind."""
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    models = [_small_qlora_model(), _small_qlora_model()]
    optimizers = [make([p for p in m.parameters() if p.requires_grad]) for m in models]
    handles = optimizers[1].step_in_backward()
    for step in range(4):
        if step == 2:
            for opt in optimizers:
                opt.param_groups[0]["lr"] = 3e-3
        losses = []
        for model, opt in zip(models, optimizers):
            loss = model(ids, labels=ids).loss
            loss.backward()
            if opt is optimizers[1]:
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert losses[0] == losses[1]
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name
    states = [optimizer_state_tensors(opt) for opt in optimizers]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert all(s["step"] == 4 for s in optimizers[1].state.values())
    for handle in handles:
        handle.remove()
    models[1](ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in models[1].parameters() if p.requires_grad)


def test_step_in_backward_never_holds_every_gradient():
    """Measured (qlora_ref.memory.PeakMemory follows every tensor): with rank-32 adapters, whose gradients are
    much of what a step holds at its end, the update in the backward lowers the peak by at least half of their
    bytes (measured: 394,600 -> 268,744 bytes, the gradients being 237,568)."""
    from qlora_ref.memory import PeakMemory

    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    peaks = []
    for in_backward in (False, True):
        model = _small_qlora_model(r=32)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW8bit(trainable, lr=1e-2, min_8bit_size=0)
        if in_backward:
            opt.step_in_backward()
        for _ in range(2):  # the first step makes the states
            with PeakMemory() as peak:
                model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        peaks.append(peak.peak)
    gradients = sum(p.numel() * p.element_size() for p in trainable)
    assert peaks[0] - peaks[1] >= 0.5 * gradients


def test_step_in_backward_makes_no_reference_cycle():
    """The hooks hold the optimizer weakly: without the garbage collector, deleting the model and the optimizer
    frees them (a cycle parameter -> hook -> optimizer -> parameter kept a 7B model's adapters alive on a GPU)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = _small_qlora_model()
        opt = AdamW8bit([p for p in model.parameters() if p.requires_grad])
        opt.step_in_backward()
        refs = weakref.ref(model), weakref.ref(opt)
        del model, opt
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
