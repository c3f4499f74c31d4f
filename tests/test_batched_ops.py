"""Batches of different lengths (issue #16): every sequence of a batch gets, from each op, the
result it gets alone, and the float64 reference agrees.

A ragged batch is left-padded: sequence b has padding[b] leading padding rows (filled with
garbage that must never be read as a key), its real rows after them. The ops take the
padding and per-sequence positions; "alone" is the same op on that sequence's real rows with
shared (batch-of-one) positions.
"""

from __future__ import annotations

import pytest
import torch

import lm_infinite as li
from lm_infinite.ops import lambda_attention_chunk, lambda_attention_chunk_top_k, ring_cache_append
from lm_infinite.top_k_rows import top_k_rows_attention
from helpers import rel_error, rope_inv_freq

HEAD_DIM = 32
INV_FREQ = rope_inv_freq(HEAD_DIM)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA device"))]
# Batched vs alone on one device, and against the float64 reference: the CUDA kernels sum in
# other orders (and use fast exp), so their float32 results sit a little further away.
TOLERANCE = {"cpu": dict(rtol=1e-5, atol=1e-6, reference=1e-5),
             "cuda": dict(rtol=1e-4, atol=2e-5, reference=1e-4)}


def on(device, *tensors):
    """The tensors (None passes through) on `device`."""
    return tuple(None if t is None else t.to(device) for t in tensors)


def close(got, want, device):
    tol = TOLERANCE[device]
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=tol["rtol"], atol=tol["atol"])


def left_padded(tensors: list[torch.Tensor], garbage: float = 1e3) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence [heads, n_b, head_dim] tensors as one [batch, heads, max n, head_dim]
    batch, left-padded with large random garbage; and the padding counts, int64 [batch]."""
    longest = max(t.shape[1] for t in tensors)
    batch = garbage * torch.randn(len(tensors), tensors[0].shape[0], longest, tensors[0].shape[2])
    for b, t in enumerate(tensors):
        batch[b, :, longest - t.shape[1]:] = t
    return batch, torch.tensor([longest - t.shape[1] for t in tensors], dtype=torch.int64)


def chunk_positions(starts: torch.Tensor, padding: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[batch, n_rows]: start_b + t - padding_b for real rows, -1 for padding rows (the
    reference's convention)."""
    t = torch.arange(n_rows)[None, :]
    return torch.where(t >= padding[:, None], starts[:, None] + t - padding[:, None], -1)


def ring_positions(start: int, n_global: int, n_local: int) -> torch.Tensor:
    """Slot positions of a ring cache that has seen positions 0..start-1, in ring_slot order."""
    positions = torch.full((n_global + n_local,), -1, dtype=torch.int64)
    for p in range(start):
        positions[p if p < n_global else n_global + (p - n_global) % n_local] = p
    return positions


def reference(q, k, v, **kwargs):
    return li.lambda_attention_reference(q.double(), k.double(), v.double(), INV_FREQ, **kwargs)


# Lengths below and beyond n_local (and n_global) in one batch; GQA and MHA.
LENGTH_CASES = [
    # lengths, heads_q, heads_kv, n_global, n_local
    ([1, 5, 40, 17], 4, 2, 3, 8),
    ([33, 2, 33], 3, 3, 0, 5),
    ([70, 9, 130], 6, 2, 4, 20),
]


# --- The reference: per-sequence positions equal a loop over the sequences. ---

