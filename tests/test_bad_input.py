"""Every malformed input is refused with a message naming the argument, never a crash.

Includes the regression cases of the API attack (issue 14): sizes the kernels cannot index,
positions that overflow int64, aliased caches, wrong types."""

import numpy as np
import pytest
import torch

import lm_infinite as li
from helpers import random_qkv, rope_inv_freq

INV = rope_inv_freq(64)


def call(q=None, k=None, v=None, inv_freq=INV, **kw):
    q0, k0, v0 = random_qkv(1, 4, 2, 9, 64)
    kw.setdefault("n_local", 4)
    return li.lambda_attention(q0 if q is None else q, k0 if k is None else k,
                               v0 if v is None else v, inv_freq, **kw)


@pytest.mark.parametrize("kwargs,message", [
    (dict(q=torch.randn(4, 9, 64)), "q must be 4-D"),
    (dict(k=torch.randn(1, 2, 9)), "k must be 4-D"),
    (dict(k=torch.randn(1, 3, 9, 64), v=torch.randn(1, 3, 9, 64)), "multiple of k's heads"),
    (dict(k=torch.randn(1, 2, 9, 32), v=torch.randn(1, 2, 9, 32)), "head_dim"),
    (dict(k=torch.randn(2, 2, 9, 64), v=torch.randn(2, 2, 9, 64)), "batch"),
    (dict(k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64)), "sequence length"),
    (dict(v=torch.randn(1, 2, 9, 63)), "v must have k's shape"),
    (dict(inv_freq=rope_inv_freq(66)[:33]), "at most head_dim / 2"),
    (dict(inv_freq=torch.ones(2, 4)), "inv_freq must be a 1-D float tensor"),
    (dict(inv_freq=torch.ones(4, dtype=torch.int64)), "inv_freq must be a 1-D float tensor"),
    (dict(n_local=0), "n_local must be in \\[1, 2\\^62\\], got 0"),
    (dict(n_global=-1), "n_global must be in \\[0, 2\\^62\\], got -1"),
    (dict(distance_cap=-2), "distance_cap must be in \\[0, 2\\^62\\], got -2"),
    (dict(k=torch.randn(1, 2, 9, 64, dtype=torch.float64)), "k must have the dtype of q"),
    (dict(q=torch.randn(1, 4, 9, 64, dtype=torch.float64),
          k=torch.randn(1, 2, 9, 64, dtype=torch.float64),
          v=torch.randn(1, 2, 9, 64, dtype=torch.float64)), "q must be float32, bfloat16 or float16"),
    (dict(v=torch.randn(1, 2, 9, 64, device="meta")), "device"),
    # The attack's sizes: beyond 2^62 nothing the kernels add up could stay in int64.
    (dict(n_local=2**62 + 1), "n_local must be in \\[1, 2\\^62\\], got 4611686018427387905"),
    (dict(n_global=2**63 - 1), "n_global must be in \\[0, 2\\^62\\]"),
    (dict(distance_cap=2**63 - 1), "distance_cap must be in \\[0, 2\\^62\\]"),
    (dict(scale=float("nan")), "scale must be a finite number, got nan"),
    (dict(scale=float("inf")), "scale must be a finite number, got inf"),
    (dict(scale=1e300), "scale must be a finite number, got inf"),  # inf once it is a float32
    (dict(inv_freq=torch.tensor([1.0, float("nan"), 0.1])), "inv_freq must be finite, got nan at index 1"),
    # Types: what the dispatcher would take silently or refuse without naming the argument.
    (dict(q=np.zeros((1, 4, 9, 64), np.float32)), "q must be a torch.Tensor, got ndarray"),
    (dict(n_local=True), "n_local must be an int, got bool"),
    (dict(n_local=4.0), "n_local must be an int, got float"),
    (dict(n_global=np.int64(2)), "n_global must be an int, got int64"),
    (dict(scale=False), "scale must be a real number, got bool"),
    (dict(scale="0.1"), "scale must be a real number, got str"),
])
def test_lambda_attention_rejects(kwargs, message):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        call(**kwargs)


