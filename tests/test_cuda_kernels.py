"""The CUDA kernels against the float64 reference (docs/design.md section 1), through the public API.

Every kernel path is reached: the tensor-core kernel (bf16/fp16, head_dim 64 and 128) after
its chunk-anchored pre-pass, whole sequences and chunks against a wrapped cache, in split-key
mode too (few blocks: partials merged by log-sum-exp); the generic kernel (float32, other head dims,
unaligned rows); the ring-buffer append. Inputs are fresh random tensors for every test,
outputs come from memory poisoned with NaN first, and the reference runs in float64 on the
CPU. Low-precision errors are bounded by twice PyTorch's own error in that dtype (the
reference evaluated in bf16/fp16 on the GPU), as FlashAttention's tests do. Batches of different
sequences (per-sequence starts, padding, cache-position rows) are tests/test_cuda_batched.py.
"""

from __future__ import annotations

import pytest
import torch

import lm_infinite as li
from cuda_checks import DEV, LOW_PRECISION, check_close, poison_allocator, randn
from helpers import PREFILL_CASES, rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# ----------------------------------------------------------------------------------------------
# Whole sequences (prefill).


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
@pytest.mark.parametrize("batch,hq,hkv,seq,dim,rot,g,l,cap", PREFILL_CASES)
def test_prefill_matches_reference(dtype, batch, hq, hkv, seq, dim, rot, g, l, cap):
    q, k, v = randn(batch, hq, seq, dim, dtype=dtype), randn(batch, hkv, seq, dim, dtype=dtype), \
        randn(batch, hkv, seq, dim, dtype=dtype)
    inv_freq = rope_inv_freq(rot)
    poison_allocator(q)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=g, n_local=l, distance_cap=cap)
    assert out.dtype == dtype and out.shape == q.shape and out.device.type == "cuda"
    check_close(out, q, k, v, inv_freq, dtype, n_global=g, n_local=l, distance_cap=cap)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_long_prefill_with_global_tiles(dtype):
    """Several thousand queries: tiles strictly inside the band (no masks), band edges, and
    the global tile, in one launch (head_dim 128, GQA)."""
    q, k, v = randn(1, 8, 4500, 128, dtype=dtype), randn(1, 2, 4500, 128, dtype=dtype), \
        randn(1, 2, 4500, 128, dtype=dtype)
    inv_freq = rope_inv_freq(128)
    poison_allocator(q)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=4, n_local=1024)
    check_close(out, q, k, v, inv_freq, dtype, n_global=4, n_local=1024)


def test_unaligned_rows_use_the_generic_kernel():
    """A view starting one element into its storage is not 16-byte aligned."""
    base = randn(1, 4, 50, 65, dtype=torch.bfloat16)
    q = base[..., 1:]
    k, v = randn(1, 2, 50, 64, dtype=torch.bfloat16), randn(1, 2, 50, 64, dtype=torch.bfloat16)
    inv_freq = rope_inv_freq(64)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=2, n_local=9)
    check_close(out, q, k, v, inv_freq, torch.bfloat16, n_global=2, n_local=9)


# ----------------------------------------------------------------------------------------------
# Chunks against an explicit cache: arbitrary slot order, empty slots, positions near 10^9.

def ring_cache(batch, hkv, dim, n_global, n_local, seen, dtype, empty_fill=float("nan")):
    """A cache as RingKVCache would hold it after `seen` tokens, with random contents. Empty
    slots hold NaN: kernels must ignore them entirely."""
    slots = n_global + n_local
    positions = torch.full((slots,), -1, dtype=torch.int64)
    for p in range(max(0, seen - n_local), seen):
        positions[p if p < n_global else n_global + (p - n_global) % n_local] = p
    for p in range(min(n_global, seen)):
        positions[p] = p
    cache_k = randn(batch, hkv, slots, dim, dtype=dtype)
    cache_v = randn(batch, hkv, slots, dim, dtype=dtype)
    empty = positions < 0
    cache_k[:, :, empty.to(DEV)] = empty_fill
    cache_v[:, :, empty.to(DEV)] = empty_fill
    return cache_k, cache_v, positions


