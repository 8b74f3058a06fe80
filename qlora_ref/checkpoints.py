"""Lesson 8's checkpoints: a training run saved whole and resumed exactly, never losing work or accepting garbage.

A checkpoint is a directory `checkpoint-<step>` (six digits) written whole to a temporary name and renamed; the
adapters inside are PEFT's layout. Every file is safetensors or JSON; nothing is pickled. Resuming takes the highest
step among folders named exactly `checkpoint-<digits>` (so not a copy `checkpoint-000006.old`) whose every file reads
back and fits the run; a damaged one (a file cut short, garbage, a value out of range) is named with its file and the
reason in a warning, renamed `<name>.damaged`, and the one before it is tried. A run never deletes or overwrites a
checkpoint folder it did not write. `run` is always a qlora_ref.train.Run, set up from the same TrainConfig.
"""

import json
import math
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save

from .adapters import (WEIGHTS_NAME, assign_adapters, atomic_write, read_adapters, read_json_object, read_safetensors,
                       save_adapters)
from .distributed import load_sharded_checkpoint, save_sharded_checkpoint
from .optimizer_state import check_optimizer_state_tensors, load_optimizer_state_tensors, optimizer_state_tensors

__all__ = ["DamagedCheckpointError", "checkpoints", "latest_checkpoint", "load_checkpoint", "resume_latest",
           "save_checkpoint"]

# Settings a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "output_dir", "resume", "progress", "samples")
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # exactly: a copy named checkpoint-000006.old is no checkpoint
SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


class DamagedCheckpointError(ValueError):
    """A checkpoint folder whose files do not read back as save_checkpoint wrote them; the message names the
    file and the reason."""


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def _rng_tensors(device) -> dict:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def save_checkpoint(run, directory) -> Path:
    """directory/checkpoint-<step>/: adapters (PEFT layout) or weights, optimizer state, RNG state, trainer state.

    Written into a temporary directory and renamed when complete, so a run killed while saving leaves the
    previous checkpoint as the latest. A checkpoint folder already there is never replaced: that raises."""
    directory = Path(directory)
    final = directory / _checkpoint_name(run.step)
    if final.exists():
        raise FileExistsError(f"{final} exists already; a run never deletes or overwrites a checkpoint it did not "
                              f"write: move it out of {directory} (or choose a new output_dir)")
    if run.data_parallel:  # lesson 10: every rank writes its shards (torch.distributed.checkpoint)
        return save_sharded_checkpoint(run, final, _trainer_state(run))
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving this step
    partial.mkdir(parents=True)
    if run.config.method == "full":
        weights = {n: p.detach().cpu().contiguous() for n, p in run.model.named_parameters() if p.requires_grad}
        atomic_write(partial / "model.safetensors", save(weights))
    else:
        save_adapters(run.model, partial, base_model_name_or_path=run.config.model)
    state = {k: v.detach().cpu().contiguous() for k, v in optimizer_state_tensors(run.optimizer).items()}
    atomic_write(partial / "optimizer.safetensors", save(state))
    atomic_write(partial / "rng.safetensors", save(_rng_tensors(run.device)))
    atomic_write(partial / "trainer_state.json", (json.dumps(_trainer_state(run), indent=1) + "\n").encode())
    os.replace(partial, final)
    return final


def _trainer_state(run) -> dict:
    return {"step": run.step, "losses": run.losses, "evals": run.evals, "config": asdict(run.config),
            "scaler": run.scaler.state_dict() if run.scaler else None, "torch_threads": torch.get_num_threads()}


