"""Chunked attention over the ring-buffer cache: chunk independence, bounded memory,
relative positions, and the ring's bookkeeping."""

import pytest
import torch

import lm_infinite as li
from helpers import random_qkv, rel_error, rope_inv_freq


def stream(q, k, v, inv_freq, chunk_sizes, *, n_global, n_local, distance_cap=None):
    """Feed a sequence through a RingKVCache in chunks of the given sizes (cycled)."""
    cache = li.RingKVCache(q.shape[0], k.shape[1], q.shape[-1], n_global=n_global,
                           n_local=n_local, dtype=q.dtype)
    outs, t, i = [], 0, 0
    while t < q.shape[2]:
        size = chunk_sizes[i % len(chunk_sizes)]
        sl = slice(t, t + size)
        outs.append(cache.attend_and_append(q[:, :, sl], k[:, :, sl], v[:, :, sl], inv_freq,
                                            distance_cap=distance_cap))
        t, i = t + size, i + 1
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("chunks", [[1], [3], [7, 1, 64], [100], [1000]])
@pytest.mark.parametrize("n_global,n_local,cap", [(4, 50, None), (0, 17, 5), (10, 1, None)])
def test_chunked_equals_whole_and_reference(chunks, n_global, n_local, cap):
    q, k, v = random_qkv(2, 6, 2, 211, 64)
    inv_freq = rope_inv_freq(64)
    whole = li.lambda_attention(q, k, v, inv_freq, n_global=n_global, n_local=n_local, distance_cap=cap)
    streamed, cache = stream(q, k, v, inv_freq, chunks, n_global=n_global, n_local=n_local, distance_cap=cap)
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), inv_freq,
                                        n_global=n_global, n_local=n_local, distance_cap=cap)
    assert rel_error(streamed, ref) < 1e-5
    # Chunks rotate from other anchors than the whole pass: float32 rounding differs by a few ulps.
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=5e-6)
    assert cache.n_seen == 211


def test_cache_memory_is_fixed_whatever_the_stream_length():
    q, k, v = random_qkv(1, 2, 1, 600, 32)
    inv_freq = rope_inv_freq(32)
    cache = li.RingKVCache(1, 1, 32, n_global=3, n_local=20)
    size = cache.nbytes()
    assert cache.k.shape[2] == 3 + 20
    for t in range(0, 600, 37):
        cache.attend_and_append(q[:, :, t:t + 37], k[:, :, t:t + 37], v[:, :, t:t + 37], inv_freq)
        assert cache.nbytes() == size
    kept = sorted(cache.positions[0].tolist())  # [batch, slots]: each sequence its own
    assert kept == [0, 1, 2] + list(range(580, 600))


def test_ring_slots_follow_the_layout():
    """Each position lands in slot ring_slot(p); a chunk longer than the window keeps only
    its tail; an independent Python model of the ring agrees after every append."""
    n_global, n_local = 3, 5
    cache_k = torch.zeros(1, 1, n_global + n_local, 2)
    cache_v = torch.zeros_like(cache_k)
    positions = torch.full((n_global + n_local,), -1, dtype=torch.int64)
    model = {}
    start = 0
    for size in (2, 1, 4, 11, 1, 6):
        k = torch.arange(start, start + size, dtype=torch.float32).view(1, 1, size, 1).expand(1, 1, size, 2)
        li.ring_cache_append(cache_k, cache_v, positions, k, -k, start, n_global=n_global, n_local=n_local)
        for p in range(start, start + size):
            model[p if p < n_global else n_global + (p - n_global) % n_local] = p
        start += size
        for slot, p in model.items():
            assert positions[slot] == p
            assert cache_k[0, 0, slot, 0] == p and cache_v[0, 0, slot, 1] == -p
    assert (positions >= 0).all()


def _window_at(offset, q, k, v, n_global, n_local):
    """Queries at offset..offset+T attending to a cache of the first n_global tokens and the
    n_local tokens before offset, with the same contents whatever the offset."""
    g_k, w_k, chunk_k = k[:, :, :n_global], k[:, :, n_global:n_global + n_local], k[:, :, n_global + n_local:]
    g_v, w_v, chunk_v = v[:, :, :n_global], v[:, :, n_global:n_global + n_local], v[:, :, n_global + n_local:]
    cache_k, cache_v = torch.cat([g_k, w_k], 2), torch.cat([g_v, w_v], 2)
    positions = torch.cat([torch.arange(n_global), torch.arange(offset - n_local, offset)])
    return cache_k, cache_v, positions, chunk_k, chunk_v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_at_1e9_equals_stream_at_1e3(dtype):
    n_global, n_local, T = 4, 64, 40
    q, k, v = random_qkv(1, 4, 2, n_global + n_local + T, 64, dtype)
    q = q[:, :, -T:]
    inv_freq = rope_inv_freq(64)
    outs = []
    for offset in (10**3, 10**9):
        cache_k, cache_v, positions, ck, cv = _window_at(offset, q, k, v, n_global, n_local)
        outs.append(li.lambda_attention_chunk(q, ck, cv, cache_k, cache_v, positions, offset, inv_freq,
                                              n_global=n_global, n_local=n_local))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_chunk_far_into_a_stream_matches_reference():
    n_global, n_local, T, offset = 4, 64, 100, 10**9 + 7
    q, k, v = random_qkv(1, 6, 3, n_global + n_local + T, 64)
    q = q[:, :, -T:]
    inv_freq = rope_inv_freq(64)
    cache_k, cache_v, positions, ck, cv = _window_at(offset, q, k, v, n_global, n_local)
    out = li.lambda_attention_chunk(q, ck, cv, cache_k, cache_v, positions, offset, inv_freq,
                                    n_global=n_global, n_local=n_local, distance_cap=30)
    key_positions = torch.cat([positions, torch.arange(offset, offset + T)])
    ref = li.lambda_attention_reference(
        q.double(), torch.cat([cache_k, ck], 2).double(), torch.cat([cache_v, cv], 2).double(), inv_freq,
        n_global=n_global, n_local=n_local, distance_cap=30,
        query_positions=torch.arange(offset, offset + T), key_positions=key_positions)
    assert rel_error(out, ref) < 1e-5


def test_empty_slots_are_ignored():
    q, k, v = random_qkv(1, 2, 1, 5, 32)
    inv_freq = rope_inv_freq(32)
    garbage = torch.full((1, 1, 8, 32), float("nan"))
    empty = torch.full((8,), -1, dtype=torch.int64)
    out = li.lambda_attention_chunk(q, k, v, garbage, garbage, empty, 0, inv_freq, n_global=2, n_local=3)
    torch.testing.assert_close(out, li.lambda_attention(q, k, v, inv_freq, n_global=2, n_local=3))
