"""Every malformed input is refused with a message naming the argument, never a crash."""

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
    (dict(n_local=0), "n_local must be >= 1"),
    (dict(n_global=-1), "n_global must be >= 0"),
    (dict(distance_cap=-2), "distance_cap must be >= 0"),
    (dict(k=torch.randn(1, 2, 9, 64, dtype=torch.float64)), "k must have the dtype of q"),
    (dict(q=torch.randn(1, 4, 9, 64, dtype=torch.float64),
          k=torch.randn(1, 2, 9, 64, dtype=torch.float64),
          v=torch.randn(1, 2, 9, 64, dtype=torch.float64)), "q must be float32, bfloat16 or float16"),
    (dict(v=torch.randn(1, 2, 9, 64, device="meta")), "device"),
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
    with pytest.raises(RuntimeError, match="start_position must be >= 0"):
        li.ring_cache_append(torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), positions, k, k, -1,
                             n_global=2, n_local=4)


@pytest.mark.parametrize("name,value", [("batch", 0), ("n_local", 0), ("n_global", -1), ("head_dim", 0)])
def test_ring_cache_rejects_bad_sizes(name, value):
    args = dict(batch=1, n_heads_kv=1, head_dim=8, n_global=2, n_local=4)
    args[name] = value
    with pytest.raises(ValueError, match=name):
        li.RingKVCache(args.pop("batch"), args.pop("n_heads_kv"), args.pop("head_dim"), **args)