def test_odd_rotary_dim_cannot_be_expressed():
    """rotary_dim is 2 * len(inv_freq), so it is even by construction; a head_dim of 3 with
    one frequency rotates features 0 and 1 and leaves feature 2 alone."""
    q, k, v = random_qkv(1, 1, 1, 5, 3)
    inv = torch.tensor([1.0])
    out = li.lambda_attention(q, k, v, inv, n_local=2)
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), inv, n_local=2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def chunk_call(**kw):
    q, k, v = random_qkv(1, 2, 1, 3, 32)
    args = dict(q=q, k=k, v=v, cache_k=torch.zeros(1, 1, 6, 32), cache_v=torch.zeros(1, 1, 6, 32),
                cache_positions=torch.full((6,), -1), query_start=0, inv_freq=rope_inv_freq(32))
    args.update(kw)
    return li.lambda_attention_chunk(**args, n_global=2, n_local=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(cache_positions=torch.full((5,), -1)), "cache_positions must be int64 of shape \\[6\\]"),
    (dict(cache_positions=torch.full((6,), -1, dtype=torch.int32)), "cache_positions must be int64"),
    (dict(cache_k=torch.zeros(1, 2, 6, 32)), "heads_kv"),
    (dict(cache_v=torch.zeros(1, 1, 5, 32)), "cache_v must have cache_k's shape"),
    (dict(query_start=torch.tensor([1, 2])), "query_start must be an int64 tensor with one element"),
    (dict(query_start=1.5), "position must be an int"),
])
def test_chunk_rejects(kwargs, message):
    with pytest.raises((RuntimeError, TypeError), match=message):
        chunk_call(**kwargs)


def test_append_rejects_bad_cache():
    k = torch.randn(1, 1, 3, 8)
    positions = torch.full((6,), -1)
    with pytest.raises(RuntimeError, match="must equal n_global \\+ n_local"):
        li.ring_cache_append(torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8), positions[:5], k, k, 0,
                             n_global=2, n_local=4)
    with pytest.raises(RuntimeError, match="written in place"):
        cache = torch.zeros(1, 1, 8, 6).transpose(-1, -2)
        li.ring_cache_append(cache, cache, positions, k, k, 0, n_global=2, n_local=4)
    with pytest.raises(ValueError, match="start_position must be in \\[0, 2\\^62\\], got -1"):
        li.ring_cache_append(torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), positions, k, k, -1,
                             n_global=2, n_local=4)
    with pytest.raises(RuntimeError, match="start_position must be in \\[0, 2\\^62 - 3\\]"):
        li.ring_cache_append(torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), positions, k, k,
                             torch.tensor([-1]), n_global=2, n_local=4)


@pytest.mark.parametrize("name,value", [("batch", 0), ("n_local", 0), ("n_global", -1), ("head_dim", 0)])
def test_ring_cache_rejects_bad_sizes(name, value):
    args = dict(batch=1, n_heads_kv=1, head_dim=8, n_global=2, n_local=4)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        li.RingKVCache(args.pop("batch"), args.pop("n_heads_kv"), args.pop("head_dim"), **args)


def test_huge_n_local_is_refused_or_plain_causal_attention_not_a_crash():
    """n_local = 2^62 aborted the process (a std::length_error from a vector reserve). With
    the default n_global = 10 the ring would exceed 2^62 slots; just below, every row is
    inside the window."""
    q, k, v = random_qkv(1, 4, 2, 9, 64)
    with pytest.raises(RuntimeError, match="n_global \\+ n_local must be at most 2\\^62, got 10 \\+ 4611686018427387904"):
        li.lambda_attention(q, k, v, INV, n_local=2**62)
    out = li.lambda_attention(q, k, v, INV, n_global=3, n_local=2**62 - 3)
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), INV, n_global=3, n_local=2**62 - 3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_huge_top_k_chooses_every_candidate():
    """top_k beyond the candidates (the attack's 2^60) is all of them, as in the reference."""
    q, k, v = random_qkv(1, 2, 1, 5, 32)
    middle_k, middle_v = torch.randn(1, 1, 20, 32), torch.randn(1, 1, 20, 32)
    args = dict(n_global=2, n_local=3, middle_k=middle_k, middle_v=middle_v,
                middle_positions=torch.arange(2, 22))
    empty = torch.zeros(1, 1, 0, 32)
    out = li.lambda_attention_chunk_top_k(q, k, v, empty, empty, torch.zeros(0, dtype=torch.int64), 22,
                                          rope_inv_freq(32), top_k=2**60, top_k_distance=1, **args)
    every = li.lambda_attention_chunk_top_k(q, k, v, empty, empty, torch.zeros(0, dtype=torch.int64), 22,
                                            rope_inv_freq(32), top_k=25, top_k_distance=1, **args)
    torch.testing.assert_close(out, every)
    with pytest.raises(RuntimeError, match="top_k must be in \\[0, 2\\^62\\]"):
        li.lambda_attention_chunk_top_k(q, k, v, empty, empty, torch.zeros(0, dtype=torch.int64), 22,
                                        rope_inv_freq(32), top_k=2**63 - 1, top_k_distance=1, **args)


def test_huge_head_dim_is_an_error_or_a_result_never_an_abort():
    """Scratch for head_dim 2^18 is allocated before the parallel region, sized by the tile."""
    q, k, v = random_qkv(1, 1, 1, 1, 2**18)
    out = li.lambda_attention(q, k, v, torch.ones(1), n_local=4)
    torch.testing.assert_close(out, v)  # one key: its value


