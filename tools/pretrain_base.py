"""Pretrain the course's base model (models/base/) on the shipped docstring corpus; seeded and deterministic.

    python tools/pretrain_base.py                    # the shipped base: CPU, one thread, about 11 minutes
    python tools/pretrain_base.py --device cuda      # same recipe on a GPU (other bytes: other kernels)

One thread by default: on a 2-core machine that others share, two threads ran a step 4x slower than
one (each thread waits for the other at every operation). The model is 4 layers of hidden size 128
(0.89M parameters, 3.5 MB in float32); 800 steps of 32 x 128 ids are about 2.4 passes over the train
split (held-out perplexity 3.98). More steps overfit this small corpus: on a GPU, 10,000 steps of
128 x 128 ids ended at a held-out perplexity of 10.9, so a GPU buys no better base here, only a faster one.

Recipe: windows of --seq-len ids drawn at seeded random offsets from the train split's id stream
(qlora_ref.tasks.corpus_ids), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices only), linear warm-up
then cosine decay to a tenth of --lr, gradient norm clipped at 1. On a CPU with the same torch, thread
count and seed, two runs write the same bytes (torch.use_deterministic_algorithms is on).

Writes config.json + model.safetensors (qlora_ref.llama's HF layout, float32) and provenance.json: the
command, seconds, device, torch version, corpus and file checksums, final train loss, and the held-out
perplexity on the whole held-out split and on the fixed slice that tests/test_base_model.py recomputes.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qlora_ref.course_files import base_model_dir, data_dir  # noqa: E402
from qlora_ref.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from qlora_ref.tasks import (BOS_ID, CORPUS_FILES, EOS_ID, PAD_ID, VOCAB_SIZE, corpus_ids,  # noqa: E402
                             load_corpus, perplexity)

# The slice of the held-out split that tests/test_base_model.py evaluates (kept small: a few seconds).
TEST_SLICE = {"start": 0, "tokens": 16384, "seq_len": 128, "batch_size": 32}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unigram_perplexity(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """exp of the held-out cross-entropy of add-one-smoothed train byte frequencies (the no-context baseline)."""
    counts = torch.bincount(train, minlength=VOCAB_SIZE).double() + 1
    log_p = (counts / counts.sum()).log()
    return math.exp(-log_p[heldout].mean().item())


def learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    if args.device == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(args.threads)
    else:  # cuBLAS is deterministic only with a fixed workspace; some attention backwards have no such mode
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_positions,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = LlamaForCausalLM(config).to(args.device)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    train_ids, heldout_ids = corpus_ids("train"), corpus_ids("heldout")
    generator = torch.Generator().manual_seed(args.seed)
    offsets_range = train_ids.numel() - args.seq_len
    losses, start = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        offsets = torch.randint(0, offsets_range, (args.batch_size,), generator=generator)
        batch = torch.stack([train_ids[o:o + args.seq_len] for o in offsets.tolist()]).to(args.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {learning_rate(step, args):.2e}  "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    seconds = time.perf_counter() - start
    model.to("cpu").eval()
    heldout_ppl = perplexity(model, heldout_ids, seq_len=TEST_SLICE["seq_len"])
    piece = heldout_ids[TEST_SLICE["start"]:TEST_SLICE["start"] + TEST_SLICE["tokens"]]
    slice_ppl = perplexity(model, piece, seq_len=TEST_SLICE["seq_len"], batch_size=TEST_SLICE["batch_size"])
    print(f"held-out perplexity {heldout_ppl:.4f} (test slice {slice_ppl:.4f}), {seconds:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    last = losses[-min(50, len(losses)):]
    return {
        "what": "the course's pretrained base model (qlora_ref.llama.LlamaForCausalLM, HF LlamaForCausalLM layout)",
        "command": shlex.join(["python", "tools/pretrain_base.py", *sys.argv[1:]]),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "threads": torch.get_num_threads() if args.device == "cpu" else None,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "seconds": round(seconds, 1), "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len, "lr": args.lr, "warmup": args.warmup,
        "seed": args.seed, "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_loss_last_50_steps": round(sum(last) / len(last), 4),
        "heldout_perplexity": round(heldout_ppl, 4),
        "heldout_tokens": heldout_ids.numel(),
        "heldout_slice": {**TEST_SLICE, "perplexity": round(slice_ppl, 4)},
        "unigram_heldout_perplexity": round(unigram_perplexity(train_ids, heldout_ids), 4),
        "uniform_perplexity": VOCAB_SIZE,
        "corpus": {split: {"file": name, "file_sha256": sha256((data_dir() / name).read_bytes()),
                           "text_sha256": sha256(load_corpus(split).encode("ascii"))}
                   for split, name in CORPUS_FILES.items()},
        "model_safetensors_sha256": sha256((args.out / "model.safetensors").read_bytes()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the bytes may depend on it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=base_model_dir())
    args = parser.parse_args()
    provenance = train(args)
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


if __name__ == "__main__":
    main()
