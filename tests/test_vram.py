"""Lesson 9's VRAM estimator: exact parameter counts, exact storage of the 4-bit layers, and the activation
terms checked by measuring small models on a CPU (what autograd saves, and the peak of a whole step)."""

import json
import math
import os
from pathlib import Path

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_ref import QLoRALinear, constant_bits_per_parameter, prepare_model
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM
from qlora_ref.optim8bit import bytes_per_parameter, predicted_state_bytes
from qlora_ref.results import load_measurements
from qlora_ref.activations import activations, measure_peak_bytes, measure_saved_bytes
from qlora_ref.methods import LORA_TARGETS, METHODS, RECIPES
from qlora_ref.model_shapes import PRESETS, ModelShape, from_hf_config
from qlora_ref.vram import (
    GIB,
    GPUS,
    PARTS,
    TRANSIENT_PARTS,
    estimate,
    gpu_memory,
    matching_run,
    measurement_line,
    quantized_linear_bytes,
)

# Published totals (the model cards' "7B", ...), which the architecture gives exactly.
PUBLISHED = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-2-70B": 68_976_648_192,
             "Llama-3-8B": 8_030_261_248}


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_equals_the_published_total(name):
    assert PRESETS[name].parameter_count == PUBLISHED[name]


def _hf_config(shape: ModelShape) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_count_what_transformers_builds(name):
    """The same architecture built by transformers on the meta device (shapes, no memory)."""
    shape = PRESETS[name]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(_hf_config(shape))
    tensors = [p.numel() for p in model.parameters()]
    assert sum(tensors) == shape.parameter_count
    assert sorted(tensors) == sorted(shape.parameter_tensors())


def test_from_hf_config_reads_dicts_files_and_folders(tmp_path):
    config = _hf_config(PRESETS["Llama-3-8B"]).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    for source in (config, tmp_path, tmp_path / "config.json", str(tmp_path)):
        shape = from_hf_config(source, name="Llama-3-8B")
        assert shape == PRESETS["Llama-3-8B"]
    assert estimate(str(tmp_path)).parts == estimate("Llama-3-8B").parts


def test_from_hf_config_defaults_are_transformers():
    shape = from_hf_config({"model_type": "mistral", "vocab_size": 100, "hidden_size": 96, "intermediate_size": 200,
                            "num_hidden_layers": 3, "num_attention_heads": 6})
    assert (shape.num_key_value_heads, shape.head_dim, shape.tie_word_embeddings) == (6, 16, False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=100, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6))
    assert shape.parameter_count == sum(p.numel() for p in model.parameters())


def test_tied_embeddings_count_once():
    config = LlamaConfig(vocab_size=131, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True)
    shape = from_hf_config(config.to_hf_dict())
    model = LlamaForCausalLM(config)
    assert shape.parameter_count == sum(p.numel() for p in model.parameters())  # parameters() dedups the tie


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_size": 100}, "not a multiple of num_attention_heads"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive int"),
    ({"vocab_size": "32000"}, "the config: vocab_size must be a positive int"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive int, got 0"),  # was read as "absent"
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),  # was True
])
def test_from_hf_config_refuses_what_it_cannot_model(change, message):
    config = {**_hf_config(PRESETS["Llama-2-7B"]).to_dict(), "head_dim": None, **change}
    with pytest.raises(ValueError, match=message):
        from_hf_config(config)


def test_from_hf_config_names_missing_fields_and_files(tmp_path):
    with pytest.raises(ValueError, match="lacks \\['intermediate_size'\\]"):
        from_hf_config({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                        "num_attention_heads": 2})
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="one of the presets"):
        estimate("Llama-9-1B")
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        estimate(tmp_path)
    (tmp_path / "config.json").write_text('[{"model_type": "llama"}]')
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object \{...\}, got a list"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                                                      "intermediate_size": 16, "num_hidden_layers": -1,
                                                      "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="config.json: num_hidden_layers must be a positive int, got -1"):
        from_hf_config(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (33, 65), (257, 31)])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantized_bytes_equal_what_qlora_linear_stores(shape, blocksize, double_quant):
    torch.manual_seed(0)
    layer = QLoRALinear(torch.nn.Linear(*shape, bias=False), r=2, blocksize=blocksize, double_quant=double_quant)
    measured = layer.memory_breakdown()
    codes, constants = quantized_linear_bytes(*shape, blocksize=blocksize, double_quant=double_quant)
    assert codes == measured["packed_weight"]
    assert constants == measured["total"] - measured["packed_weight"] - measured["lora_A"] - measured["lora_B"]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.sampled_from([32, 64, 128]), st.booleans())