@pytest.mark.parametrize("top_k", [0, 2])
def test_reference_with_per_sequence_positions_equals_each_sequence_alone(top_k):
    """Positions [batch, n] (negative = padding) give, row for row, what [n] positions give
    for that sequence alone; padding queries are zeros."""
    n_global, n_local, n_q, slots = 2, 6, 7, 12
    batch, heads_q, heads_kv = 3, 4, 2
    q = torch.randn(batch, heads_q, n_q, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(batch, heads_kv, slots + n_q, HEAD_DIM, dtype=torch.float64)
    v = torch.randn_like(k)
    middle_k = torch.randn(batch, heads_kv, 5, HEAD_DIM, dtype=torch.float64)
    middle_v = torch.randn_like(middle_k)
    starts, padding = torch.tensor([12, 30, 4]), torch.tensor([0, 3, 7])
    query_positions = chunk_positions(starts, padding, n_q)
    key_positions = torch.cat([torch.stack([ring_positions(int(s), n_global, slots - n_global)
                                            for s in starts]), query_positions], dim=1)
    middle_positions = torch.stack([torch.randperm(int(s) + 1)[:5] - 1 for s in starts])
    kwargs = dict(n_global=n_global, n_local=n_local, top_k=top_k, top_k_distance=3,
                  top_k_first_row=2)
    batched = li.lambda_attention_reference(
        q, k, v, INV_FREQ, query_positions=query_positions, key_positions=key_positions,
        middle_k=middle_k, middle_v=middle_v, middle_positions=middle_positions, **kwargs)
    for b in range(batch):
        alone = li.lambda_attention_reference(
            q[b:b + 1], k[b:b + 1], v[b:b + 1], INV_FREQ, query_positions=query_positions[b],
            key_positions=key_positions[b], middle_k=middle_k[b:b + 1],
            middle_v=middle_v[b:b + 1], middle_positions=middle_positions[b], **kwargs)
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-12, atol=1e-12)
        # A real row sees at least itself; a padding row sees nothing.
        real = query_positions[b] >= 0
        assert (batched[b, :, ~real] == 0).all()
        assert (batched[b, :, real].abs().sum(-1) > 0).all()


def test_reference_padding_is_a_shift_of_positions():
    """A left-padded sequence (padding queries and keys at -1) equals the unpadded one: the
    reference itself, checked against the plain causal path."""
    n = 9
    q = torch.randn(1, 2, n, HEAD_DIM, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    positions = torch.arange(-3, n - 3).clamp(min=-1)[None]
    padded = li.lambda_attention_reference(q, k, v, INV_FREQ, n_global=1, n_local=4,
                                           query_positions=positions, key_positions=positions)
    alone = li.lambda_attention_reference(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], INV_FREQ,
                                          n_global=1, n_local=4)
    torch.testing.assert_close(padded[:, :, 3:], alone, rtol=1e-12, atol=1e-12)
    assert (padded[:, :, :3] == 0).all()


# --- lambda_attention with padding. ---

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,heads_q,heads_kv,n_global,n_local", LENGTH_CASES)
def test_lambda_attention_padded_batch_equals_each_sequence_alone(lengths, heads_q, heads_kv,
                                                                  n_global, n_local, device):
    qs = [torch.randn(heads_q, n, HEAD_DIM) for n in lengths]
    ks = [torch.randn(heads_kv, n, HEAD_DIM) for n in lengths]
    vs = [torch.randn(heads_kv, n, HEAD_DIM) for n in lengths]
    (q, padding), (k, _), (v, _) = left_padded(qs), left_padded(ks), left_padded(vs)
    out = li.lambda_attention(*on(device, q, k, v, INV_FREQ), n_global=n_global, n_local=n_local,
                              padding=padding.to(device)).cpu()
    longest = q.shape[2]
    positions = chunk_positions(torch.zeros(len(lengths), dtype=torch.int64), padding, longest)
    ref = reference(q, k, v, n_global=n_global, n_local=n_local, query_positions=positions,
                    key_positions=positions)
    for b, n in enumerate(lengths):
        alone = li.lambda_attention(*on(device, qs[b][None], ks[b][None], vs[b][None], INV_FREQ),
                                    n_global=n_global, n_local=n_local)
        close(out[b:b + 1, :, longest - n:], alone, device)
        assert rel_error(out[b, :, longest - n:], ref[b, :, longest - n:]) < TOLERANCE[device]["reference"]
        assert (out[b, :, :longest - n] == 0).all()


