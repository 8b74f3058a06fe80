"""Lesson 10: QLoRA over several processes with FSDP2 (gloo on CPUs, NCCL on GPUs).

    results = run_on_cpus(fn, world_size=2, *args)      # fn(rank, world_size, *args) in each of 2 processes
    shard_qlora_model(model, mesh)                       # after prepare_model(..., quantize=True)

In order: the process group and a launcher for CPUs; sharding a prepared model, and each rank's share of a
batch; the 8-bit optimizer on shards; what the trainer calls under torchrun; sharded checkpoints.
"""

import json
import os
import pickle
import shutil
import socket
import traceback
from math import prod
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .adapters import adapter_state_dict, atomic_write, save_adapters
from .adamw_step import adamw8bit_update_, adamw_update_
from .backend import resolve_backend
from .optim8bit import AdamW8bit
from .optimizer_state import load_optimizer_state_tensors, optimizer_state_tensors
from .sharded_4bit import ShardableQLoRALinear, check_rows_shardable, make_shardable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of run_on_cpus)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str = "cpu"):
    """Join the process group that torchrun (or run_on_cpus) described in the environment; return a 1-D mesh.

    gloo for CPU processes, NCCL for GPUs (one GPU per process: LOCAL_RANK picks it). The mesh is made
    for `device_type` explicitly: FSDP2 on CPUs needs a CPU mesh, it would otherwise look for a GPU."""
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"the environment lacks {missing}: start the processes with torchrun "
                               "(torchrun --nproc-per-node N -m ...) or qlora_ref.distributed.run_on_cpus")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return init_device_mesh(device_type, (dist.get_world_size(),))


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or run_on_cpus): its rank and world size are in the environment."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _child(rank: int, world_size: int, port: int, fn, args, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # N processes on a few cores: more threads would only wait for each other
    try:
        init_distributed("cpu")
        # pickled here to bytes: a tensor put on the queue as it is would travel as a shared-memory handle, which
        # dies with this process before the parent reads it
        results.put((rank, pickle.dumps(fn(rank, world_size, *args)), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_cpus(fn, world_size: int, *args, start_method: str = "spawn") -> list:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined by gloo; return their results by rank.

    fn must be importable by name (a function of a module, not of a notebook or a test's body), and what it
    returns picklable. Each process has one torch thread. A failure in any process raises here with its
    traceback. start_method "fork" starts faster (no fresh import of torch) and is safe only from a process
    that has not started threads of its own (a plain script or test, not a notebook's kernel)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    results = mp.get_context(start_method).SimpleQueue()
    processes = mp.start_processes(_child, args=(world_size, free_port(), fn, args, results), nprocs=world_size,
                                   start_method=start_method, join=False)
    by_rank = {}

    def drain():  # read while the children run: a child blocks on a full pipe until its result is read
        while not results.empty():
            rank, value, error = results.get()
            if error:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
            by_rank[rank] = pickle.loads(value)

    while not processes.join(timeout=0.2):  # raises if a child died (with its traceback)
        drain()
    drain()
    return [by_rank[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------------------------
# Sharding a prepared model, and the data each rank sees
# ---------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList named `layers`: ours and transformers' Llama)."""
    stacks = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] == "layers"]
    if len(stacks) != 1:
        raise ValueError(f"expected one ModuleList named 'layers' (the decoder layers) in {type(model).__name__}, "
                         f"found {len(stacks)}: FSDP2 shards the model layer by layer")
    return stacks[0]


def shard_qlora_model(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 over a model prepared with QLoRA: each decoder layer one unit, the embeddings and the head one each
    (when untied), the rest (the final norm) the root.

    The QLoRALinear layers first become ShardableQLoRALinear (their 4-bit base one Weight4bit parameter), and
    every one is checked to cut into whole (nested) blocks over the mesh, so that a world size that does not
    fit stops here with the layer's name instead of inside FSDP2. Each unit's parameters (4-bit bases, adapters,
    norms) are all-gathered before its forward, freed after it, gathered again for its backward; the adapters'
    gradients are reduce-scattered (averaged over the ranks) into each rank's shard."""
    world_size = mesh.size()
    make_shardable(model)
    for name, layer in model.named_modules():
        if isinstance(layer, ShardableQLoRALinear):
            check_rows_shardable(layer.weight.shape, layer.blocksize, layer.double_quant, world_size, name)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        # units of their own, gathered only while they compute (the root's stay gathered from its forward to the
        # end of its backward: for a 70B model 1 GiB a GPU). Tied, their one parameter must stay in one unit.
        fully_shard(embeddings, mesh=mesh)
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class DataParallel:
    """This rank's place in the group: which examples of a batch it computes, and how its loss is weighted.

    Rank k of N takes the k-th of N equal slices of every batch. The loss of a batch is the mean over all its
    answer tokens, T = T_0 + ... + T_{N-1} of them; rank k computes the mean l_k over its own T_k. FSDP2
    averages the ranks' gradients (sums and divides by N), so rank k back-propagates

        N * (T_k / T) * l_k        whose average over the ranks is  sum_k T_k l_k / T,  the batch's mean loss,

    and the gradient equals the single process's up to the order of the float32 sums (each rank sums its own
    tokens, then the ranks are summed)."""

    def __init__(self, mesh):
        self.mesh, self.world_size, self.rank = mesh, mesh.size(), dist.get_rank()

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} does not divide over {self.world_size} processes: each rank "
                             f"computes batch_size / world_size examples; use a multiple of {self.world_size}")

    def part(self, indices: list) -> list:
        """This rank's slice of a batch's example indices."""
        self.check_batch_size(len(indices))
        share = len(indices) // self.world_size
        return indices[self.rank * share:(self.rank + 1) * share]

    def make_optimizer(self, config, named_params: list):
        """The trainer's optimizer over FSDP2's parameters: ShardedAdamW8bit, or torch's AdamW (which takes DTensors)."""
        kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
        if config.optimizer == "adamw":
            return torch.optim.AdamW([p for _, p in named_params], **kwargs)
        return ShardedAdamW8bit(named_params, **kwargs)

    def weight_loss(self, loss: torch.Tensor, labels: torch.Tensor) -> tuple:
        """(N T_k / T * loss, to back-propagate; the batch's mean loss over all ranks, a float, to report)."""
        mine = (labels[:, 1:] != -100).sum().to(loss.device, torch.float64)  # NCCL reduces GPU tensors only
        counts = torch.stack([mine, loss.detach().to(torch.float64) * mine])  # float64: exact for token counts
        dist.all_reduce(counts)
        total, loss_sum = counts.tolist()
        return loss * (self.world_size * mine.item() / total), loss_sum / total


# ---------------------------------------------------------------------------------------------------
# The 8-bit optimizer on shards
# ---------------------------------------------------------------------------------------------------


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedAdamW8bit(AdamW8bit):
    """AdamW8bit over FSDP2's parameters: each rank updates its own shard and keeps only that shard's moments.

    The parameters and gradients are DTensors; AdamW8bit's update is elementwise within blocks of 256 moments,
    so it runs unchanged on the local tensors (`to_local()`, which shares the shard's memory: the update writes
    into the parameter). What must follow the whole tensor and not the shard is the choice of 8-bit or float32
    moments (min_8bit_size counts the whole parameter's values, as on one process), and the blocks: a shard
    that starts on a multiple of 256 values has the single process's blocks, so its moments' bytes and its
    updates are those of one process given the same gradients (`shard_blocks_aligned` says whether they do).
    Not here: paging, the update inside backward, CUDA graphs (none of them is needed at a shard's size).
    """

    def _state_layout(self, p) -> dict:
        local = _local(p)
        if p.numel() >= self.min_8bit_size:  # the whole parameter's count, as one process would decide
            blocks = (-(-local.numel() // self.blocksize),)
            return {"state1": (local.shape, torch.uint8), "absmax1": (blocks, torch.float32),
                    "state2": (local.shape, torch.uint8), "absmax2": (blocks, torch.float32)}
        return {"state1": (local.shape, torch.float32), "state2": (local.shape, torch.float32)}

    def _update(self, p, group) -> None:
        param, grad = _local(p), _local(p.grad)
        state = self._state_for(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = (state["step"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        if "absmax1" not in state:
            adamw_update_(param, grad, state["state1"], state["state2"], *hyper)
        elif resolve_backend(self.backend, param) == "triton":
            from .kernels.adamw_8bit import adamw8bit_update_triton

            adamw8bit_update_triton(param, grad, state, *hyper, blocksize=self.blocksize)
        else:
            adamw8bit_update_(param, grad, state, *hyper, blocksize=self.blocksize)

    def step_in_backward(self):
        raise NotImplementedError("ShardedAdamW8bit updates after FSDP2 has reduce-scattered the gradients; "
                                  "the update inside backward is for one process")

    def shard_blocks_aligned(self) -> bool:
        """Whether every 8-bit shard starts on a block boundary of its whole parameter (see the class docstring)."""
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, DTensor) and p.numel() >= self.min_8bit_size:
                    rows = -(-p.shape[0] // p.device_mesh.size())  # torch.chunk's rows per rank
                    if (rows * prod(p.shape[1:])) % self.blocksize:
                        return False
        return True


# ---------------------------------------------------------------------------------------------------
# What the trainer (qlora_ref.train) calls under torchrun
# ---------------------------------------------------------------------------------------------------

SHARDABLE_METHODS = ("qlora", "lora")


def start_data_parallel(config, device, dtype) -> DataParallel:
    """Check that the run's settings can be sharded, join the process group, and return this rank's DataParallel.

    Refused with what to change: method "full" (its float32 master weights and autocast are not wired to FSDP2
    here), the paged optimizer (its pages follow whole tensors; a shard's moments are small: adamw_8bit), float16
    (its gradient scaler is not wired to FSDP2 here), a fixed GPU index (each process takes the GPU of its
    LOCAL_RANK), a batch that does not divide over the ranks."""
    if config.method not in SHARDABLE_METHODS:
        raise ValueError(f"method {config.method!r} does not run under torchrun here; FSDP2 shards methods "
                         f"{SHARDABLE_METHODS}")
    if config.optimizer == "paged_adamw_8bit":
        raise ValueError("optimizer 'paged_adamw_8bit' pages whole tensors and does not run on FSDP2's shards: under "
                         "torchrun set optimizer=adamw_8bit (each rank keeps only its shard's 8-bit moments)")
    if dtype == torch.float16:
        raise ValueError("float16 needs a gradient scaler, which the sharded step does not run: under torchrun use "
                         "dtype bfloat16 (Ampere or newer) or float32")
    if device.type == "cuda" and device.index is not None:
        raise ValueError(f"device {config.device!r} names one GPU, but under torchrun each process takes the GPU of "
                         "its LOCAL_RANK: set device 'auto' or 'cuda'")
    data_parallel = DataParallel(init_distributed(device.type))
    data_parallel.check_batch_size(config.batch_size)
    return data_parallel


# ---------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint for the shards, the PEFT files gathered beside them
# ---------------------------------------------------------------------------------------------------

SHARDED_DIR = "sharded"  # the torch.distributed.checkpoint folder inside checkpoint-<step>/


def _rank_prefix(kind: str, rank: int) -> str:
    return f"{kind}.rank{rank}."


def _sharded_state(run) -> dict:
    """What torch.distributed.checkpoint writes: the adapters as the DTensors they are (each rank writes its rows),
    and under names of this rank alone its optimizer state (8-bit moments of its shard) and its RNG state."""
    rank = run.data_parallel.rank
    state = {f"adapters.{n}": p.detach() for n, p in run.model.named_parameters() if p.requires_grad}
    for name, tensor in optimizer_state_tensors(run.optimizer).items():
        state[_rank_prefix("optimizer", rank) + name] = tensor
    rng = {"torch_cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(run.device)
    for name, tensor in rng.items():
        state[_rank_prefix("rng", rank) + name] = tensor
    return state


def save_sharded_checkpoint(run, final: Path, trainer_state: dict) -> Path:
    """checkpoint-<step>/ of a sharded run: sharded/ (torch.distributed.checkpoint, every rank writing its part),
    and from rank 0 the gathered adapters in PEFT's layout (adapter_config.json, adapter_model.safetensors: what
    load_adapters and peft load, on one process) and trainer_state.json with the world size.

    Written into .checkpoint-<step>.partial and renamed by rank 0 once every rank has written, so a run killed
    while saving leaves the previous checkpoint as the latest. sharded/.metadata is pickled by torch (the one
    pickle in a checkpoint); the files a single-process run reads are safetensors and JSON as before."""
    from torch.distributed import checkpoint as dcp

    rank = run.data_parallel.rank
    partial = final.parent / f".{final.name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving this step
        partial.mkdir(parents=True)
    dist.barrier()
    adapters = adapter_state_dict(run.model)  # all-gathered: every rank takes part
    dcp.save(_sharded_state(run), checkpoint_id=partial / SHARDED_DIR)
    if rank == 0:
        save_adapters(run.model, partial, base_model_name_or_path=run.config.model, tensors=adapters)
        trainer_state = {**trainer_state, "world_size": run.data_parallel.world_size}
        atomic_write(partial / "trainer_state.json", (json.dumps(trainer_state, indent=1) + "\n").encode())
        os.replace(partial, final)
    dist.barrier()
    return final


def load_sharded_checkpoint(run, checkpoint: Path, trainer_state: dict) -> None:
    """Restore a save_sharded_checkpoint into a freshly set-up sharded run with as many ranks as wrote it.

    Another world size is refused: the adapters would reshard (they are DTensors), but the 8-bit moments are
    quantized in blocks of each rank's shard, and cut differently they would not be the same numbers."""
    from torch.distributed import checkpoint as dcp

    dp = run.data_parallel
    saved = trainer_state.get("world_size")
    if saved != dp.world_size:
        raise ValueError(f"{checkpoint} was written by {saved or 'one'} process(es) and this run has {dp.world_size}: "
                         "its 8-bit optimizer moments are quantized per rank's shard and do not reshard exactly. "
                         f"Resume with torchrun --nproc-per-node {saved or 1}, or start a new run (its adapters, "
                         "adapter_model.safetensors, load anywhere)")
    reader = dcp.FileSystemReader(checkpoint / SHARDED_DIR)
    stored = reader.read_metadata().state_dict_metadata
    mine = [_rank_prefix("optimizer", dp.rank), _rank_prefix("rng", dp.rank)]
    state = {f"adapters.{n}": p.detach() for n, p in run.model.named_parameters() if p.requires_grad}
    missing = sorted(set(state) - set(stored))
    if missing:
        raise ValueError(f"{checkpoint / SHARDED_DIR} lacks {missing[:3]}: it is not a checkpoint of this model")
    for name, meta in stored.items():
        if any(name.startswith(p) for p in mine):
            state[name] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(state, storage_reader=reader)
    optimizer = {k[len(mine[0]):]: v for k, v in state.items() if k.startswith(mine[0])}
    optimizer = {k: v.to(run.device) if k.startswith("state.") else v for k, v in optimizer.items()}
    load_optimizer_state_tensors(run.optimizer, optimizer)
    torch.set_rng_state(state[mine[1] + "torch_cpu"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(state[mine[1] + "torch_cuda"], run.device)
    run.step, run.losses, run.evals = trainer_state["step"], trainer_state["losses"], trainer_state["evals"]
