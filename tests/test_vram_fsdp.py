"""The estimator across GPUs (lesson 10): what FSDP2 keeps on each of n GPUs."""

import math

import pytest
import torch

from qlora_ref.distributed import run_on_cpus
from qlora_ref.course_files import base_model_dir
from qlora_ref.model_shapes import from_hf_config
from qlora_ref.vram import GIB, PARTS, estimate

SHARDED = ("4-bit weights", "16-bit weights", "trainable weights", "gradients")


def test_one_gpu_is_lesson_9s_estimate():
    for optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        one = estimate("Llama-2-7B", optimizer=optimizer, seq_len=2048, r=16)
        assert estimate("Llama-2-7B", optimizer=optimizer, seq_len=2048, r=16, n_gpus=1) == one
        assert one.parts["gathered layers (FSDP2)"] == 0 and "n_gpus" not in one.setup


@pytest.mark.parametrize("n", [2, 4, 8])
def test_what_is_sharded_divides_and_what_is_gathered_is_a_layer(n):
    one = estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=16)
    many = estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=16, n_gpus=n)
    assert list(many.parts) == list(PARTS) and many.setup["n_gpus"] == n
    for part in SHARDED:
        assert many.parts[part] == math.ceil(one.parts[part] / n)
    # the offsets and code tables stay whole on every GPU: 7 linears x 80 layers x (4 + 4 x 272) bytes
    replicated = 7 * 80 * (4 + 4 * 272)
    assert many.parts["quantization constants"] == math.ceil((one.parts["quantization constants"] - replicated) / n) \
        + replicated
    assert many.parts["optimizer states"] == pytest.approx(one.parts["optimizer states"] / n, rel=1e-3)
    # a 70B layer whole: 7 linears of 4-bit codes (0.43 GB) and constants, norms, adapters; two at once
    assert 0.8 * GIB < many.parts["gathered layers (FSDP2)"] < 0.9 * GIB
    for part in ("activations (saved)", "logits", "dequantization workspace", "CUDA context"):
        assert many.parts[part] == one.parts[part]  # per GPU: its own batch, its own copy
    assert many.total < one.total


def test_70b_on_two_24gb_gpus_at_2048_tokens():
    """The issue's goal, estimated (the measurement needs two GPUs): 27.9 GiB a GPU at r=16 against 22.5, of which
    15.9 GiB are the 4-bit weights, 2.5 GiB the checkpointed layer inputs and 3.8 GiB the allocator's overhead
    (lesson 9's constant, measured with CUDA graphs); no rank fits. Four GPUs fit at r=64."""
    limit = 22.5 * GIB
    b = estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=16, n_gpus=2)
    assert round(b.total / GIB, 1) == 27.9 and round(b.allocated / GIB, 1) == 23.2
    assert not any(estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=r, n_gpus=2).total <= limit
                   for r in (1, 2, 4, 8, 16))
    assert estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=512, r=8, n_gpus=2).total <= limit
    assert estimate("Llama-2-70B", optimizer="adamw_8bit", seq_len=2048, r=64, n_gpus=4).total <= limit


def test_set_ups_fsdp2_does_not_run_are_refused():
    with pytest.raises(ValueError, match="optimizer 'adamw_8bit' or 'adamw', without optimizer_in_backward"):
        estimate("Llama-2-7B", n_gpus=2)  # the default optimizer is the paged one
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        estimate("Llama-2-7B", optimizer="adamw_8bit", optimizer_in_backward=True, n_gpus=2)
    with pytest.raises(ValueError, match="FSDP2 over LoRA or QLoRA"):
        estimate("Llama-2-7B", method="full_bf16", optimizer="adamw_8bit", n_gpus=2)
    with pytest.raises(ValueError, match="n_gpus must be a positive int"):
        estimate("Llama-2-7B", optimizer="adamw_8bit", n_gpus=0)


def _held_bytes(rank, world_size):
    """Worker: bytes this rank holds of each sharded part after one step of the trainer's sharded QLoRA."""
    from qlora_ref.sharded_4bit import ShardableQLoRALinear
    from qlora_ref.train import TrainConfig, setup, sharded_train_step

    run = setup(TrainConfig(method="qlora", double_quant=False, optimizer="adamw_8bit", steps=2, warmup_steps=0,
                            batch_size=4, n_train=8, n_eval=1, progress=False, r=16, alpha=32))
    sharded_train_step(run)
    layers = [m for m in run.model.modules() if isinstance(m, ShardableQLoRALinear)]
    local = [m.weight._local_tensor for m in layers]
    return {"4-bit weights": sum(w.codes.nbytes for w in local),
            "quantization constants": sum(w.absmax.nbytes + w.code.nbytes for w in local),
            "trainable weights": sum(p.to_local().nbytes for p in run.trainable),
            "optimizer states": sum(t.nbytes for s in run.optimizer.state.values() for t in s.values()
                                    if torch.is_tensor(t))}


def test_the_sharded_terms_are_what_each_rank_holds(tmp_path):
    """On 2 gloo processes the course's model (tied embeddings, plain absmax: its projections are one nested block
    each), the bytes each rank holds equal the estimate's per-GPU terms exactly. The 16-bit weights are float32 on
    a CPU, the estimate's bf16: not compared."""
    shape = from_hf_config(base_model_dir())
    b = estimate(shape, method="qlora_nf4", optimizer="adamw_8bit", r=16, n_gpus=2)
    for held in run_on_cpus(_held_bytes, 2, start_method="fork"):
        assert held == {part: b.parts[part] for part in held}