def check_chunk(dtype, batch, hq, hkv, dim, n_q, n_global, n_local, seen, cap=None, offset=0,
                shuffle=False, rotary_dim=None):
    """Queries at positions seen..seen+n_q (plus `offset` everywhere but the global keys'
    first n_global positions, which the reference sees as they are). shuffle: the cache slots
    in a random order (kernels may not rely on the ring's layout)."""
    cache_k, cache_v, positions = ring_cache(batch, hkv, dim, n_global, n_local, seen, dtype)
    if offset:
        positions = torch.where(positions >= n_global, positions + offset, positions)
    if shuffle:
        order = torch.randperm(positions.numel())
        positions, cache_k, cache_v = positions[order], cache_k[:, :, order.to(DEV)], \
            cache_v[:, :, order.to(DEV)]
    q, k, v = randn(batch, hq, n_q, dim, dtype=dtype), randn(batch, hkv, n_q, dim, dtype=dtype), \
        randn(batch, hkv, n_q, dim, dtype=dtype)
    inv_freq = rope_inv_freq(rotary_dim or dim)
    start = seen + offset
    poison_allocator(q)
    out = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions.to(DEV), start,
                                    inv_freq.to(DEV), n_global=n_global, n_local=n_local,
                                    distance_cap=cap)
    present = positions >= 0
    keys = torch.cat([cache_k[:, :, present.to(DEV)], k], 2)
    values = torch.cat([cache_v[:, :, present.to(DEV)], v], 2)
    key_positions = torch.cat([positions[present], torch.arange(start, start + n_q)])
    check_close(out, q, keys, values, inv_freq, dtype, n_global=n_global, n_local=n_local,
                distance_cap=cap, query_positions=torch.arange(start, start + n_q),
                key_positions=key_positions)
    return out


@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float32])
@pytest.mark.parametrize("n_q", [1, 3, 16, 17, 100, 1000])
@pytest.mark.parametrize("batch,hq,hkv,dim,n_global,n_local,seen", [
    (1, 32, 8, 128, 4, 4096, 10_000),  # the decode benchmark's shape, ring wrapped
    (16, 32, 8, 128, 4, 300, 999),     # batch 16
    (2, 9, 3, 64, 10, 200, 150),       # cache not yet full: empty slots
    (1, 6, 6, 64, 0, 77, 5000),        # MHA, no global keys, window not a tile multiple
    (1, 4, 2, 128, 4, 300, 0),         # a fresh ring: every slot empty (tiles skipped)
])
def test_chunk_matches_reference(dtype, n_q, batch, hq, hkv, dim, n_global, n_local, seen):
    if batch * hq * n_q * (n_global + n_local + n_q) > 2e8:
        pytest.skip("the float64 reference would need tens of GB")
    check_chunk(dtype, batch, hq, hkv, dim, n_q, n_global, n_local, seen)


