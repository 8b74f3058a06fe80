"""qlora_ref.train on a CUDA GPU: bf16 and fp16 (the T4's dtype, with a gradient scaler), the managed paged
optimizer, exact resume, step memory from the CUDA allocator, and a Hugging Face model directory."""

from dataclasses import replace

import pytest
import torch

from qlora_ref.adapters import lora_layers
from qlora_ref.lora import QLoRALinear
from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.tasks import date_task
from qlora_ref.train import TrainConfig, step_memory, train

pytestmark = pytest.mark.gpu

GPU = TrainConfig(n_train=640, n_eval=64, batch_size=16, steps=40, warmup_steps=4, eval_every=0, progress=False,
                  samples=2, r=8, alpha=16, lr=5e-3, device="cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_qlora_trains_on_the_gpu_in_16_bits(dtype):
    result = train(replace(GPU, dtype=dtype))
    run = result.run
    assert run.dtype == getattr(torch, dtype) and run.device.type == "cuda"
    assert isinstance(run.optimizer, PagedAdamW8bit) and run.optimizer.paging == "managed"
    assert (run.scaler is not None) == (dtype == "float16")
    layers = lora_layers(run.model)
    assert all(isinstance(m, QLoRALinear) and m.compute_dtype == run.dtype for m in layers.values())
    assert all(m.lora_A.weight.dtype == torch.float32 for m in layers.values())
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.evals[-1]["eval_loss"] < 1.0


def test_a_resumed_gpu_run_equals_one_that_never_stopped(tmp_path):
    config = replace(GPU, steps=8, warmup_steps=2, save_every=4, dropout=0.1, grad_accum=2)
    whole = train(replace(config, output_dir=str(tmp_path / "whole")))
    train(replace(config, output_dir=str(tmp_path / "stopped")), stop_after=4)
    resumed = train(replace(config, output_dir=str(tmp_path / "stopped"), resume=True))
    assert resumed.losses == whole.losses
    for (name, a), (_, b) in zip(lora_layers(whole.model).items(), lora_layers(resumed.model).items()):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight) and torch.equal(a.lora_B.weight, b.lora_B.weight), name


def test_step_memory_on_the_gpu_reads_the_allocator():
    qlora = step_memory(replace(GPU, optimizer="adamw_8bit"), steps=1)
    lora = step_memory(replace(GPU, method="lora", optimizer="adamw_8bit"), steps=1)
    assert qlora["weights"] < lora["weights"] and qlora["trainable"] == lora["trainable"]
    assert qlora["peak"] > qlora["weights"] + qlora["optimizer_state"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_hugging_face_directory_trains_on_the_gpu_in_float16(tmp_path):
    pytest.importorskip("transformers")
    from qlora_ref.hf import make_local_model

    train_examples, _ = date_task(n_train=64, n_eval=16)
    directory = make_local_model(tmp_path / "model", [e.prompt + e.answer for e in train_examples])
    result = train(replace(GPU, model=str(directory), dtype="float16", steps=6, warmup_steps=1, lr=1e-2))
    assert next(result.model.parameters()).device.type == "cuda"
    assert sum(isinstance(m, QLoRALinear) for m in result.model.modules()) == 14
    assert result.losses[-1] < result.losses[0]
