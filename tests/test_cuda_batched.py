"""Batches of different sequences on the CUDA kernels (issue 16): per-sequence query starts,
leading padding rows and per-sequence cache-position rows.

The contract: a batch behaves, sequence by sequence, exactly as if each sequence ran alone.
Every test checks each sequence of a batch against the same sequence run alone through the
same op (a batch of one, no padding, a shared positions row) and against the float64
reference, and that padding rows are zeros. Padding rows of q, k and v hold NaN (and empty
cache slots too), so a padding row that leaks into a real row shows as NaN. The paths:
prefill on the tensor-core kernel (with and without key splits) and the generic kernel,
decode (1 to 16 queries, its split merge), chunks against a wrapped ring cache with rows in
any order, the ring append, and a short stream (left-padded prompts, then decode steps).
Low-precision errors are bounded by twice PyTorch's own error in that dtype, as in
test_cuda_kernels.py; "alone" is held to the same bound (its blocks and splits differ).
"""

from __future__ import annotations

import pytest
import torch

import lm_infinite as li
from cuda_checks import DEV, LOW_PRECISION, randn
from helpers import rel_error, rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def padded_qkv(batch, hq, hkv, n_q, dim, dtype, padding):
    """Random q, k, v whose padding rows (t < padding[b]) are NaN."""
    q, k, v = randn(batch, hq, n_q, dim, dtype=dtype), randn(batch, hkv, n_q, dim, dtype=dtype), \
        randn(batch, hkv, n_q, dim, dtype=dtype)
    for b, pad in enumerate(padding):
        for t in (q, k, v):
            t[b, :, :pad] = float("nan")
    return q, k, v


def ring_row(n_global, n_local, seen, offset=0):
    """The slot positions of a RingKVCache after `seen` tokens (positions >= n_global moved by
    offset), -1 = empty."""
    positions = torch.full((n_global + n_local,), -1, dtype=torch.int64)
    for p in range(max(0, seen - n_local), seen):
        positions[p if p < n_global else n_global + (p - n_global) % n_local] = p
    for p in range(min(n_global, seen)):
        positions[p] = p
    return torch.where(positions >= n_global, positions + offset, positions)


def ring_caches(batch, hkv, dim, n_global, n_local, seens, dtype, offsets=None, shuffle=False):
    """Caches and a [batch, slots] positions tensor, sequence b after seens[b] tokens; empty
    slots hold NaN. shuffle: each row's slots in its own random order."""
    offsets = offsets or [0] * batch
    slots = n_global + n_local
    cache_k, cache_v = (randn(batch, hkv, slots, dim, dtype=dtype) for _ in range(2))
    rows = []
    for b in range(batch):
        row = ring_row(n_global, n_local, seens[b], offsets[b])
        if shuffle:
            order = torch.randperm(slots)
            row = row[order]
            cache_k[b], cache_v[b] = cache_k[b][:, order.to(DEV)], cache_v[b][:, order.to(DEV)]
        empty = (row < 0).to(DEV)
        cache_k[b][:, empty] = float("nan")
        cache_v[b][:, empty] = float("nan")
        rows.append(row)
    return cache_k, cache_v, torch.stack(rows)


def check_sequence(out_b, alone_b, q, keys, values, inv_freq, dtype, query_positions,
                   key_positions, **kwargs):
    """One sequence's real rows of a batched output (out_b) and of the same sequence run alone
    (alone_b) against the float64 reference of q (that sequence's real rows) over keys/values
    at key_positions; returns the batched error."""
    exact = li.lambda_attention_reference(q.double().cpu(), keys.double().cpu(),
                                          values.double().cpu(), inv_freq,
                                          query_positions=query_positions,
                                          key_positions=key_positions, **kwargs)
    if dtype == torch.float32:
        bound = 2e-5
    else:
        low = li.lambda_attention_reference(q, keys, values, inv_freq.to(DEV),
                                            query_positions=query_positions.to(DEV),
                                            key_positions=key_positions.to(DEV), **kwargs)
        bound = 2 * rel_error(low.cpu(), exact) + 1e-4
    err = rel_error(out_b.cpu(), exact)
    assert err <= bound, ("batched", err, bound)
    assert rel_error(alone_b.cpu(), exact) <= bound, ("alone", bound)
    assert rel_error(out_b.cpu(), alone_b.cpu()) <= bound, ("batched vs alone", bound)
    return err


def assert_padding_rows_zero(out, padding):
    for b, pad in enumerate(padding):
        assert (out[b, :, :pad] == 0).all(), f"padding rows of sequence {b} are not zeros"


