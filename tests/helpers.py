"""Shared test utilities: random attention inputs and error measures."""

from __future__ import annotations

import torch

# Whole-sequence attention cases every backend is checked on (odd sizes, GQA/MHA, G = 0,
# distance_cap != n_local, partial rotary, head dims that take the generic paths).
PREFILL_CASES = [
    # batch, heads_q, heads_kv, seq, head_dim, rotary_dim, n_global, n_local, distance_cap
    (1, 1, 1, 1, 64, 64, 10, 4, None),
    (2, 3, 3, 3, 64, 64, 0, 2, None),
    (1, 9, 3, 19, 64, 64, 3, 5, None),
    (2, 4, 2, 19, 128, 128, 0, 7, 3),
    (1, 4, 2, 1177, 128, 128, 10, 100, 50),
    (1, 9, 3, 1177, 64, 64, 10, 300, None),
    (1, 3, 1, 1177, 64, 32, 4, 129, 200),  # partial rotary, cap beyond the window
    (1, 8, 2, 700, 128, 128, 1, 64, None),  # window = one tile: every band edge
    (3, 32, 8, 257, 128, 128, 4, 4096, None),  # window covers the sequence: causal
    (1, 2, 2, 200, 80, 64, 5, 33, 0),  # head_dim 80: generic kernel
    (1, 4, 2, 130, 64, 6, 2, 40, None),  # rotary_dim % 4 != 0: generic kernel
    (1, 8, 1, 257, 256, 128, 2, 64, None),  # head_dim 256: generic kernel
]


def rope_inv_freq(rotary_dim: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def random_qkv(batch, heads_q, heads_kv, seq, head_dim, dtype=torch.float32):
    q = torch.randn(batch, heads_q, seq, head_dim, dtype=dtype)
    k = torch.randn(batch, heads_kv, seq, head_dim, dtype=dtype)
    v = torch.randn(batch, heads_kv, seq, head_dim, dtype=dtype)
    return q, k, v


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN or inf"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
