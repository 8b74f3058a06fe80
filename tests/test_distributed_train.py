"""QLoRA training sharded by FSDP2 over 2 and 4 gloo processes equals the single-process run (lesson 10)."""

import pytest
import torch

from qlora_ref.distributed import ShardedAdamW8bit, run_on_cpus
from qlora_ref.sharded_4bit import ShardableQLoRALinear, Weight4bit
from qlora_ref.train import TrainConfig, setup, sharded_train_step, train_step

# The course's model: its 128 x 128 projections are one nested block each, so double quantization would not
# shard (test_sharded_4bit covers nested weights); plain absmax blocks of 64 cut anywhere on a row.
# r=16 makes lora_B of gate/up_proj and lora_A of down_proj 6144 values, so they take 8-bit moments.
SETTINGS = dict(method="qlora", double_quant=False, optimizer="adamw_8bit", steps=20, warmup_steps=1, batch_size=8,
                n_train=64, n_eval=8, progress=False, r=16, alpha=32)
STEPS = 3


def _whole(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train(run):
    """STEPS steps: the losses, the first step's gradients (before the optimizer), the adapters at the end."""
    first_grads = []

    def keep_grads(optimizer, args, kwargs):
        if not first_grads:
            first_grads.append([_whole(p.grad).clone() for p in run.trainable])

    run.optimizer.register_step_pre_hook(keep_grads)
    step = sharded_train_step if run.data_parallel else train_step
    losses = [step(run) for _ in range(STEPS)]
    return losses, first_grads[0], [_whole(p).detach().clone() for p in run.trainable]


def _sharded_worker(rank, world_size):
    run = setup(TrainConfig(**SETTINGS))
    layers = [m for m in run.model.modules() if isinstance(m, ShardableQLoRALinear)]
    losses, grads, adapters = _train(run)
    state_bytes = sum(t.numel() for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"losses": losses, "grads": grads, "adapters": adapters, "state_values": state_bytes,
            "optimizer": type(run.optimizer).__name__, "aligned": run.optimizer.shard_blocks_aligned(),
            "shards": {type(l.weight._local_tensor).__name__ for l in layers}, "n_layers": len(layers)}


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: on a busy machine more threads only wait
    try:
        run = setup(TrainConfig(**SETTINGS))
        start = [p.detach().clone() for p in run.trainable]
        losses, grads, adapters = _train(run)
    finally:
        torch.set_num_threads(threads)
    state_values = sum(t.numel() for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"losses": losses, "grads": grads, "adapters": adapters, "start": start,
            "state_values": state_values, "lr": run.config.lr}


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharded_training_equals_one_process(world_size, single_process):
    results = run_on_cpus(_sharded_worker, world_size, start_method="fork")
    ref = single_process
    if world_size == 1:  # FSDP2 over one rank: the same sums in the same order, so the same bits
        (result,) = results
        assert result["losses"] == ref["losses"]
        for key in ("grads", "adapters"):
            assert all(torch.equal(a, b) for a, b in zip(result[key], ref[key]))
    for result in results:
        assert result["optimizer"] == ShardedAdamW8bit.__name__ and result["aligned"]
        assert result["shards"] == {Weight4bit.__name__} and result["n_layers"] == 28
        # every rank reports the whole batch's loss; the float32 sums run in another order (per rank, then over
        # the ranks), so the losses agree to float32 rounding and not bit for bit
        assert result["losses"] == results[0]["losses"]
        assert result["losses"] == pytest.approx(ref["losses"], rel=1e-6, abs=0)
        scale = max(g.abs().max() for g in ref["grads"])
        assert max((g - r).abs().max() for g, r in zip(result["grads"], ref["grads"])) <= 1e-5 * scale
        # AdamW divides by sqrt(v): an update moves each value by about lr whatever the gradient's size, so a
        # gradient that differs in its last bits moves an element by a little more or less; the moments' 8-bit
        # codes can then round to the neighbouring level. After 3 steps the adapters agree to a tenth of lr,
        # while they moved by more than lr from where they started.
        moved = max((a - s).abs().max() for a, s in zip(ref["adapters"], ref["start"]))
        assert moved > ref["lr"]
        assert max((a - r).abs().max() for a, r in zip(result["adapters"], ref["adapters"])) < 0.1 * ref["lr"]
        # each rank keeps its shard's moments: a world_size-th of the single process's, block for block
        assert result["state_values"] * world_size == pytest.approx(ref["state_values"], rel=0.01)


def _stop_and_resume_worker(rank, world_size, out):
    from pathlib import Path

    from qlora_ref.train import train

    settings = dict(SETTINGS, steps=4, eval_every=0, samples=0, n_eval=1)
    straight = train(TrainConfig(**settings, output_dir=str(Path(out) / "straight")))
    train(TrainConfig(**settings, output_dir=str(Path(out) / "stopped")), stop_after=2)
    resumed = train(TrainConfig(**settings, output_dir=str(Path(out) / "stopped"), resume=True))
    adapters = [[_whole(p).detach().clone() for p in result.run.trainable] for result in (straight, resumed)]
    return {"losses": [straight.losses, resumed.losses], "adapters": adapters, "checkpoint": str(resumed.checkpoint),
            "evals": [straight.evals, resumed.evals]}


def _resume_elsewhere_worker(rank, world_size, out):
    from qlora_ref.train import train

    settings = dict(SETTINGS, steps=4, eval_every=0, samples=0, n_eval=1)
    try:
        train(TrainConfig(**settings, output_dir=out, resume=True))
    except ValueError as error:
        return str(error)


def test_a_stopped_and_resumed_sharded_run_equals_an_uninterrupted_one(tmp_path):
    from qlora_ref.adapters import load_adapters, lora_layers

    run = setup(TrainConfig(**SETTINGS))  # first, so that the forked ranks find scipy and torch._dynamo imported
    (result, _) = run_on_cpus(_stop_and_resume_worker, 2, str(tmp_path), start_method="fork")
    straight, resumed = result["losses"]
    assert len(straight) == 4 and straight == resumed  # bit for bit: the same ranks, the same order of sums
    assert all(torch.equal(a, b) for a, b in zip(*result["adapters"]))
    assert result["evals"][0] == result["evals"][1]
    # the checkpoint's PEFT files hold the whole adapters, which the single-process loader takes
    load_adapters(run.model, result["checkpoint"])
    loaded = [getattr(layer, part).weight for layer in lora_layers(run.model).values() for part in ("lora_A", "lora_B")]
    assert len(loaded) == len(result["adapters"][1]) == 56
    assert all(torch.equal(a, b) for a, b in zip(loaded, result["adapters"][1]))
    # 4 ranks cannot take over the 2 ranks' 8-bit moments
    messages = run_on_cpus(_resume_elsewhere_worker, 4, str(tmp_path / "stopped"), start_method="fork")
    assert all(m and "written by 2 process(es) and this run has 4" in m and "--nproc-per-node 2" in m
               for m in messages)


def _main_worker(rank, world_size, argv):
    import contextlib
    import io

    from qlora_ref.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


@pytest.mark.parametrize("settings, message", [
    (["batch_size=6"], "batch_size 6 does not divide over 4 processes"),
    (["optimizer=paged_adamw_8bit"], "under torchrun set optimizer=adamw_8bit"),
    (["method=full"], "method 'full' does not run under torchrun"),
    (["double_quant=true"], "model.layers.0.self_attn.q_proj of shape (128, 128) cannot be sharded over 4 ranks"),
])
def test_set_ups_that_cannot_be_sharded_stop_with_what_to_change(settings, message, single_process):
    # single_process: run first, so that the forked ranks find the trainer's imports done
    base = [f"{k}={v}" for k, v in dict(SETTINGS, double_quant="false", method="qlora").items()
            if k in ("double_quant", "optimizer", "batch_size", "n_train", "method")]
    argv = ["--set", *base, *settings, "progress=false", "steps=2", "warmup_steps=0"]
    for status, err in run_on_cpus(_main_worker, 4, argv, start_method="fork"):
        assert status == 2 and message in err, err


def test_torchrun_trains_two_processes_and_writes_a_sharded_checkpoint(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    settings = [f"{k}={v}" for k, v in dict(SETTINGS, steps=3, n_eval=2, samples=1, eval_every=0).items()
                if k not in ("progress",)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "qlora_ref.train", "--set", *settings, "progress=false", f"output_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sum(line.startswith("qlora: 3 steps") for line in lines) == 1  # rank 0 alone reports
    checkpoint = out / "checkpoint-000003"
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "sharded/.metadata"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["world_size"] == 2


def _untied_model():
    from qlora_ref.adapters import prepare_model
    from qlora_ref.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    prepare_model(model, r=8, alpha=16, quantize=True)  # nested constants: 256 x 256 cuts into 2 or 4
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.02)
    return model


def _untied_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from qlora_ref.distributed import shard_qlora_model

    model = shard_qlora_model(_untied_model(), init_device_mesh("cpu", (world_size,)))
    ids = torch.randint(0, 256, (2 * world_size, 32), generator=torch.Generator().manual_seed(1))
    mine = ids.chunk(world_size)[rank]
    model(mine, labels=mine).loss.backward()
    units = [isinstance(m, FSDPModule) for m in (model.model.embed_tokens, model.lm_head, model)]
    head_local = model.lm_head.weight.to_local().shape  # resharded after the backward
    grads = [_whole(p.grad) for p in model.parameters() if p.requires_grad]
    return units, head_local, grads


def test_untied_embeddings_and_head_are_units_of_their_own():
    world_size = 2
    reference = _untied_model()
    ids = torch.randint(0, 256, (2 * world_size, 32), generator=torch.Generator().manual_seed(1))
    reference(ids, labels=ids).loss.backward()  # the same mean per rank: each rank's tokens count alike
    expected = [p.grad for p in reference.parameters() if p.requires_grad]
    for units, head_local, grads in run_on_cpus(_untied_worker, world_size, start_method="fork"):
        assert units == [True, True, True] and head_local == (128, 256)
        assert max((g - e).abs().max() / e.abs().max() for g, e in zip(grads, expected)) < 1e-5


LORA_SETTINGS = dict(SETTINGS, method="lora")


def _lora_worker(rank, world_size):
    run = setup(TrainConfig(**LORA_SETTINGS))
    return [sharded_train_step(run) for _ in range(STEPS)]


def test_lora_over_a_dense_base_shards_too(single_process):
    """method lora: FSDP2 shards the frozen dense weights like any parameter (no Weight4bit needed)."""
    run = setup(TrainConfig(**LORA_SETTINGS))
    expected = [train_step(run) for _ in range(STEPS)]
    for losses in run_on_cpus(_lora_worker, 2, start_method="fork"):
        assert losses == pytest.approx(expected, rel=1e-6, abs=0)
