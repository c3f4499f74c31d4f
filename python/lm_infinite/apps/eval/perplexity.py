"""Per-token NLL over a long text for each method, and perplexity by position bucket."""

from __future__ import annotations

import math

import torch

from lm_infinite.streaming import LambdaStream
from .methods import METHODS, TOP_K_METHOD, Settings, lm_infinite_enabled, stock_nll, truncated_window_nll

__all__ = ["bucket_perplexity", "perplexity", "perplexity_run"]


def perplexity_run(model, ids: torch.Tensor, *, methods=METHODS, settings: Settings = Settings(),
                   stride: int = 2048, chunk_size: int = 2048, progress=None) -> dict:
    """NLL of every token of ids ([tokens]) under each method: {"settings": ..., "nll":
    {method: float32 [tokens] (NaN where the method scores nothing)}}. `progress(method, total)`
    returns a callable advanced by the number of tokens done, or None."""
    settings = settings.resolved(model)
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"the text must have at least 2 tokens, got {ids.numel()}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "truncated" in methods and settings.n_local >= ids.numel():
        raise ValueError(f"n_local ({settings.n_local}) must be smaller than the text "
                         f"({ids.numel()} tokens) for the truncated-window baseline to differ")
    ticker = progress or (lambda method, total: None)
    nll = {}
    for method in methods:
        if method == "stock":
            nll[method] = stock_nll(model, ids, progress=ticker(method, ids.numel()))
        elif method == "truncated":
            nll[method] = truncated_window_nll(model, ids, window=settings.n_local, stride=stride,
                                               progress=ticker(method, ids.numel() - settings.n_local))
        else:
            with lm_infinite_enabled(model, settings, top_k=method == TOP_K_METHOD):
                stream = LambdaStream(model, chunk_size=chunk_size)
                nll[method] = stream.nll(ids[None], progress=ticker(method, ids.numel()))[0]
    return {"settings": vars(settings), "n_tokens": ids.numel(), "nll": nll}


def bucket_perplexity(nll: torch.Tensor, bucket_size: int) -> list[tuple[int, int, float]]:
    """(start, end, perplexity) of each bucket of positions [start, end): exp of the mean NLL
    over the scored (non-NaN) tokens; NaN for a bucket with none."""
    rows = []
    for start in range(0, nll.numel(), bucket_size):
        values = nll[start : start + bucket_size]
        scored = values[~torch.isnan(values)]
        ppl = math.exp(scored.double().mean()) if scored.numel() else float("nan")
        rows.append((start, min(start + bucket_size, nll.numel()), ppl))
    return rows


def perplexity(nll: torch.Tensor, start: int = 0, end: int | None = None) -> float:
    """exp(mean NLL) over the scored tokens of positions [start, end)."""
    values = nll[start:end]
    values = values[~torch.isnan(values)]
    if values.numel() == 0:
        raise ValueError(f"no scored tokens in positions [{start}, {end})")
    return math.exp(values.double().mean())
