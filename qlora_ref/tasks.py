"""Lesson 8: the text side of fine-tuning: a byte tokenizer, the pretraining corpus, and a task to teach.

Tokenizer: a token is a byte (ids 0-255) or one of three specials, PAD 256, BOS 257, EOS 258, so any
text encodes and decodes without a vocabulary file: encode(s) = [BOS] + list(s.encode("utf-8")).

Corpus: English prose from the docstrings of CPython's standard library (PSF License 2.0), shipped in
data/ as a train and a held-out split (data/README.md says how it was extracted). A paragraph is
[BOS] + bytes + [EOS]; the splits are the concatenations of their paragraphs.

Perplexity of ids x_1..x_N under the model: exp( -(1/M) sum log p(x_i | x_<i) ) over the M predicted
positions, computed window by window (each window starts afresh, so its first token is not predicted).

The fine-tuning task: rewrite an ISO date with the month's abbreviation, prompt "date 1969-07-20 =",
answer " 1969 Jul 20" (strftime's "%Y %b %d" in English). It takes copying digits from fixed places
and a 12-way lookup (07 -> Jul). The base model cannot do it (it continues with prose: accuracy 0);
100-150 steps of LoRA, QLoRA or full fine-tuning (batches of 32) teach it. Dates are drawn without
repeats from 1900-01-01..2099-12-31 (seeded), so the eval dates are never trained on.

Training sequences are [BOS] prompt answer [EOS]; the labels copy the ids on the answer and its EOS
and are -100 elsewhere, so the loss is -log p(answer | prompt) per answer token. Score: exact match
of the greedy continuation (up to the first EOS) with the answer, which one teacher-forced forward pass
decides (greedy_correct).

The functions that turn examples into ids take a `tokenizer`: BYTES (the byte tokenizer above) for the
course's model, or HFTokenizer(AutoTokenizer.from_pretrained(...)) for a Hugging Face model, whose
prompt and answer are tokenized separately and joined the same way.
"""

import gzip
import json
import math
import random
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import course_files

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
VOCAB_SIZE = 259
CORPUS_FILES = {"train": "stdlib_docstrings.train.txt.gz", "heldout": "stdlib_docstrings.heldout.txt.gz"}


def encode(text: str, bos: bool = True, eos: bool = False) -> list:
    """[BOS] + the UTF-8 bytes of text (+ [EOS])."""
    if not isinstance(text, str):
        raise TypeError(f"encode takes a str, got {type(text).__name__}")
    return [BOS_ID] * bos + list(text.encode("utf-8")) + [EOS_ID] * eos


def decode(ids) -> str:
    """The text of the byte ids, up to the first EOS; PAD and BOS are dropped, broken UTF-8 becomes U+FFFD."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if any(not 0 <= i < VOCAB_SIZE for i in ids):
        raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got {min(ids)}..{max(ids)}")
    if EOS_ID in ids:
        ids = ids[:ids.index(EOS_ID)]
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class ByteTokenizer:
    """The course model's tokenizer as an object (encode/decode above), for code that takes any tokenizer."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        return encode(text, bos, eos)

    def decode(self, ids) -> str:
        return decode(ids)

    def generate_kwargs(self, ids: torch.Tensor) -> dict:
        return {"eos_token_id": EOS_ID}


BYTES = ByteTokenizer()


class HFTokenizer:
    """A Hugging Face tokenizer behind ByteTokenizer's interface.

    encode(text, bos, eos) = [bos_token_id if it has one] + tokenizer(text, add_special_tokens=False)
    + [eos_token_id]; the pad id is the tokenizer's, else its EOS (many causal LMs define no pad token).
    """

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no eos_token: answers could not end")
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.bos_id] * (bos and self.bos_id is not None) + list(ids) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_kwargs(self, ids: torch.Tensor) -> dict:
        # transformers' generate: greedy, with an explicit mask and pad id (the rows are never padded)
        return {"eos_token_id": self.eos_id, "pad_token_id": self.pad_id, "do_sample": False,
                "attention_mask": torch.ones_like(ids)}


def load_corpus(split: str, data_dir=None) -> str:
    """The text of a split ("train" or "heldout"): one paragraph a line, from data_dir (default: data/)."""
    if split not in CORPUS_FILES:
        raise ValueError(f"split must be one of {sorted(CORPUS_FILES)}, got {split!r}")
    path = (course_files.data_dir() if data_dir is None else Path(data_dir)) / CORPUS_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the corpus ships in the repository's data/ folder")
    with gzip.open(path, "rt", encoding="ascii") as f:
        return f.read()


