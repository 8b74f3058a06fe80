"""Lesson 10's runs across processes: what each rank does, importable so that run_on_cpus can start it.

    results = run_on_cpus(lesson_run, 2)      # in a notebook: 2 fresh processes joined by gloo

`gather_timeline` follows the 4-bit bytes one rank holds through a training step of a small sharded model;
`train_losses` runs the course's fine-tuning under FSDP2 for a few steps.
"""

import warnings

import torch

from .adapters import prepare_model
from .distributed import decoder_layers, init_distributed, shard_qlora_model
from .llama import LlamaConfig, LlamaForCausalLM
from .sharded_4bit import ShardableQLoRALinear, Weight4bit
from .train import TrainConfig, setup, sharded_train_step

# The course's model and task, as lesson 8 fine-tunes them, small enough for a few steps on a laptop. Plain
# absmax: the course's 128 x 128 projections are one nested block each and would not cut in two.
LESSON_SETTINGS = dict(method="qlora", double_quant=False, optimizer="adamw_8bit", steps=20, warmup_steps=1,
                       batch_size=8, n_train=64, n_eval=8, progress=False, r=16, alpha=32)


def tiny_qlora_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 4-layer Llama of width 256 with QLoRA on every linear (NF4, double quantization): each 256 x 256 weight
    is 4 nested blocks of 256 x 64 values, so it cuts into 2 or 4 whole shards."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    prepare_model(model, r=8, alpha=16, quantize=True)
    return model


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` that hold memory now (a freed one has 0)."""
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    return sum(nbytes for _, nbytes in storages)


def gather_timeline(rank: int, world_size: int) -> dict:
    """One forward and backward of tiny_qlora_llama sharded over the ranks, and at every QLoRA layer's forward and
    backward the bytes of whole 4-bit weights this rank holds at that moment (FSDP2's gathered buffers).

    Returns {"events": [(pass, layer name, or model.layers.<i>.done after a decoder layer's forward, gathered bytes)], "shard_bytes": the 4-bit bytes this rank keeps
    throughout, "whole_bytes": the whole model's, "after": gathered bytes once the step is done}."""
    mesh = init_distributed("cpu")
    model = shard_qlora_model(tiny_qlora_llama(), mesh)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ShardableQLoRALinear)}
    gathered = {}  # layer name -> the streams FSDP2 gathers it into (the same buffers at every gather)

    def capture(block, *_):  # a decoder layer's forward: FSDP2 has just gathered its 4-bit weights
        for name, layer in layers.items():
            if isinstance(layer.weight, Weight4bit):
                gathered.setdefault(name, layer.weight.streams())

    events = []

    def record(phase, name):
        def hook(*_):
            events.append((phase, name, _storage_bytes(t for s in gathered.values() for t in s)))
        return hook

    for index, block in enumerate(decoder_layers(model)):
        block.register_forward_pre_hook(capture)
        # runs after FSDP2's own post-forward hook (registered first), which has freed the layer by then
        block.register_forward_hook(record("forward", f"model.layers.{index}.done"))
    for name, layer in layers.items():
        layer.register_forward_pre_hook(record("forward", name))
        layer.register_full_backward_pre_hook(record("backward", name))
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(rank))
    with warnings.catch_warnings():  # layer 0's inputs need no gradient (frozen embeddings): torch says so, rightly
        warnings.filterwarnings("ignore", "Full backward hook is firing")
        model(ids, labels=ids).loss.backward()
    shards = [layer.weight.to_local() for layer in layers.values()]
    return {"events": events, "after": _storage_bytes(t for s in gathered.values() for t in s),
            "shard_bytes": sum(t.nbytes for w in shards for t in w.streams()),
            "whole_bytes": sum(t.nbytes for s in gathered.values() for t in s)}


def train_losses(rank: int, world_size: int, steps: int = 3) -> dict:
    """`steps` steps of the trainer (qlora_ref.train) under FSDP2 with LESSON_SETTINGS: the losses, and the bytes of
    8-bit optimizer state and adapters this rank keeps."""
    run = setup(TrainConfig(**LESSON_SETTINGS))
    losses = [sharded_train_step(run) for _ in range(steps)]
    state = sum(t.nbytes for s in run.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"losses": losses, "optimizer_bytes": state,
            "adapter_bytes": sum(p.to_local().nbytes for p in run.trainable)}


def lesson_run(rank: int, world_size: int) -> dict:
    """Both, in one start of the processes (each fresh process spends seconds importing torch)."""
    return {"timeline": gather_timeline(rank, world_size), "training": train_losses(rank, world_size)}
