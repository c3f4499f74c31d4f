"""Small calls that reach every CUDA kernel path once, for compute-sanitizer (memcheck and
racecheck) in scripts/gpu_check.sh (its decode_sanitize and sanitize phases). Sizes are small
because the sanitizer slows kernels down 100x; each case still crosses tile edges, wraps the ring and uses GQA,
and ragged batches (per-sequence padding, starts and positions) are among them. Exits non-zero if an
output disagrees with the float64 reference, so a sanitizer run also proves the calls ran.
`--decode-only` runs the decode kernel's cases alone."""

import sys

import torch

import lm_infinite as li

DEV = "cuda"


def inv_freq(dim):
    return (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(DEV)


def check(out, q, k, v, freqs, tol, **kw):
    ref = li.lambda_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                        freqs.cpu(), **kw)
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < tol, err
    return err


def check_chunk(out, q, k, v, cache_k, cache_v, positions, start, freqs, tol, **kw):
    """check() for a chunk at positions start.. against a cache whose slot positions
    (`positions`, shared by the batch) are -1 where empty: its keys are the present slots
    followed by the chunk's own."""
    present = positions >= 0
    chunk_positions = torch.arange(start, start + q.shape[2])
    return check(out, q, torch.cat([cache_k[:, :, present.to(DEV)], k], 2),
                 torch.cat([cache_v[:, :, present.to(DEV)], v], 2), freqs, tol,
                 query_positions=chunk_positions,
                 key_positions=torch.cat([positions[present], chunk_positions]), **kw)


def ring(batch, hkv, dim, n_global, n_local, seen, dtype):
    """A cache as RingKVCache holds it after `seen` tokens; empty slots hold NaN."""
    positions = torch.full((n_global + n_local,), -1, dtype=torch.int64)
    for pos in range(max(0, seen - n_local), seen):
        positions[pos if pos < n_global else n_global + (pos - n_global) % n_local] = pos
    positions[:min(n_global, seen)] = torch.arange(min(n_global, seen))
    cache_k = torch.randn(batch, hkv, positions.numel(), dim, dtype=dtype, device=DEV)
    cache_v = torch.randn_like(cache_k)
    empty = (positions < 0).to(DEV)
    cache_k[:, :, empty] = float("nan")
    cache_v[:, :, empty] = float("nan")
    return cache_k, cache_v, positions


def decode_cases():
    """The decode kernel and its merge: 1, 5 and 16 queries against a wrapped ring (GQA 4:1
    head_dim 128 bf16, 8:1 head_dim 64 fp16, MHA), and against an unfull one (empty slots)."""
    for dtype, hq, hkv, dim, seen in ((torch.bfloat16, 8, 2, 128, 1000),
                                      (torch.float16, 16, 2, 64, 1000),
                                      (torch.bfloat16, 4, 4, 64, 1000),
                                      (torch.float16, 9, 3, 64, 150)):
        n_global, n_local = 4, 300
        cache_k, cache_v, positions = ring(2, hkv, dim, n_global, n_local, seen, dtype)
        f = inv_freq(dim)
        for n_q in (1, 5, 16):
            q = torch.randn(2, hq, n_q, dim, dtype=dtype, device=DEV)
            k = torch.randn(2, hkv, n_q, dim, dtype=dtype, device=DEV)
            v = torch.randn(2, hkv, n_q, dim, dtype=dtype, device=DEV)
            out = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions.to(DEV), seen, f,
                                            n_global=n_global, n_local=n_local)
            err = check_chunk(out, q, k, v, cache_k, cache_v, positions, seen, f, 3e-2,
                              n_global=n_global, n_local=n_local)
            print(dtype, f"{hq}/{hkv}", dim, "decode n_q", n_q, "err", err)


