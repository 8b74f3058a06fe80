"""A small Hugging Face model directory made offline, for lesson 8's "any Hugging Face model" path.

`qlora_ref.train` loads any model id or directory with transformers' AutoModelForCausalLM and AutoTokenizer.
Without a network, there is still a real directory to load: `make_local_model` writes a randomly
initialised transformers LlamaForCausalLM (from a config) and a byte-level BPE tokenizer trained on a few
texts, with the files from_pretrained reads (config.json, model.safetensors, tokenizer.json, ...).
A model from it learns nothing useful before fine-tuning, but it runs the same code as a 0.5B model from
the Hub, which is what the tests and the lesson need.
"""

from pathlib import Path
from typing import Optional, Sequence

import torch

from .model_shapes import ModelShape

# HuggingFaceTB/SmolLM2-360M (Apache 2.0): a Llama of 362M parameters, the shape of its config.json. A real model
# a Colab T4 fine-tunes with QLoRA in minutes, and one lesson 9's estimator can budget (Llama's layout: no biases).
SMOLLM2_360M = ModelShape(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                          num_attention_heads=15, num_key_value_heads=5, head_dim=64, tie_word_embeddings=True,
                          name="SmolLM2-360M")


def make_local_model(directory, texts: Sequence[str], hidden_size: int = 64, layers: int = 2,
                     max_position_embeddings: int = 128, vocab_size: int = 320, seed: int = 0,
                     shape: Optional[ModelShape] = None) -> Path:
    """Write a random transformers LlamaForCausalLM and its tokenizer (BPE trained on texts) to directory.

    With `shape`, the model has that architecture and size (a real model's, e.g. SMOLLM2_360M: its embedding
    keeps all shape.vocab_size rows, of which the small tokenizer uses the first); hidden_size and layers are
    then ignored."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(list(texts), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if shape is None:
        shape = ModelShape(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=hidden_size // 4)
    elif shape.vocab_size < len(fast):
        raise ValueError(f"shape.vocab_size {shape.vocab_size} is smaller than the tokenizer's {len(fast)} tokens")
    config = LlamaConfig(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                         num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                         head_dim=shape.head_dim, tie_word_embeddings=shape.tie_word_embeddings,
                         max_position_embeddings=max_position_embeddings, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    directory = Path(directory)
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
