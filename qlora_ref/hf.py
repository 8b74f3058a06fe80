"""A small Hugging Face model directory made offline, for lesson 8's "any Hugging Face model" path.

`qlora_ref.train` loads any model id or directory with transformers' AutoModelForCausalLM and AutoTokenizer.
Without a network, there is still a real directory to load: `make_local_model` writes a randomly
initialised transformers LlamaForCausalLM (from a config) and a byte-level BPE tokenizer trained on a few
texts, with the files from_pretrained reads (config.json, model.safetensors, tokenizer.json, ...).
A model from it learns nothing useful before fine-tuning, but it runs the same code as a 0.5B model from
the Hub, which is what the tests and the lesson need.
"""

from pathlib import Path
from typing import Sequence

import torch


def make_local_model(directory, texts: Sequence[str], hidden_size: int = 64, layers: int = 2,
                     max_position_embeddings: int = 128, vocab_size: int = 320, seed: int = 0) -> Path:
    """Write a random transformers LlamaForCausalLM and its tokenizer (BPE trained on texts) to directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=max_position_embeddings,
                         pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    directory = Path(directory)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