@pytest.mark.parametrize("query_start", [-1, 2**63])
def test_chunk_refuses_int_positions_out_of_range(query_start):
    with pytest.raises(ValueError, match=f"query_start must be in \\[0, 2\\^62\\], got {query_start}"):
        chunk_call(query_start=query_start)


@pytest.mark.parametrize("query_start", [-1, 2**62, 2**63 - 1])
def test_chunk_refuses_tensor_positions_out_of_range(query_start):
    """A negative query_start read the rotary table out of bounds (later calls returned
    non-finite values); near 2^63 the chunk's positions wrapped."""
    with pytest.raises(RuntimeError, match=f"query_start must be in \\[0, 2\\^62 - 3\\] .*got {query_start}"):
        chunk_call(query_start=torch.tensor([query_start]))


def test_append_refuses_positions_that_would_wrap():
    """At 2^63 - 2 the positions of a 3-token chunk wrapped negative and overwrote the global
    slots; refused, and the cache is untouched."""
    cache_k, cache_v, positions = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), torch.full((6,), -1)
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(RuntimeError, match="start_position must be in \\[0, 2\\^62 - 3\\]"):
        li.ring_cache_append(cache_k, cache_v, positions, k, k, torch.tensor([2**63 - 2]),
                             n_global=2, n_local=4)
    assert (positions == -1).all() and (cache_k == 0).all()


@pytest.mark.parametrize("alias,message", [
    ("same", "cache_k must not share memory with cache_v"),
    ("expanded", "cache_k must not have overlapping elements"),
    ("k_is_cache", "cache_k must not share memory with k"),
    ("positions_expanded", "cache_positions must be contiguous"),
])
def test_append_refuses_aliased_caches(alias, message):
    """Writing through an aliased or stride-0 cache corrupted it silently."""
    cache_k, cache_v = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8)
    positions, k = torch.full((6,), -1), torch.randn(1, 1, 3, 8)
    if alias == "same":
        cache_v = cache_k
    elif alias == "expanded":
        cache_k = torch.zeros(1, 1, 1, 8).expand(1, 1, 6, 8)
    elif alias == "k_is_cache":
        k = cache_k[:, :, :3]
    else:
        positions = torch.full((1,), -1).expand(6)
    with pytest.raises(RuntimeError, match=message):
        li.ring_cache_append(cache_k, cache_v, positions, k, k.clone(), 0, n_global=2, n_local=4)


def test_append_refuses_sizes_whose_sum_overflows():
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(RuntimeError, match="n_local must be in \\[1, 2\\^62\\]"):
        li.ring_cache_append(torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), torch.full((6,), -1),
                             k, k, 0, n_global=2**62, n_local=2**63 - 1)


# --- Batches of different lengths: padding, per-sequence starts and slot positions. ---

def batch_chunk_call(**kw):
    """A batch of two with per-sequence positions; kw replaces any argument."""
    q, k, v = random_qkv(2, 2, 1, 3, 32)
    args = dict(q=q, k=k, v=v, cache_k=torch.zeros(2, 1, 6, 32), cache_v=torch.zeros(2, 1, 6, 32),
                cache_positions=torch.full((2, 6), -1), query_start=torch.tensor([0, 5]),
                inv_freq=rope_inv_freq(32), padding=torch.tensor([1, 0]))
    args.update(kw)
    attend = li.lambda_attention_chunk_top_k if "top_k" in args else li.lambda_attention_chunk
    return attend(**args, n_global=2, n_local=4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(padding=torch.tensor([1, 0], dtype=torch.int32)), "padding must be int64 of shape \\[2\\]"),
    (dict(padding=torch.tensor([1, 0, 0])), "padding must be int64 of shape \\[2\\] .*got Long of shape \\[3\\]"),
    (dict(padding=torch.tensor([[1, 0]])), "padding must be int64 of shape \\[2\\]"),
    (dict(padding=torch.tensor([0, 4])), "padding must be in \\[0, 3\\] .*got 4 for sequence 1"),
    (dict(padding=torch.tensor([-1, 0])), "padding must be in \\[0, 3\\] .*got -1 for sequence 0"),
    (dict(padding=[1, 0]), "padding must be a torch.Tensor, got list"),
    (dict(padding=torch.tensor([1, 0], device="meta")), "padding must be on q's device"),
    (dict(query_start=torch.tensor([0, 5, 7])),
     "query_start must be an int64 tensor with one element \\(shared by the batch\\) or of shape \\[2\\]"),
    (dict(query_start=torch.tensor([[0, 5]])), "query_start must be an int64 tensor"),
    (dict(query_start=torch.tensor([0, -1])), "query_start must be in \\[0, 2\\^62 - 3\\] .*got -1 for sequence 1"),
    (dict(query_start=torch.tensor([0, 2**62])), "query_start must be in .*for sequence 1"),
    (dict(cache_positions=torch.full((3, 6), -1)), "cache_positions must be int64 of shape \\[6\\] or \\[2, 6\\]"),
    (dict(cache_positions=torch.full((2, 5), -1)), "cache_positions must be int64 of shape \\[6\\] or \\[2, 6\\]"),
    (dict(cache_positions=torch.full((2, 1, 6), -1)), "cache_positions must be int64 of shape"),
])
def test_batched_chunk_rejects(kwargs, message):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        batch_chunk_call(**kwargs)


