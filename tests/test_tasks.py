"""qlora_ref.tasks: the byte tokenizer, the shipped corpus, perplexity, and the date task with its scorer."""

import math
from datetime import date
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlora_ref.llama import LlamaConfig, LlamaForCausalLM
from qlora_ref.tasks import (BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, Example, collate, corpus_ids, date_example,
                             date_task, decode, encode, exact_match, generate_answers, greedy_correct, load_corpus,
                             perplexity)


def tiny_model(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64, pad_token_id=PAD_ID, eos_token_id=EOS_ID)
    return LlamaForCausalLM(LlamaConfig(**{**config, **overrides})).eval()


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_encode_decode_round_trip(text):
    ids = encode(text, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert decode(ids) == text


def test_decode_stops_at_eos_drops_specials_and_replaces_broken_utf8():
    assert decode([BOS_ID, 104, 105, EOS_ID, 106]) == "hi"
    assert decode(torch.tensor([104, PAD_ID, 105, PAD_ID])) == "hi"
    assert decode([0xC3]) == "\ufffd"  # the first byte of a two-byte character, alone
    assert encode("é", bos=False) == [0xC3, 0xA9]


def test_tokenizer_bad_input():
    with pytest.raises(TypeError, match="takes a str"):
        encode(b"bytes")
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        decode([65, 259])


def test_corpus_splits_are_ascii_prose_and_share_no_paragraph():
    train, heldout = load_corpus("train"), load_corpus("heldout")
    assert train.isascii() and heldout.isascii()
    train_lines, heldout_lines = train.splitlines(), heldout.splitlines()
    assert len(train_lines) > 5000 and len(heldout_lines) > 500
    assert not set(train_lines) & set(heldout_lines)
    ids = corpus_ids("heldout")
    assert int((ids == BOS_ID).sum()) == int((ids == EOS_ID).sum()) == len(heldout_lines)
    assert ids[0] == BOS_ID and decode(ids[1:]) == heldout_lines[0]
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("test")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: p = 1/259 for every id
    assert perplexity(model, corpus_ids("heldout")[:1000], seq_len=50) == pytest.approx(VOCAB_SIZE, rel=1e-5)


def test_perplexity_is_exp_of_the_model_loss_window_by_window():
    model = tiny_model(seed=1)
    ids = torch.randint(0, VOCAB_SIZE, (3 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    windows = ids[:120].view(3, 40)
    expected = math.exp(model(windows, labels=windows).loss.item())
    assert perplexity(model, ids, seq_len=40, batch_size=2) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least seq_len=40"):
        perplexity(model, ids[:39], seq_len=40)


def test_date_example_is_year_month_abbreviation_day():
    assert date_example(date(1969, 7, 20)) == Example("date 1969-07-20 =", " 1969 Jul 20")
    names = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    for day in (date(1900, 1, 1), date(2000, 2, 29), date(2099, 12, 31), date(1955, 5, 9), date(2024, 9, 30)):
        assert date_example(day).answer == f" {day.year} {names[day.month - 1]} {day.day:02d}"


def test_date_task_is_seeded_and_eval_dates_are_never_trained_on():
    train, evaluation = date_task(n_train=3000, n_eval=500, seed=7)
    assert (train, evaluation) == date_task(n_train=3000, n_eval=500, seed=7)
    assert train != date_task(n_train=3000, n_eval=500, seed=8)[0]
    assert len(train) == 3000 and len(evaluation) == 500
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    assert len({e.prompt for e in train}) == 3000
    for e in train[:50] + evaluation[:50]:
        day = date.fromisoformat(e.prompt.removeprefix("date ").removesuffix(" ="))
        assert date(1900, 1, 1) <= day <= date(2099, 12, 31) and e == date_example(day)
    with pytest.raises(ValueError, match="n_eval must be an int >= 0"):
        date_task(n_eval=-1)
    with pytest.raises(ValueError, match="distinct dates"):
        date_task(n_train=80_000)


def test_collate_masks_everything_but_the_answer_and_its_eos():
    examples = [Example("ab", " xyz"), Example("a longer prompt", "!"), Example("q", "")]
    batch = collate(examples)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (3, 1 + len("a longer prompt") + 1 + 1)
    for row, e in enumerate(examples):
        start, end = 1 + len(e.prompt), 1 + len(e.prompt) + len(e.answer) + 1
        assert ids[row, :end].tolist() == encode(e.prompt) + encode(e.answer, bos=False, eos=True)
        assert (ids[row, end:] == PAD_ID).all()
        assert labels[row, start:end].tolist() == ids[row, start:end].tolist()
        assert (labels[row, :start] == -100).all() and (labels[row, end:] == -100).all()
    with pytest.raises(ValueError, match="at least one example"):
        collate([])


def test_generate_answers_in_batches_equals_one_prompt_at_a_time():
    model = tiny_model(seed=3)
    prompts = ["date 1969-07-20 =", "abc", "date 2001-01-01 =", "xy", "abd"]
    batched = generate_answers(model, prompts, max_new_tokens=6, batch_size=2)
    alone = [generate_answers(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(a, str) for a in batched)


class Oracle(nn.Module):
    """A next-token rule over the prefix, standing in for a model that learned the task.

    The next token after prompt + partial answer is the answer's next byte, then EOS; for prompts in
    `wrong` the answer ends in "?", for prompts in `endless` the answer runs on in "x" instead of ending.
    forward() gives logits whose argmax is that token at every position; generate() applies the rule
    token by token. Both score with the same rule, so greedy decoding and teacher forcing must agree.
    """

    def __init__(self, examples, wrong=(), endless=()):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.table = {e.prompt: e.answer for e in examples}
        self.wrong, self.endless = set(wrong), set(endless)

    def next_token(self, prefix: list) -> int:
        text = bytes(i for i in prefix if i < 256).decode("utf-8", errors="replace")
        for prompt, answer in self.table.items():
            if text.startswith(prompt):
                answer = answer + ("?" if prompt in self.wrong else "")
                written = text[len(prompt):]
                if prompt in self.endless and len(written) >= len(answer):
                    return ord("x")
                return ord(answer[len(written)]) if len(written) < len(answer) else EOS_ID
        return ord("?")

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, VOCAB_SIZE)
        for b, row in enumerate(input_ids.tolist()):
            for i in range(len(row)):
                logits[b, i, self.next_token(row[:i + 1])] = 1.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, max_new_tokens, eos_token_id):
        rows = []
        for row in input_ids.tolist():
            for _ in range(max_new_tokens):
                row.append(PAD_ID if eos_token_id in row[1:] else self.next_token(row))
            rows.append(row)
        return torch.tensor(rows)


def test_exact_match_counts_answers_that_are_exactly_right():
    _, examples = date_task(n_train=0, n_eval=20, seed=1)
    assert exact_match(Oracle(examples), examples) == 1.0
    wrong = [examples[0].prompt, examples[5].prompt]
    assert exact_match(Oracle(examples, wrong=wrong), examples) == pytest.approx(18 / 20)
    assert exact_match(Oracle(examples, endless=[examples[3].prompt]), examples) == pytest.approx(19 / 20)
    with pytest.raises(ValueError, match="at least one example"):
        exact_match(Oracle(examples), [])


def test_teacher_forced_score_agrees_with_greedy_generation():
    """greedy_correct (one forward pass) against generate_answers (token by token), example by example."""
    examples = date_task(n_train=0, n_eval=12, seed=2)[1] + [Example("q", ""), Example("a longer prompt", "!")]
    oracle = Oracle(examples, wrong=[examples[1].prompt, examples[12].prompt], endless=[examples[4].prompt])
    generated = generate_answers(oracle, [e.prompt for e in examples], max_new_tokens=14, batch_size=5)
    expected = [g == e.answer for g, e in zip(generated, examples)]
    assert greedy_correct(oracle, examples, batch_size=5) == expected
    assert expected.count(False) == 3