def padding_tensor(padding):
    return torch.tensor(padding, dtype=torch.int64, device=DEV)


# ----------------------------------------------------------------------------------------------
# Whole sequences (prefill): left padding, positions t - padding[b].

PREFILL_BATCHES = [
    # dtype, batch, hq, hkv, n_q, dim, n_global, n_local, padding
    (torch.bfloat16, 3, 8, 2, 300, 128, 4, 100, [0, 37, 200]),  # tensor cores; a padding block
    (torch.float16, 3, 9, 3, 300, 64, 4, 64, [5, 0, 299]),      # one real row left
    (torch.bfloat16, 2, 2, 1, 150, 64, 3, 70, [64, 1]),         # few blocks: key splits
    (torch.float16, 4, 4, 4, 130, 128, 0, 40, [0, 16, 17, 130]),  # MHA, G = 0; all padding
    (torch.float32, 3, 4, 2, 100, 64, 4, 30, [0, 9, 50]),       # the generic kernel
    (torch.bfloat16, 2, 4, 2, 90, 80, 2, 33, [3, 40]),          # head_dim 80: generic
]


@pytest.mark.parametrize("dtype,batch,hq,hkv,n_q,dim,n_global,n_local,padding", PREFILL_BATCHES)
def test_batched_prefill_equals_each_sequence_alone(dtype, batch, hq, hkv, n_q, dim, n_global,
                                                    n_local, padding):
    q, k, v = padded_qkv(batch, hq, hkv, n_q, dim, dtype, padding)
    inv_freq = rope_inv_freq(dim)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=n_global, n_local=n_local,
                              padding=padding_tensor(padding))
    assert out.shape == q.shape and out.dtype == dtype
    assert_padding_rows_zero(out, padding)
    for b, pad in enumerate(padding):
        if pad == n_q:
            continue
        real = slice(pad, n_q)
        qb, kb, vb = (t[b:b + 1, :, real] for t in (q, k, v))
        alone = li.lambda_attention(qb, kb, vb, inv_freq.to(DEV), n_global=n_global,
                                    n_local=n_local)
        positions = torch.arange(n_q - pad)
        check_sequence(out[b:b + 1, :, real], alone, qb, kb, vb, inv_freq, dtype, positions,
                       positions, n_global=n_global, n_local=n_local)


def test_batched_prefill_without_padding_equals_the_shared_layout():
    """padding all zero is the same computation as no padding (bit for bit)."""
    q, k, v = padded_qkv(2, 4, 2, 200, 64, torch.bfloat16, [0, 0])
    inv_freq = rope_inv_freq(64).to(DEV)
    plain = li.lambda_attention(q, k, v, inv_freq, n_global=4, n_local=50)
    zero = li.lambda_attention(q, k, v, inv_freq, n_global=4, n_local=50,
                               padding=padding_tensor([0, 0]))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Chunks against per-sequence ring caches: decode (1 to 16 queries) and the tensor-core path
# (more than 16), wrapped rings, empty slots, rows in any order.

def run_chunk_batch(dtype, batch, hq, hkv, dim, n_q, n_global, n_local, seens, padding,
                    offsets=None, shuffle=False, cap=None):
    """A batched lambda_attention_chunk against per-sequence caches, each sequence checked
    against itself alone; returns the batched output."""
    offsets = offsets or [0] * batch
    cache_k, cache_v, positions = ring_caches(batch, hkv, dim, n_global, n_local, seens, dtype,
                                              offsets, shuffle)
    q, k, v = padded_qkv(batch, hq, hkv, n_q, dim, dtype, padding)
    inv_freq = rope_inv_freq(dim)
    starts = [s + o for s, o in zip(seens, offsets)]
    out = li.lambda_attention_chunk(
        q, k, v, cache_k, cache_v, positions.to(DEV),
        torch.tensor(starts, dtype=torch.int64, device=DEV), inv_freq.to(DEV),
        n_global=n_global, n_local=n_local, distance_cap=cap, padding=padding_tensor(padding))
    assert out.shape == q.shape
    assert_padding_rows_zero(out, padding)
    for b, pad in enumerate(padding):
        if pad == n_q:
            continue
        real = slice(pad, n_q)
        qb, kb, vb = (t[b:b + 1, :, real] for t in (q, k, v))
        alone = li.lambda_attention_chunk(qb, kb, vb, cache_k[b:b + 1], cache_v[b:b + 1],
                                          positions[b].to(DEV), starts[b], inv_freq.to(DEV),
                                          n_global=n_global, n_local=n_local, distance_cap=cap)
        present = positions[b] >= 0
        keys = torch.cat([cache_k[b:b + 1, :, present.to(DEV)], kb], 2)
        values = torch.cat([cache_v[b:b + 1, :, present.to(DEV)], vb], 2)
        query_positions = torch.arange(starts[b], starts[b] + n_q - pad)
        check_sequence(out[b:b + 1, :, real], alone, qb, keys, values, inv_freq, dtype,
                       query_positions, torch.cat([positions[b][present], query_positions]),
                       n_global=n_global, n_local=n_local, distance_cap=cap)
    return out


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n_q,padding", [(1, [0, 1, 0]), (4, [0, 3, 4]), (16, [15, 0, 6])])
@pytest.mark.parametrize("hq,hkv,dim", [(32, 8, 128), (16, 2, 64), (6, 6, 64)])
def test_batched_decode_equals_each_sequence_alone(dtype, n_q, padding, hq, hkv, dim):
    """The decode kernel and its merge: a wrapped ring, an unfull one (empty slots) and a fresh
    one in one batch, per-sequence starts and padding."""
    run_chunk_batch(dtype, 3, hq, hkv, dim, n_q, 4, 500, [10_000, 300, 0], padding)


