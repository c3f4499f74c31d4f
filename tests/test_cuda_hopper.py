"""The tensor-core prefill kernels against the float64 reference: the Hopper kernel
(csrc/cuda/lambda_attention_hopper.cu, wgmma + TMA, 128 x 128 tiles) and the mma.sync kernel it
replaces on sm_90, through the public API.

Which kernel runs is LMINF_PREFILL_KERNEL's choice (csrc/cuda/hopper_prefill.cuh), read once per
process, so scripts/gpu_check.sh runs this file twice: as it is (auto: the Hopper kernel on an
H100/H200 build with sm_90a code) and with LMINF_PREFILL_KERNEL=mma. The first test checks that
the kernel the switch names is the one that ran (its name in the profiler's kernel list).

Shapes aim at the Hopper kernel's edges: 128-row blocks (two 64-row consumer groups) and
128-key tiles, so sequences of 1 .. 4500 rows cut blocks, tiles and groups at every offset;
band edges (n_local below, at and above a tile), global tiles (n_global 0, 4, 200), GQA and
MHA, head_dim 64 and 128, bf16 and fp16, partial rotary, few blocks (split keys, merged) and
many; chunks of 17 .. 4096 queries against a full wrapped ring, a half-full one (partial window
tiles), a fresh one (every window tile skipped), slots in any order, and positions near 10^9
(bit-identical to the same window near 10^4). Outputs come from memory poisoned with NaN;
low-precision errors are bounded by twice PyTorch's own error in that dtype.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

import lm_infinite as li
from cuda_checks import DEV, LOW_PRECISION, check_close, poison_allocator, randn
from helpers import rope_inv_freq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CHOICE = os.environ.get("LMINF_PREFILL_KERNEL", "") or "auto"


def hopper_expected() -> bool:
    """Whether the switch should send tensor-core prefill calls to the Hopper kernel here."""
    built = li.build_info().get("hopper_prefill", False)
    return built and CHOICE in ("auto", "hopper") and torch.cuda.get_device_capability() == (9, 0)


def prefill_kernels_run(fn) -> set[str]:
    """Names of the prefill kernels (mma.sync or Hopper) that fn() launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    return {kind for kind in ("lambda_attention_hopper_kernel", "lambda_attention_mma_kernel")
            if any(kind in n for n in names)}


def test_the_switch_picks_the_kernel_that_runs():
    q, k, v = (randn(1, h, 300, 128, dtype=torch.bfloat16) for h in (4, 2, 2))
    inv_freq = rope_inv_freq(128).to(DEV)
    ran = prefill_kernels_run(lambda: li.lambda_attention(q, k, v, inv_freq, n_global=4,
                                                          n_local=100))
    want = "lambda_attention_hopper_kernel" if hopper_expected() else "lambda_attention_mma_kernel"
    assert ran == {want}, (CHOICE, li.build_info().get("hopper_prefill"), ran)


def test_an_unknown_switch_value_is_an_error_naming_it():
    code = ("import torch, lm_infinite as li\n"
            "q = torch.randn(1, 2, 40, 64, dtype=torch.bfloat16, device='cuda')\n"
            "f = 1.0 / 10000 ** (torch.arange(0, 64, 2, device='cuda') / 64)\n"
            "try:\n"
            "    li.lambda_attention(q, q, q, f.float(), n_global=2, n_local=8)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, LMINF_PREFILL_KERNEL="wgmma2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "LMINF_PREFILL_KERNEL must be auto, hopper or mma, got 'wgmma2'" in out.stdout, out


# ----------------------------------------------------------------------------------------------
# Whole sequences.

WHOLE = [  # batch, heads_q, heads_kv, seq, head_dim, rotary_dim, n_global, n_local, distance_cap
    (1, 4, 2, 17, 128, 128, 4, 8, None),        # one block, one tile, most rows padding
    (2, 3, 3, 129, 64, 64, 0, 64, None),        # MHA, no globals: 2 blocks, a 1-row one
    (1, 8, 2, 255, 128, 128, 4, 128, None),     # window = one tile
    (1, 9, 3, 1177, 64, 64, 10, 300, None),     # SmolLM2's heads, band edges mid-tile
    (1, 4, 2, 1177, 128, 128, 200, 129, 50),    # two global tiles, cap inside the window
    (1, 3, 1, 1177, 64, 32, 4, 129, 200),       # partial rotary, GQA 3:1
    (3, 32, 8, 257, 128, 128, 4, 4096, None),   # window covers the sequence: causal
    (1, 8, 2, 4500, 128, 128, 4, 1024, None),   # 288 blocks: no splits
]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("batch,hq,hkv,seq,dim,rot,g,l,cap", WHOLE)
def test_whole_sequence_matches_reference(dtype, batch, hq, hkv, seq, dim, rot, g, l, cap):
    q, k, v = randn(batch, hq, seq, dim, dtype=dtype), randn(batch, hkv, seq, dim, dtype=dtype), \
        randn(batch, hkv, seq, dim, dtype=dtype)
    inv_freq = rope_inv_freq(rot)
    poison_allocator(q)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=g, n_local=l, distance_cap=cap)
    assert out.dtype == dtype and out.shape == q.shape
    check_close(out, q, k, v, inv_freq, dtype, n_global=g, n_local=l, distance_cap=cap)


