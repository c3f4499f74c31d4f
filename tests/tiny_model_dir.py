"""A tiny Hugging Face model directory (random Llama + a byte-level BPE tokenizer) on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lm_infinite.apps.eval.passkey import FILLER, INSTRUCTION, NEEDLE, QUESTION

TRAINING_LENGTH = 32


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    sample = [INSTRUCTION, FILLER * 4, NEEDLE.format(key=12345), QUESTION, "def f(x):\n    return x\n"]
    bpe.train_from_iterator(sample, vocab_size=300, min_frequency=1, special_tokens=["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (4 query / 2 KV heads) sized to the tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TRAINING_LENGTH, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