def test_quantized_bytes_follow_constant_bits_per_parameter(a, b, blocksize, double_quant):
    """Whenever whole second-level blocks fill the weight: 4 bits + lesson 4's constant bits, plus the tables."""
    in_features, out_features = 256 * a, blocksize * b
    codes, constants = quantized_linear_bytes(in_features, out_features, blocksize, double_quant)
    n = in_features * out_features
    tables = 4 * (16 + 256) + 4 if double_quant else 4 * 16
    assert codes * 8 == 4 * n
    assert math.isclose(constants - tables, n * constant_bits_per_parameter(blocksize, double_quant) / 8, rel_tol=1e-12)


def test_bits_per_weight_of_the_quantized_linears():
    """Llama-2-7B's linears cost 4.5 bits a weight (4 + 32/64), 4.127 with double quantization."""
    for method, bits in (("qlora_nf4", 4.5), ("qlora_nf4_dq", 4 + 8 / 64 + 32 / (64 * 256))):
        parts = estimate("Llama-2-7B", method=method).parts
        linear = PRESETS["Llama-2-7B"].parameter_counts()["linear"]
        tables = 32 * 7 * (4 * 16 + (4 * 256 + 4 if method == "qlora_nf4_dq" else 0))
        quantized = parts["4-bit weights"] + parts["quantization constants"] - tables
        assert math.isclose(quantized * 8 / linear, bits, rel_tol=1e-12)


def test_weights_of_each_method():
    shape = PRESETS["Llama-2-13B"]
    n = shape.parameter_count
    assert estimate(shape, method="full_fp32").parts["trainable weights"] == 4 * n
    assert estimate(shape, method="full_bf16").parts["trainable weights"] == 2 * n
    lora = estimate(shape, method="lora_bf16", r=16).parts
    assert lora["16-bit weights"] == 2 * n and lora["4-bit weights"] == 0
    qlora = estimate(shape, method="qlora_nf4_dq").parts
    frozen = shape.parameter_counts()
    assert qlora["16-bit weights"] == 2 * (frozen["embeddings"] + frozen["lm_head"] + frozen["norms"])


def test_lora_parameters_are_r_times_in_plus_out():
    """r (in + out) per adapted linear: the count prepare_model makes on the same architecture."""
    config = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    for r, targets in ((3, LORA_TARGETS), (5, ("k_proj", "down_proj"))):
        model = LlamaForCausalLM(config)
        summary = prepare_model(model, r=r, target_modules=list(targets))
        parts = estimate(from_hf_config(config.to_hf_dict()), method="lora_bf16", r=r, lora_targets=targets).parts
        assert parts["trainable weights"] == 4 * summary.trainable  # float32 adapters
        assert parts["gradients"] == parts["trainable weights"]


# ---------------------------------------------------------------------------------------------------
# Optimizer states
# ---------------------------------------------------------------------------------------------------


def test_optimizer_states_by_type():
    shape = PRESETS["Llama-2-7B"]
    trainable = estimate(shape).parts["trainable weights"] // 4  # float32 adapters
    adamw = estimate(shape, optimizer="adamw").parts["optimizer states"]
    assert adamw == 8 * trainable
    eight = estimate(shape, optimizer="adamw_8bit").parts["optimizer states"]
    assert math.isclose(eight / trainable, bytes_per_parameter(8, 256), rel_tol=1e-12)  # no tensor under 4096
    full = estimate(shape, method="full_bf16", optimizer="adamw").parts["optimizer states"]
    assert full == 4 * shape.parameter_count  # torch's AdamW keeps bf16 moments for bf16 parameters
    full8 = estimate(shape, method="full_bf16", optimizer="adamw_8bit").parts["optimizer states"]
    assert full8 == predicted_state_bytes(shape.parameter_tensors())


