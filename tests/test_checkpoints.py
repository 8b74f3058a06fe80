"""qlora_ref.checkpoints never lose work or accept garbage: which folder a resume takes, what it does with a
damaged one, a folder it did not write, the thread count, a NaN loss, and a run killed while it saves."""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from dataclasses import fields, replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_ref.checkpoints import DamagedCheckpointError, checkpoints, latest_checkpoint, save_checkpoint
from qlora_ref.train import NonFiniteLossError, TrainConfig, main, setup, train, train_step

# Checkpoints at steps 2 and 4 of a 5-step run: a resume from step 2 has three steps to get right.
TINY = TrainConfig(n_train=64, n_eval=16, batch_size=8, steps=5, warmup_steps=1, eval_every=0, save_every=2,
                   samples=0, progress=False, r=4, alpha=8, dropout=0.1, device="cpu")


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """(a run stopped after step 4, with checkpoints 2 and 4; the losses of the same run never stopped)."""
    root = tmp_path_factory.mktemp("stopped")
    train(replace(TINY, output_dir=str(root / "run")), stop_after=4)
    whole = train(replace(TINY, output_dir=str(root / "whole")))
    return root / "run", whole.losses


def copy_of(stopped, tmp_path):
    run, losses = stopped
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", losses


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def resume(directory):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = train(replace(TINY, output_dir=str(directory), resume=True))
    return result, [str(w.message) for w in seen]


