"""Top-k middle attention for a few query rows, composed from PyTorch ops.

The CUDA kernels have no top-k path yet. On CUDA, the op lambda_attention_chunk_top_k (its CUDA
implementation is registered in ops.py) lets the plain kernel compute every row of the chunk and
then recomputes here the rows that use top-k: the last rows of a prompt and each decode step, a
handful. That costs O(rows x (slots + middle)) work in a few batched matmuls and a torch.topk,
small next to the chunk's own attention, and keeps the CPU kernel's semantics exactly (docs/design.md
section 1 and ops.lambda_attention_chunk_top_k): candidates are the middle store and the chunk's own keys
at positions in [n_global, i - n_local].

Computed in float32. RoPE uses offsets from each sequence's first real row, clamped to the window,
so positions near 10^9 lose nothing: keys beyond the window are never scored as local.
"""

from __future__ import annotations

import torch

from .reference import apply_rotary

__all__ = ["top_k_rows_attention"]


def _slot_rows(positions: torch.Tensor, batch: int) -> torch.Tensor:
    """Slot positions [slots] (shared) or [batch, slots] as [batch, slots]."""
    return positions.expand(batch, -1) if positions.dim() == 1 else positions


def top_k_rows_attention(q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, *,
                         first_row: int, n_global: int, n_local: int, distance_cap: int,
                         scale: float, middle_k, middle_v, middle_positions, top_k: int,
                         top_k_distance: int, padding=None) -> torch.Tensor:
    """Output rows first_row.. of lambda_attention_chunk with top-k middle attention, float32
    [batch, heads_q, n_q - first_row, head_dim]; the arguments are the op's (query_start [1]
    or [batch], cache and middle positions [slots] or [batch, slots], padding [batch] or
    None), each sequence with its own positions; padding rows come out as zeros."""
    batch, heads_q, n_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    # [batch, n_q] positions of the chunk's rows, -1 for padding rows.
    pad = (torch.zeros(batch, dtype=torch.int64, device=q.device) if padding is None
           else padding.reshape(batch))
    row = torch.arange(n_q, device=q.device)
    real = row[None, :] >= pad[:, None]
    chunk_positions = torch.where(
        real, query_start.reshape(-1).expand(batch)[:, None] + row[None, :] - pad[:, None], -1)
    row_positions = chunk_positions[:, first_row:]
    n_rows = row_positions.shape[1]
    # [batch, heads_kv, group, rows, head_dim]: each KV head's queries side by side (GQA).
    rows = q[:, :, first_row:].float().reshape(batch, heads_kv, group, n_rows, head_dim)

    def placed(distance: int) -> torch.Tensor:
        return apply_rotary(rows, torch.full((n_rows,), distance, device=q.device), inv_freq)

    def scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return (queries @ keys.float()[:, :, None].transpose(-1, -2)) * scale

    def per_row(mask: torch.Tensor) -> torch.Tensor:
        """[batch, rows, keys] as [batch, 1 (heads_kv), 1 (group), rows, keys]."""
        return mask[:, None, None]

    # Λ part: the ring's keys and the chunk's own, local ones at their relative distance and
    # global ones (first n_global positions) at distance_cap.
    keys = torch.cat([cache_k, k], dim=2)
    values = torch.cat([cache_v, v], dim=2).float()
    key_positions = torch.cat([_slot_rows(cache_positions, batch), chunk_positions], dim=1)
    distance = row_positions[:, :, None] - key_positions[:, None, :]
    present = (key_positions >= 0)[:, None, :] & (row_positions >= 0)[:, :, None]
    local = present & (distance >= 0) & (distance < n_local)
    global_ = present & (distance >= n_local) & (key_positions < n_global)[:, None, :]
    # Each sequence's rotations are relative to its first real row among these.
    base = torch.where(row_positions >= 0, row_positions,
                       torch.iinfo(torch.int64).max).amin(1, keepdim=True).clamp(max=2**62)
    key_offsets = (key_positions - base).clamp(-n_local - n_rows, n_rows)
    row_offsets = (row_positions - base).clamp(-n_rows, n_rows)
    local_scores = scores(apply_rotary(rows, row_offsets[:, None, None], inv_freq),
                          apply_rotary(keys.float(), key_offsets, inv_freq))
    global_scores = scores(placed(distance_cap), keys)
    minus_inf = torch.tensor(float("-inf"), device=q.device)
    lambda_scores = torch.where(per_row(local), local_scores,
                                torch.where(per_row(global_), global_scores, minus_inf))

    # Top-k part: every candidate scored with the query placed at top_k_distance.
    candidates_k = torch.cat([middle_k, k], dim=2)
    candidates_v = torch.cat([middle_v, v], dim=2).float()
    candidate_positions = torch.cat([_slot_rows(middle_positions, batch), chunk_positions], dim=1)
    hidden = ((candidate_positions >= n_global)[:, None, :]
              & (candidate_positions[:, None, :] <= row_positions[:, :, None] - n_local)
              & (row_positions >= 0)[:, :, None])
    middle_scores = torch.where(per_row(hidden), scores(placed(top_k_distance), candidates_k),
                                minus_inf)
    best_scores, best = middle_scores.topk(min(top_k, middle_scores.shape[-1]), dim=-1)
    # Values of the chosen keys: [batch, heads_kv, group, rows, k, head_dim].
    chosen_v = torch.gather(
        candidates_v[:, :, None, None].expand(-1, -1, group, n_rows, -1, -1), 4,
        best[..., None].expand(*best.shape, head_dim))

    weights = torch.softmax(torch.cat([lambda_scores, best_scores], dim=-1), dim=-1).nan_to_num(0.0)
    n_keys = keys.shape[2]
    out = weights[..., :n_keys] @ values[:, :, None] + (weights[..., n_keys:, None] * chosen_v).sum(-2)
    return out.reshape(batch, heads_q, n_rows, head_dim)