@pytest.mark.parametrize("n_q", [1, 5, 300])
def test_positions_near_1e9_give_the_same_result(n_q):
    """Only relative positions reach the kernels: the same window at 10^3 and near 10^9
    gives bit-identical outputs, and both match the reference."""
    args = (torch.bfloat16, 1, 8, 2, 128, n_q, 4, 256, 1000)
    torch.manual_seed(0)
    near = check_chunk(*args)
    torch.manual_seed(0)
    far = check_chunk(*args, offset=10**9 - 1000 + 17)
    torch.testing.assert_close(near, far, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("n_q", [17, 63, 64, 65, 1000, 4096])
def test_prefill_chunks_against_a_full_wrapped_cache(dtype, dim, n_q):
    """The chunk-anchored pre-pass gathers a wrapped window by position: chunks of 17 .. 4096
    queries against a full cache of 4 + 4096 slots, ten thousand tokens into the stream."""
    check_chunk(dtype, 1, 4, 2, dim, n_q, 4, 4096, 10_000)


@pytest.mark.parametrize("n_q", [17, 4096])
def test_prefill_chunk_near_1e9_is_bit_identical(n_q):
    """The pre-pass and the kernel take only differences of positions: a 4096-token window
    near 10^9 gives the same bits as the same window near 10^4."""
    args = (torch.bfloat16, 1, 4, 2, 128, n_q, 4, 4096, 10_000)
    torch.manual_seed(0)
    near = check_chunk(*args)
    torch.manual_seed(0)
    far = check_chunk(*args, offset=10**9 - 10_000 + 17)
    torch.testing.assert_close(near, far, rtol=0, atol=0)


@pytest.mark.parametrize("n_q", [17, 40, 300])
def test_chunk_with_cache_slots_in_any_order(n_q):
    """Slots carry explicit positions, so a permuted cache must give the same result as the
    ring order (the window is gathered by position, not by slot)."""
    dtype, hq, hkv, dim, n_global, n_local, seen = torch.bfloat16, 6, 2, 64, 3, 200, 777
    cache_k, cache_v, positions = ring_cache(1, hkv, dim, n_global, n_local, seen, dtype)
    q, k, v = (randn(1, h, n_q, dim, dtype=dtype) for h in (hq, hkv, hkv))
    inv_freq = rope_inv_freq(dim).to(DEV)
    order = torch.randperm(positions.numel())

    def attend(ck, cv, pos):
        return li.lambda_attention_chunk(q, k, v, ck, cv, pos.to(DEV), seen, inv_freq,
                                         n_global=n_global, n_local=n_local)

    ring = attend(cache_k, cache_v, positions)
    permuted = attend(cache_k[:, :, order.to(DEV)], cache_v[:, :, order.to(DEV)], positions[order])
    torch.testing.assert_close(permuted, ring, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# The decode kernel (bf16/fp16, head_dim 64/128, 1 to 16 queries): GQA 4:1 and 8:1, MHA, a
# wrapped ring, empty slots, slots in any order, positions near 10^9.

DECODE_SHAPES = [  # batch, hq, hkv, dim, n_global, n_local, seen
    (1, 32, 8, 128, 4, 4096, 10_000),  # GQA 4:1, the benchmark's window, wrapped
    (2, 16, 2, 64, 4, 300, 999),       # GQA 8:1: 16 queries make 8 row tiles
    (1, 6, 6, 128, 0, 77, 5000),       # MHA, no global keys
    (3, 9, 3, 64, 10, 200, 150),       # cache not yet full: empty slots (NaN)
    (1, 8, 2, 128, 4, 300, 0),         # a fresh ring: only the chunk's own keys
    (1, 8, 1, 64, 4, 100, 100),        # global keys local for some queries, global for others
]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n_q", [1, 2, 4, 7, 16])
@pytest.mark.parametrize("batch,hq,hkv,dim,n_global,n_local,seen", DECODE_SHAPES)
def test_decode_matches_reference(dtype, n_q, batch, hq, hkv, dim, n_global, n_local, seen):
    check_chunk(dtype, batch, hq, hkv, dim, n_q, n_global, n_local, seen)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("n_q", [1, 16])
def test_decode_slots_in_any_order_and_distance_cap(dim, n_q):
    check_chunk(torch.bfloat16, 2, 8, 2, dim, n_q, 4, 500, 3000, cap=300, shuffle=True)


@pytest.mark.parametrize("dim,hq,hkv", [(64, 9, 3), (128, 32, 8), (128, 4, 4)])
@pytest.mark.parametrize("n_q", [1, 16])
def test_decode_near_1e9_is_bit_identical(dim, hq, hkv, n_q):
    args = (torch.float16, 1, hq, hkv, dim, n_q, 4, 1000, 5000)
    torch.manual_seed(1)
    near = check_chunk(*args)
    torch.manual_seed(1)
    far = check_chunk(*args, offset=10**9 + 12345)
    torch.testing.assert_close(near, far, rtol=0, atol=0)


def test_partial_rotary_decode_uses_the_tensor_core_kernel():
    """rotary_dim < head_dim is routed to the 64-row tensor-core kernel."""
    check_chunk(torch.bfloat16, 1, 8, 2, 128, 3, 4, 300, 1000, rotary_dim=64)


# ----------------------------------------------------------------------------------------------
# Streaming through RingKVCache: chunk sizes 1 .. 4096, windows that wrap.

def stream(q, k, v, inv_freq, chunk_sizes, *, n_global, n_local):
    cache = li.RingKVCache(q.shape[0], k.shape[1], q.shape[-1], n_global=n_global,
                           n_local=n_local, dtype=q.dtype, device=DEV)
    outs, t, i = [], 0, 0
    while t < q.shape[2]:
        size = chunk_sizes[i % len(chunk_sizes)]
        sl = slice(t, t + size)
        outs.append(cache.attend_and_append(q[:, :, sl], k[:, :, sl], v[:, :, sl], inv_freq))
        t, i = t + size, i + 1
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunks,seq", [([1], 700), ([7, 1, 64], 1500), ([333], 3000),
                                         ([4096], 6000), ([1, 4096, 16], 5000)])
