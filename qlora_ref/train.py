"""Lesson 8: QLoRA fine-tuning end to end, as a library function and a command.

    python -m qlora_ref.train --config configs/date_qlora.json [--set steps=20 output_dir=runs/try]

    result = train(TrainConfig(method="qlora", steps=150))   # the course's model on the date task, on a CPU
    result.evals[-1]                                          # {"step": 150, "eval_loss": ..., "exact_match": ...}

What one optimizer step does (`train_step`), for micro-batches b_1..b_k (k = grad_accum) of the training set:

    lr(s)  = lr * (s + 1) / warmup_steps                                         for s < warmup_steps
           = lr * (m + (1 - m) * (1 + cos(pi * (s - warmup) / (steps - warmup))) / 2)   after (m = min_lr_ratio)
    g      = sum_j grad( loss(b_j) / k )            loss: mean -log p(answer token | everything before it)
    g      = g * min(1, max_grad_norm / ||g||)      gradient clipping over all trainable parameters
    theta  = AdamW(theta, g, lr(s))                 the paged 8-bit AdamW of lesson 7 by default

method "qlora": the base's linear layers become QLoRALinear (NF4 + double quantization, frozen) with LoRA
adapters A, B (float32) on every linear layer but the output head; "lora": the same adapters over the
unquantized base; "full": every parameter trains (float32 master weights, autocast in a 16-bit dtype).
Activations are recomputed in the backward pass (gradient checkpointing) unless it is turned off.

Batches are a pure function of (seed, step): batch i is the i-th slice of a permutation of the training set
drawn for its epoch from torch.Generator().manual_seed(seed + epoch). So a checkpoint needs only the step,
the trainable weights, the optimizer's state and the RNG state (dropout) to resume exactly: a run stopped
and resumed computes the same losses, bit for bit, as one that never stopped, at the same number of torch
threads. (CPU kernels split their sums by thread, so at another count float32 sums round differently and the
losses agree only to float32 rounding: trainer_state.json records torch.get_num_threads(), and a resume at
another count warns.)

Checkpoints (qlora_ref.checkpoints) are saved whole and resumed exactly, never losing work or accepting garbage.
A NaN or Inf loss stops the run (NonFiniteLossError; the command exits 1) before anything of that step is saved.

Under torchrun (`torchrun --nproc-per-node N -m qlora_ref.train ...`, lesson 10) the same run is spread over N
processes by qlora_ref.distributed: FSDP2 shards the model, each rank computes its slice of every batch, and the
checkpoints are sharded (torch.distributed.checkpoint) beside the gathered PEFT adapters.

model "base" is the course's pretrained model (models/base, byte tokenizer). Any other value is a Hugging Face
model id or local directory, loaded with transformers' AutoModelForCausalLM and AutoTokenizer (an optional
extra): the same code fine-tunes it (on a Colab T4: dtype "auto" picks float16 and a gradient scaler).
"""

import argparse
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .adapters import merge_adapters, prepare_model, writable_directory
from .checkpoints import latest_checkpoint, resume_latest, save_checkpoint
from .distributed import launched_by_torchrun, shard_qlora_model, start_data_parallel
from .llama import LlamaForCausalLM
from .memory import PeakMemory, tensor_bytes
from .optim8bit import AdamW8bit, optimizer_state_bytes, predicted_state_bytes
from .paging import PagedAdamW8bit
from .tasks import BYTES, HFTokenizer, collate, date_task, exact_match, generate_answers, load_examples
from .train_config import DTYPES, TrainConfig, check_config, parse_overrides


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> list:
    """The index-th batch: slice index of the epoch's permutation (an epoch drops its last partial batch)."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size ({batch_size}) is larger than the training set ({n} examples)")
    epoch, position = divmod(index, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def resolve_device_and_dtype(config: TrainConfig) -> tuple:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asks for CUDA but torch sees no GPU; use device 'auto' or 'cpu'")
    if config.dtype == "auto":
        if device.type != "cuda":
            return device, torch.float32
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    dtype = DTYPES[config.dtype]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16 (a T4 is sm_75): set dtype "
                         "'float16' or 'auto'")
    return device, dtype


def load_model(config: TrainConfig, device, dtype):
    """(model, tokenizer): the course's base with the byte tokenizer, or a transformers model and its tokenizer."""
    weights_dtype = torch.float32 if config.method == "full" else dtype
    if config.model == "base":
        return LlamaForCausalLM.from_pretrained().to(device, weights_dtype), BYTES
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ImportError(f"model {config.model!r} is a Hugging Face model, which needs transformers: "
                          "pip install transformers (or set model 'base')") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype=weights_dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except OSError as error:
        raise FileNotFoundError(f"model {config.model!r} is not 'base', a model directory, or a Hugging Face model "
                                f"id that transformers could fetch ({str(error).splitlines()[0]})") from None
    model.config.use_cache = False  # no KV cache in training; generate() turns it on by itself
    return model, HFTokenizer(tokenizer)


