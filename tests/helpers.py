"""Shared test utilities: random attention inputs and error measures."""

from __future__ import annotations

import torch


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
