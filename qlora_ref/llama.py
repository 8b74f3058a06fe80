"""Lesson 8: a small LLaMA-style causal language model, saved and loaded in Hugging Face's format.

For token ids t_1..t_T (batch dimension left out), with d = hidden_size and d_h = head_dim = d / heads:

    h_0 = E[t]                                            E: embed_tokens [vocab, d]
    for each layer:
        h = h + o_proj( attention( rope(q_proj(n_1(h))), rope(k_proj(n_1(h))), v_proj(n_1(h)) ) )
        h = h + down_proj( silu(gate_proj(n_2(h))) * up_proj(n_2(h)) )         (SwiGLU)
    logits = lm_head( norm(h) )                           lm_head: E itself when tie_word_embeddings

    RMSNorm     n(x) = w * x / sqrt(mean(x^2) + eps)                       (over the last dimension)
    attention   softmax(Q K^T / sqrt(d_h) + causal mask) V, each head on its own; with grouped-query
                attention (num_key_value_heads < num_attention_heads) a K/V head serves heads/kv_heads
                query heads
    rope        position p turns each pair (x_i, x_{i+d_h/2}) of a head by the angle p * theta^(-2i/d_h):
                rope(x) = x * cos + rotate_half(x) * sin,  rotate_half(x) = (-x_2nd_half, x_1st_half)
    loss        mean over positions i with labels[i+1] != -100 of -log softmax(logits[i])[labels[i+1]]

Tensor and config names are those of transformers' LlamaForCausalLM (model.layers.0.self_attn.q_proj.weight,
...), so `save_pretrained` writes a directory that `transformers.LlamaForCausalLM.from_pretrained` loads,
and the other way round. Every projection is a plain nn.Linear without bias, which is what
`qlora_ref.prepare_model` replaces with LoRA or QLoRA layers.
"""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adapters import LORA_LAYERS, atomic_write
from .backend import is_capturing
from .course_files import base_model_dir

IGNORE_INDEX = -100  # labels with this value are not predicted (the prompt, the padding)


@dataclass
class LlamaConfig:
    """The architecture; field names and defaults follow transformers' LlamaConfig where it has them."""

    vocab_size: int = 259
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: as many as num_attention_heads (no grouping)
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be num_attention_heads "
                             f"({self.num_attention_heads}) times an even head_dim (rope turns pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads}): each K/V head serves a group")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_hf_dict(self, dtype: torch.dtype = torch.float32) -> dict:
        """config.json as transformers writes it (rope_theta also at the top level, for transformers 4)."""
        return {**asdict(self), "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "head_dim": self.head_dim, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                "attention_dropout": 0.0, "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
                "dtype": str(dtype).removeprefix("torch.")}

    @classmethod
    def from_hf_dict(cls, config: dict) -> "LlamaConfig":
        """Read a transformers config.json dict; refuse what this model does not implement."""
        if config.get("model_type") != "llama":
            raise ValueError(f"model_type is {config.get('model_type')!r}; only 'llama' configs load here")
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
        unsupported = {"hidden_act": ("silu", config.get("hidden_act", "silu")),
                       "attention_bias": (False, config.get("attention_bias", False)),
                       "mlp_bias": (False, config.get("mlp_bias", False)),
                       "rope type": ("default", rope.get("rope_type", "default")),
                       "rope_scaling": (None, config.get("rope_scaling"))}
        for name, (wanted, found) in unsupported.items():
            if found != wanted:
                raise ValueError(f"{name} is {found!r}; this model implements only {wanted!r}")
        known = {f.name for f in fields(cls)} - {"rope_theta"}
        ours = cls(**{k: v for k, v in config.items() if k in known}, rope_theta=float(rope["rope_theta"]))
        if config.get("head_dim", ours.head_dim) != ours.head_dim:
            raise ValueError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads = {ours.head_dim}")
        return ours


