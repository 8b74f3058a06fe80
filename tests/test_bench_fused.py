"""bench/fused.py's pairs of ops, run on a CPU at a small shape: each fused op and the unfused one it is timed
against compute the same output and input gradient (the benchmark itself needs a GPU)."""

import pytest

import bench.fused as fused_bench
from qlora_ref.model_shapes import ModelShape


def test_each_benchmarked_pair_computes_the_same(monkeypatch):
    small = ModelShape(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    monkeypatch.setattr(fused_bench, "DEVICE", "cpu")
    monkeypatch.setattr(fused_bench, "PRESETS", {"Llama-2-7B": small})
    pairs = fused_bench.cases("Llama-2-7B", tokens=24)
    assert list(pairs) == ["rms_norm", "rope_qk", "swiglu", "loss"]
    for name, (fused, unfused, leaves) in pairs.items():
        difference = fused_bench._difference(fused, unfused, leaves)
        assert difference["output"] <= 0.05 and difference["grad"] <= 0.05, (name, difference)
        assert all(leaf.grad is None for leaf in leaves)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        fused_bench.main(["--tokens", "8"])
