"""bench.baseline on a CPU: its settings parser, its 7B config (the preset's exact parameter count in
transformers' LlamaForCausalLM), and both recipes on a small checkpoint saved and loaded through
from_pretrained + bitsandbytes (the GPU runs are in bench/results/baseline-*.json)."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import LlamaForCausalLM

import bench.baseline as bench_baseline
from qlora_ref.model_shapes import PRESETS, from_hf_config


def test_parse_settings_keeps_the_order():
    assert bench_baseline.parse_settings(["2048:64", "512:16", "1000:7"]) == [(2048, 64), (512, 16), (1000, 7)]


@pytest.mark.parametrize("bad", ["512x64", "512:0", "0:16", "512:", ":16", "a:b", "512:64:1", "-512:16", "512.5:16"])
def test_parse_settings_rejects_what_is_not_two_positive_integers(bad):
    with pytest.raises(ValueError, match=r"seq_len:rank with two positive integers.*" + repr(bad).replace(".", r"\.")):
        bench_baseline.parse_settings([bad])


@pytest.mark.parametrize("name", ["Llama-2-7B", "Llama-2-70B"])
def test_the_config_builds_the_presets_model(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(bench_baseline.hf_config(name))
    shape = PRESETS[name]
    assert sum(p.numel() for p in model.parameters()) == shape.parameter_count
    layer = model.model.layers[1]
    linears = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    for target, (in_features, out_features) in shape.linear_shapes().items():
        assert (linears[target].in_features, linears[target].out_features) == (in_features, out_features), target


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A 2-layer Llama with odd sizes and grouped-query attention, saved the way main() saves the 7B one."""
    config = bench_baseline.hf_config()
    for key, value in dict(vocab_size=301, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=16).items():
        setattr(config, key, value)
    folder = tmp_path_factory.mktemp("checkpoint")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench_baseline, "DEVICE", "cpu")
        bench_baseline.save_random_checkpoint(config, folder)
    return folder, from_hf_config(config.to_dict())


@pytest.mark.parametrize("recipe, rest_dtype", [("standard", torch.float32), ("no_upcast", torch.bfloat16)])
def test_recipes_quantize_every_linear_and_train_every_adapter(monkeypatch, small_checkpoint, recipe, rest_dtype):
    monkeypatch.setattr(bench_baseline, "DEVICE", "cpu")
    folder, shape = small_checkpoint
    r = 3
    model = bench_baseline.load_qlora(folder, r, recipe)
    base = model.get_base_model()
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * shape.num_hidden_layers
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantized)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    expected = shape.num_hidden_layers * sum(r * (i + o) for i, o in shape.linear_shapes().values())
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    # prepare_model_for_kbit_training casts what is not 4-bit to float32; without it, it stays bf16 (as ours)
    assert {base.model.embed_tokens.weight.dtype, base.lm_head.weight.dtype, base.model.norm.weight.dtype} == {rest_dtype}
    assert model.training and base.model.gradient_checkpointing

    lora_b = {name: p for name, p in trainable.items() if "lora_B" in name}
    assert all(not p.any() for p in lora_b.values())  # PEFT starts B at zero
    ids = torch.randint(0, shape.vocab_size, (1, 21), generator=torch.Generator().manual_seed(0))
    result = bench_baseline.train(model, bnb.optim.AdamW8bit(list(trainable.values()), lr=1e-3), ids, steps=2)
    assert all(p.any() for p in lora_b.values())  # every adapter got a gradient and an update
    assert torch.isfinite(torch.tensor(result["loss"]))
    assert {k: len(v) for k, v in result["phase_seconds"].items()} == {"forward": 2, "backward": 2, "optimizer": 2}


def test_load_qlora_rejects_an_unknown_recipe(small_checkpoint):
    with pytest.raises(ValueError, match="recipe must be one of"):
        bench_baseline.load_qlora(small_checkpoint[0], 4, "fp32_everything")