@pytest.mark.parametrize("n_global,n_local", [(4, 500), (0, 129)])
def test_streaming_matches_reference(dtype, chunks, seq, n_global, n_local):
    q, k, v = randn(1, 6, seq, 64, dtype=dtype), randn(1, 2, seq, 64, dtype=dtype), \
        randn(1, 2, seq, 64, dtype=dtype)
    inv_freq = rope_inv_freq(64)
    streamed, cache = stream(q, k, v, inv_freq.to(DEV), chunks, n_global=n_global, n_local=n_local)
    check_close(streamed, q, k, v, inv_freq, dtype, n_global=n_global, n_local=n_local)
    assert int(cache.next_position) == seq


# ----------------------------------------------------------------------------------------------
# Ring append.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n_global,n_local", [(0, 5), (3, 17), (10, 256)])
@pytest.mark.parametrize("start", [0, 2, 1000, 10**9 + 3])
@pytest.mark.parametrize("n_new", [1, 4, 300])
def test_ring_append_matches_cpu(dtype, n_global, n_local, start, n_new):
    slots = n_global + n_local
    cache_k = torch.randn(2, 3, slots, 64).to(dtype)
    cache_v = torch.randn(2, 3, slots, 64).to(dtype)
    positions = torch.randint(-1, 50, (slots,))
    k = torch.randn(2, 3, n_new, 64).to(dtype)
    v = torch.randn(2, 3, n_new, 64).to(dtype)
    gpu = [t.to(DEV) for t in (cache_k, cache_v, positions)]
    li.ring_cache_append(cache_k, cache_v, positions, k, v, start, n_global=n_global, n_local=n_local)
    li.ring_cache_append(*gpu, k.to(DEV), v.to(DEV), start, n_global=n_global, n_local=n_local)
    for cpu_t, gpu_t in zip((cache_k, cache_v, positions), gpu):
        torch.testing.assert_close(gpu_t.cpu(), cpu_t, rtol=0, atol=0)


