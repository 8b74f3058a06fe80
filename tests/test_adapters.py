"""Lesson 6's model surgery: prepare_model, merge_adapters, save_adapters / load_adapters, and PEFT.

Small plain-PyTorch models first (fast); the tests at the end build a tiny randomly initialised
transformers LlamaForCausalLM from a config (no download) and load our adapters with PEFT.

Tolerances: our LoRALinear and PEFT's lora.Linear run the same float32 operations in the same order
(F.linear on W0, then lora_B(lora_A(dropout(x))) * scaling), so their logits are compared EXACTLY; so are
QLoRA and the dense model on the dequantized base. A merged layer computes x (W0^ + s B A)^T instead of
x W0^T + s (x A^T) B^T: a different float32 rounding, about 1e-7 relative per layer and a few 1e-6 after
two Llama layers, hence rtol 1e-5 / atol 1e-5 for merged outputs.
"""

import json
import os

import pytest
import torch
from torch import nn

import qlora_ref as Q
from qlora_ref import adapters as adapters_module

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        h = self.norm(x + self.q_proj(x) * torch.sigmoid(self.v_proj(x)))
        return h + self.down(torch.relu(self.up(h)))


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=32, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def tiny(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def randomise_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters_module.lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


IDS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("quantize", [False, True])
def test_prepare_model_replaces_the_targets_and_freezes_everything_else(quantize):
    model = tiny()
    summary = Q.prepare_model(model, r=4, alpha=8, target_modules=["q_proj", "up"], quantize=quantize)
    layer_type = Q.QLoRALinear if quantize else Q.LoRALinear
    replaced = {n for n, m in model.named_modules() if isinstance(m, layer_type)}
    assert replaced == {"layers.0.q_proj", "layers.1.q_proj", "layers.0.up", "layers.1.up"}
    assert isinstance(model.layers[0].v_proj, nn.Linear) and isinstance(model.lm_head, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.{p}.weight" for i in (0, 1) for m in ("q_proj", "up") for p in ("lora_A", "lora_B")}
    d = 32
    expected_trainable = 2 * (4 * d + d * 4 + 4 * d + 2 * d * 4)
    expected_total = sum(p.numel() for p in tiny().parameters()) + expected_trainable
    assert (summary.trainable, summary.total) == (expected_trainable, expected_total)
    assert summary.percent == pytest.approx(100 * expected_trainable / expected_total)
    assert str(summary) == (f"trainable params: {expected_trainable:,d} || all params: {expected_total:,d} "
                            f"|| trainable%: {summary.percent:.4f}")
    assert Q.trainable_summary(model) == summary


def test_all_linear_takes_every_linear_but_the_output_head():
    model = tiny()
    Q.prepare_model(model, r=2, alpha=2, target_modules="all-linear")
    replaced = set(adapters_module.lora_layers(model))
    assert replaced == {f"layers.{i}.{m}" for i in (0, 1) for m in ("q_proj", "v_proj", "up", "down")}
    assert type(model.lm_head) is nn.Linear


def test_a_freshly_prepared_model_computes_what_the_base_did():
    base, model = tiny(), tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules="all-linear")
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def test_unknown_target_names_say_which_names_exist():
    with pytest.raises(ValueError, match=r"'o_proj' matches no module.*\['down', 'lm_head', 'q_proj', 'up', 'v_proj'\]"):
        Q.prepare_model(tiny(), target_modules=["q_proj", "o_proj"])
    with pytest.raises(TypeError, match="'norm' matches 'layers.0.norm', a LayerNorm"):
        Q.prepare_model(tiny(), target_modules=["norm"])
    with pytest.raises(ValueError, match="'all-linear' or a list"):
        Q.prepare_model(tiny(), target_modules="q_proj")
    with pytest.raises(ValueError, match="non-empty list"):
        Q.prepare_model(tiny(), target_modules=[])


def test_bad_hyperparameters_and_preparing_twice():
    with pytest.raises(ValueError, match=">= 1"):
        Q.prepare_model(tiny(), r=0)
    with pytest.raises(TypeError, match="must be an int"):
        Q.prepare_model(tiny(), r=2.5)
    with pytest.raises(ValueError, match="alpha"):
        Q.prepare_model(tiny(), alpha=-1)
    with pytest.raises(ValueError, match="dropout"):
        Q.prepare_model(tiny(), dropout=1)
    model = tiny()
    Q.prepare_model(model)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        Q.prepare_model(model)


# ------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("quantize", [False, True])
def test_merge_gives_plain_linear_layers_with_w0_plus_scaled_ba(quantize):
    model = randomise_adapters(tiny())
    Q.prepare_model(model, r=4, alpha=8, target_modules="all-linear", quantize=quantize)
    randomise_adapters(model)
    layers = adapters_module.lora_layers(model)
    expected = {n: l.base_weight().float() + (8 / 4) * l.lora_B.weight.detach() @ l.lora_A.weight.detach()
                for n, l in layers.items()}
    with torch.no_grad():
        before = model(IDS)
    Q.merge_adapters(model)
    assert not adapters_module.lora_layers(model)
    for name, weight in expected.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and not merged.weight.requires_grad
        torch.testing.assert_close(merged.weight, weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA layers to merge"):
        Q.merge_adapters(model)


def test_merging_untrained_qlora_gives_exactly_the_dequantized_base():
    model = tiny()
    weight = model.layers[0].up.weight.detach().clone()
    Q.prepare_model(model, target_modules=["up"], quantize=True)
    Q.merge_adapters(model)
    assert torch.equal(model.layers[0].up.weight, Q.dequantize_4bit(*Q.quantize_4bit(weight, double_quant=True)))


# ---------------------------------------------------------------------------------------- save/load


def test_save_writes_peft_s_layout_with_safetensors_and_nothing_else(tmp_path):
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "down"])
    randomise_adapters(model)
    Q.save_adapters(model, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"], "no temporary file left behind"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["target_modules"] == ["q_proj", "down"] and config["base_model_name_or_path"] is None
    raw = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then JSON: no pickle
    header = json.loads(raw[8:8 + header_len])
    names = sorted(k for k in header if k != "__metadata__")
    assert names == sorted(f"base_model.model.layers.{i}.{m}.lora_{ab}.weight"
                           for i in (0, 1) for m in ("q_proj", "down") for ab in "AB")
    assert header["base_model.model.layers.1.down.lora_A.weight"] == {
        "dtype": "F32", "shape": [4, 64], "data_offsets": header["base_model.model.layers.1.down.lora_A.weight"]["data_offsets"]}


@pytest.mark.parametrize("quantize", [False, True])
def test_save_then_load_into_a_fresh_prepared_model(tmp_path, quantize):
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules="all-linear", quantize=quantize)
    randomise_adapters(model)
    Q.save_adapters(model, tmp_path)
    fresh = tiny()
    Q.prepare_model(fresh, r=4, alpha=8, target_modules="all-linear", quantize=quantize)
    Q.load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_loading_adapters_that_do_not_fit_names_the_module_and_both_shapes(tmp_path):
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules=["q_proj"])
    Q.save_adapters(model, tmp_path)
    wider = tiny()
    Q.prepare_model(wider, r=8, alpha=16, target_modules=["q_proj"])  # same alpha/r, other shapes
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj\.lora_A: the saved adapter has shape \(4, 32\) "
                                         r"but the model's layer has shape \(8, 32\)"):
        Q.load_adapters(wider, tmp_path)
    other_alpha = tiny()
    Q.prepare_model(other_alpha, r=4, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"lora_alpha/r = 8/4 but the layer has alpha/r = 4/4"):
        Q.load_adapters(other_alpha, tmp_path)
    more = tiny()
    Q.prepare_model(more, r=4, alpha=8, target_modules=["q_proj", "up"])
    with pytest.raises(ValueError, match=r"lacks adapters for .*layers\.0\.up"):
        Q.load_adapters(more, tmp_path)
    fewer = tiny()
    Q.prepare_model(fewer, r=4, alpha=8, target_modules=["q_proj"])
    Q.save_adapters(more, tmp_path / "more")
    with pytest.raises(ValueError, match=r"no LoRA layer at.*layers\.0\.up"):
        Q.load_adapters(fewer, tmp_path / "more")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        Q.load_adapters(fewer, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no LoRA layers"):
        Q.load_adapters(tiny(), tmp_path)


def saved_adapters(directory):
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules=["q_proj"])
    Q.save_adapters(model, directory)
    fresh = tiny()
    Q.prepare_model(fresh, r=4, alpha=8, target_modules=["q_proj"])
    return fresh


