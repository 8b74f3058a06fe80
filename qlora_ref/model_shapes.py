"""Lessons 8-10: a Llama-family model's shape, and its parameters counted exactly from it.

The shape is a preset (PRESETS) or any Llama-family config.json (from_hf_config). With V = vocab_size,
d = hidden_size, f = intermediate_size, L layers, H heads and K key/value heads of d_h = head_dim numbers each:

    per layer   q_proj d x H d_h, k_proj and v_proj d x K d_h, o_proj H d_h x d,
                gate_proj and up_proj d x f, down_proj f x d, two RMSNorm weights of d
    the rest    embeddings V x d, lm_head V x d (none when tied to the embeddings), a final norm of d

Llama-2-7B: 32 layers of 4096 x 4096 (q, k, v, o) and 4096 x 11008 (gate, up, down), embeddings and head of
32000 x 4096: 6,738,415,616 parameters.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .adapters import read_json_object
from .methods import LORA_TARGETS
from .validation import check_positive_int

__all__ = ["PRESETS", "ModelShape", "from_hf_config", "resolve_model"]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's shape: everything the budget needs from a config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
            check_positive_int(getattr(self, f), f)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    def linear_shapes(self) -> dict:
        """{name: (in_features, out_features)} of the seven linears of one decoder layer (LORA_TARGETS' order)."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return dict(zip(LORA_TARGETS, ((d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d))))

    def parameter_counts(self) -> dict:
        """Parameters by kind: linear (the layers' seven linears), embeddings, lm_head, norms."""
        d, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        return {"linear": L * sum(i * o for i, o in self.linear_shapes().values()), "embeddings": V * d,
                "lm_head": 0 if self.tie_word_embeddings else V * d, "norms": (2 * L + 1) * d}

    @property
    def parameter_count(self) -> int:
        return sum(self.parameter_counts().values())

    def parameter_tensors(self) -> list:
        """Element counts of every parameter tensor, in model order (the optimizer keeps state per tensor)."""
        V, d, L = self.vocab_size, self.hidden_size, self.num_hidden_layers
        layer = [i * o for i, o in self.linear_shapes().values()] + [d, d]
        return [V * d] + layer * L + [d] + ([] if self.tie_word_embeddings else [V * d])


PRESETS = {
    "Llama-2-7B": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, name="Llama-2-7B"),
    "Llama-2-13B": ModelShape(32000, 5120, 13824, 40, 40, 40, 128, name="Llama-2-13B"),
    "Llama-2-70B": ModelShape(32000, 8192, 28672, 80, 64, 8, 128, name="Llama-2-70B"),
    "Llama-3-8B": ModelShape(128256, 4096, 14336, 32, 32, 8, 128, name="Llama-3-8B"),
    "Llama-3-70B": ModelShape(128256, 8192, 28672, 80, 64, 8, 128, name="Llama-3-70B"),
}

_LLAMA_LIKE = ("llama", "mistral")  # the same tensors; other families add biases or other blocks


def from_hf_config(path_or_dict, name: Optional[str] = None) -> ModelShape:
    """The ModelShape of a Hugging Face config.json (a path to the file or its folder, or the dict).

    Defaults are transformers' LlamaConfig's: num_key_value_heads = num_attention_heads,
    head_dim = hidden_size / num_attention_heads, tie_word_embeddings = False.
    """
    if isinstance(path_or_dict, dict):
        config, source = path_or_dict, "the config"
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (give a config.json, its folder, or a dict)")
        config, source = read_json_object(path, "the model config"), str(path)
    model_type = config.get("model_type")
    if model_type not in _LLAMA_LIKE:
        raise ValueError(f"{source} has model_type {model_type!r}; this estimator models the Llama layout "
                         f"({', '.join(_LLAMA_LIKE)})")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source} sets {flag}; the estimator models Llama's linears without biases")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {missing}: the parameter count needs them")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is None:
        check_positive_int(hidden, "hidden_size")
        check_positive_int(heads, "num_attention_heads")
        if hidden % heads:
            raise ValueError(f"{source} has no head_dim and hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads}")
        head_dim = hidden // heads
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
    kv_heads = config.get("num_key_value_heads")
    try:
        return ModelShape(config["vocab_size"], hidden, config["intermediate_size"], config["num_hidden_layers"],
                          heads, heads if kv_heads is None else kv_heads, head_dim, tied,
                          name or config.get("_name_or_path") or "custom")
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def resolve_model(model) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    if isinstance(model, (dict, Path)) or (isinstance(model, str) and Path(model).exists()):
        return from_hf_config(model)
    raise ValueError(f"model must be one of the presets {list(PRESETS)}, a ModelShape, a config.json "
                     f"dict or path; got {model!r}")
