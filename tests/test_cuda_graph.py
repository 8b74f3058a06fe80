"""qlora_ref.cuda_graph.CapturedStep's refusals, on a CPU (the captured step itself: test_cuda_graph_gpu.py)."""

import pytest
import torch

from qlora_ref.cuda_graph import CapturedStep
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM
from qlora_ref.optim8bit import AdamW8bit

CONFIG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2)


def model_and_batch(dropout=0.0):
    from qlora_ref import prepare_model

    model = LlamaForCausalLM(CONFIG)
    prepare_model(model, r=2, alpha=4, dropout=dropout, target_modules="all-linear", quantize=True)
    model.train()
    ids = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, [p for p in model.parameters() if p.requires_grad], ids


def test_refusals():
    model, params, ids = model_and_batch()
    with pytest.raises(TypeError, match="qlora_ref's AdamW8bit"):
        CapturedStep(model, torch.optim.AdamW(params), ids, ids)
    with pytest.raises(ValueError, match="CUDA GPU"):
        CapturedStep(model, AdamW8bit(params), ids, ids)
    model.eval()
    with pytest.raises(ValueError, match="eval mode"):
        CapturedStep(model, AdamW8bit(params), ids, ids)
    model, params, ids = model_and_batch(dropout=0.1)
    with pytest.raises(ValueError, match="dropout"):
        CapturedStep(model, AdamW8bit(params), ids, ids)

