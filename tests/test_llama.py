"""qlora_ref.llama against transformers' LlamaForCausalLM: same logits, same loss, each loads the other's files."""

import json

import pytest
import torch
from torch import nn

from qlora_ref import prepare_model
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM

transformers = pytest.importorskip("transformers")

# Awkward on purpose: vocab and intermediate sizes are no powers of two, GQA with 3 query heads per K/V head.
CONFIGS = {
    "tied-gqa": dict(vocab_size=261, hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                     max_position_embeddings=64),
    "untied-mha": dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                       max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0),
}


def ours(name="tied-gqa", seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIGS[name], **overrides}))
    with torch.no_grad():  # RMSNorm weights start at 1; random ones make the parity test see them
        for module in model.modules():
            if hasattr(module, "eps"):
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def ids_for(model, batch=3, seq=37, seed=1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


# Our forward runs the same float32 operations as transformers' (sdpa attention, the same rope tables),
# and in practice the logits come out identical; 1e-5 leaves room for a kernel that sums in another order.
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_loads_ours_and_gives_the_same_logits_and_loss(name, tmp_path):
    model = ours(name)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == CONFIGS[name]["num_key_value_heads"]
    assert hf.config.tie_word_embeddings == CONFIGS[name]["tie_word_embeddings"]
    ids = ids_for(model)
    labels = ids.clone()
    labels[:, :11] = -100
    labels[0, -5:] = -100
    with torch.no_grad():
        mine, theirs = model(ids, labels=labels), hf(ids, labels=labels)
    torch.testing.assert_close(mine.logits, theirs.logits, **LOGIT_TOL)
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ours_loads_what_transformers_saved(name, tmp_path):
    torch.manual_seed(3)
    hf_config = transformers.LlamaConfig(**CONFIGS[name])
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]
    ids = ids_for(model, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, **LOGIT_TOL)


def test_tensor_names_are_transformers_names(tmp_path):
    from safetensors.torch import load_file

    model = ours("untied-mha")
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIGS["untied-mha"]))
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(hf.state_dict())


def test_a_tied_model_saves_one_embedding_and_trains_it_as_one(tmp_path):
    from safetensors.torch import load_file

    model = ours("tied-gqa").train()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    ids = ids_for(model)
    model(ids, labels=ids).loss.backward()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # one tensor gets both gradients


def test_bfloat16_round_trip(tmp_path):
    model = ours("untied-mha").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_loss_is_the_shifted_mean_over_labels_that_are_not_ignored():
    model = ours("untied-mha")
    ids = ids_for(model, batch=2, seq=9)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6] = -100
    out = model(ids, labels=labels)
    terms = [-torch.log_softmax(out.logits[b, i - 1].float(), -1)[labels[b, i]]
             for b in range(2) for i in range(1, 9) if labels[b, i] != -100]
    torch.testing.assert_close(out.loss, torch.stack(terms).mean())
    assert len(terms) == 2 * 8 - 3 - 1  # 2 x 8 predicted positions; labels[0, 1:4] and labels[1, 6] ignored


def test_ignored_positions_do_not_change_the_loss():
    model = ours()
    ids = ids_for(model, batch=2, seq=12)
    labels = ids.clone()
    labels[:, :6] = -100
    other = ids.clone()
    other[:, 8:] = (other[:, 8:] + 1) % model.config.vocab_size  # a later token cannot change earlier logits
    other_labels = labels.clone()
    other_labels[:, 9:] = -100
    labels[:, 9:] = -100
    assert torch.equal(model(ids, labels=labels).loss, model(other, labels=other_labels).loss)


def test_bad_inputs_get_a_clear_error():
    model = ours()
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(TypeError, match=r"\[batch, seq\] tensor of dtype torch.long"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.long"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match="vocab_size=261"):
        model(torch.full((1, 5), 261))
    with pytest.raises(ValueError, match="all -100"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.full((1, 5), -100))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 5, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)


def test_bad_configs_get_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="even head_dim"):
        LlamaConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        LlamaConfig(hidden_size=0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaForCausalLM.from_pretrained(tmp_path)
    ours().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in [("model_type", "mistral", "only 'llama'"), ("hidden_act", "gelu", "silu"),
                                ("rope_parameters", {"rope_theta": 1e4, "rope_type": "llama3"}, "rope type")]:
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=message):
            LlamaForCausalLM.from_pretrained(tmp_path)


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients():
    ids = ids_for(ours(), batch=2, seq=20)
    grads, calls = [], []
    for checkpointing in (False, True):
        model = ours().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        count = [0]
        model.model.layers[0].register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # run once; run again in the backward pass
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_greedy_generation_matches_transformers(tmp_path):
    model = ours("untied-mha")
    model.save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = ids_for(model, batch=2, seq=7)
    mine = model.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mine, theirs)


def test_generation_stops_rows_at_eos_and_pads_after_it():
    model = ours("untied-mha", pad_token_id=299)
    prompt = ids_for(model, batch=2, seq=5, seed=4)
    free = model.generate(prompt, max_new_tokens=10)[:, 5:]
    stop = next(t for t in free[0].tolist() if t not in free[1].tolist())  # row 0 makes it, row 1 never does
    first = free[0].tolist().index(stop)
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=stop)
    assert out[0, 5:6 + first].tolist() == free[0, :first + 1].tolist()
    assert (out[0, 6 + first:] == 299).all()
    assert torch.equal(out[1, 5:], free[1])


def test_sampling_follows_softmax_of_logits_over_temperature():
    model = ours("untied-mha")
    prompt = ids_for(model, batch=1, seq=6)
    temperature, n = 0.7, 4000
    probs = torch.softmax(model(prompt).logits[0, -1].double() / temperature, -1)
    draws = model.generate(prompt.expand(n, -1), max_new_tokens=1, temperature=temperature,
                           generator=torch.Generator().manual_seed(0))[:, -1]
    freq = torch.bincount(draws, minlength=probs.numel()).double() / n
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()  # within 4 standard errors


def test_prepare_model_puts_qlora_into_every_projection_and_leaves_the_head(tmp_path):
    from qlora_ref import QLoRALinear

    model = ours("untied-mha").train()
    ids = ids_for(model)
    prepare_model(model, r=4, alpha=8, quantize=True)
    layers = {n for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    assert len(layers) == 3 * 7 and isinstance(model.lm_head, nn.Linear)
    model(ids, labels=ids).loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_A" in n or "lora_B" in n) for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)
    with pytest.raises(ValueError, match="merge_adapters"):
        model.save_pretrained(tmp_path)
