"""The shipped base model (models/base/): its bytes, the corpus it was made from, and how well it predicts text."""

import hashlib
import json
import math

import pytest
import torch

from qlora_ref.course_files import base_model_dir
from qlora_ref.llama import LlamaForCausalLM
from qlora_ref.tasks import VOCAB_SIZE, corpus_ids, date_task, exact_match, load_corpus, perplexity

# Written by tools/pretrain_base.py into models/base/provenance.json; repeated here so that a new base
# is a visible change to this test, not a silent one.
BASE_SHA256 = "253185c306fbfe49946145337088bcd6ae734ba24211366612acea96d681101c"
PROVENANCE = json.loads((base_model_dir() / "provenance.json").read_text())
SLICE = PROVENANCE["heldout_slice"]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(base_model_dir()).eval()


@pytest.fixture(scope="module")
def heldout_slice() -> torch.Tensor:
    return corpus_ids("heldout")[SLICE["start"]:SLICE["start"] + SLICE["tokens"]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_the_shipped_file_is_the_recorded_one():
    data = (base_model_dir() / "model.safetensors").read_bytes()
    assert len(data) <= 20 * 2**20
    assert sha256(data) == BASE_SHA256 == PROVENANCE["model_safetensors_sha256"]


def test_the_corpus_is_the_one_the_base_was_trained_on():
    for split, recorded in PROVENANCE["corpus"].items():
        assert sha256(load_corpus(split).encode("ascii")) == recorded["text_sha256"], split


def test_heldout_perplexity_is_the_recorded_one_and_far_below_the_baselines(base, heldout_slice):
    assert heldout_slice.numel() == SLICE["tokens"]
    ppl = perplexity(base, heldout_slice, seq_len=SLICE["seq_len"], batch_size=SLICE["batch_size"])
    # Same weights, same float32 operations; only the order in which a CPU's matrix kernels add up
    # (AVX2 vs AVX-512, thread count) can differ, which moves the perplexity by about 1e-6 relative.
    assert ppl == pytest.approx(SLICE["perplexity"], rel=1e-4)
    # Baselines computed here: uniform over the 259 ids, and add-one-smoothed byte frequencies of the
    # train split (a unigram model, which knows which bytes are common but sees no context).
    counts = torch.bincount(corpus_ids("train"), minlength=VOCAB_SIZE).double() + 1
    unigram = math.exp(-(counts / counts.sum()).log()[heldout_slice[1:]].mean().item())
    assert 15 < unigram < VOCAB_SIZE
    assert ppl < unigram / 4


def test_the_base_model_cannot_rewrite_dates(base):
    _, evaluation = date_task(n_train=0, n_eval=64, seed=0)
    assert exact_match(base, evaluation) <= 0.05


def test_transformers_reads_the_shipped_model(base, heldout_slice):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(base_model_dir()).eval()
    ids = heldout_slice[:4 * 128].view(4, 128)
    with torch.no_grad():  # the same float32 operations (see tests/test_llama.py)
        torch.testing.assert_close(hf(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
