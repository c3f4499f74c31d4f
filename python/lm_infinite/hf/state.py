"""What `enable` attaches to a model: the LM-Infinite settings and the cache of the forward in flight."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

__all__ = ["LambdaState", "state_of"]


@dataclass
class LambdaState:
    n_global: int
    n_local: int
    distance_cap: int
    num_layers: int
    # float32 [rotary_dim / 2], the model's RoPE frequencies at its training length.
    inv_freq: torch.Tensor
    # Scaled RoPE multiplies cos and sin by this; every score carries its square.
    attention_scaling: float
    # Top-k middle attention (0 = off): from layer top_k_first_layer on, the last top_k_rows
    # rows of each forward (None: every row) also attend to their top_k hidden middle keys,
    # placed at top_k_distance.
    top_k: int = 0
    top_k_first_layer: int = 0
    top_k_distance: int = 0
    top_k_rows: int | None = 1
    # Where the top-k layers keep the middle: cache.middle_store's kind and options
    # ("exact": every key; "paged": blocks chosen through summaries, see paged_middle.py).
    top_k_store: str = "exact"
    top_k_store_options: dict = field(default_factory=dict)
    # Set by LambdaStream for each chunk of a prompt: how many of the chunk's rows lie among the
    # prompt's last top_k_rows, so that the rows using top-k do not depend on the chunking.
    chunk_top_k_rows: int | None = None
    # Leading padding rows per sequence (int64 [batch]) of the chunk now fed, set by
    # LambdaStream and StaticDecodeStep around their forwards (which pass no mask).
    chunk_padding: torch.Tensor | None = None
    # The padding the forward now running got from its attention_mask (hf/padding.py), set and
    # cleared by the hooks.
    forward_padding: object | None = None
    # The cache passed to the decoder's forward now running (set and cleared by hooks), since
    # transformers hands the attention function the keys but not the cache.
    active_cache: Cache | None = None
    # What `disable` restores.
    previous_attn_implementation: str | None = None
    hooks: tuple = ()
    _inv_freq_by_device: dict = field(default_factory=dict, repr=False)

    def cache_settings(self) -> tuple:
        """What a LambdaCache's contents depend on: a cache filled under other settings (another
        `enable`) must not be continued under these."""
        return (self.num_layers, self.n_global, self.n_local, self.distance_cap, self.top_k,
                self.top_k_first_layer, self.top_k_distance, self.top_k_rows, self.top_k_store,
                tuple(sorted(self.top_k_store_options.items())))

    def padding_rows(self) -> torch.Tensor | None:
        """Padding rows per sequence of the chunk in flight (int64 [batch]), or None."""
        if self.forward_padding is not None:
            return self.forward_padding.chunk
        return self.chunk_padding

    def uses_top_k(self, layer_idx: int) -> bool:
        return self.top_k > 0 and layer_idx >= self.top_k_first_layer

    def top_k_first_row(self, n_query: int) -> int:
        """First row of an n_query-row forward that uses top-k (n_query: none)."""
        rows = self.top_k_rows if self.chunk_top_k_rows is None else self.chunk_top_k_rows
        return 0 if rows is None else max(0, n_query - rows)

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """inv_freq on `device`, copied once per device (it is not a buffer, so that
        `model.to(dtype)` cannot round it)."""
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self.inv_freq.to(device)
        return self._inv_freq_by_device[device]


def state_of(model) -> LambdaState:
    """The LambdaState of a model that `lm_infinite.enable` was called on."""
    state = getattr(model, "_lm_infinite", None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not LM-Infinite-enabled; call lm_infinite.enable(model) first"
        )
    return state