def context_length(model) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


@dataclass
class Run:
    """A set-up run: what train_step needs, and where the run stands."""

    config: TrainConfig
    model: nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    train_examples: list
    eval_examples: list
    device: torch.device
    dtype: torch.dtype
    scaler: Optional[torch.amp.GradScaler] = None
    step: int = 0
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    data_parallel: Optional[object] = None  # lesson 10: qlora_ref.distributed.DataParallel under torchrun

    @property
    def trainable(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def autocast(self):
        """Full fine-tuning keeps float32 weights and computes in the 16-bit dtype; LoRA layers need nothing."""
        if self.config.method == "full" and self.dtype != torch.float32:
            return torch.autocast(self.device.type, dtype=self.dtype)
        return nullcontext()


def make_optimizer(config: TrainConfig, named_params: list, device) -> torch.optim.Optimizer:
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in named_params], **kwargs)
    if config.optimizer == "adamw_8bit":
        return AdamW8bit(named_params, **kwargs)
    if device.type == "cuda":
        return PagedAdamW8bit(named_params, paging="managed", **kwargs)
    # A CPU has no unified memory: the pager pages the states through a simulated device that holds them all.
    budget = predicted_state_bytes([p for _, p in named_params])
    return PagedAdamW8bit(named_params, paging="pager", budget_bytes=budget, **kwargs)


