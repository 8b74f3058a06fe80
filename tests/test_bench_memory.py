"""bench.memory's model builder on a CPU: every linear of every layer becomes a QLoRALinear, nothing
stays on the meta device, and one training step gives every adapter a gradient (the GPU runs are in
bench/results/memory-*.json)."""

import torch

import bench.memory as bench_memory
from qlora_ref import QLoRALinear
from qlora_ref.llama import LlamaConfig


def test_build_quantizes_every_layer_linear_and_materialises_the_rest(monkeypatch):
    monkeypatch.setattr(bench_memory, "DEVICE", "cpu")
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = bench_memory.build(config, r=4, generator=torch.Generator().manual_seed(0))
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, QLoRALinear)]
    assert len(linears) == 7 * config.num_hidden_layers
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(linears) and all(p.grad is not None for p in trainable)


def test_presets_become_llama_configs():
    config = bench_memory.config_of("Llama-2-70B", 512)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_key_value_heads) == (
        8192, 28672, 80, 8)