def test_batched_chunk_rejects_bad_middle_positions():
    middle = torch.zeros(2, 1, 4, 32)
    for positions in (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="middle_positions must be int64 of shape \\[4\\] or \\[2, 4\\]"):
            batch_chunk_call(middle_k=middle, middle_v=middle, middle_positions=positions, top_k=1)


def test_lambda_attention_rejects_bad_padding():
    q, k, v = random_qkv(2, 4, 2, 9, 64)
    with pytest.raises(RuntimeError, match="padding must be in \\[0, 9\\] .*got 10 for sequence 0"):
        li.lambda_attention(q, k, v, INV, n_local=4, padding=torch.tensor([10, 0]))
    with pytest.raises(RuntimeError, match="padding must be int64 of shape \\[2\\]"):
        li.lambda_attention(q, k, v, INV, n_local=4, padding=torch.tensor([1]))


def append_batch(**kw):
    """ring_cache_append on a batch of two; kw replaces any argument."""
    args = dict(cache_k=torch.zeros(2, 1, 6, 8), cache_v=torch.zeros(2, 1, 6, 8),
                cache_positions=torch.full((2, 6), -1), k=torch.randn(2, 1, 3, 8),
                v=torch.randn(2, 1, 3, 8), start_position=torch.tensor([0, 4]),
                padding=torch.tensor([0, 2]))
    args.update(kw)
    li.ring_cache_append(**args, n_global=2, n_local=4)
    return args


@pytest.mark.parametrize("kwargs,message", [
    # One shared row of slot positions cannot hold two sequences at different positions.
    (dict(cache_positions=torch.full((6,), -1)),
     "cache_positions must be \\[2, 6\\] \\(one row per sequence\\) when start_position is per "
     "sequence or padding is given, got shape \\[6\\]"),
    (dict(cache_positions=torch.full((6,), -1), start_position=torch.tensor([3])),
     "cache_positions must be \\[2, 6\\] \\(one row per sequence\\)"),
    (dict(cache_positions=torch.full((2, 7), -1)), "cache_positions must be int64 of shape \\[6\\] or \\[2, 6\\]"),
    (dict(cache_positions=torch.full((6, 2), -1).t()), "cache_positions must be contiguous"),
    (dict(start_position=torch.tensor([0, 1, 2])), "start_position must be an int64 tensor with one element"),
    (dict(start_position=torch.tensor([0, -3])), "start_position must be in .*got -3 for sequence 1"),
    (dict(padding=torch.tensor([0, 4])), "padding must be in \\[0, 3\\] .*got 4 for sequence 1"),
    (dict(padding=torch.tensor([0.0, 1.0])), "padding must be int64 of shape \\[2\\]"),
])
def test_batched_append_rejects(kwargs, message):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        append_batch(**kwargs)


def test_batched_append_refused_leaves_the_cache_untouched():
    cache_k, positions = torch.zeros(2, 1, 6, 8), torch.full((2, 6), -1)
    with pytest.raises(RuntimeError, match="for sequence 1"):
        append_batch(cache_k=cache_k, cache_positions=positions,
                     start_position=torch.tensor([0, 2**62]))
    assert (positions == -1).all() and (cache_k == 0).all()


def test_batched_append_refuses_padding_that_aliases_positions():
    positions = torch.full((2, 6), -1)
    with pytest.raises(RuntimeError, match="cache_positions must not share memory with padding"):
        append_batch(cache_positions=positions, padding=positions[0, :2])


def test_no_autograd_a_clear_error_when_a_gradient_is_asked_for():
    """backward() used to give no gradients without a word; the forward still runs (a model
    called without no_grad), the backward says why it cannot."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 5, 32))
    out = li.lambda_attention(q, k, v, rope_inv_freq(32), n_local=3)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="lminf::lambda_attention has no backward"):
        out.sum().backward()
    with torch.no_grad():
        assert not li.lambda_attention(q, k, v, rope_inv_freq(32), n_local=3).requires_grad


def test_glue_messages_format_numbers():
    """Every glue message that carries a number (the GPU build's ostream crash, issue 11)."""
    with pytest.raises(RuntimeError, match=r"k.size\(2\) must equal q.size\(2\), the sequence length \(9\), "
                                           r"got shape \[1, 2, 8, 64\]"):
        call(k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64))
