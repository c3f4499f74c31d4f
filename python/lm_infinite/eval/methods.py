"""The three ways of reading a long text that the evaluations compare."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..hf import disable, enable
from ..hf.patching import top_k_defaults
from ..hf.families import decoder_of, training_length

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
    # For TOP_K_METHOD: enable()'s top-k options (None: enable()'s defaults).
    top_k_middle: int = 5
    top_k_first_layer: int | None = None
    top_k_distance: int | None = None
    top_k_rows: int | str = 1

    def resolved(self, model) -> "Settings":
        """The settings with every default filled in, as enable() applies them."""
        n_local = training_length(model.config) if self.n_local is None else self.n_local
        first_layer, distance = top_k_defaults(model, n_local)
        return replace(
            self, n_local=n_local, distance_cap=n_local if self.distance_cap is None else self.distance_cap,
            top_k_first_layer=first_layer if self.top_k_first_layer is None else self.top_k_first_layer,
            top_k_distance=distance if self.top_k_distance is None else self.top_k_distance)


@contextmanager
def lm_infinite_enabled(model, settings: Settings, *, top_k: bool = False):
    """LM-Infinite attention (with top-k middle attention if top_k) for the duration of the
    block; the stock model again after it."""
    options = {}
    if top_k:
        options = dict(top_k_middle=settings.top_k_middle, top_k_first_layer=settings.top_k_first_layer,
                       top_k_distance=settings.top_k_distance, top_k_rows=settings.top_k_rows)
    enable(model, settings.n_global, settings.n_local, settings.distance_cap, **options)
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