@pytest.mark.parametrize("dim", [64, 128])
def test_strided_views_of_q_and_v(dim):
    """q and v as transposed views of [batch, seq, heads, dim] (what HF attention hands over):
    the tensor maps take their strides, not a packed layout."""
    seq, hq, hkv = 700, 8, 2
    q = randn(2, seq, hq, dim, dtype=torch.bfloat16).transpose(1, 2)
    k = randn(2, hkv, seq, dim, dtype=torch.bfloat16)
    v = randn(2, seq, hkv, dim, dtype=torch.bfloat16).transpose(1, 2)
    inv_freq = rope_inv_freq(dim)
    out = li.lambda_attention(q, k, v, inv_freq.to(DEV), n_global=4, n_local=200)
    check_close(out, q, k, v, inv_freq, torch.bfloat16, n_global=4, n_local=200)


# ----------------------------------------------------------------------------------------------
# Chunks against a cache.

def ring_cache(hkv, dim, n_global, n_local, seen, dtype):
    """A cache as RingKVCache holds it after `seen` tokens; empty slots hold NaN."""
    slots = n_global + n_local
    positions = torch.full((slots,), -1, dtype=torch.int64)
    for p in range(max(0, seen - n_local), seen):
        positions[p if p < n_global else n_global + (p - n_global) % n_local] = p
    for p in range(min(n_global, seen)):
        positions[p] = p
    cache_k, cache_v = randn(1, hkv, slots, dim, dtype=dtype), randn(1, hkv, slots, dim, dtype=dtype)
    empty = (positions < 0).to(DEV)
    cache_k[:, :, empty] = float("nan")
    cache_v[:, :, empty] = float("nan")
    return cache_k, cache_v, positions


def check_chunk(dtype, hq, hkv, dim, n_q, n_global, n_local, seen, offset=0, shuffle=False):
    cache_k, cache_v, positions = ring_cache(hkv, dim, n_global, n_local, seen, dtype)
    if offset:
        positions = torch.where(positions >= n_global, positions + offset, positions)
    if shuffle:
        order = torch.randperm(positions.numel())
        positions = positions[order]
        cache_k, cache_v = cache_k[:, :, order.to(DEV)], cache_v[:, :, order.to(DEV)]
    q, k, v = (randn(1, h, n_q, dim, dtype=dtype) for h in (hq, hkv, hkv))
    inv_freq = rope_inv_freq(dim)
    start = seen + offset
    poison_allocator(q)
    out = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions.to(DEV), start,
                                    inv_freq.to(DEV), n_global=n_global, n_local=n_local)
    present = positions >= 0
    keys = torch.cat([cache_k[:, :, present.to(DEV)], k], 2)
    values = torch.cat([cache_v[:, :, present.to(DEV)], v], 2)
    key_positions = torch.cat([positions[present], torch.arange(start, start + n_q)])
    check_close(out, q, keys, values, inv_freq, dtype, n_global=n_global, n_local=n_local,
                query_positions=torch.arange(start, start + n_q), key_positions=key_positions)
    return out


