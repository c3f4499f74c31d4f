"""TEMPORARY BRIDGE (issue #16): the batched ops' contract, by a loop over sequences.

The batching contract (per-sequence query starts, leading padding rows, [batch, slots] positions)
is implemented in the kernels by branch batch-ops. Until that lands, this module offers the same
signatures as ops.lambda_attention / lambda_attention_chunk / ring_cache_append and runs each
sequence alone through today's ops (shared positions, no padding). It is correct but slow (one
op call per sequence, and a host read of the padding counts); delete it and call ops directly
once the batched ops are merged.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["lambda_attention", "lambda_attention_chunk", "ring_cache_append"]


def _paddings(padding: torch.Tensor | None, batch: int) -> list[int]:
    return [0] * batch if padding is None else [int(p) for p in padding.tolist()]


def lambda_attention(q, k, v, inv_freq, *, padding=None, **options):
    if padding is None:
        return ops.lambda_attention(q, k, v, inv_freq, **options)
    out = torch.zeros_like(q)
    for b, p in enumerate(_paddings(padding, q.shape[0])):
        if p < q.shape[2]:
            one = slice(b, b + 1)
            out[one, :, p:] = ops.lambda_attention(q[one, :, p:].contiguous(), k[one, :, p:].contiguous(),
                                                   v[one, :, p:].contiguous(), inv_freq, **options)
    return out


def lambda_attention_chunk(q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, *,
                           padding=None, middle_k=None, middle_v=None, middle_positions=None,
                           top_k_first_row=0, **options):
    batch, rows = q.shape[0], q.shape[2]
    if not isinstance(query_start, torch.Tensor):
        query_start = torch.tensor([query_start], dtype=torch.int64, device=q.device)
    out = torch.zeros_like(q)
    for b, p in enumerate(_paddings(padding, batch)):
        if p >= rows:
            continue
        one = slice(b, b + 1)
        start = query_start[one] if query_start.numel() == batch else query_start
        positions = cache_positions[b] if cache_positions.dim() == 2 else cache_positions
        middle = {}
        if middle_k is not None:
            middle = dict(middle_k=middle_k[one], middle_v=middle_v[one],
                          middle_positions=middle_positions[b] if middle_positions.dim() == 2
                          else middle_positions)
        out[one, :, p:] = ops.lambda_attention_chunk(
            q[one, :, p:].contiguous(), k[one, :, p:].contiguous(), v[one, :, p:].contiguous(),
            cache_k[one], cache_v[one], positions.contiguous(), start, inv_freq,
            top_k_first_row=max(0, top_k_first_row - p), **middle, **options)
    return out


def ring_cache_append(cache_k, cache_v, cache_positions, k, v, start_position, *, n_global, n_local,
                      padding=None):
    batch, rows = k.shape[0], k.shape[2]
    if not isinstance(start_position, torch.Tensor):
        start_position = torch.tensor([start_position], dtype=torch.int64, device=k.device)
    for b, p in enumerate(_paddings(padding, batch)):
        if p >= rows:
            continue
        one = slice(b, b + 1)
        start = start_position[one] if start_position.numel() == batch else start_position
        positions = cache_positions[b] if cache_positions.dim() == 2 else cache_positions
        ops.ring_cache_append(cache_k[one], cache_v[one], positions, k[one, :, p:].contiguous(),
                              v[one, :, p:].contiguous(), start, n_global=n_global, n_local=n_local)