@pytest.mark.parametrize("dim", [64, 128])
def test_batched_decode_slots_in_any_order_and_distance_cap(dim):
    run_chunk_batch(torch.bfloat16, 2, 8, 2, dim, 5, 4, 300, [3000, 1000], [2, 0],
                    shuffle=True, cap=200)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("n_q,padding", [(17, [0, 16, 1]), (100, [99, 37, 0]),
                                         (1000, [0, 500, 1000])])
def test_batched_chunk_against_wrapped_rings_equals_each_sequence_alone(dtype, dim, n_q, padding):
    """The tensor-core path after its pre-pass: one index row per sequence (its own window,
    global keys, empty tiles), the key sequence of its real rows only."""
    run_chunk_batch(dtype, 3, 4, 2, dim, n_q, 4, 1024, [10_000, 1500, 200], padding)


def test_batched_chunk_slots_in_any_order():
    run_chunk_batch(torch.bfloat16, 3, 6, 2, 64, 40, 3, 200, [777, 5000, 150], [0, 7, 39],
                    shuffle=True)


def test_batched_chunk_generic_kernel():
    """float32 chunks take the generic kernel."""
    run_chunk_batch(torch.float32, 3, 4, 2, 64, 30, 4, 100, [1000, 50, 0], [0, 29, 5])


