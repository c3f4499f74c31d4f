"""Defined NaN/Inf behaviour (docs/api.md, "Low-level ops"): a row is NaN when a key it sees has a
non-finite score or value; keys it does not see never affect it. The kernel and the float64
reference agree on it, and on a plain causal case both are the softmax over the keys each row sees."""

import pytest
import torch

import lm_infinite as li
from helpers import random_qkv, rope_inv_freq

INV = rope_inv_freq(32)
SETTINGS = dict(n_global=1, n_local=3)  # row i sees key 0 and keys i-2 .. i


def both(q, k, v, **kw):
    settings = {**SETTINGS, **kw}
    out = li.lambda_attention(q, k, v, INV, **settings)
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), INV, **settings)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    return out


def nan_rows(out):  # [seq] for batch 0, head 0
    return torch.isnan(out[0, 0]).all(-1).nonzero().flatten().tolist()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_query_makes_its_row_nan(bad):
    q, k, v = random_qkv(1, 2, 1, 8, 32)
    q[0, 0, 5, 7] = bad
    out = both(q, k, v)
    assert nan_rows(out) == [5]
    assert torch.isfinite(out[0, 1]).all()  # the other head of the group


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_key_or_value_makes_the_rows_that_see_it_nan(where, bad):
    q, k, v = random_qkv(1, 1, 1, 10, 32)
    (k if where == "k" else v)[0, 0, 4, 3] = bad
    out = both(q, k, v)
    assert nan_rows(out) == [4, 5, 6]  # key 4 is local to rows 4..6 only


def test_a_non_finite_global_key_poisons_every_row_that_sees_it():
    q, k, v = random_qkv(1, 1, 1, 10, 32)
    v[0, 0, 0, 0] = float("nan")
    assert nan_rows(both(q, k, v)) == list(range(10))


def test_masked_and_empty_slots_never_reach_a_row():
    """Garbage (NaN, Inf) in empty cache slots and in keys the Λ mask hides changes nothing."""
    q, k, v = random_qkv(1, 2, 1, 4, 32)
    cache_k, cache_v = torch.randn(1, 1, 6, 32), torch.randn(1, 1, 6, 32)
    positions = torch.tensor([0, -1, 17, 18, 19, 5])  # slot 1 empty; position 5 is in the middle
    clean = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions, 20, INV, **SETTINGS)
    cache_k[0, 0, 1], cache_v[0, 0, 1] = float("nan"), float("inf")
    cache_k[0, 0, 5], cache_v[0, 0, 5] = float("inf"), float("nan")
    dirty = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions, 20, INV, **SETTINGS)
    torch.testing.assert_close(dirty, clean)
    assert torch.isfinite(dirty).all()


def test_top_k_candidates_count_as_seen():
    q, k, v = random_qkv(1, 1, 1, 2, 32)
    middle_k, middle_v = torch.randn(1, 1, 10, 32), torch.randn(1, 1, 10, 32)
    middle_k[0, 0, 2] = float("nan")
    empty = torch.zeros(1, 1, 0, 32)
    args = dict(n_global=1, n_local=3, middle_k=middle_k, middle_v=middle_v,
                middle_positions=torch.arange(1, 11), top_k=2, top_k_distance=2, top_k_first_row=1)
    out = li.lambda_attention_chunk_top_k(q, k, v, empty, empty, torch.zeros(0, dtype=torch.int64), 11,
                                          INV, **args)
    ref = li.lambda_attention_reference(
        q.double(), k.double(), v.double(), INV, query_positions=torch.arange(11, 13),
        **{**args, "middle_k": middle_k.double(), "middle_v": middle_v.double()})
    torch.testing.assert_close(out.double(), ref, equal_nan=True)
    assert nan_rows(out) == [1]  # row 0 does not use top-k