def test_padding_rows_are_never_read_as_keys():
    """NaN in every padding row of q, k and v leaves the real rows finite and exact."""
    lengths = [3, 11]
    qs = [torch.randn(2, n, HEAD_DIM) for n in lengths]
    ks = [torch.randn(1, n, HEAD_DIM) for n in lengths]
    vs = [torch.randn(1, n, HEAD_DIM) for n in lengths]
    q, padding = left_padded(qs, garbage=float("nan"))
    k, _ = left_padded(ks, garbage=float("nan"))
    v, _ = left_padded(vs, garbage=float("nan"))
    out = li.lambda_attention(q, k, v, INV_FREQ, n_global=1, n_local=4, padding=padding)
    alone = li.lambda_attention(qs[0][None], ks[0][None], vs[0][None], INV_FREQ, n_global=1,
                                n_local=4)
    torch.testing.assert_close(out[:1, :, 8:], alone, rtol=1e-5, atol=1e-6)
    assert (out[0, :, :8] == 0).all()
    assert torch.isfinite(out).all()


def test_no_padding_and_zero_padding_agree():
    q = torch.randn(2, 2, 13, HEAD_DIM)
    k, v = torch.randn_like(q), torch.randn_like(q)
    plain = li.lambda_attention(q, k, v, INV_FREQ, n_global=2, n_local=5)
    zero = li.lambda_attention(q, k, v, INV_FREQ, n_global=2, n_local=5,
                               padding=torch.zeros(2, dtype=torch.int64))
    assert torch.equal(plain, zero)


def test_all_padding_sequence_is_zeros():
    q = torch.randn(2, 2, 6, HEAD_DIM)
    k, v = torch.randn_like(q), torch.randn_like(q)
    out = li.lambda_attention(q, k, v, INV_FREQ, n_global=1, n_local=3,
                              padding=torch.tensor([6, 0]))
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1:], li.lambda_attention(q[1:], k[1:], v[1:], INV_FREQ,
                                                            n_global=1, n_local=3))


# --- lambda_attention_chunk with per-sequence starts, slot positions and padding. ---

def chunk_case(starts, n_new, padding, heads_q, heads_kv, n_global, n_local):
    """A batch whose sequences sit at different positions: ring caches filled to `starts`,
    a chunk of n_new rows with `padding` leading padding rows each."""
    batch, slots = len(starts), n_global + n_local
    q = torch.randn(batch, heads_q, n_new, HEAD_DIM)
    k = torch.randn(batch, heads_kv, n_new, HEAD_DIM)
    v = torch.randn_like(k)
    cache_k = torch.randn(batch, heads_kv, slots, HEAD_DIM)
    cache_v = torch.randn_like(cache_k)
    cache_positions = torch.stack([ring_positions(s, n_global, n_local) for s in starts])
    return q, k, v, cache_k, cache_v, cache_positions, torch.tensor(starts), torch.tensor(padding)


CHUNK_CASES = [
    # starts, n_new, padding, heads_q, heads_kv, n_global, n_local
    ([0, 3, 50, 7], 5, [0, 2, 4, 5], 4, 2, 2, 8),   # below and beyond the window, one all padding
    ([100, 1], 1, [0, 0], 3, 1, 4, 6),             # decode step at different positions
    ([9, 40, 200], 37, [30, 0, 12], 2, 2, 0, 16),  # chunk longer than the window
    # Decode over rings long enough that the CPU kernel splits each sequence's slots across
    # work items (wrapped, partly empty, one sequence padding only).
    ([5000, 2500, 300], 1, [0, 1, 0], 3, 1, 2, 2500),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("starts,n_new,padding,heads_q,heads_kv,n_global,n_local", CHUNK_CASES)
def test_chunk_per_sequence_equals_each_sequence_alone(starts, n_new, padding, heads_q, heads_kv,
                                                       n_global, n_local, device):
    q, k, v, ck, cv, cpos, qs, pad = chunk_case(starts, n_new, padding, heads_q, heads_kv,
                                                n_global, n_local)
    out = lambda_attention_chunk(*on(device, q, k, v, ck, cv, cpos, qs, INV_FREQ), n_global=n_global,
                                 n_local=n_local, padding=pad.to(device)).cpu()
    positions = chunk_positions(qs, pad, n_new)
    ref = reference(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2), n_global=n_global,
                    n_local=n_local, query_positions=positions,
                    key_positions=torch.cat([cpos, positions], 1))
    for b, p in enumerate(padding):
        real = slice(p, None)
        assert (out[b, :, :p] == 0).all()
        if p == n_new:
            continue
        alone = lambda_attention_chunk(
            *on(device, q[b:b + 1, :, real], k[b:b + 1, :, real], v[b:b + 1, :, real], ck[b:b + 1],
                cv[b:b + 1], cpos[b]), starts[b], INV_FREQ.to(device), n_global=n_global,
            n_local=n_local)
        close(out[b:b + 1, :, real], alone, device)
        assert rel_error(out[b, :, real], ref[b, :, real]) < TOLERANCE[device]["reference"]