def test_paged_states_split_between_gpu_and_host():
    for method, r in (("qlora_nf4_dq", 64), ("qlora_nf4_dq", 4), ("full_bf16", 8)):
        eight = estimate("Llama-2-7B", method=method, optimizer="adamw_8bit", r=r)
        paged = estimate("Llama-2-7B", method=method, optimizer="paged_adamw_8bit", r=r)
        on_gpu = paged.parts["optimizer states"]
        assert on_gpu + paged.optimizer_host_bytes == eight.parts["optimizer states"]
        if method == "full_bf16":  # what stays: small tensors' states, absmax under 100,000 values, one page
            embedding = 32000 * 4096
            assert on_gpu - (2 * embedding + 8 * embedding // 256) < eight.parts["optimizer states"] / 100
        elif r == 4:  # every adapter has fewer than bitsandbytes' 100,000 values (4 x 11008 at most): none paged
            assert paged.optimizer_host_bytes == 0
        else:  # codes paged, absmax (n / 256 < 100,000 values) not; the largest page: down_proj's lora_A
            adapters = [64 * 4096] * 11 * 32 + [64 * 11008] * 3 * 32  # A [64, in] and B [out, 64] of 7 linears
            assert on_gpu == sum(8 * -(-n // 256) for n in adapters) + 2 * 64 * 11008


# ---------------------------------------------------------------------------------------------------
# Activations, predicted against what a small model saves and holds on a CPU
# ---------------------------------------------------------------------------------------------------


def _small_model(method, checkpointing=False, kv_heads=2, tie=True, targets=LORA_TARGETS, r=4, adapter_bytes=4,
                 vocab=150):
    """A 2-layer qlora_ref.llama in the method's dtype, prepared as the method trains it, and its shape."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         max_position_embeddings=64)
    base, compute_bytes, trains, _ = RECIPES[method]
    model = LlamaForCausalLM(config).to(torch.float32 if compute_bytes == 4 else torch.bfloat16)
    if not trains:
        prepare_model(model, r=r, alpha=2 * r, target_modules=list(targets), quantize=base.startswith("nf4"),
                      double_quant=base == "nf4_dq", compute_dtype=torch.bfloat16,
                      adapter_dtype=torch.float32 if adapter_bytes == 4 else torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model.train(), from_hf_config(config.to_hf_dict())


def _batch(batch, seq, vocab=150):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return ids, ids.clone()  # labels in their own storage, as a data loader gives them


# QLoRA saves what 16-bit LoRA saves (the codes are buffers, not activations): two QLoRA cases check that,
# 16-bit LoRA, which builds faster, the rest.
SAVED_CASES = [(m, gc, {}) for m in ("full_fp32", "full_bf16", "lora_bf16") for gc in (False, True)] + [
    ("qlora_nf4", True, {}),
    ("qlora_nf4_dq", False, {"batch": 1}),
    ("lora_bf16", False, {"targets": ("q_proj", "v_proj")}),
    ("lora_bf16", False, {"targets": ("o_proj",)}),
    ("lora_bf16", False, {"targets": ("up_proj", "down_proj")}),
    ("lora_bf16", True, {"targets": ("k_proj",)}),
    ("full_fp32", False, {"batch": 1}),
    ("lora_bf16", False, {"kv_heads": 1, "tie": False, "batch": 3}),
    ("full_bf16", False, {"kv_heads": 4, "tie": False}),
    ("lora_bf16", False, {"adapter_bytes": 2, "r": 7}),
]


@pytest.mark.parametrize("method, checkpointing, options", SAVED_CASES)
def test_saved_activations_equal_the_measurement(method, checkpointing, options):
    """Exact, tolerance 0 bytes: every tensor autograd saves on a CPU is in the formula. (On a GPU, flash
    attention also saves its random-number state, and memory-efficient attention pads the logsumexp to
    32 positions: a few bytes per layer more.)"""
    options = dict(options)
    batch = options.pop("batch", 2)
    model, shape = _small_model(method, checkpointing, **options)
    seq = 23  # odd, not a power of two
    measured = measure_saved_bytes(model, *_batch(batch, seq))
    predicted = activations(shape, method, batch, seq, options.get("r", 4), checkpointing,
                            options.get("targets", LORA_TARGETS), options.get("adapter_bytes", 4))
    assert measured == predicted.saved


def test_layer_formula_of_the_docstring():
    """20 d + 8 f + 28 r + 4 H + 8 bytes per token and layer for bf16 QLoRA on all seven linears; the
    first layer saves 4d + 4 less; checkpointing keeps 2d per layer."""
    shape, r, batch, seq = PRESETS["Llama-2-7B"], 64, 2, 300
    d, f, H, L = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, shape.num_hidden_layers
    per_token = 20 * d + 8 * f + 28 * r + 4 * H + 8
    plain = activations(shape, "qlora_nf4_dq", batch, seq, r, gradient_checkpointing=False)
    assert plain.per_layer == ((per_token - 4 * d - 4) * batch * seq,) + (per_token * batch * seq,) * (L - 1)
    checkpointed = activations(shape, "qlora_nf4_dq", batch, seq, r, gradient_checkpointing=True)
    assert checkpointed.layers == L * 2 * d * batch * seq
    assert checkpointed.recomputed_layer == per_token * batch * seq


PEAK_CASES = [
    ("lora_bf16", False, {}), ("lora_bf16", True, {"adapter_bytes": 2}),
    ("lora_bf16", False, {"targets": ("q_proj", "v_proj")}), ("lora_bf16", True, {"vocab": 2000}),
    ("full_fp32", True, {}), ("full_bf16", False, {"vocab": 2000}),
]


@pytest.mark.parametrize("method, checkpointing, options", PEAK_CASES)
def test_peak_of_a_step_is_predicted(method, checkpointing, options):
    """measure_peak_bytes follows every tensor of forward + backward. LoRA: within 10% of the predicted
    peak plus the adapters' gradients (left out: small temporaries such as rope's products; counted
    whole: gradients, which appear during the backward). Full fine-tuning: between the peak without
    gradients (-1%: the same small terms) and with all of them. QLoRA is not here: on a CPU, dequantize
    makes other temporaries (unpacked codes, float32 values) than the GPU kernel."""
    model, shape = _small_model(method, checkpointing, **options)
    batch, seq = 2, 31
    measured = measure_peak_bytes(model, *_batch(batch, seq, options.get("vocab", 150)))
    predicted = activations(shape, method, batch, seq, 4, checkpointing, options.get("targets", LORA_TARGETS),
                            options.get("adapter_bytes", 4))
    gradients = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    if RECIPES[method].trains_base:
        assert 0.99 * predicted.peak <= measured <= predicted.peak + gradients
    else:
        assert measured == pytest.approx(predicted.peak + gradients, rel=0.10)


def test_peak_moment_switches_with_the_vocabulary():
    """Llama-3's 128k vocabulary makes the loss's float32 tensors the peak; Llama-2's 32k does not."""
    assert estimate("Llama-3-8B").peak_moment == "head and loss backward"
    assert estimate("Llama-2-7B").peak_moment == "layer backward"
    b = estimate("Llama-3-8B")
    assert b.parts["recomputed layer"] == b.parts["dequantization workspace"] == 0


def test_activations_grow_linearly_with_tokens_and_checkpointing_shrinks_them():
    small = estimate("Llama-2-7B", batch=1, seq_len=1024, gradient_checkpointing=False)
    large = estimate("Llama-2-7B", batch=2, seq_len=2048, gradient_checkpointing=False)
    assert large.parts["activations (saved)"] == pytest.approx(4 * small.parts["activations (saved)"], rel=1e-3)
    checkpointed = estimate("Llama-2-7B", batch=2, seq_len=2048, gradient_checkpointing=True)
    assert checkpointed.total < large.total
    assert checkpointed.parts["activations (saved)"] * 10 < large.parts["activations (saved)"]


# ---------------------------------------------------------------------------------------------------
# The breakdown
# ---------------------------------------------------------------------------------------------------


def test_breakdown_adds_up_and_fits():
    b = estimate("Llama-2-7B")
    assert list(b.parts) == list(PARTS)
    assert b.total == sum(b.parts.values())
    assert b.allocated == b.total - b.parts["CUDA context"] - b.parts["allocator overhead"]
    assert b.fits("T4 (14.75 GiB)") and not b.fits(b.total - 1) and b.fits(b.total)
    big = estimate("Llama-2-70B")
    assert not big.fits("A100 (40 GiB)") and big.fits("A100 (80 GiB)")
    assert not estimate("Llama-2-7B", method="full_fp32", optimizer="adamw").fits("H100 (80 GiB)")
    table = b.table("RTX 3060 (12 GiB)")
    assert f"{b.total / GIB:8.3f} GiB" in table and "RTX 3060 (12 GiB): fits" in table
    assert "does NOT fit" in big.table("RTX 4090 (24 GiB)")


def test_assumed_terms_are_parameters():
    b = estimate("Llama-2-7B", context_bytes=0, allocator_overhead=0.0)
    assert b.parts["CUDA context"] == b.parts["allocator overhead"] == 0 and b.total == b.allocated
    c = estimate("Llama-2-7B", context_bytes=10**9, allocator_overhead=0.1)
    transients = sum(b.parts[p] for p in TRANSIENT_PARTS)
    assert 0 < transients < b.total and c.parts["allocator overhead"] == math.ceil(0.1 * transients)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"method": "qlora"}, ValueError, "method must be one of"),
    ({"optimizer": "sgd"}, ValueError, "optimizer must be one of"),
    ({"batch": 0}, ValueError, "batch must be a positive int"),
    ({"seq_len": 512.0}, ValueError, "seq_len must be a positive int"),
    ({"seq_len": 1}, ValueError, "seq_len must be at least 2"),
    ({"r": 0}, ValueError, "r must be a positive int"),
    ({"lora_targets": ("q", "v")}, ValueError, "lora_targets must be a non-empty subset"),
    ({"lora_targets": ()}, ValueError, "lora_targets must be a non-empty subset"),
    ({"adapter_bytes": 3}, ValueError, "adapter_bytes must be 2"),
    ({"blocksize": 100}, ValueError, "blocksize must be one of"),
    ({"allocator_overhead": 2.5}, ValueError, "allocator_overhead must be a number in"),
    ({"context_bytes": -1}, ValueError, "context_bytes must be an int"),
])
def test_bad_settings_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        estimate("Llama-2-7B", **kwargs)


