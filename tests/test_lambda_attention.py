"""The whole-sequence op against the float64 reference (docs/design.md section 1)."""

import math

import pytest
import torch
import torch.nn.functional as F

import lm_infinite as li
from lm_infinite.reference import apply_rotary
from helpers import PREFILL_CASES, random_qkv, rel_error, rope_inv_freq


@pytest.mark.parametrize("batch,hq,hkv,seq,dim,rot,g,l,cap", PREFILL_CASES)
def test_float32_matches_float64_reference(batch, hq, hkv, seq, dim, rot, g, l, cap):
    q, k, v = random_qkv(batch, hq, hkv, seq, dim)
    inv_freq = rope_inv_freq(rot)
    out = li.lambda_attention(q, k, v, inv_freq, n_global=g, n_local=l, distance_cap=cap)
    ref = li.lambda_attention_reference(
        q.double(), k.double(), v.double(), inv_freq, n_global=g, n_local=l, distance_cap=cap
    )
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel_error(out, ref) < 1e-5


@pytest.mark.parametrize("seq,n_local", [(1, 1), (19, 19), (300, 4096)])
def test_window_covering_sequence_is_causal_rope_attention(seq, n_local):
    """n_local >= seq: nothing is masked but the future, so the op is plain causal attention
    over RoPE-rotated q and k (computed here with SDPA, independently of the reference)."""
    q, k, v = random_qkv(1, 6, 2, seq, 64)
    inv_freq = rope_inv_freq(64)
    out = li.lambda_attention(q, k, v, inv_freq, n_global=3, n_local=n_local)
    positions = torch.arange(seq)
    qr, kr = apply_rotary(q.double(), positions, inv_freq), apply_rotary(k.double(), positions, inv_freq)
    expected = F.scaled_dot_product_attention(qr, kr, v.double(), is_causal=True, enable_gqa=True)
    assert rel_error(out, expected) < 1e-5


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = random_qkv(1, 2, 1, 50, 64)
    inv_freq = rope_inv_freq(64)
    default = li.lambda_attention(q, k, v, inv_freq, n_local=8)
    explicit = li.lambda_attention(q, k, v, inv_freq, n_local=8, scale=1 / math.sqrt(64))
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,seq,dim,g,l", [(9, 3, 333, 64, 10, 64), (4, 4, 129, 128, 0, 100)])
def test_low_precision_within_twice_torch_error(dtype, hq, hkv, seq, dim, g, l):
    """bf16/fp16 error against float64 stays within twice that of PyTorch computing the
    same attention in that dtype (the reference run on low-precision tensors)."""
    q, k, v = random_qkv(1, hq, hkv, seq, dim, dtype)
    inv_freq = rope_inv_freq(dim)
    out = li.lambda_attention(q, k, v, inv_freq, n_global=g, n_local=l)
    assert out.dtype == dtype
    exact = li.lambda_attention_reference(q.double(), k.double(), v.double(), inv_freq, n_global=g, n_local=l)
    torch_low = li.lambda_attention_reference(q, k, v, inv_freq, n_global=g, n_local=l)
    assert rel_error(out, exact) <= 2 * rel_error(torch_low, exact) + 1e-6


def test_non_contiguous_inputs_give_the_contiguous_answer():
    """Hugging Face hands over q as a transposed view; other layouts are copied."""
    q, k, v = random_qkv(2, 4, 2, 40, 64)
    inv_freq = rope_inv_freq(64)
    expected = li.lambda_attention(q, k, v, inv_freq, n_global=2, n_local=9)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # head-major strides
    k_cols = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim not contiguous
    out = li.lambda_attention(q_view, k_cols, v, inv_freq[::1], n_global=2, n_local=9)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_thread_count_does_not_change_the_result():
    q, k, v = random_qkv(1, 9, 3, 500, 64)
    inv_freq = rope_inv_freq(64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = li.lambda_attention(q, k, v, inv_freq, n_local=64)
    finally:
        torch.set_num_threads(threads)
    many = li.lambda_attention(q, k, v, inv_freq, n_local=64)
    torch.testing.assert_close(one, many, rtol=0, atol=0)


def test_empty_batch_and_sequence():
    inv_freq = rope_inv_freq(64)
    for shape in ((0, 2, 5, 64), (1, 2, 0, 64)):
        q = torch.randn(shape)
        k = torch.randn(shape[0], 1, shape[2], 64)
        assert li.lambda_attention(q, k, k, inv_freq, n_local=4).shape == shape
