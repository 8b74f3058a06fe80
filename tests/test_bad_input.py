"""A learner's mistake gets one clear sentence naming the problem, never a silent wrong answer."""

import bitsandbytes.functional as bnb
import pytest
import torch

import qlora_ref as Q


@pytest.mark.parametrize("quantize", [Q.quantize_4bit, Q.quantize_blockwise], ids=["4bit", "8bit"])
class TestInputs:
    def test_nan_is_refused_with_its_position(self, quantize):
        x = torch.randn(100)
        x[37] = float("nan")
        with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(first: nan at flat index 37\)"):
            quantize(x)

    def test_inf_is_refused(self, quantize):
        with pytest.raises(ValueError, match="non-finite"):
            quantize(torch.tensor([1.0, float("-inf")]))

    def test_empty_tensor(self, quantize):
        with pytest.raises(ValueError, match=r"empty \(shape \(0, 4\)\)"):
            quantize(torch.empty(0, 4))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64, torch.bool])
    def test_unsupported_dtype(self, quantize, dtype):
        with pytest.raises(TypeError, match=f"dtype {dtype}"):
            quantize(torch.zeros(8, dtype=dtype))

    def test_not_a_tensor(self, quantize):
        with pytest.raises(TypeError, match="must be a torch.Tensor, got list"):
            quantize([1.0, 2.0])

    def test_meta_tensor_is_refused(self, quantize):
        with pytest.raises(ValueError, match="x is a meta tensor"):
            quantize(torch.empty(64, 64, device="meta"))

    def test_a_tensor_that_requires_grad_leaves_no_autograd_history_in_the_state(self, quantize):
        x = torch.randn(64 * 300, requires_grad=True)
        _, state = quantize(x) if quantize is Q.quantize_blockwise else quantize(x, double_quant=True)
        nested = [state.offset, state.state2.absmax] if state.nested else []
        assert all(t.grad_fn is None and not t.requires_grad for t in [state.absmax, *nested])

    @pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 64.0, "64", True])
    def test_unsupported_blocksize(self, quantize, blocksize):
        with pytest.raises(ValueError, match="blocksize must be one of"):
            quantize(torch.randn(64), blocksize=blocksize)


def test_unknown_quant_type():
    with pytest.raises(ValueError, match="got 'NF4'"):
        Q.quantize_4bit(torch.randn(64), quant_type="NF4")


@pytest.mark.parametrize("value", ["no", "False", 1, None])
def test_double_quant_must_be_a_bool(value):
    with pytest.raises(TypeError, match=f"double_quant must be True or False, got {type(value).__name__} {value!r}"):
        Q.quantize_4bit(torch.randn(64), double_quant=value)


def test_unknown_rounding():
    with pytest.raises(ValueError, match="rounding must be 'lut' or 'nearest'"):
        Q.quantize_blockwise(torch.randn(64), rounding="stochastic")


@pytest.mark.parametrize("code", [torch.linspace(-1, 1, 16), Q.dynamic_map().double(), Q.dynamic_map().flip(0)])
def test_unusable_8bit_code(code):
    with pytest.raises(ValueError, match="code must be"):
        Q.quantize_blockwise(torch.randn(64), code=code)


def test_packed_data_from_another_tensor():
    packed, _ = Q.quantize_4bit(torch.randn(100))
    _, other_state = Q.quantize_4bit(torch.randn(300))
    with pytest.raises(ValueError, match="has 50 bytes but the state describes shape \\(300,\\), which needs 150"):
        Q.dequantize_4bit(packed, other_state)


def test_absmax_of_the_wrong_length():
    packed, state = Q.quantize_4bit(torch.randn(640))
    state.absmax = state.absmax[:-1]
    with pytest.raises(ValueError, match="state.absmax has 9 entries but 640 values in blocks of 64 need 10"):
        Q.dequantize_4bit(packed, state)


def test_nested_state_whose_second_level_does_not_fit():
    packed, state = Q.quantize_4bit(torch.randn(64 * 600), double_quant=True)
    state.state2.absmax = state.state2.absmax[:1]
    with pytest.raises(ValueError, match="state.absmax has 1 entries"):
        Q.dequantize_4bit(packed, state)


def test_packed_data_of_the_wrong_dtype():
    packed, state = Q.quantize_4bit(torch.randn(64))
    with pytest.raises(TypeError, match="must be a uint8 tensor, got torch.float32"):
        Q.dequantize_4bit(packed.float(), state)


def test_8bit_state_given_to_dequantize_4bit_and_back():
    q8, state8 = Q.quantize_blockwise(torch.randn(256))
    packed, state4 = Q.quantize_4bit(torch.randn(512))
    with pytest.raises(TypeError, match="needs the QuantState returned by quantize_4bit"):
        Q.dequantize_4bit(q8, state8)
    with pytest.raises(ValueError, match="4-bit \\(nf4\\) state: use dequantize_4bit"):
        Q.dequantize_blockwise(packed.reshape(-1), state4)


def test_bitsandbytes_own_behaviour_on_nan_and_inf_which_we_refuse():
    """What the validation docstring says bitsandbytes does with non-finite input, checked."""
    x = torch.randn(128)
    x[3] = float("nan")
    x[64 + 5] = float("inf")
    packed, state = bnb.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.isnan(state.absmax[0]) and torch.isinf(state.absmax[1])
    values = bnb.dequantize_4bit(packed, state).reshape(-1)  # [1, n] for a 1-D input
    assert not bool(torch.isfinite(values).any()), "no value of either block survives"
    assert int(torch.isnan(values).sum()) == 127, "all NaN (NaN * code, 0 * Inf) but the Inf itself"


def test_double_quantization_that_would_overflow_says_so():
    x = torch.full((256,), 3e38)
    with pytest.raises(ValueError, match="double quantization overflowed.*double_quant=False"):
        Q.quantize_4bit(x, double_quant=True)


def test_a_state_whose_code_is_not_its_table_of_levels():
    packed, state = Q.quantize_4bit(torch.randn(640))
    state.code = state.code[:4]
    with pytest.raises(ValueError, match=r"state.code must be the float32 table of the 16 levels .* got torch.float32 "
                                         r"of shape \(4,\)"):
        Q.dequantize_4bit(packed, state)


def test_meta_data_or_state_is_refused_not_read_as_memory():
    packed, state = Q.quantize_4bit(torch.randn(640))
    with pytest.raises(ValueError, match="the quantized data is a meta tensor"):
        Q.dequantize_4bit(packed.to("meta"), state, backend="torch")
    state.absmax = state.absmax.to("meta")
    with pytest.raises(ValueError, match="state.absmax is a meta tensor"):
        Q.dequantize_4bit(packed, state, backend="torch")