def test_ring_append_unaligned_rows():
    """head_dim 36 in bf16 is not a whole number of 16-byte words: element-wise copy."""
    cache_k, cache_v = torch.zeros(1, 2, 9, 36), torch.zeros(1, 2, 9, 36)
    positions = torch.full((9,), -1)
    k, v = torch.randn(1, 2, 20, 36), torch.randn(1, 2, 20, 36)
    gpu = [t.to(DEV, torch.bfloat16) if t.is_floating_point() else t.to(DEV)
           for t in (cache_k, cache_v, positions)]
    li.ring_cache_append(cache_k, cache_v, positions, k, v, 5, n_global=2, n_local=7)
    li.ring_cache_append(*gpu, k.to(DEV, torch.bfloat16), v.to(DEV, torch.bfloat16), 5,
                         n_global=2, n_local=7)
    torch.testing.assert_close(gpu[0].float().cpu(), cache_k.bfloat16().float(), rtol=0, atol=0)
    torch.testing.assert_close(gpu[2].cpu(), positions, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Decode in a CUDA graph: query_start and the cache positions advance on the device.

@pytest.mark.parametrize("batch,hq,hkv,dim,n_q", [(1, 32, 8, 128, 1), (16, 32, 8, 128, 1),
                                                 (2, 9, 3, 64, 4)])
def test_decode_cuda_graph_capture_and_replay(batch, hq, hkv, dim, n_q):
    """A decode step (attention, then the ring append, which advances the device-side
    positions) captured once and replayed equals the same steps run eagerly, bit for bit."""
    dtype, n_global, n_local = torch.bfloat16, 4, 256
    inv_freq = rope_inv_freq(dim).to(DEV)
    prompt = 600
    q0, k0, v0 = randn(batch, hq, prompt, dim, dtype=dtype), randn(batch, hkv, prompt, dim, dtype=dtype), \
        randn(batch, hkv, prompt, dim, dtype=dtype)
    graph_cache = li.RingKVCache(batch, hkv, dim, n_global=n_global, n_local=n_local, dtype=dtype, device=DEV)
    eager_cache = li.RingKVCache(batch, hkv, dim, n_global=n_global, n_local=n_local, dtype=dtype, device=DEV)
    for cache in (graph_cache, eager_cache):
        cache.attend_and_append(q0, k0, v0, inv_freq)

    static_q, static_k, static_v = (randn(batch, h, n_q, dim, dtype=dtype) for h in (hq, hkv, hkv))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (attend does not append)
        graph_cache.attend(static_q, static_k, static_v, inv_freq)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graph_cache.attend_and_append(static_q, static_k, static_v, inv_freq)

    # Capture does not run the work: the cache is still at `prompt`. Replay 300 steps (the
    # window wraps) and compare with eager calls on the twin cache.
    steps = 300 // n_q
    for step in range(steps):
        q, k, v = (randn(batch, h, n_q, dim, dtype=dtype) for h in (hq, hkv, hkv))
        static_q.copy_(q), static_k.copy_(k), static_v.copy_(v)
        static_out.fill_(float("nan"))  # the graph writes its output here
        graph.replay()
        expected = eager_cache.attend_and_append(q, k, v, inv_freq)
        if step % 50 == 0 or step == steps - 1:
            torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
    torch.testing.assert_close(graph_cache.positions, eager_cache.positions, rtol=0, atol=0)
    assert int(graph_cache.next_position) == prompt + steps * n_q


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile on CUDA tensors.

def test_opcheck_cuda():
    dtype = torch.bfloat16
    q, k, v = randn(1, 4, 37, 64, dtype=dtype), randn(1, 2, 37, 64, dtype=dtype), randn(1, 2, 37, 64, dtype=dtype)
    inv_freq = rope_inv_freq(64).to(DEV)
    torch.library.opcheck(torch.ops.lminf.lambda_attention, (q, k, v, inv_freq, 4, 16, 16, 0.125))
    cache_k, cache_v, positions = ring_cache(1, 2, 64, 4, 16, 40, dtype, empty_fill=0.0)
    start = torch.tensor([40], dtype=torch.int64, device=DEV)
    torch.library.opcheck(torch.ops.lminf.lambda_attention_chunk,
                          (q[:, :, :3], k[:, :, :3], v[:, :, :3], cache_k, cache_v,
                           positions.to(DEV), start, inv_freq, 4, 16, 16, 0.125))
    torch.library.opcheck(torch.ops.lminf.ring_cache_append,
                          (cache_k, cache_v, positions.to(DEV), k[:, :, :3], v[:, :, :3], start, 4, 16))


def test_torch_compile_cuda():
    dtype = torch.bfloat16
    q, k, v = randn(1, 4, 100, 64, dtype=dtype), randn(1, 2, 100, 64, dtype=dtype), randn(1, 2, 100, 64, dtype=dtype)
    inv_freq = rope_inv_freq(64).to(DEV)

    def f(q, k, v):
        return li.lambda_attention(q * 2, k, v, inv_freq, n_global=3, n_local=20) + 1

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=0, atol=0)