def test_gpus():
    assert gpu_memory("H100 (80 GiB)") == 80 * GIB and gpu_memory(12345) == 12345
    assert list(GPUS)[0].startswith("T4")
    with pytest.raises(ValueError, match="unknown GPU 'V100'"):
        gpu_memory("V100")


# ---------------------------------------------------------------------------------------------------
# Measurements from the GPU
# ---------------------------------------------------------------------------------------------------


def test_load_measurements(tmp_path):
    assert load_measurements(tmp_path) == []
    run = {**estimate("Llama-2-7B").setup, "peak_allocated": 5 * GIB, "peak_reserved": 6 * GIB}
    (tmp_path / "memory-h100.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "runs": [run]}))
    (tmp_path / "other.json").write_text("not read")
    (loaded,) = load_measurements(tmp_path)
    assert loaded == {**run, "device": "NVIDIA H100 80GB HBM3", "file": "memory-h100.json"}
    assert matching_run(estimate("Llama-2-7B"), [loaded]) == loaded
    assert matching_run(estimate("Llama-2-7B", seq_len=513), [loaded]) is None
    assert matching_run(estimate("Llama-2-13B"), [loaded]) is None
    b = estimate("Llama-2-7B")
    assert measurement_line(b, loaded) == (
        f"allocated: estimated {b.allocated / GIB:.2f} GiB, measured 5.00 GiB ({b.allocated / (5 * GIB) - 1:+.1%}); "
        "reserved 6.00 GiB (context not measured)")
    with_context = {**loaded, "context_bytes": GIB // 2}
    resident = b.total + b.optimizer_host_bytes  # every paged state on the GPU, as context_bytes counts them
    assert b.optimizer_host_bytes > 0 and measurement_line(b, with_context).endswith(
        f"reserved + context: estimated {resident / GIB:.2f} GiB, measured 6.50 GiB ({resident / (6.5 * GIB) - 1:+.1%})")
    eager = {k: v for k, v in run.items() if k != "optimizer_in_backward"}  # a run without "step" ran eagerly
    graph = {**eager, "step": "graph"}
    (tmp_path / "memory-h100.json").write_text(json.dumps({"runs": [eager, graph]}))
    assert [r["optimizer_in_backward"] for r in load_measurements(tmp_path)] == [False, True]
    assert matching_run(estimate("Llama-2-7B", optimizer_in_backward=True), load_measurements(tmp_path))["step"] == "graph"
    (tmp_path / "memory-bad.json").write_text(json.dumps({"runs": [{"model": "Llama-2-7B"}]}))
    with pytest.raises(ValueError, match="memory-bad.json: run 0 lacks \\['method'"):
        load_measurements(tmp_path)


def test_optimizer_in_backward_keeps_one_linears_gradients():
    after, inside = estimate("Llama-2-7B"), estimate("Llama-2-7B", optimizer_in_backward=True)
    assert after.parts["gradients"] == 4 * 64 * (4096 + 32 * 128) * 32 * 4 + 4 * 64 * (4096 + 11008) * 3 * 32
    assert inside.parts["gradients"] == 4 * 64 * (11008 + 4096)  # gate/up/down_proj's A and B
    assert after.allocated - inside.allocated == after.parts["gradients"] - inside.parts["gradients"]
    full = estimate("Llama-2-7B", method="full_bf16", optimizer="adamw", optimizer_in_backward=True)
    assert full.parts["gradients"] == 2 * 32000 * 4096  # the embeddings, the largest tensor


def test_every_gpu_measurement_within_ten_percent():
    """The estimator against every committed GPU run (bench/results/memory-*.json): what PyTorch allocated at
    the peak, derived with no constant measured on a GPU, and reserved + context, which uses the two measured
    ones (CUDA_CONTEXT_BYTES, ALLOCATOR_OVERHEAD)."""
    runs = load_measurements(Path(__file__).resolve().parent.parent / "bench" / "results")
    assert len(runs) >= 12
    for run in runs:
        b = estimate(run["model"], run["method"], run["optimizer"], run["batch"], run["seq_len"], run["r"],
                     run["gradient_checkpointing"], optimizer_in_backward=run["optimizer_in_backward"])
        assert b.allocated == pytest.approx(run["peak_allocated"], rel=0.10), run
        measured = run["peak_reserved"] + run["context_bytes"]
        assert b.total + b.optimizer_host_bytes == pytest.approx(measured, rel=0.10), run


def test_every_recipe_is_run_by_a_trainer_method_and_every_method_budgets():
    """The budget's recipes and the trainer's methods are one vocabulary: each recipe names the method that runs it."""
    assert {r.method for r in RECIPES.values()} == set(METHODS)
    assert all(r.trains_base == (r.method == "full") for r in RECIPES.values())
    assert all(r.base.startswith("nf4") == (r.method == "qlora") for r in RECIPES.values())
    assert tuple(PRESETS["Llama-2-7B"].linear_shapes()) == LORA_TARGETS
