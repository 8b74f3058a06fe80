"""Saving and restoring AdamW8bit's state as flat tensors, for safetensors (no pickle): lesson 8's checkpoints.

    tensors = optimizer_state_tensors(optimizer)          # {name: tensor}, shared with the optimizer
    check_optimizer_state_tensors(optimizer, tensors)     # raises, naming the first tensor that does not fit
    load_optimizer_state_tensors(optimizer, tensors)      # checks everything first, then restores
"""

import torch

from .optim8bit import AdamW8bit, check_group, parameters_in_order

__all__ = ["check_optimizer_state_tensors", "load_optimizer_state_tensors", "optimizer_state_tensors"]


def optimizer_state_tensors(optimizer) -> dict:
    """A flat {name: tensor} of the optimizer's state and hyperparameters, for safetensors (no pickle).

        state.{i}.{key}        the state tensors of the i-th parameter (param_groups order), and its
                               step as a 0-d int64 tensor
        param_groups.{g}.{key} lr, eps, weight_decay as 0-d float64 tensors, betas as a float64 pair
    Tensors are shared with the optimizer, not copied; load with load_optimizer_state_tensors.
    """
    tensors = {}
    for g, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key in ("params", "param_names"):  # the parameters themselves, and their names
                continue
            numbers = value if isinstance(value, (tuple, list)) else [value]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
                raise ValueError(f"param_groups[{g}][{key!r}] = {value!r} is not a number or a tuple of numbers")
            tensors[f"param_groups.{g}.{key}"] = torch.tensor(value, dtype=torch.float64)
    for i, p in enumerate(parameters_in_order(optimizer)):
        for key, value in optimizer.state.get(p, {}).items():
            name = f"state.{i}.{key}"
            tensors[name] = torch.tensor(value, dtype=torch.int64) if key == "step" else value
    return tensors


def load_optimizer_state_tensors(optimizer, tensors: dict) -> None:
    """Restore what optimizer_state_tensors saved into an AdamW8bit (or PagedAdamW8bit) over the same parameters.

    Everything is checked before anything changes (check_optimizer_state_tensors): a ValueError names the
    first tensor that is not what this optimizer would have saved."""
    groups, states = _read_state_tensors(optimizer, tensors)
    for group, values in zip(optimizer.param_groups, groups):
        group.update(values)
    params = parameters_in_order(optimizer)
    for index, saved in states.items():
        optimizer._load_state(params[index], saved)


def check_optimizer_state_tensors(optimizer, tensors: dict) -> None:
    """Raise, naming the tensor, unless load_optimizer_state_tensors can load `tensors`: known names, finite
    hyperparameters in range, and per parameter the state's keys, shapes, dtypes, step and finite values."""
    _read_state_tensors(optimizer, tensors)


def _read_state_tensors(optimizer, tensors: dict) -> tuple:
    """([hyperparameters per param group], {parameter index: saved state}) of `tensors`, all checked."""
    if not isinstance(optimizer, AdamW8bit):
        raise TypeError(f"optimizer state tensors load into AdamW8bit or PagedAdamW8bit, got {type(optimizer).__name__}")
    params = parameters_in_order(optimizer)
    groups = [{} for _ in optimizer.param_groups]
    states = {}
    for name, value in tensors.items():
        kind, index, key = _split_name(name)
        if kind == "param_groups":
            if index >= len(groups) or key not in optimizer.param_groups[index] or key in ("params", "param_names"):
                raise ValueError(f"{name}: this optimizer has no such hyperparameter")
            if not value.is_floating_point() or value.dim() > 1:
                raise ValueError(f"{name}: a hyperparameter is saved as a float64 number or pair, got {value.dtype} "
                                 f"of shape {tuple(value.shape)}")
            number = value.tolist()
            groups[index][key] = tuple(number) if isinstance(number, list) else number
        else:
            if index >= len(params):
                raise ValueError(f"{name}: the saved optimizer had more parameters than this one ({len(params)})")
            states.setdefault(index, {})[key] = value
    for g, (group, values) in enumerate(zip(optimizer.param_groups, groups)):
        check_group({**group, **values}, f"param_groups.{g}")
    for index, saved in states.items():
        optimizer._check_saved_state(params[index], saved, f"state.{index}")
    return groups, states


def _split_name(name: str):
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in ("state", "param_groups") or not parts[1].isdigit():
        raise ValueError(f"{name!r} is not a name optimizer_state_tensors writes "
                         "('state.<i>.<key>' or 'param_groups.<g>.<key>')")
    return parts[0], int(parts[1]), parts[2]
