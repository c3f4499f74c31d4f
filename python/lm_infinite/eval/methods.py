"""The three ways of reading a long text that the evaluations compare."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..hf import cache_argument_name, disable, enable
from ..hf.families import training_length

__all__ = ["METHODS", "Settings", "lm_infinite_enabled", "stock_nll", "token_nll",
           "truncated_window_nll"]

# stock: the unmodified model over the whole text; truncated: the stock model re-run on the
# last n_local tokens; lm-infinite: Λ-shaped attention with the distance cap.
METHODS = ("stock", "truncated", "lm-infinite")


@dataclass(frozen=True)
class Settings:
    n_global: int = 10
    n_local: int | None = None  # None: the model's training length
    distance_cap: int | None = None

    def resolved(self, model) -> "Settings":
        n_local = training_length(model.config) if self.n_local is None else self.n_local
        return Settings(self.n_global, n_local, n_local if self.distance_cap is None else self.distance_cap)


@contextmanager
def lm_infinite_enabled(model, settings: Settings):
    """LM-Infinite attention for the duration of the block; the stock model again after it."""
    enable(model, settings.n_global, settings.n_local, settings.distance_cap)
    try:
        yield model
    finally:
        disable(model)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) for logits [..., vocab] and targets [...] (float32 result)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def stock_nll(model, ids: torch.Tensor, *, chunk_size: int = 2048, progress=None) -> torch.Tensor:
    """Per-token NLL (float32 [tokens], NaN for token 0) of the stock model reading all of ids
    ([tokens]) with a standard growing cache, chunk by chunk to bound activation memory."""
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    keyword = cache_argument_name(model)
    nll = torch.full((ids.numel(),), float("nan"))
    previous = None
    for start in range(0, ids.numel(), chunk_size):
        chunk = ids[start : start + chunk_size].to(device)
        logits = model(chunk[None], use_cache=True, **{keyword: cache}).logits[0]
        predictors = logits[:-1] if previous is None else torch.cat([previous[None], logits[:-1]])
        first = start + (previous is None)
        nll[first : start + chunk.numel()] = token_nll(predictors, chunk[first - start :]).cpu()
        previous = logits[-1]
        if progress is not None:
            progress(chunk.numel())
    return nll


@torch.inference_mode()
def truncated_window_nll(model, ids: torch.Tensor, *, window: int, stride: int, progress=None) -> torch.Tensor:
    """Per-token NLL (float32 [tokens]) of the stock model re-run on the last `window` tokens
    every `stride` tokens: tokens [end - stride, end) are scored with the window ending at
    `end`, so each sees between window - stride and window tokens of context. Only tokens at
    positions >= window are scored (before that this baseline is the stock model); NaN elsewhere."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and window ({window}), got {stride}")
    device = next(model.parameters()).device
    nll = torch.full((ids.numel(),), float("nan"))
    for scored_from in range(window, ids.numel(), stride):
        end = min(scored_from + stride, ids.numel())
        context = ids[end - window : end].to(device)
        # Logits at positions scored_from - 1 .. end - 2 predict tokens scored_from .. end - 1.
        n_scored = end - scored_from
        logits = model(context[None], use_cache=False, logits_to_keep=n_scored + 1).logits[0, :-1]
        nll[scored_from:end] = token_nll(logits, context[-n_scored:]).cpu()
        if progress is not None:
            progress(n_scored)
    return nll
