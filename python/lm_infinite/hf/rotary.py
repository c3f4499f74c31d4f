"""A stand-in for a model's rotary embedding that leaves q and k unrotated."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnrotatedRotaryEmbedding"]


class UnrotatedRotaryEmbedding(nn.Module):
    """Returns cos = 1, sin = 0, so the attention modules' `apply_rotary_pos_emb` is the
    identity and keys reach the cache unrotated. The LM-Infinite attention function rotates
    q and k by *relative* position instead, with the original's frequencies.

    `original` is kept as a submodule (it has no parameters and only non-persistent buffers,
    so the state dict is unchanged) so that `disable` can put it back.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        # The frequencies at the training length: `original_inv_freq` is what dynamic and
        # longrope variants return to for sequences that fit it, which every LM-Infinite
        # distance does.
        inv_freq = getattr(original, "original_inv_freq", None)
        if inv_freq is None:
            inv_freq = original.inv_freq
        self.inv_freq = inv_freq.detach().to(torch.float32).clone()
        # Scaled RoPE (yarn, longrope) multiplies cos and sin by this factor.
        self.attention_scaling = float(getattr(original, "attention_scaling", 1.0))
        self.rotary_dim = 2 * self.inv_freq.numel()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.rotary_dim)
        # Expanded views: no memory that grows with the sequence.
        cos = x.new_ones(()).expand(shape)
        sin = x.new_zeros(()).expand(shape)
        return cos, sin
