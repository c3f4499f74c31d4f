"""Pure-PyTorch reference of LM-Infinite attention (docs/design.md section 1).

Written for clarity, not speed: it materialises the full query x key score matrix and
expands K/V per query head. Tests compare every kernel against it in float64.

Independence from the kernels: the kernels rotate queries and keys by positions relative to
a per-tile anchor and never see an absolute position; this reference rotates both by their
offset from the smallest query position of its sequence, in float64, and takes the case of
every (query, key) pair from the integer distance.

Batches of different lengths: every position argument is either shared by the batch ([n]) or
given per sequence ([batch, n]); a negative position is padding or an empty slot (never a
key; a query there outputs zeros), so each sequence's result is the one it gets alone.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary", "lambda_attention_reference"]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*len(inv_freq) features of x ([..., seq, head_dim]) by
    positions (any real dtype; [seq], or [batch, seq] for x [batch, heads, seq, head_dim], or
    of 3 or more dimensions broadcasting against x's [..., seq]) in Hugging Face's rotate_half
    convention. Angles are taken in float64, then cos and sin rounded to x's dtype. The one
    rotation of the Python package: the reference, the top-k rows (top_k_rows.py) and the paged
    store's block bounds (paged_middle.py) all use it."""
    half = inv_freq.numel()
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(x.device, torch.float64)
    if positions.dim() == 2:
        angles = angles[:, None]  # [batch, 1 (heads), seq, half]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def lambda_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    n_global: int = 10,
    n_local: int,
    distance_cap: int | None = None,
    scale: float | None = None,
    query_positions: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
    middle_k: torch.Tensor | None = None,
    middle_v: torch.Tensor | None = None,
    middle_positions: torch.Tensor | None = None,
    top_k: int = 0,
    top_k_distance: int = 0,
    top_k_first_row: int = 0,
) -> torch.Tensor:
    """LM-Infinite attention, computed naively.

    q: [batch, heads_q, n_q, head_dim]; k, v: [batch, heads_kv, n_k, head_dim], unrotated.
    query_positions: int64 [n_q] or [batch, n_q] (default 0..n_q-1); key_positions: int64
    [n_k] or [batch, n_k] (default 0..n_k-1); middle_positions likewise [n] or [batch, n].
    A negative key position marks an empty slot or a padding token, never attended to; a
    query at a negative position is padding and outputs zeros. Computed in q's dtype; pass
    float64 inputs for a reference. A row that sees no key returns zeros.

    Non-finite inputs: a row is NaN when a key it sees has a non-finite score (a NaN or Inf in
    its query, the key, the frequencies or the scale) or a non-finite value; keys it does not
    see (masked, empty slots) never affect it. With top-k, every candidate key is scored, so
    counts as seen, and so do the chosen keys' values.

    Top-k middle attention (top_k > 0): query rows top_k_first_row.. also attend, per head,
    to the top_k keys with positions in [n_global, i - n_local], scored
    s * (R_top_k_distance q) . k, in the same softmax. Candidates are the given keys and the
    middle store (middle_k, middle_v, middle_positions; earlier tokens, none by default).
    """
    n_q, n_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    distance_cap = n_local if distance_cap is None else distance_cap
    scale = head_dim**-0.5 if scale is None else scale
    if query_positions is None:
        query_positions = torch.arange(n_q, device=q.device)
    if key_positions is None:
        key_positions = torch.arange(n_k, device=q.device)
    group = q.shape[1] // k.shape[1]
    k = k.to(q.dtype).repeat_interleave(group, dim=1)
    v = v.to(q.dtype).repeat_interleave(group, dim=1)
    # Every position as [batch or 1, n]: one row per sequence, or one shared row.
    query_positions, key_positions = _per_sequence(query_positions), _per_sequence(key_positions)

    base = _smallest_real(query_positions)  # [batch or 1, 1]
    q_local = apply_rotary(q, query_positions - base, inv_freq)
    k_local = apply_rotary(k, key_positions - base, inv_freq)
    q_global = apply_rotary(q, torch.full((n_q,), distance_cap, device=q.device), inv_freq)
    local_scores = (q_local @ k_local.transpose(-1, -2)) * scale
    global_scores = (q_global @ k.transpose(-1, -2)) * scale

    # Masks [batch or 1, 1 (heads), n_q, n_k].
    distance = (query_positions[:, :, None] - key_positions[:, None, :])[:, None]
    present = ((query_positions >= 0)[:, :, None] & (key_positions >= 0)[:, None, :])[:, None]
    is_local = present & (distance >= 0) & (distance < n_local)
    is_global = present & (distance >= n_local) & (key_positions < n_global)[:, None, None, :]
    minus_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    scores = torch.where(is_local, local_scores, torch.where(is_global, global_scores, local_scores))
    visible = is_local | is_global
    bad_row = _sees_non_finite(scores, v, visible)
    scores = torch.where(visible, scores, minus_inf)
    if top_k > 0:
        if middle_k is None:
            middle_k, middle_v = k[:, :, :0], v[:, :, :0]
            middle_positions = key_positions[:, :0]
        else:
            middle_k = middle_k.to(q.dtype).repeat_interleave(group, dim=1)
            middle_v = middle_v.to(q.dtype).repeat_interleave(group, dim=1)
        middle_positions = _per_sequence(middle_positions)
        # Broadcast the two leading dimensions (1 = shared; an empty batch stays empty).
        rows = middle_positions.shape[0] if key_positions.shape[0] == 1 else key_positions.shape[0]
        candidate_positions = torch.cat([middle_positions.expand(rows, -1),
                                         key_positions.expand(rows, -1)], dim=-1)
        middle_scores, middle_v, middle_bad = _top_k_middle_scores(
            q, query_positions, torch.cat([middle_k, k], dim=-2), torch.cat([middle_v, v], dim=-2),
            candidate_positions, inv_freq, scale,
            n_global, n_local, top_k, top_k_distance, top_k_first_row,
        )
        bad_row = bad_row | middle_bad
        scores, v = torch.cat([scores, middle_scores], dim=-1), torch.cat([v, middle_v], dim=-2)
    # Rows that see no key: softmax gives NaN, the result is zeros. Masked non-finite values
    # must not reach a row through a zero weight (0 * inf is NaN).
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = weights @ torch.where(v.isfinite(), v, torch.zeros_like(v))
    return out.masked_fill(bad_row[..., None], float("nan"))


