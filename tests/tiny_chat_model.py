"""A tiny chat model directory: random Llama weights, a character-level tokenizer, a chat template.

Character-level on purpose: any text the model generates re-tokenizes to the very ids it
generated, as a real model's replies almost always do with its own tokenizer. So prompt reuse
across turns is deterministic in the tests, and any shortfall is the server's fault.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tiny_model_dir import tiny_llama

EOS = "<eos>"  # the only special token; it ends every turn
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}" + EOS + "{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")


def _tokenizer() -> PreTrainedTokenizerFast:
    characters = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {EOS: 0} | {c: i + 1 for i, c in enumerate(characters)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS))  # the tests write ASCII only
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, chat_template=CHAT_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def system_message_tokens(messages) -> int:
    """The tokens of a chat's system message in this template ("[system]" + content + EOS, one
    token per character): what `lminf serve --pin-system-prompt` pins. 0 without one."""
    if not messages or messages[0]["role"] != "system":
        return 0
    return len("[system]" + messages[0]["content"]) + 1


def save_tiny_chat_model(directory: Path, seed: int = 0) -> Path:
    tokenizer = _tokenizer()
    model = tiny_llama(tokenizer, seed)
    with torch.no_grad():  # random init is small: sharpen it, so that replies vary with the prompt
        for parameter in model.parameters():
            parameter.mul_(3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