def edit_config(directory, edit):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("text, message", [
    ('{"r": 4,', r"adapter_config.json is not valid JSON: Expecting property name"),
    ("[]", r"adapter_config.json must hold a JSON object \{...\}, got a list"),
    ('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}", r"adapter_config.json nests JSON too deeply to be read"),
])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text, message):
    model = saved_adapters(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        Q.load_adapters(model, tmp_path)


@pytest.mark.parametrize("key, value, message", [
    ("r", None, "adapter_config.json lacks r: the scale alpha/r needs both"),
    ("lora_alpha", None, "adapter_config.json lacks lora_alpha"),
    ("r", 0, r"adapter_config.json: r = 0, lora_alpha = 8: r \(the LoRA rank\) must be >= 1"),
    ("r", "4", r"adapter_config.json: r = '4', lora_alpha = 8: r \(the LoRA rank\) must be an int, got str"),
    ("r", 4.0, r"r = 4.0, .* must be an int, got float"),
    ("lora_alpha", 0, r"adapter_config.json: r = 4, lora_alpha = 0: alpha must be a positive finite number"),
    ("lora_alpha", "8", r"adapter_config.json: r = 4, lora_alpha = '8': alpha must be a positive"),
])
def test_a_missing_or_bad_r_or_lora_alpha_names_the_file_and_the_field(tmp_path, key, value, message):
    model = saved_adapters(tmp_path)
    edit_config(tmp_path, lambda config: config.pop(key) if value is None else config.update({key: value}))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        Q.load_adapters(model, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("key, value", [("alpha_pattern", {"layers.0.q_proj": 16}), ("rank_pattern", {"q_proj": 8}),
                                        ("layers_to_transform", [0]), ("modules_to_save", ["lm_head"])])
def test_peft_options_these_layers_do_not_implement_are_refused_not_ignored(tmp_path, key, value):
    model = saved_adapters(tmp_path)
    edit_config(tmp_path, lambda config: config.update({key: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json: {key} is .* which these layers do not implement"):
        Q.load_adapters(model, tmp_path)
    edit_config(tmp_path, lambda config: config.update({key: {} if "pattern" in key else None}))  # PEFT's defaults
    Q.load_adapters(model, tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", "adapter_model.safetensors is empty"),
    (lambda data: data[:len(data) // 2], "adapter_model.safetensors is not a whole safetensors file"),
    (lambda data: data[:5], "adapter_model.safetensors is not a whole safetensors file"),
])
def test_an_empty_or_cut_short_weights_file_is_named(tmp_path, damage, message):
    model = saved_adapters(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message):
        Q.load_adapters(model, tmp_path)


def test_adapters_with_nan_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = saved_adapters(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors["base_model.model.layers.1.q_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"layers.1.q_proj.lora_A.weight holds NaN or Inf: the adapter is damaged"):
        Q.load_adapters(model, tmp_path)


def test_what_is_not_a_model_or_a_directory_is_named(tmp_path):
    with pytest.raises(TypeError, match="the model must be a torch.nn.Module, got str 'a string'"):
        Q.prepare_model("a string")
    with pytest.raises(TypeError, match="the model must be a torch.nn.Module, got dict"):
        Q.save_adapters({}, tmp_path)
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules=["q_proj"])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="'.*a-file' cannot be a directory: '.*a-file' is a file"):
        Q.save_adapters(model, tmp_path / "a-file")
    with pytest.raises(NotADirectoryError, match="'.*a-file/out' cannot be a directory: '.*a-file' is a file"):
        Q.save_adapters(model, tmp_path / "a-file" / "out")


def test_a_failed_save_leaves_the_old_files_and_no_temporary_file(tmp_path, monkeypatch):
    model = tiny()
    Q.prepare_model(model, r=4, alpha=8, target_modules=["q_proj"])
    Q.save_adapters(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomise_adapters(model)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(adapters_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Q.save_adapters(model, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert os.listdir(tmp_path) and all(not n.endswith(".tmp") for n in os.listdir(tmp_path))


# ------------------------------------------------------------------------------- Llama and PEFT


@pytest.fixture(scope="module")
def llama():
    """A function building the same tiny random LlamaForCausalLM for a seed (transformers imported here only)."""
    transformers = pytest.importorskip("transformers")

    def build(seed=0):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                          max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config).eval()

    return build


BATCH = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def train_steps(model, steps=2):
    """Loss on the fixed batch (eval mode) before and after `steps` AdamW steps with dropout on."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = model(input_ids=BATCH, labels=BATCH).loss.item()
    model.train()
    torch.manual_seed(1)
    for _ in range(steps):  # step 1 moves B off zero; step 2 then moves A too
        opt.zero_grad()
        model(input_ids=BATCH, labels=BATCH).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=BATCH, labels=BATCH).loss.item()
    return before, after


def logits(model):
    with torch.no_grad():
        return model(input_ids=BATCH).logits


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_llama_lora_trains_and_peft_loads_the_adapters_with_the_same_logits(llama, tmp_path):
    peft = pytest.importorskip("peft")
    model = llama()
    summary = Q.prepare_model(model, r=4, alpha=8, dropout=0.1, target_modules=LLAMA_TARGETS)
    reference = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS))
    assert (summary.trainable, summary.total) == reference.get_nb_trainable_parameters()
    before, after = train_steps(model)
    assert after < before - 0.05, f"loss {before:.4f} -> {after:.4f}"
    Q.save_adapters(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_llama_qlora_trains_and_matches_the_dequantized_base_plus_lora(llama, tmp_path):
    peft = pytest.importorskip("peft")
    model = llama()
    Q.prepare_model(model, r=4, alpha=8, dropout=0.1, target_modules=LLAMA_TARGETS, quantize=True)
    before, after = train_steps(model)
    assert after < before - 0.05, f"loss {before:.4f} -> {after:.4f}"
    Q.save_adapters(model, tmp_path)
    ours = logits(model)

    # Reference: the same base with every targeted weight replaced by its dequantized NF4 value W0^, then
    # PEFT's dense LoRA with our adapters. (W0^ itself equals bitsandbytes' dequantization: lessons 3-4.)
    reference = llama()
    with torch.no_grad():
        for name, layer in adapters_module.lora_layers(model).items():
            reference.get_submodule(name).weight.copy_(layer.base_weight())
    reference = peft.PeftModel.from_pretrained(reference, tmp_path).eval()
    assert torch.equal(ours, logits(reference))

    fresh = llama()
    Q.prepare_model(fresh, r=4, alpha=8, target_modules=LLAMA_TARGETS, quantize=True)
    Q.load_adapters(fresh, tmp_path)
    assert torch.equal(logits(fresh), ours)

    Q.merge_adapters(model)
    assert not any(isinstance(m, (Q.LoRALinear, Q.QLoRALinear)) for m in model.modules())
    torch.testing.assert_close(logits(model), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_adapters_saved_by_peft_load_into_our_model(llama, tmp_path):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.save_pretrained(tmp_path)
    ours = llama()
    Q.prepare_model(ours, r=4, alpha=8, target_modules="all-linear")
    assert "lm_head" not in adapters_module.lora_layers(ours)
    Q.load_adapters(ours, tmp_path)
    assert torch.equal(logits(ours), logits(theirs.eval()))
