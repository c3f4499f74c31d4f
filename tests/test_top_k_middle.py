"""Top-k middle attention: the kernel against the float64 reference, streamed and whole."""

import pytest
import torch

import lm_infinite as li
from helpers import random_qkv, rel_error, rope_inv_freq
from lm_infinite.top_k_rows import top_k_rows_attention


def reference_chunk(q, k, v, inv_freq, start, **options):
    """float64 reference for queries start..start+T-1 seeing every key 0..start+T-1."""
    T = q.shape[2]
    keys = slice(0, start + T)
    return li.lambda_attention_reference(
        q.double(), k[:, :, keys].double(), v[:, :, keys].double(), inv_freq,
        query_positions=torch.arange(start, start + T), key_positions=torch.arange(start + T), **options)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_k", [1, 50])
@pytest.mark.parametrize("chunk", [1, 37])
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)])
def test_streamed_top_k_rows_match_reference(top_k, chunk, heads, device):
    n_global, n_local, distance, n = 4, 32, 16, 120
    q, k, v = random_qkv(2, *heads, n, 64)
    inv_freq = rope_inv_freq(64)
    cache = li.RingKVCache(2, heads[1], 64, n_global=n_global, n_local=n_local, keep_middle=True,
                           device=device)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        T = sl.stop - start
        first_row = max(0, T - 3)  # the last rows use top-k, the others see only the Λ mask
        out = cache.attend_and_append(*(t[:, :, sl].to(device) for t in (q, k, v)), inv_freq.to(device),
                                      top_k=top_k, top_k_distance=distance, top_k_first_row=first_row)
        ref = reference_chunk(q[:, :, sl], k, v, inv_freq, start, n_global=n_global, n_local=n_local,
                              top_k=top_k, top_k_distance=distance, top_k_first_row=first_row)
        assert out.device.type == device and rel_error(out.cpu(), ref) < 1e-5, start


@pytest.mark.parametrize("first_row", [0, 30, 39])
@pytest.mark.parametrize("heads", [(6, 2), (3, 3)])
def test_composed_top_k_rows_match_reference(first_row, heads):
    """The PyTorch composition that serves CUDA's top-k rows, run on the CPU, near 10^9 too."""
    n_global, n_local, start, T = 4, 32, 110, 40
    q, k, v = random_qkv(2, *heads, start + T, 64)
    inv_freq = rope_inv_freq(64)
    options = dict(n_global=n_global, n_local=n_local, top_k=5, top_k_distance=16)
    ref = reference_chunk(q[:, :, start:], k, v, inv_freq, start, top_k_first_row=first_row, **options)
    for shift in (0, 10**9):
        # Every token past the globals moved 10^9 later: the same distances, the same result.
        cache = li.RingKVCache(2, heads[1], 64, n_global=n_global, n_local=n_local, keep_middle=True)
        cache.append(k[:, :, :start], v[:, :, :start])
        views = cache.middle.views()
        views["middle_positions"] = views["middle_positions"] + shift
        positions = torch.where(cache.positions >= n_global, cache.positions + shift, cache.positions)
        out = top_k_rows_attention(
            q[:, :, start:], k[:, :, start:], v[:, :, start:], cache.k, cache.v, positions,
            cache.next_position + shift, inv_freq, first_row=first_row, distance_cap=n_local,
            scale=64**-0.5, **views, **options)
        assert rel_error(out, ref[:, :, first_row:]) < 1e-5, shift


def test_top_k_changes_only_the_chosen_rows():
    n_global, n_local, n = 2, 16, 100
    q, k, v = random_qkv(1, 2, 1, n, 32)
    inv_freq = rope_inv_freq(32)
    empty = dict(cache_k=k[:, :, :0], cache_v=v[:, :, :0], cache_positions=torch.empty(0, dtype=torch.int64))
    plain = li.lambda_attention(q, k, v, inv_freq, n_global=n_global, n_local=n_local)
    store = dict(middle_k=k[:, :, :0], middle_v=v[:, :, :0], middle_positions=torch.empty(0, dtype=torch.int64))
    with_top_k = li.lambda_attention_chunk_top_k(q, k, v, query_start=0, inv_freq=inv_freq, n_global=n_global,
                                                 n_local=n_local, top_k=4, top_k_first_row=90, **empty, **store)
    torch.testing.assert_close(with_top_k[:, :, :90], plain[:, :, :90], rtol=0, atol=0)
    assert (with_top_k[:, :, 90:] - plain[:, :, 90:]).abs().max() > 1e-3
    ref = li.lambda_attention_reference(q.double(), k.double(), v.double(), inv_freq, n_global=n_global,
                                        n_local=n_local, top_k=4, top_k_distance=n_local // 2,
                                        top_k_first_row=90)
    assert rel_error(with_top_k, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_top_k_low_precision(dtype):
    n_global, n_local, n = 4, 40, 200
    q, k, v = random_qkv(1, 6, 2, n, 64, dtype)
    inv_freq = rope_inv_freq(64)
    cache = li.RingKVCache(1, 2, 64, n_global=n_global, n_local=n_local, dtype=dtype, keep_middle=True)
    cache.append(k[:, :, :-1], v[:, :, :-1])
    out = cache.attend(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], inv_freq, top_k=5, top_k_distance=20)
    exact = reference_chunk(q[:, :, -1:], k, v, inv_freq, n - 1, n_global=n_global, n_local=n_local,
                            top_k=5, top_k_distance=20)
    low = li.lambda_attention_reference(
        q[:, :, -1:], k, v, inv_freq, query_positions=torch.tensor([n - 1]), key_positions=torch.arange(n),
        n_global=n_global, n_local=n_local, top_k=5, top_k_distance=20)
    assert rel_error(out, exact) <= 2 * rel_error(low, exact) + 1e-6