def setup(config: TrainConfig) -> Run:
    """Check the config, load the model, put LoRA (or QLoRA) in, build the data and the optimizer."""
    check_config(config)
    device, dtype = resolve_device_and_dtype(config)
    data_parallel = start_data_parallel(config, device, dtype) if launched_by_torchrun() else None  # lesson 10
    if config.train_file is None or config.eval_file is None:
        date_train, date_eval = date_task(config.n_train, config.n_eval, seed=0)  # one fixed split of the dates
    train_examples = date_train if config.train_file is None else load_examples(config.train_file)
    eval_examples = date_eval if config.eval_file is None else load_examples(config.eval_file)
    torch.manual_seed(config.seed)  # LoRA's A initialisation, then dropout
    model, tokenizer = load_model(config, device, dtype)
    longest = max(len(tokenizer.encode(e.prompt)) + len(tokenizer.encode(e.answer, bos=False, eos=True)) + 1
                  for e in train_examples + eval_examples)
    context = context_length(model)
    if context is not None and longest > context:
        raise ValueError(f"the longest example needs {longest} positions (prompt + answer + end) but the model's "
                         f"context is {context} (max_position_embeddings): shorten the examples or use a model "
                         "with a longer context")
    if config.method == "full":
        model.requires_grad_(True)
    else:
        prepare_model(model, config.r, config.alpha, config.dropout, config.target_modules,
                      quantize=config.method == "qlora", compute_dtype=dtype, blocksize=config.blocksize,
                      quant_type=config.quant_type, double_quant=config.double_quant)
    if config.gradient_checkpointing:
        if isinstance(model, LlamaForCausalLM):
            model.gradient_checkpointing_enable()
        elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the lock's)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # its name before, as Colab's transformers may still have it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.fused:
        if data_parallel:
            raise ValueError("fused is not wired to FSDP2 here: under torchrun set fused=false")
        if not isinstance(model, LlamaForCausalLM):
            raise ValueError(f"fused runs qlora_ref.llama's model; {config.model!r} loads a {type(model).__name__} "
                             "(transformers keeps its own kernels): set fused=false")
        model.fused_kernels_enable()
    model.train()
    if data_parallel:
        shard_qlora_model(model, data_parallel.mesh)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = data_parallel.make_optimizer(config, named) if data_parallel else make_optimizer(config, named, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return Run(config, model, tokenizer, optimizer, train_examples, eval_examples, device, dtype, scaler,
               data_parallel=data_parallel)


def train_step(run: Run) -> float:
    """One optimizer step (see the module docstring); returns the mean loss of its micro-batches."""
    config = run.config
    lr = learning_rate(config, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(config.grad_accum):
        index = run.step * config.grad_accum + micro
        batch = collate([run.train_examples[i] for i in
                         batch_indices(len(run.train_examples), config.batch_size, config.seed, index)], run.tokenizer)
        with run.autocast():
            loss = run.model(input_ids=batch["input_ids"].to(run.device), labels=batch["labels"].to(run.device)).loss
        scaled = loss / config.grad_accum
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        total += loss.item()
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if config.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    if run.scaler:
        run.scaler.step(run.optimizer)  # skipped when the fp16 gradients overflowed; the scale then shrinks
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.losses.append(total / config.grad_accum)
    return run.losses[-1]


def sharded_train_step(run: Run) -> float:
    """train_step of one rank under torchrun (lesson 10): each micro-batch is cut into the ranks' slices
    (DataParallel.part) and this rank's loss weighted by its share of the answer tokens, so that FSDP2's average of
    the ranks' gradients is the whole batch's gradient (DataParallel.weight_loss); it returns the whole batch's loss.
    The rest is train_step's: the schedule, accumulation, clipping (over DTensors: the whole gradient's norm)."""
    config, data_parallel = run.config, run.data_parallel
    lr = learning_rate(config, run.step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(config.grad_accum):
        index = run.step * config.grad_accum + micro
        indices = data_parallel.part(batch_indices(len(run.train_examples), config.batch_size, config.seed, index))
        batch = collate([run.train_examples[i] for i in indices], run.tokenizer)
        loss = run.model(input_ids=batch["input_ids"].to(run.device), labels=batch["labels"].to(run.device)).loss
        weighted, reported = data_parallel.weight_loss(loss, batch["labels"])
        (weighted / config.grad_accum).backward()
        total += reported
    if config.max_grad_norm > 0:
        nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.losses.append(total / config.grad_accum)
    return run.losses[-1]


@torch.no_grad()
def evaluate(run: Run, batch_size: int = 64) -> dict:
    """Loss per answer token on the eval set, and exact match of the greedy answers."""
    model, was_training = run.model, run.model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(run.eval_examples), batch_size):
        batch = collate(run.eval_examples[start:start + batch_size], run.tokenizer)
        count = int((batch["labels"][:, 1:] != -100).sum())
        with run.autocast():
            loss = model(input_ids=batch["input_ids"].to(run.device), labels=batch["labels"].to(run.device)).loss
        loss_sum += loss.item() * count
        tokens += count
    model.train(was_training)
    with run.autocast():
        score = exact_match(model, run.eval_examples, tokenizer=run.tokenizer)
    return {"step": run.step, "eval_loss": loss_sum / tokens, "exact_match": score}


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf: the run stopped at that step and saved nothing from it."""


def _diverged(run: Run, loss: float) -> str:
    config = run.config
    kept = latest_checkpoint(config.output_dir) if config.output_dir else None
    return (f"step {run.step}: the training loss is {loss}; training diverged (lr {config.lr:g} too high? "
            + ("no gradient clipping, max_grad_norm is 0" if config.max_grad_norm == 0 else
               f"max_grad_norm {config.max_grad_norm:g}") + "). The run stopped without saving this step; "
            + (f"its last checkpoint, {kept}, is kept" if kept else "it wrote no checkpoint")
            + ": start again with a lower lr")


@dataclass
class TrainResult:
    """A finished (or stopped) run: the model with its adapters, and what was measured on the way."""

    run: Run
    seconds: float
    samples: list  # (prompt, model's answer, expected answer)
    checkpoint: Optional[Path]

    @property
    def model(self) -> nn.Module:
        return self.run.model

    @property
    def losses(self) -> list:
        return self.run.losses

    @property
    def evals(self) -> list:
        return self.run.evals


def train(config: TrainConfig, stop_after: Optional[int] = None) -> TrainResult:
    """Fine-tune as the config says; stop_after=k ends the run after step k (as if it were interrupted there).

    Everything that can be checked is checked before the first step: the settings, and that output_dir is a
    directory that takes files (a run that could not save would otherwise train to the end and lose it all)."""
    check_config(config)
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"stop_after must be None or an int >= 0, got {stop_after!r}")
    existing = latest_checkpoint(config.output_dir) if config.output_dir else None
    if existing is not None and not config.resume:
        raise ValueError(f"output_dir {config.output_dir!r} already holds {existing.name}: set resume=true to "
                         "continue that run, or choose a new output_dir")
    if config.output_dir:
        writable_directory(config.output_dir, "output_dir")
    run = setup(config)
    if config.resume:
        resume_latest(run, config.output_dir)
    last = config.steps if stop_after is None else min(stop_after, config.steps)
    checkpoint = None
    start = time.perf_counter()
    shown_here = config.progress and (run.data_parallel is None or run.data_parallel.rank == 0)  # one bar, rank 0's
    with tqdm(total=config.steps, initial=run.step, disable=not shown_here, desc=config.method,
              file=sys.stderr, dynamic_ncols=True) as bar:
        while run.step < last:
            loss = (sharded_train_step if run.data_parallel else train_step)(run)
            if not math.isfinite(loss):
                raise NonFiniteLossError(_diverged(run, loss))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate(config, run.step - 1):.2e}")
            if run.step == config.steps or (config.eval_every and run.step % config.eval_every == 0):
                run.evals.append(evaluate(run))
                if shown_here:
                    bar.write(f"step {run.step}: eval loss {run.evals[-1]['eval_loss']:.4f}, "
                              f"exact match {run.evals[-1]['exact_match']:.3f}")
            if config.output_dir and (run.step == last or (config.save_every and run.step % config.save_every == 0)):
                checkpoint = save_checkpoint(run, config.output_dir)
    seconds = time.perf_counter() - start
    shown = run.eval_examples[:config.samples]
    with run.autocast():
        answers = generate_answers(run.model, [e.prompt for e in shown], 32, tokenizer=run.tokenizer) if shown else []
    samples = [(e.prompt, a, e.answer) for e, a in zip(shown, answers)]
    return TrainResult(run, seconds, samples, checkpoint)


def step_memory(config: TrainConfig, steps: int = 2) -> dict:
    """Measured bytes of a run: the model before training, and the peak over `steps` training steps.

        weights          every parameter and buffer of the set-up model (packed 4-bit codes for QLoRA)
        trainable        the parameters the optimizer updates
        optimizer_state  the optimizer's state after the steps
        peak             the most bytes alive at once during the steps, the model included
    On a GPU, peak is torch.cuda.max_memory_allocated; on a CPU, qlora_ref.memory.PeakMemory measures it.
    """
    run = setup(config)
    weights = tensor_bytes(run.model)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
        for _ in range(steps):
            train_step(run)
        peak = torch.cuda.max_memory_allocated(run.device)
    else:
        with PeakMemory(run.device.type, baseline=weights) as memory:
            for _ in range(steps):
                train_step(run)
        peak = memory.peak
    return {"weights": weights, "trainable": tensor_bytes(run.trainable),
            "optimizer_state": optimizer_state_bytes(run.optimizer), "peak": peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_ref.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a JSON file of TrainConfig settings (defaults for the rest)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings that override the file")
    parser.add_argument("--merge", action="store_true",
                        help="after training, merge the adapters into the weights and save the model to output_dir/merged")
    args = parser.parse_args(argv)
    try:
        values = asdict(TrainConfig.from_file(args.config)) if args.config else {}
        config = TrainConfig.from_dict({**values, **parse_overrides(args.set)})
        if args.merge and launched_by_torchrun():
            raise ValueError("--merge needs the whole model on one process: under torchrun, merge afterwards from the "
                             "saved adapters (load_adapters, then merge_adapters) in a single process")
        result = train(config)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():  # lesson 10: leave the process group before torchrun's exit
            torch.distributed.destroy_process_group()
    if result.run.data_parallel and result.run.data_parallel.rank != 0:
        return 0  # rank 0 reports for all
    final = result.evals[-1]
    print(f"{config.method}: {result.run.step} steps in {result.seconds:.1f} s, loss {result.losses[-1]:.4f}, "
          f"eval loss {final['eval_loss']:.4f}, exact match {final['exact_match']:.3f}")
    for prompt, answer, expected in result.samples:
        print(f"  {prompt!r} -> {answer!r} (expected {expected!r})")
    if result.checkpoint:
        print(f"checkpoint: {result.checkpoint}")
    if args.merge and config.method != "full":
        merge_adapters(result.model)
        score = exact_match(result.model, result.run.eval_examples, tokenizer=result.run.tokenizer)
        print(f"merged: exact match {score:.3f}")
        if config.output_dir:
            result.model.save_pretrained(Path(config.output_dir) / "merged")
            print(f"merged model: {Path(config.output_dir) / 'merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
