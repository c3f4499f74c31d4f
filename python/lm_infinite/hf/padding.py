"""Left padding in a Hugging Face forward: which rows of a batch are padding.

A batch of sequences of different lengths reaches the model left-padded, with a 2-D
attention_mask whose zeros form a prefix of each row. LM-Infinite takes exactly that: pad
tokens are never attended to and are no positions (a row's first real token is its position 0
and its first global token). Anything else (holes, right padding, a 4-D mask) is refused: the
kernels have no notion of an arbitrary mask, and silently ignoring one would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ForwardPadding", "padding_from_mask"]

SUPPORTED = ("lm_infinite supports a 2-D attention_mask [batch, past + chunk tokens] of 0/1 whose "
             "zeros form a prefix of each row (left padding)")


@dataclass
class ForwardPadding:
    """Padding of one forward, per sequence (int64 [batch] tensors on the mask's device)."""

    # Leading pad tokens of the whole masked sequence (past and chunk): the positions of the
    # keys a standard cache returns are column - sequence_padding.
    sequence: torch.Tensor
    # Padding rows of this forward's chunk: clamp(sequence - past, 0, chunk).
    chunk: torch.Tensor


def padding_from_mask(attention_mask, batch: int, n_query: int, past: int) -> ForwardPadding | None:
    """The padding an attention_mask describes for a forward of `n_query` tokens per sequence
    after `past` tokens (columns) already in the cache; None when there is none (no mask, or
    all ones). Raises ValueError naming what is supported for any other mask."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{SUPPORTED}; got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"{SUPPORTED}; got a {attention_mask.dim()}-D mask of shape "
                         f"{tuple(attention_mask.shape)}")
    expected = (batch, past + n_query)
    if tuple(attention_mask.shape) != expected:
        raise ValueError(f"{SUPPORTED}: expected shape [{batch}, {past} + {n_query}] (the batch, the "
                         f"cached columns and this chunk), got {tuple(attention_mask.shape)}")
    mask = attention_mask
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{SUPPORTED}: values must be 0 or 1")
        mask = mask != 0
    if bool(mask.all()):
        return None
    # Zeros a prefix of each row <=> the row never goes from 1 back to 0.
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        bad = int((mask[:, :-1] & ~mask[:, 1:]).any(1).nonzero()[0])
        raise ValueError(f"{SUPPORTED}; row {bad} has a 0 after a 1 (a hole, or right padding)")
    sequence = (~mask).sum(1, dtype=torch.int64)
    chunk = (sequence - past).clamp(0, n_query)
    return ForwardPadding(sequence=sequence, chunk=chunk)