def test_shared_and_per_sequence_layouts_agree():
    """[1] start and [slots] positions mean the same as their per-sequence copies."""
    q, k, v, ck, cv, cpos, _, _ = chunk_case([20, 20, 20], 4, [0, 0, 0], 2, 1, 3, 7)
    shared = lambda_attention_chunk(q, k, v, ck, cv, cpos[0], 20, INV_FREQ, n_global=3, n_local=7)
    per_sequence = lambda_attention_chunk(q, k, v, ck, cv, cpos, torch.tensor([20, 20, 20]),
                                          INV_FREQ, n_global=3, n_local=7,
                                          padding=torch.zeros(3, dtype=torch.int64))
    assert torch.equal(shared, per_sequence)


def history_case(starts, n_new, padding, heads_q, heads_kv, n_global, n_local):
    """Like chunk_case, with each sequence's whole history: keys and values of positions
    0..start_b-1 ([batch, heads_kv, max start, head_dim], positions -1 past start_b), the ring
    cache holding its first n_global and last n_local, and a middle store holding every
    token past the globals (as the streaming cache keeps it)."""
    q, k, v, _, _, cache_positions, qs, pad = chunk_case(starts, n_new, padding, heads_q,
                                                         heads_kv, n_global, n_local)
    batch, longest = len(starts), max(starts)
    history_k = torch.randn(batch, heads_kv, longest, HEAD_DIM)
    history_v = torch.randn_like(history_k)
    history_positions = torch.where(torch.arange(longest)[None] < qs[:, None],
                                    torch.arange(longest)[None], -1)
    slot = cache_positions.clamp(min=0)[:, None, :, None].expand(-1, heads_kv, -1, HEAD_DIM)
    cache_k, cache_v = history_k.gather(2, slot), history_v.gather(2, slot)
    middle_positions = torch.where(history_positions >= n_global, history_positions, -1)
    return (q, k, v, cache_k, cache_v, cache_positions, qs, pad, history_k, history_v,
            history_positions, middle_positions)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k_first_row", [0, 3])
