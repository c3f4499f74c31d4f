"""LambdaCache: a transformers Cache that keeps, per layer, only what LM-Infinite attends to."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import RingKVCache
from .state import state_of

__all__ = ["MAX_PINNED_TOKENS", "LambdaCache", "LambdaLayer", "RowCaches"]

# Pinned tokens are global tokens: each is scored by every query, so a pinned prefix costs what
# a window that much longer costs. The bound keeps a mistaken value (a whole document) from
# allocating and scoring far more than anyone meant to pin.
MAX_PINNED_TOKENS = 65536


class LambdaLayer(CacheLayerMixin):
    """One layer's cache: a RingKVCache with the first n_global and the last n_local tokens,
    keys unrotated, positions int64.

    `update` does not store the chunk: LM-Infinite's chunk must attend to the cache as it was
    *before* the chunk (storing first could evict keys the chunk's early queries still see).
    The attention function calls `attend_and_append` instead.
    """

    is_compileable = False
    # A sliding layer of the model (Gemma 3) is a LambdaLayer with n_global = 0 too; transformers
    # only reads this to size masks, which the LM-Infinite attention does not use.
    is_sliding = False

    def __init__(self, n_global: int, n_local: int, keep_middle: bool = False,
                 middle_options: dict | None = None) -> None:
        super().__init__()
        self.n_global, self.n_local, self.keep_middle = n_global, n_local, keep_middle
        self.middle_options = middle_options
        self.ring: RingKVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, n_heads_kv, _, head_dim = key_states.shape
        self.ring = RingKVCache(
            batch, n_heads_kv, head_dim, n_global=self.n_global, n_local=self.n_local,
            dtype=key_states.dtype, device=key_states.device, keep_middle=self.keep_middle,
            middle_options=self.middle_options,
        )
        self.keys, self.values = self.ring.k, self.ring.v
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def attend_and_append(self, query, key, value, inv_freq, **attend_options):
        return self.ring.attend_and_append(query, key, value, inv_freq, **attend_options)

    def get_seq_length(self) -> int:
        """Tokens seen, not tokens stored: the next token's column (its position in an
        unpadded batch; with left padding, each sequence's position is this minus its
        padding, kept per sequence in the ring's next_position)."""
        return 0 if self.ring is None else self.ring.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = 0 if self.ring is None else min(self.ring.n_seen, self.n_global + self.n_local)
        return stored + query_length, 0

    def get_max_length(self) -> int:
        return -1  # a stream of any length fits

    def reset(self) -> None:
        if self.ring is not None:
            self.ring.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.ring is not None:
            self.ring.reorder(beam_idx)


class LambdaCache(Cache):
    """The cache for an LM-Infinite-enabled model: G + L tokens per layer however long the
    stream. Pass it as `past_key_values=` (or `cache=`) to the model's forward or `generate()`.

    pinned_tokens: each sequence's first pinned_tokens tokens (a system prompt, say) stay
    visible for the stream's whole life, as global tokens: every Λ layer keeps
    max(n_global, pinned_tokens) of them (docs/design.md, section 1, "Pinned prefix"). Layers that the
    model itself restricts to a sliding window keep their window only."""

    def __init__(self, model, *, pinned_tokens: int = 0) -> None:
        state = state_of(model)
        if not isinstance(pinned_tokens, int) or isinstance(pinned_tokens, bool) \
                or not 0 <= pinned_tokens <= MAX_PINNED_TOKENS:
            raise ValueError(f"LambdaCache: pinned_tokens must be an int in [0, {MAX_PINNED_TOKENS}], "
                             f"got {pinned_tokens!r}")
        self.settings = state.settings  # checked against the model's at each forward
        self.pinned_tokens = pinned_tokens
        middle = dict(kind=state.top_k_store, **dict(state.top_k_store_options))
        layers = []
        for index in range(state.num_layers):
            rule = state.layer(index)
            n_global = rule.n_global if rule.sliding else max(rule.n_global, pinned_tokens)
            layers.append(LambdaLayer(n_global, rule.n_local, state.uses_top_k(index), middle))
        super().__init__(layers=layers)

    def allocate(self, batch: int, n_heads_kv: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Allocate every layer's ring for `batch` sequences now, instead of at the first forward
        (which sizes them from its keys)."""
        keys = torch.empty(batch, n_heads_kv, 0, head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            if not layer.is_initialized:
                layer.lazy_initialization(keys, keys)

    def row(self, b: int) -> "LambdaCache":
        """Sequence b of this (filled) cache as a batch-1 LambdaCache over the same storage
        (RingKVCache.row): feeding it feeds row b here. Only without top-k middle stores."""
        view = copy.copy(self)
        view.layers = []
        for layer in self.layers:
            if layer.ring is None:
                raise ValueError("LambdaCache.row: the cache is empty; it needs its batch first")
            one = copy.copy(layer)
            one.ring = layer.ring.row(b)
            one.keys, one.values = one.ring.k, one.ring.v
            view.layers.append(one)
        return view

    def nbytes(self) -> int:
        """Bytes held by the stored keys, values and positions of all layers (the fixed rings;
        top-k middle stores, which grow with the stream, included)."""
        rings = [layer.ring for layer in self.layers if layer.ring is not None]
        return sum(r.nbytes() + (r.middle.nbytes() if r.middle is not None else 0) for r in rings)


class _RowLayers(CacheLayerMixin):
    """One layer of a RowCaches: row b of a forward goes to row_layers[b] (a batch-1
    LambdaLayer of its own stream)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, row_layers: list[LambdaLayer]) -> None:
        super().__init__()
        self.row_layers = row_layers
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass  # every row's layer is filled already

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def attend_and_append(self, query, key, value, inv_freq, *, padding=None, **attend_options):
        if padding is not None:
            raise ValueError("RowCaches: the rows of a batched step carry no padding")
        return torch.cat([layer.attend_and_append(query[b:b + 1], key[b:b + 1], value[b:b + 1], inv_freq,
                                                  **attend_options)
                          for b, layer in enumerate(self.row_layers)])

    def get_seq_length(self) -> int:
        return max(layer.get_seq_length() for layer in self.row_layers)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return max(layer.get_mask_sizes(query_length)[0] for layer in self.row_layers), 0

    def get_max_length(self) -> int:
        return -1


class RowCaches(LambdaCache):
    """Several streams' caches (each of batch 1, filled) as the rows of one forward: row b
    reads and appends to caches[b]'s rings, while everything else of the forward (the
    linear layers) runs once for all rows. For batching the decode steps of independent
    conversations (the server's worker). Holds the caches' layers, not the caches."""

    def __init__(self, caches: list[LambdaCache]) -> None:  # noqa: D107 (no Cache.__init__: layers are given)
        if not caches:
            raise ValueError("RowCaches: no caches")
        settings = caches[0].settings
        for cache in caches:
            if cache.settings != settings or any(layer.ring is None or layer.ring.k.shape[0] != 1
                                                 for layer in cache.layers):
                raise ValueError("RowCaches: every cache must be filled, of batch 1, with the same settings")
        self.__dict__.update(copy.copy(caches[0].__dict__))
        self.layers = [_RowLayers([cache.layers[i] for cache in caches]) for i in range(len(caches[0].layers))]
