"""Lesson 8: the trainer's settings (TrainConfig), each typed and range-checked the same way from the API, a JSON
file or the command line's --set, so a typo gets one sentence that names it before the first step.

    TrainConfig(method="lora", steps=20)
    TrainConfig.from_file("configs/date_qlora.json")
    TrainConfig.from_dict({**json_values, **parse_overrides(["steps=20", "double_quant=False"])})
"""

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch

from .adapters import ALL_LINEAR, check_target_modules, read_json_object
from .lora import QUANT_TYPES, check_lora_hyperparameters
from .methods import METHODS
from .optim8bit import OPTIMIZERS
from .validation import check_blocksize, check_bool

__all__ = ["DTYPES", "TrainConfig", "check_config", "parse_overrides"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Names other trainers (transformers, PEFT) use for these settings: suggested when a config uses them.
OTHER_NAMES = {"learning_rate": "lr", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_r": "r", "rank": "r",
               "max_steps": "steps", "gradient_accumulation_steps": "grad_accum", "warmup": "warmup_steps",
               "per_device_train_batch_size": "batch_size", "gradient_checkpointing_enable": "gradient_checkpointing"}


@dataclass
class TrainConfig:
    """Everything a run depends on (a JSON file of these keys configures the command).

    Each setting has the type written here, checked (check_config) the same way whether it comes from the API,
    a JSON file or --set: a bool is true or false, never a string such as "False" (which Python reads as true).
    """

    model: str = "base"                 # "base" (models/base) or a Hugging Face model id / local directory
    method: str = "qlora"               # "qlora", "lora" or "full"
    train_file: Optional[str] = None    # JSON lines {"prompt": ..., "answer": ...}; None: the date task
    eval_file: Optional[str] = None     # the same; None: the date task's held-out dates
    n_train: int = 4000                 # date task sizes (when the files are None)
    n_eval: int = 200
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: Union[str, list] = ALL_LINEAR
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    steps: int = 150
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0          # 0: no clipping
    optimizer: str = "paged_adamw_8bit"
    gradient_checkpointing: bool = True
    fused: bool = False                 # qlora_ref.fused's kernels (model "base" or another qlora_ref.llama; qlora, lora)
    dtype: str = "auto"                 # compute dtype: "auto" = bfloat16 on Ampere+, float16 before, float32 on a CPU
    device: str = "auto"
    seed: int = 0
    eval_every: int = 50                # 0: evaluate at the end only
    save_every: int = 0                 # 0: a checkpoint at the end only (when output_dir is set)
    output_dir: Optional[str] = None    # None: write nothing
    resume: bool = False                # continue from output_dir's latest checkpoint
    progress: bool = True               # a progress bar on stderr
    samples: int = 3                    # eval prompts answered at the end

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names + list(OTHER_NAMES), n=1)
                close = [OTHER_NAMES.get(c, c) for c in close]
                hint = f"; did you mean {close[0]!r}?" if close else f"; the settings are {names}"
                raise ValueError(f"unknown setting {key!r}{hint}")
        return cls(**values)

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        return cls.from_dict(read_json_object(path, "config file"))


# Settings whose value is text (a name, a path): --set keeps what follows "=" as it is.
TEXT_SETTINGS = {f.name for f in fields(TrainConfig) if f.type in (str, Optional[str])}
BOOL_SETTINGS = [f.name for f in fields(TrainConfig) if f.type is bool]
PATH_SETTINGS = ("train_file", "eval_file", "output_dir")
DEVICES = re.compile(r"auto|cpu|cuda(:\d+)?")


def _check_int(config, name: str, low: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_config(config: TrainConfig) -> None:
    """Raise with what to change for any setting of the wrong type or out of range (those that need the model:
    see setup)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"expected a TrainConfig, got {type(config).__name__}: TrainConfig.from_dict(...) makes one")
    for name in BOOL_SETTINGS:
        check_bool(getattr(config, name), name)
    for name, allowed in (("method", METHODS), ("optimizer", OPTIMIZERS), ("dtype", ("auto", *DTYPES)),
                          ("quant_type", QUANT_TYPES)):
        if not isinstance(getattr(config, name), str) or getattr(config, name) not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {getattr(config, name)!r}")
    if not isinstance(config.model, str) or not config.model:
        raise ValueError(f"model must be 'base', a Hugging Face model id or a model directory, got {config.model!r}")
    if not isinstance(config.device, str) or not DEVICES.fullmatch(config.device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {config.device!r}")
    for name in PATH_SETTINGS:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, str) or not value):
            hint = f": pass str({name})" if isinstance(value, os.PathLike) else ""
            raise TypeError(f"{name} must be a path written as a str (or None), got {type(value).__name__} "
                            f"{value!r}{hint}")
    check_lora_hyperparameters(config.r, config.alpha, config.dropout)
    check_target_modules(config.target_modules)
    check_blocksize(config.blocksize)
    for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("n_train", 1),
                      ("n_eval", 1), ("eval_every", 0), ("save_every", 0), ("seed", 0), ("samples", 0)):
        _check_int(config, name, low)
    if config.warmup_steps >= config.steps:
        raise ValueError(f"warmup_steps ({config.warmup_steps}) must be less than steps ({config.steps})")
    for name in ("lr", "weight_decay", "max_grad_norm", "min_lr_ratio"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if config.lr == 0 or config.min_lr_ratio > 1:
        raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got lr={config.lr}, "
                         f"min_lr_ratio={config.min_lr_ratio}")
    for name in ("train_file", "eval_file"):
        path = getattr(config, name)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{name} {str(path)!r} does not exist; give the path of a JSON-lines file "
                                    "of {\"prompt\": ..., \"answer\": ...}, or leave it out for the date task")
    if config.fused and config.method == "full":
        raise ValueError("fused runs the LoRA and QLoRA step (method qlora or lora); full fine-tuning keeps the "
                         "unfused path: set fused=false")
    if config.resume and config.output_dir is None:
        raise ValueError("resume needs output_dir: the directory whose latest checkpoint to continue from")
    if config.optimizer == "adamw" and config.output_dir is not None:
        raise ValueError("optimizer 'adamw' (torch's) keeps a state that these checkpoints do not save: with output_dir "
                         "use 'adamw_8bit' or 'paged_adamw_8bit', or leave output_dir unset")


PYTHON_LITERALS = {"True": "true", "False": "false", "None": "null"}


def parse_overrides(pairs: list) -> dict:
    """["steps=20", "method=lora", "double_quant=False"] -> {"steps": 20, "method": "lora", "double_quant": False}.

    A value is read as JSON (Python's True, False and None as JSON's true, false and null), else kept as text;
    a text setting (TEXT_SETTINGS: a name, a path) keeps the text, so output_dir=2024 is the directory "2024".
    Types are checked by check_config, as for a config file: "gradient_checkpointing=maybe" is refused there.
    """
    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        try:
            value = json.loads(PYTHON_LITERALS.get(text, text))
        except (json.JSONDecodeError, RecursionError):
            value = text
        values[key] = text if key in TEXT_SETTINGS and value is not None and not isinstance(value, str) else value
    return values