def checkpoints(directory) -> list:
    """The checkpoint folders in `directory` in order of step: folders named checkpoint-<digits> exactly (the
    run writes six digits); of two names for one step (checkpoint-9, checkpoint-000009), the run's comes last."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            step = int(match.group(1))
            found.append((step, path.name == _checkpoint_name(step), path))
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(directory) -> Optional[Path]:
    """The checkpoint folder of the highest step in `directory` (see checkpoints), or None."""
    found = checkpoints(directory)
    return found[-1] if found else None


@dataclass
class _CheckpointContents:
    """A checkpoint read and checked against a run, not applied yet."""

    path: Path
    trainer_state: dict
    weights: dict  # the adapters (PEFT names), or the trainable weights of method "full"
    optimizer: dict
    rng: dict


@contextmanager
def _reading(checkpoint: Path, name: str):
    """Turn a failure to read or check file `name` of `checkpoint` into a DamagedCheckpointError naming it."""
    try:
        yield checkpoint / name
    except (ValueError, TypeError, FileNotFoundError) as error:
        reason = str(error)
        raise DamagedCheckpointError(reason if str(checkpoint) in reason else f"{checkpoint / name}: {reason}") from None


def _check_trainer_state(state: dict, checkpoint: Path) -> None:
    kinds = {"step": (int, "an int"), "losses": (list, "a list"), "evals": (list, "a list"),
             "config": (dict, "an object"), "scaler": ((dict, type(None)), "an object or null")}
    missing = [key for key in kinds if key not in state]
    if missing:
        raise ValueError(f"lacks {missing}: it is incomplete")
    for key, (kind, what) in kinds.items():
        if isinstance(state[key], bool) or not isinstance(state[key], kind):
            raise ValueError(f"{key} is {state[key]!r:.80}, not {what}")
    step, losses = state["step"], state["losses"]
    match = CHECKPOINT_NAME.fullmatch(checkpoint.name)
    if step < 0 or (match and int(match.group(1)) != step):
        raise ValueError(f"step is {step} but the folder is named {checkpoint.name}")
    if len(losses) != step or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses):
        raise ValueError(f"losses must be {step} finite numbers, one per step, got {len(losses)} values")
    threads = state.get("torch_threads")  # absent in checkpoints written before it was recorded
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"torch_threads is {threads!r}, not a thread count")


def _check_rng(rng: dict, device) -> None:
    if "torch_cpu" not in rng:
        raise ValueError("lacks torch_cpu, the CPU generator's state")
    for key, generator_device in (("torch_cpu", "cpu"), ("torch_cuda", device if device.type == "cuda" else None)):
        if key in rng and generator_device is not None:
            try:
                torch.Generator(device=generator_device).set_state(rng[key])  # a scratch generator: checks only
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"{key} is not a generator state ({error})") from None


def _check_weights(weights: dict, model) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise ValueError(f"holds {len(weights)} tensors for the {len(params)} trainable parameters (missing "
                         f"{sorted(set(params) - set(weights))[:3]}, unknown {sorted(set(weights) - set(params))[:3]})")
    for name, param in params.items():
        tensor = weights[name]
        if tensor.shape != param.shape or not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} is {tensor.dtype} of shape {tuple(tensor.shape)}; the parameter is "
                             f"{tuple(param.shape)}, and its values must be finite floats")


def _read_checkpoint(run, checkpoint: Path) -> _CheckpointContents:
    """Read every file of `checkpoint` and check it against the run, changing nothing: a DamagedCheckpointError
    names the file that does not read back and why; a ValueError, settings that differ from the run's."""
    trainer_state = _read_trainer_state(run, checkpoint)
    if run.scaler and trainer_state["scaler"] is not None:
        with _reading(checkpoint, "trainer_state.json"):
            scaler = trainer_state["scaler"]
            if not all(isinstance(scaler.get(k), (int, float)) for k in SCALER_KEYS) or not (
                    math.isfinite(scaler["scale"]) and scaler["scale"] > 0):
                raise ValueError(f"scaler must hold {list(SCALER_KEYS)} with a finite scale > 0, got {scaler!r}")
    if run.config.method == "full":
        with _reading(checkpoint, "model.safetensors") as path:
            weights = read_safetensors(path)
            _check_weights(weights, run.model)
    else:
        with _reading(checkpoint, WEIGHTS_NAME):
            weights = read_adapters(run.model, checkpoint)
    with _reading(checkpoint, "optimizer.safetensors") as path:
        optimizer = read_safetensors(path)
        check_optimizer_state_tensors(run.optimizer, optimizer)
    with _reading(checkpoint, "rng.safetensors") as path:
        rng = read_safetensors(path)
        _check_rng(rng, run.device)
    return _CheckpointContents(checkpoint, trainer_state, weights, optimizer, rng)