def test_causal_case_is_softmax_over_the_keys_each_row_sees():
    """With the window covering the sequence and no rotation, the op is causal attention:
    row i is softmax(q_i . k_0..i) v_0..i in IEEE arithmetic. (PyTorch's SDPA backends
    disagree here: the math backend lets a masked NaN key reach every row, the CPU flash one
    drops a NaN query; the op follows the definition.)"""
    q, k, v = random_qkv(1, 1, 1, 9, 32)
    q[0, 0, 2, 0] = float("nan")
    k[0, 0, 6, 1] = float("nan")
    out = li.lambda_attention(q, k, v, torch.zeros(16), n_global=0, n_local=64, scale=0.25)
    rows = [torch.softmax(q[0, 0, i] @ k[0, 0, : i + 1].T * 0.25, -1) @ v[0, 0, : i + 1] for i in range(9)]
    assert nan_rows(out) == [2, 6, 7, 8]
    torch.testing.assert_close(out[0, 0], torch.stack(rows), equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_padding_rows_never_reach_a_row_nor_the_cache(bad):
    """Padding rows are no key: non-finite values there leave every real row finite (kernel
    and reference agree), are not written into the ring, and a real non-finite key still
    poisons exactly the rows that see it."""
    q, k, v = random_qkv(2, 2, 1, 8, 32)
    padding = torch.tensor([3, 0])
    for t in (q, k, v):
        t[0, :, :3] = bad
    k[1, 0, 6, 0] = bad  # a real key of sequence 1, seen by its rows 6 and 7
    positions = torch.where(torch.arange(8)[None] >= padding[:, None],
                            torch.arange(8)[None] - padding[:, None], -1)
    out = li.lambda_attention(q, k, v, INV, padding=padding, **SETTINGS)
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), INV, query_positions=positions,
                                        key_positions=positions, **SETTINGS)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isfinite(out[0]).all() and (out[0, :, :3] == 0).all()
    assert torch.isnan(out[1]).all(-1).any(0).nonzero().flatten().tolist() == [6, 7]

    cache_k, cache_v = torch.zeros(2, 1, 5, 32), torch.zeros(2, 1, 5, 32)
    cache_positions = torch.full((2, 5), -1)
    li.ring_cache_append(cache_k, cache_v, cache_positions, k, v, torch.zeros(2, dtype=torch.int64),
                         n_global=1, n_local=4, padding=padding)
    assert torch.isfinite(cache_k[0]).all() and torch.isfinite(cache_v[0]).all()
    assert cache_positions[0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_a_long_ring_split_across_threads_keeps_the_rule(dtype):
    """A decode step over thousands of slots is split across work items whose softmax states
    are merged: a NaN value in any part reaches the rows that see it, and garbage in empty
    slots and slots the mask hides reaches none, as in one piece."""
    n_global, n_local, start = 2, 3000, 10_000
    q, k, v = (t.to(dtype) for t in random_qkv(1, 4, 1, 1, 32))
    slots = n_global + n_local
    cache_k, cache_v = torch.randn(1, 1, slots, 32).to(dtype), torch.randn(1, 1, slots, 32).to(dtype)
    positions = torch.cat([torch.arange(n_global), torch.arange(start - n_local, start)])
    positions[100] = -1  # an empty slot
    positions[2500] = 7  # a middle position the mask hides
    settings = dict(n_global=n_global, n_local=n_local)

    def run():
        return li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions, start, INV, **settings)

    clean = run()
    assert torch.isfinite(clean).all()
    # The float64 reference over cache and chunk as one key list.
    ref = li.lambda_attention_reference(
        q.double(), torch.cat([cache_k, k], 2).double(), torch.cat([cache_v, v], 2).double(), INV,
        query_positions=torch.tensor([start]), key_positions=torch.cat([positions, torch.tensor([start])]),
        **settings)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(clean.double(), ref, rtol=tol, atol=tol)
    cache_k[0, 0, 100], cache_v[0, 0, 2500] = float("nan"), float("inf")
    torch.testing.assert_close(run(), clean)
    cache_v[0, 0, slots - 5, 0] = float("nan")  # a key every row sees, in the last part
    assert torch.isnan(run()).all()