@pytest.mark.parametrize("starts,n_new,padding,heads_q,heads_kv,n_global,n_local", CHUNK_CASES)
def test_chunk_top_k_per_sequence_equals_each_sequence_alone(starts, n_new, padding, heads_q,
                                                             heads_kv, n_global, n_local,
                                                             top_k_first_row, device):
    """Top-k with per-sequence middle positions; top_k_first_row counts padding rows, so
    alone the first top-k row is top_k_first_row - padding[b]. The reference sees each
    sequence's whole history as keys (so its candidates are the middle store's). The composed
    path (what CUDA runs; called here on CPU too) agrees with the kernel."""
    (q, k, v, ck, cv, cpos, qs, pad, hk, hv, hpos,
     middle_positions) = history_case(starts, n_new, padding, heads_q, heads_kv, n_global, n_local)
    top = dict(middle_k=hk, middle_v=hv, middle_positions=middle_positions, top_k=2,
               top_k_distance=5)
    top_on = dict(top, middle_k=hk.to(device), middle_v=hv.to(device),
                  middle_positions=middle_positions.to(device))
    out = lambda_attention_chunk_top_k(*on(device, q, k, v, ck, cv, cpos, qs, INV_FREQ), n_global=n_global,
                                       n_local=n_local, padding=pad.to(device),
                                       top_k_first_row=top_k_first_row, **top_on).cpu()
    positions = chunk_positions(qs, pad, n_new)
    ref = reference(q, torch.cat([hk, k], 2), torch.cat([hv, v], 2), n_global=n_global,
                    n_local=n_local, query_positions=positions,
                    key_positions=torch.cat([hpos, positions], 1), top_k=2, top_k_distance=5,
                    top_k_first_row=top_k_first_row)
    composed = top_k_rows_attention(q, k, v, ck, cv, cpos, qs, INV_FREQ, first_row=0,
                                    n_global=n_global, n_local=n_local, distance_cap=n_local,
                                    scale=HEAD_DIM**-0.5, padding=pad, **top)
    for b, p in enumerate(padding):
        real = slice(p, None)
        assert (out[b, :, :p] == 0).all() and (composed[b, :, :p] == 0).all()
        if p == n_new:
            continue
        alone = lambda_attention_chunk_top_k(
            *on(device, q[b:b + 1, :, real], k[b:b + 1, :, real], v[b:b + 1, :, real], ck[b:b + 1],
                cv[b:b + 1], cpos[b]), starts[b], INV_FREQ.to(device), n_global=n_global,
            n_local=n_local, middle_k=hk[b:b + 1].to(device), middle_v=hv[b:b + 1].to(device),
            middle_positions=middle_positions[b].to(device), top_k=2, top_k_distance=5,
            top_k_first_row=max(0, top_k_first_row - p))
        close(out[b:b + 1, :, real], alone, device)
        assert rel_error(out[b, :, real], ref[b, :, real]) < TOLERANCE[device]["reference"]
        if top_k_first_row == 0:
            assert rel_error(composed[b, :, real], ref[b, :, real]) < 1e-5


# --- ring_cache_append and chunked feeding. ---

def test_ring_append_per_sequence_follows_each_sequence_alone():
    """Per-sequence starts and padding write each sequence's ring exactly as a batch of one."""
    n_global, n_local, n_new = 2, 5, 9
    starts, padding = [0, 4, 30], [3, 0, 9]
    batch = len(starts)
    k = torch.randn(batch, 2, n_new, 4)
    v = torch.randn_like(k)
    cache_k = torch.zeros(batch, 2, n_global + n_local, 4)
    cache_v = torch.zeros_like(cache_k)
    positions = torch.stack([ring_positions(s, n_global, n_local) for s in starts])
    expected = [(cache_k[b:b + 1].clone(), cache_v[b:b + 1].clone(), positions[b].clone())
                for b in range(batch)]
    ring_cache_append(cache_k, cache_v, positions, k, v, torch.tensor(starts), n_global=n_global,
                      n_local=n_local, padding=torch.tensor(padding))
    for b, (ek, ev, ep) in enumerate(expected):
        ring_cache_append(ek, ev, ep, k[b:b + 1, :, padding[b]:], v[b:b + 1, :, padding[b]:],
                          starts[b], n_global=n_global, n_local=n_local)
        assert torch.equal(cache_k[b:b + 1], ek) and torch.equal(cache_v[b:b + 1], ev)
        assert torch.equal(positions[b], ep)
    assert torch.equal(positions[2], ring_positions(30, n_global, n_local))  # all padding