class RMSNorm(nn.Module):
    """n(x) = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back before the weight (as HF)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps
        self.fused = False  # LlamaForCausalLM.fused_kernels_enable: one Triton kernel each way

    def forward(self, x):
        if self.fused:
            from .kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None, dtype=torch.float32):
    """cos and sin [seq_len, head_dim] of the angles p * theta^(-2i/head_dim), each half repeated (HF's layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin: turns the pair (x_i, x_{i+d/2}) of every head by its angle."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped K/V heads."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        d, h_d = config.hidden_size, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, h_d
        self.q_proj = nn.Linear(d, self.heads * h_d, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * h_d, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * h_d, bias=False)
        self.o_proj = nn.Linear(self.heads * h_d, d, bias=False)
        self.fused = False  # LlamaForCausalLM.fused_kernels_enable: rotary embeddings of q and k in one Triton kernel

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, T, d_h]
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.fused:
            from .kernels.rope import rope_qk

            q, k = rope_qk(q, k, cos, sin)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.heads // self.kv_heads  # K/V head j serves query heads j*group .. (j+1)*group - 1
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(QK^T/sqrt(d_h) + mask) V
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), silu(z) = z * sigmoid(z)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused = False  # LlamaForCausalLM.fused_kernels_enable: silu(g) * u in one Triton kernel each way

    def forward(self, x):
        if self.fused:
            from .kernels.swiglu import swiglu

            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: h + attention(n_1(h)), then h + mlp(n_2(h))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The decoder stack without the output head (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _check_labels(labels, shape) -> None:
    if not isinstance(labels, torch.Tensor) or labels.shape != shape or labels.dtype != torch.long:
        found = (f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                 else type(labels).__name__)
        raise ValueError(f"labels must be a torch.long tensor of shape {tuple(shape)} (that of input_ids), got a {found}")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError("labels[:, 1:] is all -100: there is no position to compute a loss on")


class CausalLMOutput(NamedTuple):
    logits: Optional[torch.Tensor]  # [batch, seq, vocab]; None when the fused path computed the loss without them
    loss: Optional[torch.Tensor]  # None without labels


class LlamaForCausalLM(nn.Module):
    """The language model: `model(input_ids, labels=labels)` returns (logits, loss) like transformers."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.fused = False  # fused_kernels_enable: with labels, the loss without the whole logits
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):  # HF's init: N(0, initializer_range^2)
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def gradient_checkpointing_enable(self) -> None:
        """Keep only each layer's input in training; recompute the layer in the backward pass."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def fused_kernels_enable(self, on: bool = True) -> "LlamaForCausalLM":
        """The fused path (lesson 11), or back: every RMSNorm, rotary embedding (q and k together) and SwiGLU through one
        Triton kernel each way, and with labels the loss by qlora_ref.fused.linear_cross_entropy (the output's logits
        are then None)."""
        if on and type(self.lm_head) is not nn.Linear:
            raise TypeError(f"the fused loss reads lm_head.weight, but lm_head is a {type(self.lm_head).__name__}: "
                            "leave lm_head out of target_modules")
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP, LlamaForCausalLM)):
                module.fused = bool(on)
        return self

    def _check_ids(self, ids, name: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            found = (f"{ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor)
                     else type(ids).__name__)
            raise TypeError(f"{name} must be a [batch, seq] tensor of dtype torch.long, got a {found}")
        if ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{name} has {ids.shape[1]} positions but the model was built for at most "
                             f"max_position_embeddings={self.config.max_position_embeddings}: shorten the sequence")

    def check_inputs(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Raise unless input_ids is a [batch, seq] long tensor of token ids below vocab_size that fits the
        context, and labels (if given) has its shape with at least one position to predict. Reads values back
        from the GPU, so a CUDA graph being captured skips it (qlora_ref.cuda_graph checks each batch instead)."""
        self._check_ids(input_ids, "input_ids")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got values "
                             f"from {int(input_ids.min())} to {int(input_ids.max())}")
        if labels is not None:
            _check_labels(labels, input_ids.shape[:2])

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> CausalLMOutput:
        """Logits [batch, seq, vocab]; with labels (same shape, -100 = ignore), also the shifted mean loss."""
        capturing = is_capturing(input_ids)
        if capturing:
            self._check_ids(input_ids, "input_ids")  # shapes only: a graph being captured cannot read values back
        else:
            self.check_inputs(input_ids)  # the labels are checked by loss
        h = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(input_ids.shape[1], self.config.head_dim, self.config.rope_theta, h.device, h.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # A graph being captured cannot read the RNG state; CapturedStep refuses models that draw numbers.
                h = checkpoint(layer, h, cos, sin, use_reentrant=False, preserve_rng_state=not capturing)
            else:
                h = layer(h, cos, sin)
        h = self.model.norm(h)
        if self.fused and labels is not None:
            from .fused import linear_cross_entropy

            if not capturing:
                _check_labels(labels, input_ids.shape[:2])
            targets = labels[:, 1:].reshape(-1)
            return CausalLMOutput(None, linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), self.lm_head.weight,
                                                             targets, ignore_index=IGNORE_INDEX))
        logits = self.lm_head(h)
        return CausalLMOutput(logits, None if labels is None else self.loss(logits, labels))

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of logits[:, i] against labels[:, i+1] (float32), averaged over labels != -100."""
        if not is_capturing(labels):
            _check_labels(labels, logits.shape[:2])
        targets = labels[:, 1:]
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Append up to max_new_tokens tokens to every row of input_ids [batch, seq]; returns [batch, seq + n].

        temperature 0: greedy (argmax). temperature > 0: sample from softmax(logits / temperature).
        A row that has produced eos_token_id gets pad_token_id (else eos) from then on; generation stops
        when every row has. No KV cache: each step reruns the whole sequence (short sequences here).
        Dropout (LoRA's) is active in training mode: call model.eval() first for repeatable answers.
        """
        self._check_ids(input_ids, "input_ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature!r}")
        if input_ids.shape[1] + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(input_ids).logits[:, -1].float()
            if temperature == 0:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, pad), token)
                done = done | (token == eos_token_id)
            input_ids = torch.cat((input_ids, token[:, None]), dim=1)
            if bool(done.all()):
                break
        return input_ids

    def save_pretrained(self, directory) -> Path:
        """Write config.json and model.safetensors (HF names; a tied lm_head.weight is left out, as HF does)."""
        if any(isinstance(m, LORA_LAYERS) for m in self.modules()):
            raise ValueError("the model has LoRA layers, which a Llama checkpoint cannot hold: merge_adapters(model) "
                             "first, or save the adapters alone with save_adapters")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            del tensors["lm_head.weight"]
        dtype = self.model.embed_tokens.weight.dtype
        atomic_write(directory / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        config = json.dumps(self.config.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n"
        atomic_write(directory / "config.json", config.encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory=None) -> "LlamaForCausalLM":
        """Load a directory written by save_pretrained or by transformers (config.json + model.safetensors);
        by default the course's base model (models/base/)."""
        directory = base_model_dir() if directory is None else Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} does not exist (a saved model has config.json "
                                        "and model.safetensors)")
        config = LlamaConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
        tensors = load_file(str(directory / "model.safetensors"))
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
        model = cls(config)
        expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"{directory / 'model.safetensors'} does not fit the config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        model.to(tensors["model.embed_tokens.weight"].dtype)
        model.load_state_dict(tensors, strict=False)  # strict=False only for the tied lm_head.weight
        return model
