"""Lesson 6: putting LoRA into a model, taking it out again, and saving adapters the way PEFT does.

    summary = prepare_model(model, r=16, alpha=32, dropout=0.05, target_modules="all-linear", quantize=True)
    print(summary)                       # trainable params: ... || all params: ... || trainable%: ...
    ... train ...
    save_adapters(model, "out/")         # adapter_config.json + adapter_model.safetensors, PEFT's layout
    load_adapters(other_prepared_model, "out/")
    merge_adapters(model)                # back to plain nn.Linear layers: W0^ + (alpha/r) B A

Saved files follow PEFT's LoRA format, so `peft.PeftModel.from_pretrained(base_model, "out/")` loads
them: tensor names `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and a config with
peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, bias "none". safetensors only: nothing is
ever pickled, and both files are written to a temporary file first and moved into place (os.replace).
Loading checks everything before it copies anything: a damaged file or a setting these layers do not
implement (PEFT's alpha_pattern, rank_pattern, layers_to_transform, modules_to_save) is named, with its file.
"""

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .lora import LoRALinear, QLoRALinear, check_lora_hyperparameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name for the wrapped model inside PeftModel
ALL_LINEAR = "all-linear"
LORA_LAYERS = (LoRALinear, QLoRALinear)
# PEFT settings that change what is loaded; these layers have one r and one lora_alpha and adapt every targeted layer.
PEFT_OPTIONS_NOT_IMPLEMENTED = {"alpha_pattern": "a lora_alpha per layer", "rank_pattern": "an r per layer",
                                "layers_to_transform": "adapters on some layers only",
                                "modules_to_save": "whole modules trained beside the adapters"}


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts after prepare_model. A quantized base weight counts as its out*in weights."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # PEFT's print_trainable_parameters format
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """Count trainable and total parameters; each QLoRALinear adds the out*in weights it stores as codes."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QLoRALinear))
    return TrainableSummary(trainable=trainable, total=total)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}")


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _output_embedding_names(model: nn.Module) -> set:
    """The modules "all-linear" leaves alone: the output head (get_output_embeddings(), else `lm_head`)."""
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    names = set()
    for name, module in model.named_modules():
        if (head is not None and module is head) or name == "lm_head" or name.endswith(".lm_head"):
            names.add(name)
    return names


def find_target_modules(model: nn.Module, target_modules: Union[str, Sequence[str]]) -> list:
    """Names of the nn.Linear modules that target_modules selects, in model order.

    target_modules: "all-linear" (every nn.Linear except the output head, as PEFT), or a list of name
    suffixes matched on whole dotted parts ("q_proj" matches "model.layers.0.self_attn.q_proj").
    Every suffix must match at least one module; a match that is not an nn.Linear is an error.
    """
    check_target_modules(target_modules)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if isinstance(target_modules, str):
        excluded = _output_embedding_names(model)
        return [n for n in linear_names if n not in excluded]
    targets = list(target_modules)
    modules = dict(model.named_modules())
    existing = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            raise ValueError(f"target module {target!r} matches no module of the model; "
                             f"its nn.Linear layers are named {existing}")
        not_linear = [n for n in hits if not isinstance(modules[n], nn.Linear)]
        if not_linear:
            raise TypeError(f"target module {target!r} matches {not_linear[0]!r}, a "
                            f"{type(modules[not_linear[0]]).__name__}; only nn.Linear layers can take LoRA here")
    return [n for n in linear_names if any(_matches(n, t) for t in targets)]


def check_target_modules(target_modules) -> None:
    """Raise unless target_modules is "all-linear" or a non-empty list (tuple, set) of module names."""
    if isinstance(target_modules, str):
        if target_modules.lower() != ALL_LINEAR:
            raise ValueError(f"target_modules must be {ALL_LINEAR!r} or a list of module names, got {target_modules!r}")
        return
    if (not isinstance(target_modules, (list, tuple, set, frozenset)) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def prepare_model(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                  target_modules: Union[str, Sequence[str]] = ALL_LINEAR, quantize: bool = False,
                  compute_dtype: Optional[torch.dtype] = None, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True, adapter_dtype: torch.dtype = torch.float32) -> TrainableSummary:
    """Replace the targeted nn.Linear layers by LoRALinear (quantize=False) or QLoRALinear (True), in place.

    Every other parameter is frozen: afterwards only lora_A and lora_B train. Returns the summary
    (print it). The settings are remembered on the model (`model._lora_settings`) for save_adapters.
    """
    _check_model(model)
    check_lora_hyperparameters(r, alpha, dropout)
    if any(isinstance(m, LORA_LAYERS) for m in model.modules()):
        raise ValueError("this model already has LoRA layers (prepare_model was called on it before)")
    names = find_target_modules(model, target_modules)
    if not names:
        raise ValueError("target_modules selects no nn.Linear layer of this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if quantize:
            layer = QLoRALinear(base, r, alpha, dropout, compute_dtype=compute_dtype, blocksize=blocksize,
                                quant_type=quant_type, double_quant=double_quant, adapter_dtype=adapter_dtype)
        else:
            layer = LoRALinear(base, r, alpha, dropout, adapter_dtype=adapter_dtype)
        _set_module(model, name, layer)
    saved_targets = sorted(names) if isinstance(target_modules, str) else list(target_modules)
    model._lora_settings = {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout),
                         "target_modules": saved_targets}
    return trainable_summary(model)


def lora_layers(model: nn.Module) -> dict:
    """{module path: LoRALinear or QLoRALinear} of a prepared model."""
    _check_model(model)
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear with weight W0^ + (alpha/r) B A; returns the model.

    The sum is formed in float32 and stored in the base's dtype (the compute dtype for QLoRA, whose W0^
    is the dequantized base). The bias is copied. The new layers are frozen like the rest of the base.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to merge (call prepare_model first)")
    for name, layer in layers.items():
        with torch.no_grad():
            base = layer.base_weight()
            weight = (base.float() + layer.delta_weight().to(base.device)).to(base.dtype)
            merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=base.device, dtype=base.dtype)
            merged.weight.copy_(weight)
            if layer.bias is not None:
                merged.bias.copy_(layer.bias)
        merged.requires_grad_(False)
        _set_module(model, name, merged)
    if hasattr(model, "_lora_settings"):
        del model._lora_settings
    return model


def atomic_write(path: Path, data: bytes) -> None:
    """Write data to a temporary file beside path, fsync it, then os.replace: readers see the old file or
    the new one, never half of one (a run killed mid-save leaves its last checkpoint intact)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600 files; saved models are for others to read too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def writable_directory(path, what: str) -> Path:
    """Make `path` a directory (parents too) and check, by writing a temporary file in it, that it takes files:
    a run learns that it cannot save before its first step, not after its last. `what` names it in errors."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise NotADirectoryError(f"{what} {str(path)!r} cannot be a directory: {str(blocker)!r} is a file; "
                                 "give the path of a directory (it is made if missing)") from None
    except OSError as error:
        raise PermissionError(f"{what} {str(path)!r} is not writable ({error.strerror}): give a directory you can "
                              "write to") from None
    return path


def read_json_object(path, what: str) -> dict:
    """The JSON object in file `path`; a missing file, bad JSON or another kind of value raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} {path} nests JSON too deeply to be read") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {path} must hold a JSON object {{...}}, got a {type(value).__name__}")
    return value


