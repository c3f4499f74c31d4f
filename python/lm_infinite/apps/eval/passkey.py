"""The passkey retrieval task of the LM-Infinite paper (and of Mohtashami & Jaggi, 2023)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from lm_infinite.streaming import LambdaStream
from .methods import METHODS, TOP_K_METHOD, Settings, lm_infinite_enabled

__all__ = ["PasskeyPrompt", "build_passkey_prompt", "passkey_answer", "passkey_run"]

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    ids: torch.Tensor  # int64 [tokens]
    key: int
    depth: float  # where the needle sits, 0 = start of the filler, 1 = its end


def build_passkey_prompt(tokenizer, n_tokens: int, depth: float, key: int) -> PasskeyPrompt:
    """A prompt of about n_tokens tokens (never more) with the needle after `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")

    def length(text: str) -> int:
        return len(tokenizer(text).input_ids)

    fixed = length(INSTRUCTION + NEEDLE.format(key=key) + QUESTION)
    if n_tokens < fixed:
        raise ValueError(f"passkey length {n_tokens} is shorter than the prompt without filler "
                         f"({fixed} tokens)")
    n_fillers = max(0, (n_tokens - fixed) // length(FILLER))
    while n_fillers > 0 and length(INSTRUCTION + FILLER * n_fillers + NEEDLE.format(key=key) + QUESTION) > n_tokens:
        n_fillers -= 1
    before = round(depth * n_fillers)
    text = (INSTRUCTION + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_fillers - before)
            + QUESTION)
    return PasskeyPrompt(tokenizer(text, return_tensors="pt").input_ids[0], key, depth)


def passkey_answer(text: str) -> int | None:
    """The first integer in the model's continuation, as the paper scores it."""
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


@torch.inference_mode()
def _stock_continuation(model, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    device = next(model.parameters()).device
    output = model.generate(ids[None].to(device), max_new_tokens=max_new_tokens, do_sample=False,
                            attention_mask=torch.ones_like(ids[None]).to(device), pad_token_id=0)
    return output[0, ids.numel():].tolist()


def _lm_infinite_continuation(model, ids, max_new_tokens, chunk_size):
    stream = LambdaStream(model, chunk_size=chunk_size)
    stream.feed(ids[None])
    return list(stream.generate(max_new_tokens))


def passkey_run(model, tokenizer, *, lengths, depths, trials: int = 1, methods=METHODS,
                settings: Settings = Settings(), max_new_tokens: int = 8, chunk_size: int = 2048,
                seed: int = 0, progress=None) -> list[dict]:
    """One record per (length, depth, trial, method): the key, the continuation, the answer and
    whether it is right. `progress()`, if given, is called after each record."""
    settings = settings.resolved(model)
    rng = random.Random(seed)
    records = []
    for n_tokens in lengths:
        for depth in depths:
            for trial in range(trials):
                prompt = build_passkey_prompt(tokenizer, n_tokens, depth, rng.randint(1, 50000))
                for method in methods:
                    if method == "stock":
                        tokens = _stock_continuation(model, prompt.ids, max_new_tokens)
                    elif method == "truncated":
                        tokens = _stock_continuation(model, prompt.ids[-settings.n_local:], max_new_tokens)
                    else:
                        with lm_infinite_enabled(model, settings, top_k=method == TOP_K_METHOD):
                            tokens = _lm_infinite_continuation(model, prompt.ids, max_new_tokens, chunk_size)
                    text = tokenizer.decode(tokens, skip_special_tokens=True)
                    answer = passkey_answer(text)
                    records.append(dict(length=n_tokens, prompt_tokens=prompt.ids.numel(), depth=depth,
                                        trial=trial, method=method, key=prompt.key, continuation=text,
                                        answer=answer, correct=answer == prompt.key))
                    if progress is not None:
                        progress()
    return records
