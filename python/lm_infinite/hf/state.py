"""What `enable` attaches to a model, and what one forward of it carries.

LambdaState holds the model's resolved settings and its rotary frequencies; nothing in it
changes between forwards. What a forward needs beyond its arguments (the cache, the padding
rows of its chunk, the top-k rows of its prompt) travels in a ForwardContext passed as the
forward's `lminf_context` keyword: transformers hands a forward's extra keywords to every
attention call, so nothing is stored between the hooks and the attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from .padding import ForwardPadding
from .settings import ResolvedSettings

__all__ = ["CONTEXT_KEYWORD", "ForwardContext", "LambdaState", "LayerRule", "state_of"]

# The forward keyword that carries the ForwardContext down to the attention function.
CONTEXT_KEYWORD = "lminf_context"


@dataclass(frozen=True)
class ForwardContext:
    """One forward's LM-Infinite inputs. A caller (LambdaStream, StaticDecodeStep) may pass one
    with padding_rows and top_k_rows; the decoder's forward hook completes it with the cache
    and the padding the attention_mask describes."""
    # The cache of this forward (transformers hands the attention the keys, not the cache).
    cache: Cache | None = None
    # Leading padding rows per sequence of this forward's chunk (int64 [batch]), or None.
    padding_rows: torch.Tensor | None = None
    # The padding the forward's attention_mask describes (hf/padding.py), or None.
    mask_padding: ForwardPadding | None = None
    # Of this chunk's rows, how many lie among the prompt's last top_k_rows (None: the
    # settings' top_k_rows), so that the rows using top-k do not depend on the chunking.
    top_k_rows: int | None = None


@dataclass
class LayerRule:
    """What one layer attends to and how it rotates. A Λ layer: the settings' n_global,
    n_local and distance_cap. A layer the model itself restricts to a sliding window (Gemma
    3's sliding layers, `sliding`): n_global = 0 and n_local = its window, which is plain
    causal sliding-window attention, without top-k. inv_freq and attention_scaling are the
    layer's own RoPE (Gemma 3 rotates its sliding layers with another base)."""
    n_global: int
    n_local: int
    distance_cap: int
    # float32 [rotary_dim / 2], the layer's RoPE frequencies at the model's training length.
    inv_freq: torch.Tensor
    # Scaled RoPE multiplies cos and sin by this; every score carries its square.
    attention_scaling: float
    sliding: bool = False
    _inv_freq_by_device: dict = field(default_factory=dict, repr=False)

    def inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """inv_freq on `device`, copied once per device (it is not a buffer, so that
        `model.to(dtype)` cannot round it)."""
        if device not in self._inv_freq_by_device:
            self._inv_freq_by_device[device] = self.inv_freq.to(device)
        return self._inv_freq_by_device[device]


@dataclass
class LambdaState:
    settings: ResolvedSettings
    # float32 [rotary_dim / 2], the model's RoPE frequencies at its training length (of its
    # full-attention layers, where layer types differ).
    inv_freq: torch.Tensor
    # Scaled RoPE multiplies cos and sin by this; every score carries its square.
    attention_scaling: float
    # One LayerRule per decoder layer (what its attention and its cache layer follow).
    layers: tuple = ()
    # What `disable` restores.
    previous_attn_implementation: str | None = None
    hooks: tuple = ()

    def __getattr__(self, name: str):
        # The settings' fields read as the state's own (state.n_local, state.top_k, ...).
        if name.startswith("_") or name in ("settings", "layers"):
            raise AttributeError(name)
        return getattr(self.settings, name)

    def layer(self, layer_idx: int) -> LayerRule:
        """The rule of decoder layer `layer_idx`."""
        return self.layers[layer_idx]

    def uses_top_k(self, layer_idx: int) -> bool:
        """Top-k middle attention applies to Λ layers from the settings' first layer on."""
        return self.settings.uses_top_k(layer_idx) and not self.layer(layer_idx).sliding


def state_of(model) -> LambdaState:
    """The LambdaState of a model that `lm_infinite.enable` was called on."""
    state = getattr(model, "_lm_infinite", None)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not LM-Infinite-enabled; call lm_infinite.enable(model) first"
        )
    return state