BF16, FP16 = torch.bfloat16, torch.float16


# Chunk sizes 1 .. 4096 (1 is the decode kernel's, for the boundary), both head_dims and dtypes
# spread over them rather than crossed: each case pays a float64 reference over 4100 cached
# keys, and gpu_check runs this file once per kernel.
@pytest.mark.parametrize("dtype,dim,n_q", [
    (BF16, 128, 1), (BF16, 128, 17), (FP16, 64, 17), (BF16, 64, 127), (BF16, 128, 128),
    (FP16, 128, 129), (BF16, 64, 129), (BF16, 128, 1000), (FP16, 64, 1000), (BF16, 128, 4096),
    (FP16, 64, 4096),
])
def test_chunk_against_a_full_wrapped_cache(dtype, dim, n_q):
    """4 + 4096 slots, ten thousand tokens in: the window is gathered across the wrap."""
    check_chunk(dtype, 4, 2, dim, n_q, 4, 4096, 10_000)


@pytest.mark.parametrize("n_q", [17, 300])
@pytest.mark.parametrize("hq,hkv,dim,n_global,n_local,seen", [
    (9, 3, 64, 10, 200, 150),   # cache half full: partial window tiles, empty slots
    (6, 6, 64, 0, 77, 5000),    # MHA, no globals, window not a tile multiple
    (4, 2, 128, 4, 300, 0),     # a fresh ring: every window tile skipped
    (8, 2, 128, 200, 256, 999), # two global tiles, some held by the chunk itself
])
def test_chunk_with_partial_and_empty_windows(n_q, hq, hkv, dim, n_global, n_local, seen):
    check_chunk(torch.bfloat16, hq, hkv, dim, n_q, n_global, n_local, seen)


def test_chunk_with_cache_slots_in_any_order():
    torch.manual_seed(1)
    ring = check_chunk(torch.bfloat16, 6, 2, 64, 300, 3, 200, 777)
    torch.manual_seed(1)
    permuted = check_chunk(torch.bfloat16, 6, 2, 64, 300, 3, 200, 777, shuffle=True)
    torch.testing.assert_close(permuted, ring, rtol=0, atol=0)


@pytest.mark.parametrize("dim,n_q", [(128, 4096), (64, 300)])
def test_chunk_near_1e9_is_bit_identical(dim, n_q):
    """Only position differences reach sin/cos: a window near 10^9 gives the bits of the same
    window near 10^4."""
    args = (torch.bfloat16, 4, 2, dim, n_q, 4, 4096, 10_000)
    torch.manual_seed(0)
    near = check_chunk(*args)
    torch.manual_seed(0)
    far = check_chunk(*args, offset=10**9 - 10_000 + 17)
    torch.testing.assert_close(near, far, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Padding rows (the batching contract): runs once the ops take `padding`.

@pytest.mark.skipif("padding" not in inspect.signature(li.lambda_attention).parameters,
                    reason="lambda_attention has no padding argument yet (issue #16)")
@pytest.mark.parametrize("dim", [64, 128])
def test_padded_rows_behave_as_the_sequence_run_alone(dim):
    """Sequence b with padding[b] leading rows gives, on its real rows, what it gives alone,
    and zeros on its padding rows; pads cut the 64-row groups and 128-key tiles off-centre."""
    seq, hq, hkv, g, l = 700, 4, 2, 4, 200
    pads = [0, 1, 63, 130]
    q, k, v = (randn(len(pads), h, seq, dim, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    inv_freq = rope_inv_freq(dim).to(DEV)
    padding = torch.tensor(pads, dtype=torch.int64, device=DEV)
    out = li.lambda_attention(q, k, v, inv_freq, n_global=g, n_local=l, padding=padding)
    for b, pad in enumerate(pads):
        alone = li.lambda_attention(q[b:b + 1, :, pad:], k[b:b + 1, :, pad:], v[b:b + 1, :, pad:],
                                    inv_freq, n_global=g, n_local=l)
        torch.testing.assert_close(out[b:b + 1, :, pad:], alone, rtol=2e-2, atol=2e-2)
        assert (out[b, :, :pad] == 0).all()
