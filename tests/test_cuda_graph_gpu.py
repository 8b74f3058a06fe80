"""qlora_ref.cuda_graph.CapturedStep on a GPU (`pytest -m gpu`): a replayed step gives the bytes of the eager step
with the optimizer in the backward (same kernels, same order), learning-rate changes included; with paged states;
and it refuses what it cannot replay. Its memory at 7B is measured by bench.memory (bench/results)."""

import pytest
import torch

from bench.memory import build
from qlora_ref.cuda_graph import CapturedStep
from qlora_ref.llama import LlamaConfig
from qlora_ref.optim8bit import AdamW8bit
from qlora_ref.paging import PagedAdamW8bit

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=False)


def model(seed=0):
    torch.manual_seed(seed)  # the adapters' initialisation draws from torch's global generator
    m = build(CONFIG, r=8, generator=torch.Generator(device="cuda").manual_seed(seed))
    m.gradient_checkpointing_enable()
    m.train()
    return m


def batches(n, seq=96):
    g = torch.Generator(device="cuda").manual_seed(1)
    return [torch.randint(0, CONFIG.vocab_size, (2, seq), device="cuda", generator=g) for _ in range(n)]


def trainable(m):
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("make", [
    lambda params: AdamW8bit(params, lr=1e-3, min_8bit_size=0),  # 8-bit moments for every adapter
    lambda params: PagedAdamW8bit(params, lr=1e-3, paging="managed", min_8bit_size=0),
], ids=["AdamW8bit", "PagedAdamW8bit-managed"])
def test_replays_equal_the_eager_step_in_backward(make):
    data = batches(4)
    seen = [data[0], data[0], *data[1:]]  # CapturedStep's two warm-up steps train on the batch it is given
    reference, graphed = model(), model()
    reference_opt, graph_opt = make(trainable(reference)), make(trainable(graphed))
    reference_opt.step_in_backward()
    expected = []
    for i, ids in enumerate(seen):
        if i == 4:
            reference_opt.param_groups[0]["lr"] = 3e-4
        loss = reference(ids, labels=ids).loss
        loss.backward()
        reference_opt.step()
        expected.append(loss.item())

    step = CapturedStep(graphed, graph_opt, data[0], data[0], warmup_steps=2)
    got = []
    for i, ids in enumerate(seen[2:], start=2):
        if i == 4:
            graph_opt.param_groups[0]["lr"] = 3e-4
        got.append(step(ids, ids).item())
    assert got == expected[2:]
    for (name, p), q in zip(reference.named_parameters(), graphed.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(trainable(reference), trainable(graphed)):
        mine, theirs = graph_opt.state[q], reference_opt.state[p]
        assert mine["step"] == theirs["step"] == len(seen)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(mine[key], theirs[key]), key
    assert step.steps == len(seen)


def test_refusals_on_a_gpu():
    m = model()
    ids = batches(1)[0]
    with pytest.raises(RuntimeError, match="paging='pager'"):
        CapturedStep(m, PagedAdamW8bit(trainable(m), paging="pager", budget_bytes=10**9), ids, ids)
    m = model()
    step = CapturedStep(m, AdamW8bit(trainable(m), min_8bit_size=0), ids, ids)
    with pytest.raises(ValueError, match="shape"):
        step(ids[:, :-1], ids[:, :-1])
    with pytest.raises(ValueError, match="vocab_size"):
        step(ids + CONFIG.vocab_size, ids)
    m = model()
    with pytest.raises(RuntimeError, match="float32 moments"):
        CapturedStep(m, AdamW8bit(trainable(m), min_8bit_size=10**9), ids, ids)
