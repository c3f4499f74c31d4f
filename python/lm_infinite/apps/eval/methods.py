"""The three ways of reading a long text that the evaluations compare."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lm_infinite.hf import (LambdaSettings, TopK, decoder_of, disable, enable, preset_settings, top_k_defaults,
                            training_length)

__all__ = ["METHODS", "TOP_K_METHOD", "Settings", "lm_infinite_enabled", "stock_nll", "token_nll",
           "truncated_window_nll", "whole_sequence_nll"]

# stock: the unmodified model over the whole text; truncated: the stock model re-run on the
# last n_local tokens; lm-infinite: Λ-shaped attention with the distance cap; lm-infinite+top-k:
# the same, plus top-k middle attention on the last top_k_rows rows and every generated token.
TOP_K_METHOD = "lm-infinite+top-k"
METHODS = ("stock", "truncated", "lm-infinite", TOP_K_METHOD)


@dataclass(frozen=True)
class Settings:
    n_global: int = 10
    n_local: int | None = None  # None: the model's training length
    distance_cap: int | None = None
    # enable()'s preset: its values fill what is left None here (hf/presets.py).
    preset: str | None = None
    # For TOP_K_METHOD: enable()'s top-k options (None: the preset's, else enable()'s defaults,
    # except top_k_middle, which is 5 without a preset).
    top_k_middle: int | None = None
    top_k_first_layer: int | None = None
    top_k_distance: int | None = None
    top_k_rows: int | str | None = None
    top_k_store: str | None = None
    top_k_blocks: int | None = None

    def resolved(self, model) -> "Settings":
        """The settings with every default filled in, as enable() applies them."""
        n_local = training_length(model.config) if self.n_local is None else self.n_local
        first_layer, distance = top_k_defaults(model, n_local)
        defaults = dict(distance_cap=n_local, top_k_middle=5, top_k_first_layer=first_layer,
                        top_k_distance=distance, top_k_rows=1, top_k_store="exact", top_k_blocks=8)
        if self.preset is not None:
            defaults.update((name, value) for name, value in preset_settings(self.preset, n_local).items()
                            if name in defaults)
        filled = {name: value if getattr(self, name) is None else getattr(self, name)
                  for name, value in defaults.items()}
        return replace(self, n_local=n_local, **filled)


@contextmanager
def lm_infinite_enabled(model, settings: Settings, *, top_k: bool = False):
    """LM-Infinite attention (with top-k middle attention if top_k) for the duration of the
    block; the stock model again after it. Without top_k the preset's distance_cap still
    applies, its top-k does not."""
    resolved = settings.resolved(model)
    middle = None
    if top_k:
        middle = TopK(k=resolved.top_k_middle, first_layer=resolved.top_k_first_layer,
                      distance=resolved.top_k_distance, rows=resolved.top_k_rows, store=resolved.top_k_store,
                      blocks=resolved.top_k_blocks)
    enable(model, LambdaSettings(resolved.n_global, resolved.n_local, resolved.distance_cap, middle))
    try:
        yield model
    finally:
        disable(model)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) for logits [..., vocab] and targets [...] (float32 result)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.inference_mode()
def whole_sequence_nll(model, ids: torch.Tensor, *, rows_per_slice: int = 2048) -> torch.Tensor:
    """Per-token NLL (float32 [tokens], NaN for token 0) from one forward over all of ids
    ([tokens]) without a cache: the model's own causal attention kernel, with no mask tensor.
    The vocabulary projection runs slice by slice so the logits never exist for every row."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    hidden = decoder_of(model)(input_ids=ids[None], use_cache=False).last_hidden_state[0, :-1]
    head = model.get_output_embeddings()
    targets = ids[1:]
    nll = torch.full((ids.numel(),), float("nan"))
    for start in range(0, targets.numel(), rows_per_slice):
        end = start + rows_per_slice
        nll[start + 1 : end + 1] = token_nll(head(hidden[start:end]), targets[start:end]).cpu()
    return nll


def stock_nll(model, ids: torch.Tensor, *, progress=None) -> torch.Tensor:
    """Per-token NLL of the stock model reading all of ids ([tokens]) at once: memory and time
    grow with the text (quadratically for the attention), hence --stock-max-tokens."""
    nll = whole_sequence_nll(model, ids)
    if progress is not None:
        progress(ids.numel())
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