def test_middle_store_grows_and_keeps_every_token_past_the_globals():
    cache = li.RingKVCache(1, 1, 8, n_global=3, n_local=4, keep_middle=True)
    k = torch.randn(1, 1, 5000, 8)
    for start in range(0, 5000, 999):
        cache.append(k[:, :, start:start + 999], k[:, :, start:start + 999])
    views = cache.middle.views()
    assert views["middle_positions"].tolist() == [list(range(3, 5000))]  # [batch, n]
    torch.testing.assert_close(views["middle_k"], k[:, :, 3:])


def test_top_k_needs_a_middle_store():
    cache = li.RingKVCache(1, 1, 8, n_global=3, n_local=4)
    x = torch.randn(1, 1, 1, 8)
    with pytest.raises(ValueError, match="keep_middle=True"):
        cache.attend(x, x, x, rope_inv_freq(8), top_k=2)
    with pytest.raises(TypeError, match="middle_k"):
        li.lambda_attention_chunk_top_k(x, x, x, cache.k, cache.v, cache.positions, 0, rope_inv_freq(8),
                                        n_global=3, n_local=4, top_k=2)
    with pytest.raises(TypeError, match="top_k"):  # the plain op has no top-k arguments
        li.lambda_attention_chunk(x, x, x, cache.k, cache.v, cache.positions, 0, rope_inv_freq(8),
                                  n_global=3, n_local=4, top_k=2)


@pytest.mark.parametrize("first_row", [0, 4, 7, 9])
def test_cuda_composition_agrees_with_the_cpu_kernel(first_row):
    """The op's CUDA implementation (the plain kernel, then PyTorch ops for the top-k rows),
    run here on CPU tensors, gives the CPU kernel's result; first_row 9 is past the chunk."""
    from lm_infinite.ops import _lambda_attention_chunk_top_k_cuda

    n_global, n_local = 3, 8
    q, k, v = random_qkv(2, 6, 2, 7, 32)
    cache_k, cache_v = torch.randn(2, 2, 11, 32), torch.randn(2, 2, 11, 32)
    cache_positions = torch.tensor([0, 1, 2, 32, 33, 34, 35, 36, 37, 38, 39])
    middle_k, middle_v = torch.randn(2, 2, 29, 32), torch.randn(2, 2, 29, 32)
    args = (q, k, v, cache_k, cache_v, cache_positions, torch.tensor([40]), rope_inv_freq(32),
            n_global, n_local, n_local, 32**-0.5, middle_k, middle_v, torch.arange(3, 32), 3, 4,
            first_row, torch.tensor([2, 0]))
    kernel = torch.ops.lminf.lambda_attention_chunk_top_k(*args)
    composed = _lambda_attention_chunk_top_k_cuda(*args)
    assert rel_error(composed, kernel) < 1e-5


def test_cuda_composition_checks_as_the_glue_does():
    """Its arguments are checked by the glue (the same message as the CPU kernel's)."""
    from lm_infinite.ops import _lambda_attention_chunk_top_k_cuda

    q, k, v = random_qkv(1, 2, 1, 3, 32)
    empty = torch.zeros(1, 1, 0, 32)
    middle = torch.zeros(1, 1, 4, 32)
    for top_k, positions, message in ((1, torch.zeros(5, dtype=torch.int64), "middle_positions must be int64"),
                                      (-1, torch.zeros(4, dtype=torch.int64), "top_k must be in")):
        args = (q, k, v, empty, empty, torch.zeros(0, dtype=torch.int64), torch.tensor([9]),
                rope_inv_freq(32), 2, 4, 4, 0.2, middle, middle, positions, top_k, 2, 0, None)
        for run in (torch.ops.lminf.lambda_attention_chunk_top_k, _lambda_attention_chunk_top_k_cuda):
            with pytest.raises(RuntimeError, match=f"lminf::lambda_attention_chunk_top_k: {message}"):
                run(*args)
