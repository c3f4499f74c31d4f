"""RingKVCache: one layer's fixed-size LM-Infinite KV cache on top of the extension's ops."""

from __future__ import annotations

import torch

from . import ops

__all__ = ["RingKVCache"]


class RingKVCache:
    """Keys and values of the first n_global tokens and the last n_local, unrotated.

    Storage is allocated once: k, v [batch, heads_kv, n_global + n_local, head_dim] and an
    int64 position per slot (-1 = empty). `n_seen` counts every token appended so far; the
    same count lives on the device in `next_position` ([1] int64) so that kernels read it
    without a host round trip.
    """

    def __init__(
        self,
        batch: int,
        n_heads_kv: int,
        head_dim: int,
        *,
        n_global: int = 10,
        n_local: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value, low in (("batch", batch, 1), ("n_heads_kv", n_heads_kv, 1),
                                 ("head_dim", head_dim, 1), ("n_global", n_global, 0),
                                 ("n_local", n_local, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"RingKVCache: {name} must be an int >= {low}, got {value!r}")
        self.n_global, self.n_local = n_global, n_local
        slots = n_global + n_local
        self.k = torch.zeros(batch, n_heads_kv, slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((slots,), -1, dtype=torch.int64, device=device)
        self.next_position = torch.zeros(1, dtype=torch.int64, device=device)
        self.n_seen = 0

    def reset(self) -> None:
        self.positions.fill_(-1)
        self.next_position.zero_()
        self.n_seen = 0

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inv_freq: torch.Tensor,
        *,
        distance_cap: int | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention output for the next chunk (q: [batch, heads_q, seq, head_dim]; k, v its
        keys and values), which sits right after the tokens seen so far. Does not append."""
        return ops.lambda_attention_chunk(
            q, k, v, self.k, self.v, self.positions, self.next_position, inv_freq,
            n_global=self.n_global, n_local=self.n_local, distance_cap=distance_cap, scale=scale,
        )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the chunk's keys and values and advance the position by its length."""
        ops.ring_cache_append(
            self.k, self.v, self.positions, k, v, self.next_position,
            n_global=self.n_global, n_local=self.n_local,
        )
        self.next_position += k.shape[-2]
        self.n_seen += k.shape[-2]

    def attend_and_append(self, q, k, v, inv_freq, *, distance_cap=None, scale=None) -> torch.Tensor:
        out = self.attend(q, k, v, inv_freq, distance_cap=distance_cap, scale=scale)
        self.append(k, v)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions))