def stream_ragged(qs, ks, vs, chunk, *, n_global, n_local, device="cpu"):
    """Feed sequences of different lengths as one batch: each step takes the next `chunk`
    tokens of every sequence, left-padded where a sequence has fewer (or none) left; the cache
    holds per-sequence positions. Returns each sequence's outputs."""
    batch, heads_kv = len(qs), ks[0].shape[0]
    cache_k = torch.zeros(batch, heads_kv, n_global + n_local, HEAD_DIM, device=device)
    cache_v = torch.zeros_like(cache_k)
    cache_positions = torch.full((batch, n_global + n_local), -1, dtype=torch.int64, device=device)
    seen = torch.zeros(batch, dtype=torch.int64)
    outs = [[] for _ in qs]
    while any(int(seen[b]) < qs[b].shape[1] for b in range(batch)):
        pieces = [tuple(x[:, int(seen[b]):int(seen[b]) + chunk] for x in (qs[b], ks[b], vs[b]))
                  for b in range(batch)]
        width = max(p[0].shape[1] for p in pieces)
        padding = torch.tensor([width - p[0].shape[1] for p in pieces], dtype=torch.int64)

        def padded(i):
            out = 1e3 * torch.randn(batch, pieces[0][i].shape[0], width, HEAD_DIM)
            for b, p in enumerate(pieces):
                out[b, :, width - p[i].shape[1]:] = p[i]
            return out

        q, k, v = on(device, padded(0), padded(1), padded(2))
        out = lambda_attention_chunk(q, k, v, cache_k, cache_v, cache_positions, seen.to(device),
                                     INV_FREQ.to(device), n_global=n_global, n_local=n_local,
                                     padding=padding.to(device)).cpu()
        ring_cache_append(cache_k, cache_v, cache_positions, k, v, seen.to(device),
                          n_global=n_global, n_local=n_local, padding=padding.to(device))
        for b, p in enumerate(pieces):
            outs[b].append(out[b:b + 1, :, width - p[0].shape[1]:])
        seen += width - padding
    return [torch.cat(o, dim=2) for o in outs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("lengths,heads_q,heads_kv,n_global,n_local", LENGTH_CASES)
def test_chunked_ragged_stream_equals_each_sequence_alone(chunk, lengths, heads_q, heads_kv,
                                                          n_global, n_local, device):
    """Chunked feeding through ring_cache_append with per-sequence positions: each sequence's
    outputs equal its whole-sequence attention alone and the float64 reference."""
    qs = [torch.randn(heads_q, n, HEAD_DIM) for n in lengths]
    ks = [torch.randn(heads_kv, n, HEAD_DIM) for n in lengths]
    vs = [torch.randn(heads_kv, n, HEAD_DIM) for n in lengths]
    streamed = stream_ragged(qs, ks, vs, chunk, n_global=n_global, n_local=n_local, device=device)
    for b in range(len(lengths)):
        q, k, v = qs[b][None], ks[b][None], vs[b][None]
        alone = li.lambda_attention(*on(device, q, k, v, INV_FREQ), n_global=n_global,
                                    n_local=n_local).cpu()
        # Chunks rotate from other anchors than the whole pass: a few ulps more.
        torch.testing.assert_close(streamed[b], alone, rtol=5 * TOLERANCE[device]["rtol"],
                                   atol=5 * TOLERANCE[device]["atol"])
        assert rel_error(streamed[b], reference(q, k, v, n_global=n_global, n_local=n_local)) < \
            TOLERANCE[device]["reference"]


# --- opcheck on the changed ops with the new arguments. ---

def test_opcheck_with_padding_and_per_sequence_positions():
    q, k, v, ck, cv, cpos, qs, pad = chunk_case([3, 20], 4, [1, 0], 2, 1, 2, 6)
    middle_k = torch.randn(2, 1, 3, HEAD_DIM)
    middle_v = torch.randn_like(middle_k)
    middle_positions = torch.tensor([[-1, 0, 1], [5, 9, 2]])
    torch.library.opcheck(torch.ops.lminf.lambda_attention,
                          (q, k, v, INV_FREQ, 2, 6, 6, 0.2, pad))
    torch.library.opcheck(torch.ops.lminf.lambda_attention_chunk,
                          (q, k, v, ck, cv, cpos, qs, INV_FREQ, 2, 6, 6, 0.2, pad))
    torch.library.opcheck(torch.ops.lminf.lambda_attention_chunk_top_k,
                          (q, k, v, ck, cv, cpos, qs, INV_FREQ, 2, 6, 6, 0.2, middle_k, middle_v,
                           middle_positions, 2, 3, 1, pad))
    torch.library.opcheck(torch.ops.lminf.ring_cache_append,
                          (ck.clone(), cv.clone(), cpos.clone(), k, v, qs, 2, 6, pad))