def ragged_cases():
    """Batches of different lengths: a left-padded prefill (a whole tile of padding rows) and
    decode chunks with a query start, padding and cache-position row per sequence (one
    sequence's ring wrapped, the other's not yet full). Each sequence is checked alone."""
    dtype, hq, hkv, dim, n_global, n_local = torch.bfloat16, 8, 2, 128, 4, 300
    f = inv_freq(dim)
    padding = [0, 70]
    q = torch.randn(2, hq, 150, dim, dtype=dtype, device=DEV)
    k = torch.randn(2, hkv, 150, dim, dtype=dtype, device=DEV)
    v = torch.randn(2, hkv, 150, dim, dtype=dtype, device=DEV)
    out = li.lambda_attention(q, k, v, f, n_global=3, n_local=70, padding=torch.tensor(padding, device=DEV))
    for b, pad in enumerate(padding):
        assert (out[b, :, :pad] == 0).all()
        err = check(out[b:b + 1, :, pad:], q[b:b + 1, :, pad:], k[b:b + 1, :, pad:], v[b:b + 1, :, pad:], f,
                    3e-2, n_global=3, n_local=70)
        print(dtype, dim, "ragged prefill sequence", b, "err", err)

    seen = [1000, 150]
    rings = [ring(1, hkv, dim, n_global, n_local, n, dtype) for n in seen]
    cache_k, cache_v = torch.cat([r[0] for r in rings]), torch.cat([r[1] for r in rings])
    positions = torch.stack([r[2] for r in rings])
    for n_q, padding in ((1, [0, 0]), (5, [0, 3])):
        q = torch.randn(2, hq, n_q, dim, dtype=dtype, device=DEV)
        k = torch.randn(2, hkv, n_q, dim, dtype=dtype, device=DEV)
        v = torch.randn(2, hkv, n_q, dim, dtype=dtype, device=DEV)
        out = li.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions.to(DEV),
                                        torch.tensor(seen, device=DEV), f, n_global=n_global,
                                        n_local=n_local, padding=torch.tensor(padding, device=DEV))
        for b, (start, pad) in enumerate(zip(seen, padding)):
            real = (slice(b, b + 1), slice(None), slice(pad, None))
            err = check_chunk(out[real], q[real], k[real], v[real], cache_k[b:b + 1], cache_v[b:b + 1],
                              positions[b], start, f, 3e-2, n_global=n_global, n_local=n_local)
            print(dtype, f"{hq}/{hkv}", dim, "ragged decode n_q", n_q, "sequence", b, "err", err)


def main():
    torch.manual_seed(0)
    decode_cases()
    if "--decode-only" in sys.argv:
        torch.cuda.synchronize()
        print("sanitizer cases ok (decode only)")
        return
    ragged_cases()
    for dtype, dim in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 64),
                       (torch.bfloat16, 80)):
        # Prefill: 150 queries, window 70, 3 global keys (band edges, global tile, padding rows).
        q = torch.randn(1, 4, 150, dim, dtype=dtype, device=DEV)
        k = torch.randn(1, 2, 150, dim, dtype=dtype, device=DEV)
        v = torch.randn(1, 2, 150, dim, dtype=dtype, device=DEV)
        f = inv_freq(dim)
        out = li.lambda_attention(q, k, v, f, n_global=3, n_local=70)
        print(dtype, dim, "prefill err", check(out, q, k, v, f, 3e-2, n_global=3, n_local=70))

        # Streaming through the ring until the window has wrapped: a 90-token prompt against
        # the empty ring (cache tiles skipped), decode-mode chunks of 6 (split keys, merge) and
        # prefill-mode chunks of 24 and 30 against a full ring.
        cache = li.RingKVCache(1, 2, dim, n_global=3, n_local=70, dtype=dtype, device=DEV)
        outs = []
        for t, size in ((0, 90), (90, 6), (96, 24), (120, 6), (126, 24)):
            sl = slice(t, t + size)
            outs.append(cache.attend_and_append(q[:, :, sl], k[:, :, sl], v[:, :, sl], f))
        out = torch.cat(outs, 2)
        print(dtype, dim, "stream err", check(out, q, k, v, f, 3e-2, n_global=3, n_local=70))
    torch.cuda.synchronize()
    print("sanitizer cases ok")


if __name__ == "__main__":
    main()
