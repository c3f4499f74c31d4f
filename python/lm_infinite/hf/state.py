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
    # Top-k middle attention (0 = off): from layer top_k_first_layer on, the rows chosen by
    # top_k_rows also attend to their top_k hidden middle keys, placed at top_k_distance.
    top_k: int = 0
    top_k_first_layer: int = 0
    top_k_distance: int = 0
    top_k_rows: str = "last"  # "last": the last row of each forward; "all": every row
    # Cleared by LambdaStream while it feeds the leading chunks of a prompt, so that only the
    # prompt's final token (and each generated one) uses top-k, however the prompt is chunked.
    top_k_active: bool = True
    # The cache passed to the decoder's forward now running (set and cleared by hooks), since
    # transformers hands the attention function the keys but not the cache.
    active_cache: Cache | None = None
    # What `disable` restores.
    previous_attn_implementation: str | None = None
    hooks: tuple = ()
    _inv_freq_by_device: dict = field(default_factory=dict, repr=False)

    def uses_top_k(self, layer_idx: int) -> bool:
        return self.top_k > 0 and layer_idx >= self.top_k_first_layer

    def top_k_first_row(self, n_query: int) -> int:
        """First row of an n_query-row forward that uses top-k (n_query: none)."""
        if not self.top_k_active:
            return n_query
        return 0 if self.top_k_rows == "all" else n_query - 1

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