def _read_trainer_state(run, checkpoint: Path) -> dict:
    """trainer_state.json of `checkpoint`, checked, and its settings compared with the run's (a ValueError names
    those that differ)."""
    with _reading(checkpoint, "trainer_state.json") as path:
        trainer_state = read_json_object(path, "the trainer state")
        _check_trainer_state(trainer_state, checkpoint)
    saved, current = trainer_state["config"], json.loads(json.dumps(asdict(run.config)))
    changed = [k for k in saved if k not in RESUMABLE_CHANGES and saved[k] != current.get(k)]
    if changed:
        raise ValueError(f"{checkpoint} was trained with different settings: "
                         + ", ".join(f"{k} {saved[k]!r} (now {current.get(k)!r})" for k in changed)
                         + "; resume with the same settings or start a new output_dir")
    if trainer_state["step"] > run.config.steps:
        raise ValueError(f"{checkpoint} is at step {trainer_state['step']}, past steps={run.config.steps}")
    return trainer_state


def _apply_checkpoint(run, contents: _CheckpointContents) -> None:
    trainer_state = contents.trainer_state
    threads = trainer_state.get("torch_threads")
    if threads is not None and threads != torch.get_num_threads():
        warnings.warn(f"{contents.path} was written by a run with {threads} torch threads and this one has "
                      f"{torch.get_num_threads()}: CPU kernels split their sums by thread, so the resumed losses equal "
                      "an uninterrupted run's only to float32 rounding; torch.set_num_threads("
                      f"{threads}) (or OMP_NUM_THREADS={threads}) before resuming makes them equal bit for bit",
                      stacklevel=4)
    if run.config.method == "full":
        with torch.no_grad():
            for name, param in run.model.named_parameters():
                if param.requires_grad:
                    param.copy_(contents.weights[name])
    else:
        assign_adapters(run.model, contents.weights)
    state = {k: v.to(run.device) if k.startswith("state.") else v for k, v in contents.optimizer.items()}
    load_optimizer_state_tensors(run.optimizer, state)
    torch.set_rng_state(contents.rng["torch_cpu"])
    if "torch_cuda" in contents.rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(contents.rng["torch_cuda"], run.device)
    if run.scaler and trainer_state["scaler"]:
        run.scaler.load_state_dict(trainer_state["scaler"])
    run.step, run.losses, run.evals = trainer_state["step"], trainer_state["losses"], trainer_state["evals"]


def load_checkpoint(run, checkpoint) -> None:
    """Restore a checkpoint written by save_checkpoint into a freshly set-up run of the same config.

    Every file is read and checked before anything changes (DamagedCheckpointError names the file and why).
    A checkpoint written with another torch thread count warns: the losses then match only to float32 rounding."""
    _apply_checkpoint(run, _read_checkpoint(run, Path(checkpoint)))


def _set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint folder <name>.damaged (then .damaged-2, ...): kept, but no longer a checkpoint."""
    aside, number = checkpoint.with_name(checkpoint.name + ".damaged"), 1
    while aside.exists():
        number += 1
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged-{number}")
    checkpoint.rename(aside)
    return aside


def resume_latest(run, directory) -> Optional[Path]:
    """Load the checkpoint of the highest step in `directory` that reads back whole, into a freshly set-up run;
    None if there is none at all.

    A damaged checkpoint on the way (a file cut short, garbage, out of range) is skipped: a warning names it,
    its file and the reason, and the folder is renamed <name>.damaged, so that nothing is deleted and this run
    can write that step again. If every checkpoint is damaged, a DamagedCheckpointError lists them all."""
    if run.data_parallel:  # lesson 10: the latest sharded checkpoint, read by every rank
        checkpoint = latest_checkpoint(directory)
        if checkpoint is not None:
            load_sharded_checkpoint(run, checkpoint, _read_trainer_state(run, checkpoint))
        return checkpoint
    found, damaged = checkpoints(directory), []
    for checkpoint in reversed(found):
        try:
            contents = _read_checkpoint(run, checkpoint)
        except DamagedCheckpointError as error:
            damaged.append((checkpoint, error))
            continue
        for path, error in damaged:
            aside = _set_aside(path)
            warnings.warn(f"{error}: skipped {path.name}, kept as {aside.name}; resuming from {checkpoint.name}",
                          stacklevel=3)
        _apply_checkpoint(run, contents)
        return checkpoint
    if damaged:
        raise DamagedCheckpointError(f"no checkpoint in {directory} reads back whole: "
                                     + "; ".join(str(error) for _, error in damaged)
                                     + ". Repair them, or move them out to start again")
    return None
