"""qlora_ref.train: the schedule, the data order, exact resume, checkpoints, bad configs, the command, and the
Hugging Face path on a local model directory."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_ref.adapters import lora_layers
from qlora_ref.llama import LlamaForCausalLM
from qlora_ref.lora import QLoRALinear
from qlora_ref.optimizer_state import optimizer_state_tensors
from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.tasks import date_task
from qlora_ref.checkpoints import latest_checkpoint
from qlora_ref.train import (TrainConfig, batch_indices, evaluate, learning_rate, main, parse_overrides, setup, step_memory,
                             train, train_step)

# Small and fast: a few steps of batches of 8 on the shipped base (886k parameters).
TINY = TrainConfig(n_train=64, n_eval=16, batch_size=8, steps=6, warmup_steps=2, eval_every=3, progress=False,
                   samples=2, r=4, alpha=8)


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    config = TrainConfig(lr=1e-3, warmup_steps=4, steps=14, min_lr_ratio=0.1)
    lrs = [learning_rate(config, s) for s in range(config.steps)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    middle = 4 + (config.steps - 1 - 4) / 2  # half way through the decay: half way between peak and floor
    assert learning_rate(config, int(middle)) > 5.5e-4 > learning_rate(config, math.ceil(middle) + 1)


def test_batches_cover_each_epoch_once_and_are_a_function_of_the_index():
    n, size = 30, 7  # 4 batches an epoch, 2 examples left out of each
    epoch0 = [batch_indices(n, size, seed=5, index=i) for i in range(4)]
    flat = sum(epoch0, [])
    assert len(flat) == len(set(flat)) == 28 and all(0 <= i < n for i in flat)
    assert batch_indices(n, size, 5, 4) != epoch0[0]  # the next epoch is shuffled anew
    assert batch_indices(n, size, 5, 2) == epoch0[2]
    assert batch_indices(n, size, 6, 0) != epoch0[0]
    with pytest.raises(ValueError, match="larger than the training set"):
        batch_indices(5, 8, 0, 0)


def state_of(run):
    tensors = {f"adapter.{n}.{k}": getattr(l, k).weight.detach().clone() for n, l in lora_layers(run.model).items()
               for k in ("lora_A", "lora_B")} if run.config.method != "full" else {
        n: p.detach().clone() for n, p in run.model.named_parameters()}
    tensors.update({f"opt.{k}": v.detach().cpu().clone() for k, v in optimizer_state_tensors(run.optimizer).items()})
    return tensors


@pytest.mark.parametrize("method", ["qlora", "full"])
def test_a_stopped_and_resumed_run_equals_one_that_never_stopped(method, tmp_path):
    # dropout and two micro-batches per step: the RNG state and the data order must both be restored
    config = replace(TINY, method=method, dropout=0.1, grad_accum=2, save_every=3, lr=2e-3)
    whole = train(replace(config, output_dir=str(tmp_path / "whole")))
    stopped = train(replace(config, output_dir=str(tmp_path / "stopped")), stop_after=3)
    assert stopped.run.step == 3 and len(stopped.losses) == 3
    assert latest_checkpoint(tmp_path / "stopped").name == "checkpoint-000003"
    resumed = train(replace(config, output_dir=str(tmp_path / "stopped"), resume=True))
    assert resumed.losses == whole.losses  # floats compared exactly: the same arithmetic in the same order
    assert resumed.evals == whole.evals
    a, b = state_of(whole.run), state_of(resumed.run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.losses[-1] < whole.losses[0]
    prompts = [e.prompt for e in whole.run.eval_examples[:2]]
    assert [s[0] for s in whole.samples] == prompts and whole.samples == resumed.samples


def test_checkpoint_holds_peft_adapters_optimizer_rng_and_state_and_no_pickle(tmp_path):
    result = train(replace(TINY, steps=3, warmup_steps=1, output_dir=str(tmp_path)))
    checkpoint = latest_checkpoint(tmp_path)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "rng.safetensors",
        "trainer_state.json"]
    assert not list(tmp_path.glob(".*"))  # no partial directory or temporary file left behind
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    names = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert all(n.startswith("base_model.model.model.layers.") for n in names) and len(names) == 2 * 7 * 4
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["losses"] == result.losses and state["config"]["method"] == "qlora"
    assert isinstance(result.run.optimizer, PagedAdamW8bit) and result.run.optimizer.paging == "pager"
    assert all(isinstance(m, QLoRALinear) for m in lora_layers(result.model).values())
    assert result.model.gradient_checkpointing


def test_qlora_learns_the_task():
    run = setup(replace(TINY, steps=40, n_train=640, n_eval=32, lr=5e-3, warmup_steps=4))
    before = evaluate(run)
    while run.step < run.config.steps:
        train_step(run)
    after = evaluate(run)
    assert before["exact_match"] == 0 and after["step"] == 40
    assert after["eval_loss"] < 0.5 * before["eval_loss"] and run.losses[-1] < 0.5 * run.losses[0]


@pytest.mark.parametrize("change, message", [
    ({"lerning_rate": 1e-3}, "unknown setting 'lerning_rate'; did you mean 'lr'"),
    ({"r": 0}, r"r \(the LoRA rank\) must be >= 1"),
    ({"method": "qlora4"}, "method must be one of"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"train_file": "no/such/file.jsonl"}, "train_file 'no/such/file.jsonl' does not exist"),
    ({"target_modules": ["q_proj", "query"]}, "target module 'query' matches no module of the model; its nn.Linear "
                                              "layers are named"),
    ({"warmup_steps": 6}, r"warmup_steps \(6\) must be less than steps \(6\)"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"resume": True}, "resume needs output_dir"),
    ({"dtype": "half"}, "dtype must be one of"),
    # every setting has a type: "False" is a str, which Python reads as true
    ({"double_quant": "False"}, "double_quant must be True or False, got str 'False'"),
    ({"gradient_checkpointing": "maybe"}, "gradient_checkpointing must be True or False, got str 'maybe'"),
    ({"resume": 0}, "resume must be True or False, got int 0"),
    ({"progress": None}, "progress must be True or False, got NoneType None"),
    ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'"),
    ({"quant_type": "int8"}, "quant_type must be one of"),
    ({"model": ""}, "model must be 'base', a Hugging Face model id or a model directory"),
    ({"output_dir": Path("runs/x")}, r"output_dir must be a path written as a str \(or None\), got PosixPath .*: "
                                     r"pass str\(output_dir\)"),
    ({"train_file": 3}, "train_file must be a path written as a str"),
    ({"target_modules": 5}, "target_modules must be a non-empty list of module names, got 5"),
    ({"steps": "6"}, "steps must be an int >= 1, got '6'"),
    ({"lr": float("inf")}, "lr must be a finite number >= 0, got inf"),
    ({"alpha": "8"}, "alpha must be a positive finite number"),
])
def test_bad_settings_stop_with_what_to_change(change, message):
    with pytest.raises((ValueError, FileNotFoundError, TypeError), match=message):
        setup(TrainConfig.from_dict({**{k: getattr(TINY, k) for k in ("n_train", "n_eval", "steps", "warmup_steps")},
                                         **change}))


def test_a_sequence_longer_than_the_context_is_refused(tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "x" * 300, "answer": " y"}) + "\n")
    with pytest.raises(ValueError, match=r"needs 305 positions .* context is 256 \(max_position_embeddings\)"):
        setup(replace(TINY, train_file=str(data)))


def test_training_files_are_read_and_checked(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"say {i} =", "answer": f" {i}"}) + "\n" for i in range(16)))
    bad.write_text('{"prompt": "a"}\n')
    run = setup(replace(TINY, train_file=str(good), eval_file=str(good)))
    assert run.train_examples[3].answer == " 3" and len(run.eval_examples) == 16
    assert train_step(run) > 0
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: expected \{\"prompt\": str, \"answer\": str\}"):
        setup(replace(TINY, train_file=str(bad)))


def test_resuming_with_other_settings_is_refused(tmp_path):
    train(replace(TINY, steps=2, warmup_steps=1, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="already holds checkpoint-000002: set resume=true"):
        train(replace(TINY, steps=2, warmup_steps=1, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"different settings: r 4 \(now 8\)"):
        train(replace(TINY, steps=4, warmup_steps=1, r=8, output_dir=str(tmp_path), resume=True))


def test_the_command_trains_merges_and_saves_a_model_that_loads(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"n_train": 64, "n_eval": 16, "batch_size": 8, "steps": 3, "warmup_steps": 1,
                                  "method": "lora", "r": 4, "alpha": 8}))
    assert main(["--config", str(config), "--set", f"output_dir={tmp_path / 'out'}", "progress=false",
                 "--merge"]) == 0
    out = capsys.readouterr().out
    assert "lora: 3 steps" in out and "merged: exact match" in out
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert not lora_layers(merged)
    assert main(["--config", str(config), "--set", "r=-1"]) == 2
    assert "error: r (the LoRA rank) must be >= 1" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    assert "config file" in capsys.readouterr().err


def test_set_reads_json_and_python_literals_and_keeps_text_settings_as_text():
    assert parse_overrides(["double_quant=False", "resume=True", "progress=false", "output_dir=None", "steps=20",
                            "lr=1e-3", "target_modules=[\"q_proj\"]", "method=lora"]) == {
        "double_quant": False, "resume": True, "progress": False, "output_dir": None, "steps": 20, "lr": 1e-3,
        "target_modules": ["q_proj"], "method": "lora"}
    assert parse_overrides(["output_dir=2024", "model=null", "gradient_checkpointing=maybe"]) == {
        "output_dir": "2024", "model": None, "gradient_checkpointing": "maybe"}  # "maybe" is refused by check_config
    with pytest.raises(ValueError, match="--set takes key=value, got 'steps'"):
        parse_overrides(["steps"])


CLI_TINY = ["n_train=64", "n_eval=16", "batch_size=8", "steps=1", "warmup_steps=0", "eval_every=0", "samples=0",
            "progress=False", "r=4", "alpha=8", "device=cpu"]


def test_the_command_types_settings_as_the_api_does(tmp_path, capsys):
    assert main(["--set", *CLI_TINY, "double_quant=False", f"output_dir={tmp_path / 'run'}"]) == 0
    state = json.loads((latest_checkpoint(tmp_path / "run") / "trainer_state.json").read_text())
    assert state["config"]["double_quant"] is False and state["config"]["progress"] is False
    capsys.readouterr()
    assert main(["--set", *CLI_TINY, "resume=False", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "already holds checkpoint-000001: set resume=true" in capsys.readouterr().err
    assert main(["--set", *CLI_TINY, "gradient_checkpointing=maybe"]) == 2
    assert "error: gradient_checkpointing must be True or False, got str 'maybe'" in capsys.readouterr().err
    assert main(["--set", *CLI_TINY, "device=tpu"]) == 2
    assert "error: device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got 'tpu'" in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"double_quant": "false"}))
    assert main(["--config", str(config)]) == 2
    assert "error: double_quant must be True or False, got str 'false'" in capsys.readouterr().err
    config.write_text('{"target_modules": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["--config", str(config)]) == 2
    assert f"error: config file {config} nests JSON too deeply to be read" in capsys.readouterr().err


def test_an_output_dir_that_cannot_take_files_is_refused_before_the_first_step(tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr("qlora_ref.train.setup", lambda config: steps.append(config))  # the run must not start
    (tmp_path / "a-file").write_text("x")
    for output_dir in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        with pytest.raises(NotADirectoryError, match=f"output_dir '{output_dir}' cannot be a directory: "
                                                     f"'{tmp_path / 'a-file'}' is a file"):
            train(replace(TINY, output_dir=str(output_dir)))

    def read_only(*args, **kwargs):  # what the OS says for a read-only directory (chmod would not stop root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("qlora_ref.adapters.tempfile.TemporaryFile", read_only)
    with pytest.raises(PermissionError, match=f"output_dir '{tmp_path / 'ro'}' is not writable \\(Permission "
                                              "denied\\): give a directory you can write to"):
        train(replace(TINY, output_dir=str(tmp_path / "ro")))
    with pytest.raises(ValueError, match="optimizer 'adamw' .* with output_dir use 'adamw_8bit' or 'paged_adamw_8bit'"):
        train(replace(TINY, method="full", optimizer="adamw", output_dir=str(tmp_path / "run")))
    assert steps == []


def test_a_model_that_is_neither_base_nor_found_is_named(capsys):
    pytest.importorskip("transformers")
    assert main(["--set", *CLI_TINY, "model=/nonexistent"]) == 2
    assert "error: model '/nonexistent' is not 'base', a model directory, or a Hugging Face model id" in (
        capsys.readouterr().err)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_hugging_face_model_directory_fine_tunes_with_the_same_code_and_peft_loads_the_result(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from qlora_ref.hf import make_local_model

    train_examples, eval_examples = date_task(n_train=64, n_eval=16)
    texts = [e.prompt + e.answer for e in train_examples]
    directory = make_local_model(tmp_path / "model", texts)
    result = train(replace(TINY, model=str(directory), output_dir=str(tmp_path / "run"), lr=1e-2))
    model = result.model
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 2 * 7
    assert result.losses[-1] < result.losses[0]
    ids = torch.tensor([result.run.tokenizer.encode(eval_examples[0].prompt + eval_examples[0].answer)])
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    # PEFT over a fresh copy of the base, quantized by nothing: compare against our merged-free LoRA on a
    # dense base, which is what QLoRA's dequantized weight is
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for name, layer in lora_layers(model).items():
        base.get_submodule(name).weight.data.copy_(layer.base_weight().float())
    reference = peft.PeftModel.from_pretrained(base, latest_checkpoint(tmp_path / "run")).eval()
    with torch.no_grad():
        theirs = reference(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_step_memory_measures_the_model_the_optimizer_and_the_peak():
    qlora = step_memory(replace(TINY, optimizer="adamw_8bit", gradient_checkpointing=False), steps=1)
    lora = step_memory(replace(TINY, method="lora", optimizer="adamw_8bit", gradient_checkpointing=False), steps=1)
    checkpointed = step_memory(replace(TINY, optimizer="adamw_8bit"), steps=1)
    base = LlamaForCausalLM.from_pretrained()
    dense_linears = sum(m.weight.nbytes for n, m in base.named_modules()
                        if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # LoRA keeps the float32 linears; QLoRA keeps about 4.5 bits of them (codes, absmax codes, constants)
    assert lora["weights"] - qlora["weights"] > 0.8 * dense_linears
    adapters = 4 * 4 * sum(m.in_features + m.out_features for n, m in base.named_modules()
                           if isinstance(m, torch.nn.Linear) and n != "lm_head")  # r = 4, float32
    assert qlora["trainable"] == lora["trainable"] == adapters
    assert qlora["optimizer_state"] == lora["optimizer_state"] > 0
    assert qlora["peak"] > qlora["weights"] + qlora["optimizer_state"]
    assert checkpointed["peak"] < qlora["peak"]  # only each layer's input is kept for the backward