def corpus_ids(split: str, data_dir=None) -> torch.Tensor:
    """The split as one long tensor of ids: [BOS] + bytes + [EOS] for every paragraph, in order."""
    ids = [i for line in load_corpus(split, data_dir).splitlines() for i in encode(line, eos=True)]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 128, batch_size: int = 32) -> float:
    """exp(mean negative log-likelihood) of ids cut into windows of seq_len (a short last window is dropped)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < seq_len:
        raise ValueError(f"ids must be a 1-D tensor of at least seq_len={seq_len} ids, "
                         f"got {tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    device = next(model.parameters()).device
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len).to(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(batch).logits[:, :-1].float()
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


@dataclass(frozen=True)
class Example:
    """One task item: the model sees [BOS] + prompt and should continue with answer + [EOS]."""

    prompt: str
    answer: str


def load_examples(path) -> list:
    """Examples from a JSON-lines file, one {"prompt": str, "answer": str} object a line."""
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in ("prompt", "answer")):
            raise ValueError(f"{path}, line {number}: expected {{\"prompt\": str, \"answer\": str}}, got {line[:80]!r}")
        examples.append(Example(item["prompt"], item["answer"]))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


FIRST_DAY, LAST_DAY = date(1900, 1, 1), date(2099, 12, 31)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # not the locale's


def date_example(day: date) -> Example:
    """ISO date in, "%Y %b %d" out: date(1969, 7, 20) -> Example("date 1969-07-20 =", " 1969 Jul 20")."""
    return Example(prompt=f"date {day.isoformat()} =",
                   answer=f" {day.year:04d} {MONTHS[day.month - 1]} {day.day:02d}")


def date_task(n_train: int = 4000, n_eval: int = 200, seed: int = 0):
    """(train, eval) lists of Examples for n_train + n_eval distinct dates drawn with random.Random(seed)."""
    span = LAST_DAY.toordinal() - FIRST_DAY.toordinal() + 1
    for name, n in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if n_train + n_eval > span:
        raise ValueError(f"n_train + n_eval = {n_train + n_eval} but there are only {span} distinct dates")
    days = random.Random(seed).sample(range(FIRST_DAY.toordinal(), LAST_DAY.toordinal() + 1), n_train + n_eval)
    examples = [date_example(date.fromordinal(d)) for d in days]
    return examples[:n_train], examples[n_train:]


def collate(examples: Sequence[Example], tokenizer=BYTES) -> dict:
    """{"input_ids", "labels"} [batch, longest]: [BOS] prompt answer [EOS], padded on the right with PAD.

    labels = input_ids on the answer and its EOS, -100 on BOS, the prompt and the padding (the model
    shifts them: the logits at position i are scored against labels[i + 1]).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    rows = [(tokenizer.encode(e.prompt), tokenizer.encode(e.answer, bos=False, eos=True)) for e in examples]
    length = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        input_ids[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    return {"input_ids": input_ids, "labels": labels}


@torch.no_grad()
def generate_answers(model: nn.Module, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256,
                     tokenizer=BYTES) -> list:
    """Greedy continuations of the prompts, decoded up to the first EOS (prompts of one length share a batch)."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    by_length = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    answers = [None] * len(prompts)
    was_training = model.training
    model.eval()
    for length, indices in by_length.items():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            out = model.generate(ids, max_new_tokens=max_new_tokens, **tokenizer.generate_kwargs(ids))
            for i, row in zip(chunk, out[:, length:]):
                answers[i] = tokenizer.decode(row)
    model.train(was_training)
    return answers


@torch.no_grad()
def greedy_correct(model: nn.Module, examples: Sequence[Example], batch_size: int = 256, tokenizer=BYTES) -> list:
    """For each example, whether greedy decoding from its prompt gives exactly answer + [EOS].

    One forward pass over [BOS] prompt answer [EOS] instead of generating token by token: greedy decoding
    reproduces the answer and stops iff at every answer position (and the EOS) the argmax of the logits,
    given the correct tokens before it, is the correct next token. By induction on the answer's tokens, the
    generated prefix is then always the correct one, so the two tests agree (tests/test_train.py checks it).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], tokenizer)
        logits = model(batch["input_ids"].to(device)).logits[:, :-1]
        targets = batch["labels"][:, 1:].to(device)
        hits = (logits.argmax(-1) == targets) | (targets == -100)
        correct += hits.all(dim=1).tolist()
    model.train(was_training)
    return correct


def exact_match(model: nn.Module, examples: Sequence[Example], batch_size: int = 256, tokenizer=BYTES) -> float:
    """Fraction of examples whose greedy answer is exactly right (greedy_correct)."""
    if not examples:
        raise ValueError("exact_match needs at least one example")
    correct = greedy_correct(model, examples, batch_size, tokenizer)
    return sum(correct) / len(correct)
