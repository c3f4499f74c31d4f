"""A stand-in for a model's rotary embedding that leaves q and k unrotated."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnrotatedRotaryEmbedding"]


def _frequencies(original: nn.Module, prefix: str = "") -> tuple[torch.Tensor, float]:
    # The frequencies at the training length: `original_inv_freq` is what dynamic and
    # longrope variants return to for sequences that fit it, which every LM-Infinite
    # distance does.
    inv_freq = getattr(original, f"{prefix}original_inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(original, f"{prefix}inv_freq")
    # Scaled RoPE (yarn, longrope) multiplies cos and sin by this factor.
    scaling = float(getattr(original, f"{prefix}attention_scaling", 1.0))
    return inv_freq.detach().to(torch.float32).clone(), scaling


class UnrotatedRotaryEmbedding(nn.Module):
    """Returns cos = 1, sin = 0, so the attention modules' `apply_rotary_pos_emb` is the
    identity and keys reach the cache unrotated. The LM-Infinite attention function rotates
    q and k by *relative* position instead, with the original's frequencies.

    A model with one RoPE per layer type (Gemma 3: `forward(x, position_ids, layer_type)`,
    buffers `{layer_type}_inv_freq`) keeps each type's frequencies: `frequencies(layer_type)`.

    `original` is kept as a submodule (it has no parameters and only non-persistent buffers,
    so the state dict is unchanged) so that `disable` can put it back.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        layer_types = getattr(original, "layer_types", None)
        if layer_types:
            self._by_type = {kind: _frequencies(original, f"{kind}_") for kind in layer_types}
        else:
            self._by_type = {None: _frequencies(original)}
        # The model-wide (full-attention) frequencies.
        model_wide = self._by_type.get("full_attention", next(iter(self._by_type.values())))
        self.inv_freq, self.attention_scaling = model_wide
        self.rotary_dim = 2 * self.inv_freq.numel()

    def frequencies(self, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
        """(float32 inv_freq, attention_scaling) of the layers of `layer_type` (None: the
        model's single RoPE)."""
        return self._by_type[None] if None in self._by_type else self._by_type[layer_type]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor,
                layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.frequencies(layer_type)[0]
        shape = (*position_ids.shape, 2 * inv_freq.numel())
        # Expanded views: no memory that grows with the sequence.
        cos = x.new_ones(()).expand(shape)
        sin = x.new_zeros(()).expand(shape)
        return cos, sin