def read_safetensors(path) -> dict:
    """{name: tensor} of a safetensors file; a missing, empty or cut-short file raises naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): it was never written or was emptied")
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a whole safetensors file ({error}): it was cut short or is not "
                         "safetensors") from None


def adapter_state_dict(model: nn.Module) -> dict:
    """{PEFT name: tensor} of the adapters: base_model.model.<path>.lora_A.weight and .lora_B.weight.

    Sharded adapters (FSDP2's DTensors, lesson 10) are all-gathered whole: every rank must call this."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            weight = getattr(layer, part).weight.detach()
            weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
            tensors[f"{PREFIX}{name}.{part}.weight"] = weight.to("cpu").contiguous()
    return tensors


def save_adapters(model: nn.Module, directory, base_model_name_or_path: Optional[str] = None,
                  task_type: Optional[str] = "CAUSAL_LM", tensors: Optional[dict] = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's LoRA layout) into `directory`.

    tensors: adapter_state_dict(model) if already gathered (a sharded run gathers on every rank, writes on one)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save (call prepare_model first)")
    settings = {(l.r, l.alpha, l.dropout_p) for l in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"the LoRA layers disagree on (r, alpha, dropout): {sorted(settings)}; "
                         "one adapter_config.json can describe only one setting")
    ((r, alpha, dropout),) = settings
    targets = getattr(model, "_lora_settings", {}).get("target_modules") or sorted(layers)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    directory = writable_directory(directory, "the adapters' directory")
    tensors = adapter_state_dict(model) if tensors is None else tensors
    atomic_write(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return directory


def load_adapters(model: nn.Module, directory) -> nn.Module:
    """Load adapters saved by save_adapters (or by PEFT's save_pretrained) into a prepared model.

    The model must already have LoRA layers at the saved paths with the saved shapes and the saved
    alpha/r; every layer gets its A and B from the file. Mismatches raise before anything is copied.
    """
    return assign_adapters(model, read_adapters(model, directory))


@torch.no_grad()
def assign_adapters(model: nn.Module, tensors: dict) -> nn.Module:
    """Copy {PEFT name: tensor} (from read_adapters, which checked them) into the model's LoRA layers."""
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            param = getattr(layer, part).weight
            param.copy_(tensors[f"{PREFIX}{name}.{part}.weight"].to(device=param.device, dtype=param.dtype))
    return model


def read_adapters(model: nn.Module, directory) -> dict:
    """{PEFT name: tensor} of the adapters in `directory`, checked against the model's LoRA layers (names,
    shapes, alpha/r, finite values) and its config against what these layers implement; nothing is copied."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (save_adapters writes {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = read_json_object(config_path, "the adapter config")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters load here")
    for flag in ("use_rslora", "use_dora"):
        if config.get(flag):
            raise ValueError(f"{config_path}: {flag} is set; these layers implement plain LoRA only")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: bias is {config['bias']!r}; only bias 'none' is supported")
    for key, meaning in PEFT_OPTIONS_NOT_IMPLEMENTED.items():
        if config.get(key):
            raise ValueError(f"{config_path}: {key} is {config[key]!r} ({meaning}), which these layers do not "
                             "implement: loading it here would be wrong; load it with PEFT "
                             "(peft.PeftModel.from_pretrained)")
    missing_keys = [key for key in ("r", "lora_alpha") if key not in config]
    if missing_keys:
        raise ValueError(f"{config_path} lacks {' and '.join(missing_keys)}: the scale alpha/r needs both")
    r, alpha = config["r"], config["lora_alpha"]
    try:
        check_lora_hyperparameters(r, alpha, 0.0)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_path}: r = {r!r}, lora_alpha = {alpha!r}: {error}") from None
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: call prepare_model (same targets and r) before load_adapters")
    tensors = read_safetensors(weights_path)
    expected = set(adapter_state_dict_names(layers))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if unexpected:
        raise ValueError(f"{weights_path} has tensors for modules this model has no LoRA layer at, "
                         f"e.g. {unexpected[:3]}; the model's LoRA layers are {sorted(layers)[:5]}...")
    if missing:
        raise ValueError(f"{weights_path} lacks adapters for {missing[:3]} (the model was prepared with "
                         "more target modules than the adapter was saved with)")
    for name, layer in layers.items():
        if not math.isclose(alpha / r, layer.scaling, rel_tol=1e-12):
            raise ValueError(f"{name}: the adapter was saved with lora_alpha/r = {alpha}/{r} "
                             f"but the layer has alpha/r = {layer.alpha}/{layer.r}")
        for part in ("lora_A", "lora_B"):
            key = f"{PREFIX}{name}.{part}.weight"
            tensor, param = tensors[key], getattr(layer, part).weight
            if tensor.shape != param.shape:
                raise ValueError(f"{name}.{part}: the saved adapter has shape {tuple(tensor.shape)} but the "
                                 f"model's layer has shape {tuple(param.shape)}")
            if not tensor.is_floating_point():
                raise ValueError(f"{weights_path}: {key} is {tensor.dtype}; adapters are floating point")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{weights_path}: {key} holds NaN or Inf: the adapter is damaged (or was trained "
                                 "into NaN)")
    return tensors


def adapter_state_dict_names(layers: dict) -> list:
    return [f"{PREFIX}{name}.{part}.weight" for name in layers for part in ("lora_A", "lora_B")]
