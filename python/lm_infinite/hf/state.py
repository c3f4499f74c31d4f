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
    # The cache passed to the decoder's forward now running (set and cleared by hooks), since
    # transformers hands the attention function the keys but not the cache.
    active_cache: Cache | None = None
    # What `disable` restores.
    previous_attn_implementation: str | None = None
    hooks: tuple = ()
    _inv_freq_by_device: dict = field(default_factory=dict, repr=False)

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
