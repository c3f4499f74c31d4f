"""The attention function transformers calls once `enable` sets `_attn_implementation`."""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from .. import ops
from .cache import LambdaCache
from .state import ForwardContext

__all__ = ["ATTENTION_NAME", "lambda_attention_forward"]

# No mask function is registered under this name, so transformers builds no attention mask:
# the op derives causality and the Λ shape from positions itself. Left padding reaches it as
# per-sequence padding counts (hf/padding.py, read from the 2-D mask by the forward hook).
ATTENTION_NAME = "lm_infinite"

_NO_CONTEXT = ForwardContext()  # a forward that did not go through the decoder's hook


def lambda_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    lminf_context: ForwardContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """LM-Infinite attention for one layer. query: [batch, heads_q, n_q, head_dim]; key, value:
    what the cache's `update` returned, unrotated (the rotary embedding was made a no-op).
    Returns ([batch, n_q, heads_q, head_dim], None) as transformers expects; attention weights
    are never materialised. For inference: `dropout` is not applied.

    Padding (left, per sequence; see hf/padding.py): pad rows are never attended to and hold
    no position, so that each sequence of a batch computes what it would alone.

    lminf_context: the forward's ForwardContext (hf/state.py), put in the forward's keywords
    by the decoder's hook; transformers passes it on to here."""
    state = module._lm_infinite
    rule = state.layer(module.layer_idx)  # this layer's window and RoPE
    context = lminf_context or _NO_CONTEXT
    inv_freq = rule.inv_freq_on(query.device)
    scale = (module.scaling if scaling is None else scaling) * rule.attention_scaling**2
    settings = dict(distance_cap=rule.distance_cap, scale=scale)
    cache = context.cache
    n_query, n_key = query.shape[-2], key.shape[-2]
    if state.uses_top_k(module.layer_idx):
        settings.update(top_k=state.top_k, top_k_distance=state.top_k_distance,
                        top_k_first_row=state.settings.top_k_first_row(n_query, context.top_k_rows))
    padding = context.padding_rows
    if isinstance(cache, LambdaCache):
        # key/value are this chunk's only; the ring holds everything before it, with each
        # sequence's own positions.
        out = cache.layers[module.layer_idx].attend_and_append(query, key, value, inv_freq,
                                                               padding=padding, **settings)
    elif n_key == n_query and "top_k" not in settings:
        # No cache, or a fresh one: the whole sequence, row t of sequence b at t - padding[b].
        out = ops.lambda_attention(
            query, key, value, inv_freq, n_global=rule.n_global, n_local=rule.n_local,
            padding=padding, **settings,
        )
    else:
        # A standard cache (e.g. DynamicCache) returned every key so far, at columns
        # 0..n_key-1 (positions column - padding, negative for pad tokens): correct, but its
        # memory grows with the stream, unlike LambdaCache. The past keys double as the middle
        # store for top-k (the chunk's own keys are candidates too, so a cacheless forward with
        # top-k also lands here, with past = 0).
        past = n_key - n_query
        # A sliding-window layer of a standard cache (transformers' DynamicSlidingWindowLayer,
        # for Gemma 3's sliding layers) returns only the last keys: they start at column
        # `first`, the columns it has seen minus those it returned.
        first = 0 if cache is None else max(0, cache.get_seq_length(module.layer_idx) - n_key)
        positions = torch.arange(first, first + past, dtype=torch.int64, device=key.device)
        query_start = first + past
        sequence = None if context.mask_padding is None else context.mask_padding.sequence
        if sequence is not None:
            positions = positions - sequence[:, None]
            positions = positions.masked_fill(positions < 0, -1)  # [batch, past]
            query_start = (query_start - sequence).clamp(min=0)  # each sequence's first real chunk row
        past_k, past_v = key[:, :, :past], value[:, :, :past]
        attend = ops.lambda_attention_chunk
        if "top_k" in settings:
            settings.update(middle_k=past_k, middle_v=past_v, middle_positions=positions)
            attend = ops.lambda_attention_chunk_top_k
        out = attend(
            query, key[:, :, past:], value[:, :, past:], past_k, past_v,
            positions, query_start, inv_freq, n_global=rule.n_global, n_local=rule.n_local,
            padding=padding, **settings,
        )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, lambda_attention_forward)