def test_checkpoint_folders_are_matched_exactly_and_ordered_by_step(tmp_path):
    for name in ("checkpoint-000003", "checkpoint-000006", "checkpoint-000006.old", "checkpoint-9", "checkpoint-10",
                 "checkpoint-x", "checkpoint-", "checkpoint-000009", ".checkpoint-000012.partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-000012").write_text("a file, not a checkpoint")
    assert [p.name for p in checkpoints(tmp_path)] == [  # a text sort put checkpoint-9 after checkpoint-000006
        "checkpoint-000003", "checkpoint-000006", "checkpoint-9", "checkpoint-000009", "checkpoint-10"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None


def test_a_copy_named_like_a_checkpoint_is_not_resumed_and_the_real_one_is_not_rewritten(stopped, tmp_path):
    directory, losses = copy_of(stopped, tmp_path)
    shutil.copytree(directory / "checkpoint-000002", directory / "checkpoint-000004.old")
    real = contents(directory / "checkpoint-000004")
    result, said = resume(directory)
    assert result.losses == losses and said == []
    assert contents(directory / "checkpoint-000004") == real  # it resumed from step 2 and deleted this one
    assert contents(directory / "checkpoint-000004.old") == contents(directory / "checkpoint-000002")


def test_a_hand_made_checkpoint_whose_state_is_another_step_is_skipped_and_kept(stopped, tmp_path):
    directory, losses = copy_of(stopped, tmp_path)
    shutil.copytree(directory / "checkpoint-000002", directory / "checkpoint-9")
    real = contents(directory / "checkpoint-000004")
    result, said = resume(directory)
    assert result.losses == losses and contents(directory / "checkpoint-000004") == real
    assert said == [f"{directory / 'checkpoint-9' / 'trainer_state.json'}: step is 2 but the folder is named "
                    "checkpoint-9: skipped checkpoint-9, kept as checkpoint-9.damaged; resuming from checkpoint-000004"]
    assert contents(directory / "checkpoint-9.damaged") == contents(directory / "checkpoint-000002")


def cut(name):
    def damage(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return damage


def rewrite(name, edit):
    def damage(folder):
        (folder / name).write_text(edit((folder / name).read_text()))
    return damage


def edit_tensor(name, key, value):
    def damage(folder):
        tensors = load_file(str(folder / name))
        tensors[key] = value
        save_file(tensors, str(folder / name))
    return damage


def trainer_state(edit):
    return rewrite("trainer_state.json", lambda text: json.dumps(edit(json.loads(text))))


DAMAGES = {
    "adapters cut in half": (cut("adapter_model.safetensors"),
                             "adapter_model.safetensors is not a whole safetensors file"),
    "optimizer cut in half": (cut("optimizer.safetensors"), "optimizer.safetensors is not a whole safetensors file"),
    "optimizer empty": (lambda folder: (folder / "optimizer.safetensors").write_bytes(b""),
                        "optimizer.safetensors is empty"),
    "trainer state garbage": (rewrite("trainer_state.json", lambda text: "garbage"),
                              "trainer_state.json is not valid JSON"),
    "trainer state incomplete": (rewrite("trainer_state.json", lambda text: '{"step": 4}'),
                                 r"trainer_state.json: lacks \['losses', 'evals', 'config', 'scaler'\]"),
    "trainer state step a string": (trainer_state(lambda state: {**state, "step": "4"}),
                                    "trainer_state.json: step is '4', not an int"),
    "trainer state losses cut": (trainer_state(lambda state: {**state, "losses": state["losses"][:2]}),
                                 "trainer_state.json: losses must be 4 finite numbers, one per step, got 2"),
    "adapter config r 0": (rewrite("adapter_config.json", lambda text: text.replace('"r": 4', '"r": 0')),
                           r"adapter_config.json: r = 0, lora_alpha = 8: r \(the LoRA rank\) must be >= 1"),
    "adapter config malformed": (rewrite("adapter_config.json", lambda text: text[:10]),
                                 "adapter_config.json is not valid JSON"),
    "rng state of 10 bytes": (edit_tensor("rng.safetensors", "torch_cpu", torch.zeros(10, dtype=torch.uint8)),
                              "rng.safetensors: torch_cpu is not a generator state"),
    "optimizer betas 1.5": (edit_tensor("optimizer.safetensors", "param_groups.0.betas",
                                        torch.tensor([1.5, 0.999], dtype=torch.float64)),
                            r"optimizer.safetensors: param_groups.0: betas\[0\] must be a finite number in \[0, 1\), "
                            "got 1.5"),
    "optimizer eps NaN": (edit_tensor("optimizer.safetensors", "param_groups.0.eps",
                                      torch.tensor(math.nan, dtype=torch.float64)),
                          "optimizer.safetensors: param_groups.0: eps must be a finite number > 0"),
    "optimizer state of the wrong shape": (edit_tensor("optimizer.safetensors", "state.0.state1",
                                                       torch.zeros(3, dtype=torch.float32)),
                                           r"optimizer.safetensors: state.0.state1: saved shape \(3,\)"),
}


@pytest.mark.parametrize("damage, reason", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_latest_checkpoint_is_named_kept_and_the_run_resumes_from_the_one_before(stopped, tmp_path, damage,
                                                                                          reason):
    directory, losses = copy_of(stopped, tmp_path)
    damage(directory / "checkpoint-000004")
    damaged = contents(directory / "checkpoint-000004")
    result, said = resume(directory)
    assert len(said) == 1 and str(directory / "checkpoint-000004") in said[0]
    assert re.search(reason, said[0]) and said[0].endswith(
        "skipped checkpoint-000004, kept as checkpoint-000004.damaged; resuming from checkpoint-000002")
    assert contents(directory / "checkpoint-000004.damaged") == damaged  # nothing deleted or changed
    assert result.losses == losses  # steps 3 to 5 trained again, as if the run had never stopped
    assert [p.name for p in checkpoints(directory)] == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000005"]


def test_when_every_checkpoint_is_damaged_the_run_names_them_all_and_changes_nothing(stopped, tmp_path, monkeypatch):
    directory, _ = copy_of(stopped, tmp_path)
    cut("optimizer.safetensors")(directory / "checkpoint-000002")
    rewrite("trainer_state.json", lambda text: "garbage")(directory / "checkpoint-000004")
    before = {p.name: contents(p) for p in directory.iterdir()}
    with pytest.raises(DamagedCheckpointError, match=r"no checkpoint in .* reads back whole: .*checkpoint-000004/"
                                                     r"trainer_state.json is not valid JSON.*checkpoint-000002/"
                                                     r"optimizer.safetensors is not a whole safetensors file"):
        train(replace(TINY, output_dir=str(directory), resume=True))
    assert {p.name: contents(p) for p in directory.iterdir()} == before
    assert main(["--set", "n_train=64", "n_eval=16", "batch_size=8", "steps=5", "warmup_steps=1", "eval_every=0",
                 "save_every=2", "samples=0", "progress=false", "r=4", "alpha=8", "dropout=0.1", "device=cpu",
                 f"output_dir={directory}", "resume=true"]) == 2


def test_a_checkpoint_folder_the_run_did_not_write_is_never_replaced(tmp_path):
    run = setup(replace(TINY, output_dir=str(tmp_path)))
    train_step(run)
    (tmp_path / "checkpoint-000001").mkdir()
    (tmp_path / "checkpoint-000001" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{tmp_path / 'checkpoint-000001'} exists already; a run never deletes "
                                              "or overwrites a checkpoint it did not write"):
        save_checkpoint(run, tmp_path)
    assert [p.name for p in (tmp_path / "checkpoint-000001").iterdir()] == ["notes.txt"]


def test_the_thread_count_is_recorded_and_a_resume_at_another_count_warns(stopped, tmp_path):
    directory, losses = copy_of(stopped, tmp_path)
    path = directory / "checkpoint-000004" / "trainer_state.json"
    state = json.loads(path.read_text())
    assert state["torch_threads"] == torch.get_num_threads()
    path.write_text(json.dumps({**state, "torch_threads": torch.get_num_threads() + 1}))
    result, said = resume(directory)
    assert said == [f"{directory / 'checkpoint-000004'} was written by a run with {torch.get_num_threads() + 1} torch "
                    f"threads and this one has {torch.get_num_threads()}: CPU kernels split their sums by thread, so "
                    "the resumed losses equal an uninterrupted run's only to float32 rounding; torch.set_num_threads("
                    f"{torch.get_num_threads() + 1}) (or OMP_NUM_THREADS={torch.get_num_threads() + 1}) before "
                    "resuming makes them equal bit for bit"]
    assert result.losses == losses  # here the count did not really change


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    config = replace(TINY, lr=1e30, warmup_steps=0, save_every=1, output_dir=str(tmp_path))  # step 1 blows it up
    with pytest.raises(NonFiniteLossError, match=f"step 2: the training loss is nan; training diverged .* its last "
                                                 f"checkpoint, {tmp_path / 'checkpoint-000001'}, is kept"):
        train(config)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-000001"]
    state = json.loads((tmp_path / "checkpoint-000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and math.isfinite(state["losses"][0])
    assert main(["--set", "n_train=64", "n_eval=16", "batch_size=8", "steps=3", "warmup_steps=0", "eval_every=0",
                 "samples=0", "progress=false", "device=cpu", "method=full", "optimizer=adamw", "lr=1e30"]) == 1
    assert "error: step 3: the training loss is nan" in capsys.readouterr().err  # it printed "loss nan" and exited 0


# A run killed (SIGKILL) at chosen points of its second checkpoint: on its os.replace calls (each file of the
# checkpoint moved into the temporary folder, then the folder renamed) and on the fsync of a file half way
# through. Resumed, it computes the losses of a run never killed, and its last checkpoint's files are the same bytes.
KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from qlora_ref.train import TrainConfig, train

    torch.set_num_threads(int(sys.argv[3]))
    kind, kill_at = sys.argv[2].split(":")
    calls = {"replace": 0, "fsync": 0}
    real = {"replace": os.replace, "fsync": os.fsync}

    def counted(name):
        def call(*args):
            calls[name] += 1
            if name == kind and calls[name] == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return real[name](*args)
        return call

    os.replace, os.fsync = counted("replace"), counted("fsync")
    config = TrainConfig(**json.loads(sys.argv[4]), output_dir=sys.argv[1])
    train(config)
""")
FILES_PER_CHECKPOINT = 5  # adapter weights and config, optimizer, RNG, trainer state; then the folder's rename


KILLED_CONFIG = replace(TINY, steps=6)


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("never-killed")
    return train(replace(KILLED_CONFIG, output_dir=str(directory))), directory


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["replace:7", "fsync:8", "replace:12", "replace:13"])
def test_a_run_killed_while_it_saves_resumes_to_the_losses_of_a_run_never_killed(tmp_path, never_killed, kill_at):
    """replace:7 is the second checkpoint's first file, fsync:8 half way through its third, replace:12 its folder's
    rename (the kill comes first), replace:13 the third checkpoint's first file (the second is complete)."""
    whole, whole_directory = never_killed
    settings = {f.name: getattr(KILLED_CONFIG, f.name) for f in fields(TrainConfig) if f.name != "output_dir"}
    directory = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(directory), kill_at, str(torch.get_num_threads()),
                            json.dumps(settings)], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert latest_checkpoint(directory).name == ("checkpoint-000004" if kill_at == "replace:13" else "checkpoint-000002")
    resumed = train(replace(KILLED_CONFIG, output_dir=str(directory), resume=True))
    assert resumed.losses == whole.losses
    assert [p.name for p in checkpoints(directory)] == [p.name for p in checkpoints(whole_directory)]
    mine, theirs = contents(latest_checkpoint(directory)), contents(latest_checkpoint(whole_directory))
    assert mine.keys() == theirs.keys() and all(mine[k] == theirs[k] for k in mine if k.endswith(".safetensors"))
    assert not [p for p in directory.rglob(".*")]  # no partial folder or temporary file left behind