@pytest.mark.parametrize("n_q,padding", [(1, [0, 0, 1]), (5, [1, 0, 3]), (300, [0, 77, 250])])
def test_one_sequence_near_1e9_keeps_every_bit(n_q, padding):
    """Only differences of positions reach the angles, sequence by sequence: moving one
    sequence's stream near 10^9 changes no bit of any output row."""
    args = (torch.bfloat16, 3, 8, 2, 128, n_q, 4, 256, [1000, 2000, 700], padding)
    torch.manual_seed(0)
    near = run_chunk_batch(*args)
    torch.manual_seed(0)
    far = run_chunk_batch(*args, offsets=[0, 10**9 - 2000 + 17, 10**9 + 5])
    torch.testing.assert_close(far, near, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Ring append: per-sequence starts, padding rows not written.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_global,n_local", [(0, 5), (3, 17), (10, 256)])
@pytest.mark.parametrize("n_new,padding", [(1, [0, 1, 0]), (4, [0, 3, 4]), (300, [0, 120, 299])])
def test_batched_ring_append_equals_each_sequence_alone(dtype, n_global, n_local, n_new, padding):
    batch, hkv, dim, slots = 3, 2, 64, n_global + n_local
    starts = [0, 1000, 10**9 + 3]
    cache_k, cache_v = (randn(batch, hkv, slots, dim, dtype=dtype) for _ in range(2))
    positions = torch.randint(-1, 50, (batch, slots), device=DEV)
    k, v = padded_qkv(batch, hkv, hkv, n_new, dim, dtype, padding)[1:]
    alone = [(cache_k[b:b + 1].clone(), cache_v[b:b + 1].clone(), positions[b].clone())
             for b in range(batch)]
    li.ring_cache_append(cache_k, cache_v, positions, k, v,
                         torch.tensor(starts, dtype=torch.int64, device=DEV),
                         n_global=n_global, n_local=n_local, padding=padding_tensor(padding))
    for b, pad in enumerate(padding):
        ck, cv, pos = alone[b]
        if pad < n_new:
            li.ring_cache_append(ck, cv, pos, k[b:b + 1, :, pad:], v[b:b + 1, :, pad:], starts[b],
                                 n_global=n_global, n_local=n_local)
        torch.testing.assert_close(cache_k[b:b + 1], ck, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(cache_v[b:b + 1], cv, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(positions[b], pos, rtol=0, atol=0)
    assert not cache_k.isnan().any(), "a padding row was written"


# ----------------------------------------------------------------------------------------------
# A short stream: left-padded prompts of different lengths, prefill, the ring append, then
# decode steps at per-sequence positions, against each sequence streamed alone.

@pytest.mark.parametrize("dim,hq,hkv", [(64, 9, 3), (128, 8, 2)])
def test_batched_stream_equals_each_sequence_streamed_alone(dim, hq, hkv):
    dtype, n_global, n_local = torch.bfloat16, 4, 128
    lengths = [300, 77, 200]
    batch, n_q, steps = len(lengths), max(lengths), 40
    padding = [n_q - n for n in lengths]
    inv_freq = rope_inv_freq(dim).to(DEV)
    q, k, v = padded_qkv(batch, hq, hkv, n_q, dim, dtype, padding)
    step_qkv = [tuple(randn(batch, h, 1, dim, dtype=dtype) for h in (hq, hkv, hkv))
                for _ in range(steps)]
    slots = n_global + n_local

    def new_cache(rows):
        return (torch.zeros(rows, hkv, slots, dim, dtype=dtype, device=DEV),
                torch.zeros(rows, hkv, slots, dim, dtype=dtype, device=DEV),
                torch.full((rows, slots), -1, dtype=torch.int64, device=DEV))

    # The batch: prefill with padding, append the real rows, then one token per step.
    cache_k, cache_v, positions = new_cache(batch)
    pad_t = padding_tensor(padding)
    outs = [li.lambda_attention(q, k, v, inv_freq, n_global=n_global, n_local=n_local,
                                padding=pad_t)]
    zeros = torch.zeros(batch, dtype=torch.int64, device=DEV)
    li.ring_cache_append(cache_k, cache_v, positions, k, v, zeros, n_global=n_global,
                         n_local=n_local, padding=pad_t)
    starts = torch.tensor(lengths, dtype=torch.int64, device=DEV)
    for qs, ks, vs in step_qkv:
        outs.append(li.lambda_attention_chunk(qs, ks, vs, cache_k, cache_v, positions, starts,
                                              inv_freq, n_global=n_global, n_local=n_local))
        li.ring_cache_append(cache_k, cache_v, positions, ks, vs, starts, n_global=n_global,
                             n_local=n_local)
        starts += 1

    for b, (pad, length) in enumerate(zip(padding, lengths)):
        ck, cv, pos = new_cache(1)
        qb, kb, vb = (t[b:b + 1, :, pad:] for t in (q, k, v))
        alone = [li.lambda_attention(qb, kb, vb, inv_freq, n_global=n_global, n_local=n_local)]
        li.ring_cache_append(ck, cv, pos[0], kb, vb, 0, n_global=n_global, n_local=n_local)
        for step, (qs, ks, vs) in enumerate(step_qkv):
            qsb, ksb, vsb = (t[b:b + 1] for t in (qs, ks, vs))
            alone.append(li.lambda_attention_chunk(qsb, ksb, vsb, ck, cv, pos[0], length + step,
                                                   inv_freq, n_global=n_global, n_local=n_local))
            li.ring_cache_append(ck, cv, pos[0], ksb, vsb, length + step, n_global=n_global,
                                 n_local=n_local)
        torch.testing.assert_close(positions[b], pos[0], rtol=0, atol=0)
        # The whole stream of this sequence against the reference over all of its tokens.
        batched = torch.cat([outs[0][b:b + 1, :, pad:]] + [o[b:b + 1] for o in outs[1:]], 2)
        stream_q = torch.cat([qb] + [s[0][b:b + 1] for s in step_qkv], 2)
        stream_k = torch.cat([kb] + [s[1][b:b + 1] for s in step_qkv], 2)
        stream_v = torch.cat([vb] + [s[2][b:b + 1] for s in step_qkv], 2)
        positions_b = torch.arange(length + steps)
        check_sequence(batched, torch.cat(alone, 2), stream_q, stream_k, stream_v,
                       inv_freq.cpu(), dtype, positions_b, positions_b, n_global=n_global,
                       n_local=n_local)