def _per_sequence(positions: torch.Tensor) -> torch.Tensor:
    """[n] (shared by the batch) as [1, n]; [batch, n] as is."""
    return positions[None] if positions.dim() == 1 else positions


def _smallest_real(positions: torch.Tensor) -> torch.Tensor:
    """[rows, 1]: each row's smallest non-negative position (0 for a row with none), the
    anchor of its relative rotations."""
    big = torch.iinfo(torch.int64).max
    smallest = torch.where(positions >= 0, positions, big).amin(-1, keepdim=True) if \
        positions.shape[-1] else positions.new_zeros(positions.shape[0], 1)
    return torch.where(smallest == big, 0, smallest)


def _sees_non_finite(scores: torch.Tensor, v: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """[batch, heads, n_q]: the row sees (seen: broadcastable to scores) a key
    with a non-finite score or value."""
    bad_value = ~v.isfinite().all(-1)  # [batch, heads, n_k]
    return (seen & (~scores.isfinite() | bad_value[..., None, :])).any(-1)


def _top_k_middle_scores(q, query_positions, middle_k, middle_v, middle_positions, inv_freq, scale,
                         n_global, n_local, top_k, top_k_distance, top_k_first_row):
    """Scores of the candidate keys (already one per query head) for every row: each row's
    top_k candidates keep their score, everything else is -inf; and which rows read a
    non-finite candidate score or chosen value. Positions are [batch or 1, n]."""
    placed = apply_rotary(q, torch.full((q.shape[-2],), top_k_distance, device=q.device), inv_freq)
    scores = (placed @ middle_k.transpose(-1, -2)) * scale
    row = torch.arange(q.shape[-2], device=q.device)[:, None]
    candidate = ((middle_positions >= n_global)[:, None, :]
                 & (middle_positions[:, None, :] <= query_positions[:, :, None] - n_local)
                 & (query_positions >= 0)[:, :, None]
                 & (row >= top_k_first_row))[:, None]  # [batch or 1, 1, n_q, n]
    minus_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    candidate_bad = (candidate & ~scores.isfinite()).any(-1)
    scores = torch.where(candidate, scores, minus_inf)
    k = min(top_k, scores.shape[-1])
    best = scores.topk(k, dim=-1).indices
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, best, True) & candidate
    bad = candidate_bad | _sees_non_finite(torch.zeros_like(scores), middle_v, chosen)
    return torch.where(chosen, scores, minus_inf), middle_v, bad
