"""A NumPy model of csrc/cuda/lambda_attention_decode.cu, block by block and warp by warp,
checked against lm_infinite's float64 reference.

It mirrors the kernel's control flow, not its fragments: the planner's split count
(lambda_attention.cu, plan_decode), the virtual key list (cache slots, then the chunk's own
tokens) cut into 64-key chunks and contiguous splits, the 16-row tiles of a KV group's stacked
queries, the four warps' 16 keys per chunk, the per-key distances (int32, clamped, sentinel for
empty slots), the warp-uniform tests (need_local, need_global, all_local), the rotation of each
thread's two keys (float32 exact seed or one float32 complex multiply by a constant step,
exactly as the kernel decides between them), the per-element masks, the online softmax per warp,
the combination of the warps and the merge of the splits. Rotation angles are float32 like the
device code (rope_sincos_f32 and rope_sincos modelled operation by operation); values are
float64, so what the model checks is the logic and the angle precision, not bf16 rounding.

Batches (issue 16): each sequence has its own start, leading padding rows and row of cache
positions; the virtual key list is its cache slots then its real rows only, real query t' (row
pad + t') is rotated by t', padding rows output zeros. Padding rows of q, k and v are NaN, and
each sequence is checked against the reference for it alone and against the model run alone.

Values the kernel computes but must never use are NaN here: keys it leaves unrotated, score
accumulators it skips, empty slots' keys (their values are zeroed, as the kernel does), so any
use of them shows. Every call to a sine or cosine is checked to take a small relative distance.

    python scripts/cuda_block_model_decode.py        # about a minute; one line per case
"""

from __future__ import annotations

import numpy as np

from cuda_block_model import alone, per_sequence, reference, ring_positions

CHUNK, WARPS, ROWS = 64, 4, 16  # kDecodeChunkKeys, warps per block, kDecodeTileRows
MAX_SPLITS = 128
K_FAR = 1 << 30
NO_KEY = (1 << 31) - 1
F32, F64 = np.float32, np.float64
LARGEST_ANGLE_ARGUMENT = [0]  # the largest |delta| passed to a sine or cosine, over the run


def fmaf(a, b, c):
    """A float32 fma: the float64 product of two float32 numbers is exact."""
    return (np.asarray(a, F64) * np.asarray(b, F64) + np.asarray(c, F64)).astype(F32)


def sincos_reduced(x: np.ndarray, quadrant: np.ndarray):
    """common.cuh's sincos_reduced: Cephes polynomials in float32, then the quadrant."""
    x = x.astype(F32)
    x2 = x * x
    s = fmaf(x * x2, fmaf(x2, fmaf(x2, F32(-1.9515295891e-4), F32(8.3321608736e-3)),
                          F32(-1.6666654611e-1)), x)
    c = fmaf(x2 * x2, fmaf(x2, fmaf(x2, F32(2.443315711809948e-5), F32(-1.388731625493765e-3)),
                           F32(4.166664568298827e-2)), fmaf(F32(-0.5), x2, F32(1.0)))
    q = quadrant.astype(np.int64) & 3
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    return cos.astype(F32), sin.astype(F32)


def rope_sincos(delta: int, inv_freq: np.ndarray):
    """common.cuh's rope_sincos (prologue only): reduction by pi/2 in double."""
    LARGEST_ANGLE_ARGUMENT[0] = max(LARGEST_ANGLE_ARGUMENT[0], abs(delta))
    angle = F64(delta) * inv_freq.astype(F64)
    quadrant = np.rint(angle * 0.63661977236758134308)
    reduced = angle - quadrant * 1.5707963267948966 - quadrant * 6.123233995736766036e-17
    return sincos_reduced(reduced, quadrant)


def rope_sincos_f32(delta: int, inv_freq: np.ndarray):
    """rope_f32.cuh: two-product, three-part Cody-Waite reduction, all float32."""
    assert abs(delta) < 2 ** 24
    LARGEST_ANGLE_ARGUMENT[0] = max(LARGEST_ANGLE_ARGUMENT[0], abs(delta))
    d = F32(delta)
    p = (d * inv_freq).astype(F32)
    e = fmaf(d, inv_freq, -p)
    quadrant = np.rint((p * F32(0.636619772)).astype(F32))
    x = fmaf(-quadrant, F32(1.57079637e+00), p)
    x = fmaf(-quadrant, F32(-4.37113883e-08), x)
    x = fmaf(-quadrant, F32(-1.71512451e-15), x)
    return sincos_reduced((x + e).astype(F32), quadrant)


def complex_step(c, s, step_c, step_s):
    """One float32 complex multiply (c + i s)(step_c + i step_s), as the kernel's recurrence."""
    return (c * step_c - s * step_s).astype(F32), (s * step_c + c * step_s).astype(F32)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_half over the whole head (the decode path takes rotary_dim == head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def plan_decode(batch, hq, hkv, n_q, cache_len, sm_count, blocks_per_sm):
    """plan_decode in lambda_attention.cu: (row_tiles, n_splits)."""
    row_tiles = -(-(hq // hkv) * n_q // ROWS)
    blocks = row_tiles * hkv * batch
    chunks = -(-(cache_len + n_q) // CHUNK)
    return row_tiles, max(1, min(sm_count * blocks_per_sm // blocks, chunks, MAX_SPLITS))


def load_chunk(p, b, kv_head, chunk):
    """One stage: positions, K, V of 64 virtual keys (the sequence's cache slots, then its real
    rows; past the end: position -1, zeros)."""
    dim, cache_len, n_q, pad = p["q"].shape[3], p["cache_len"], p["n_q"], int(p["pad"][b])
    pos = np.full(CHUNK, -1, dtype=np.int64)
    k, v = np.zeros((CHUNK, dim)), np.zeros((CHUNK, dim))
    for r in range(CHUNK):
        key = chunk * CHUNK + r
        if key < cache_len:
            pos[r], k[r], v[r] = (p["cache_pos"][b, key], p["cache_k"][b, kv_head, key],
                                  p["cache_v"][b, kv_head, key])
        elif key < cache_len + n_q - pad:
            t = key - cache_len  # real row t: row pad + t of k and v
            pos[r], k[r], v[r] = (p["qs"][b] + t, p["k"][b, kv_head, pad + t],
                                  p["v"][b, kv_head, pad + t])
    return pos, k, v


def run_block(p, b, kv_head, row_tile, split, n_splits, out, partial_out, partial_lse):
    hq, n_q, dim = p["q"].shape[1], p["n_q"], p["q"].shape[3]
    group, n_local, inv_freq = hq // p["k"].shape[1], min(p["L"], K_FAR), p["inv_freq"]
    qs, pad = int(p["qs"][b]), int(p["pad"][b])  # read once per block
    n_real = n_q - pad
    rows_total, r0, last_t = group * n_q, row_tile * ROWS, n_real - 1
    n_chunks = -(-(p["cache_len"] + n_real) // CHUNK) if n_real > 0 else 0
    c_begin, c_end = n_chunks * split // n_splits, n_chunks * (split + 1) // n_splits

    # Prologue: R_t' q and R_D q for the 16 rows (rows past the tile zero; padding rows are
    # rotated by a negative t' and never used), the recurrence steps.
    rows = [(kv_head * group + row // n_q, row % n_q) if row < rows_total else None
            for row in range(r0, r0 + ROWS)]
    q_local, q_cap = np.zeros((ROWS, dim)), np.zeros((ROWS, dim))
    cap_cos, cap_sin = rope_sincos(p["D"], inv_freq)
    for r, info in enumerate(rows):
        if info:
            q = p["q"][b, info[0], info[1]]
            q_local[r] = rotate(q, *rope_sincos_f32(info[1] - pad, inv_freq))
            q_cap[r] = rotate(q, cap_cos, cap_sin)
    step1, step64 = rope_sincos(1, inv_freq), rope_sincos(CHUNK, inv_freq)
    row_valid = np.array([info is not None and info[1] >= pad for info in rows])
    row_t = np.array([info[1] - pad if v else 0 for info, v in zip(rows, row_valid)])
    scale_log2 = p["scale"] * 1.4426950408889634

    warp_max = np.full((WARPS, ROWS), -np.inf)
    warp_sum = np.zeros((WARPS, ROWS))
    warp_out = np.zeros((WARPS, ROWS, dim))
    # Per thread-owned key pair n (slots 16 w + 2 n, + 1): the distance its state belongs to
    # and cos/sin of every frequency (the kernel spreads the frequencies over four lanes).
    prev = [[None] * 8 for _ in range(WARPS)]
    state = [[None] * 8 for _ in range(WARPS)]

    for c in range(c_begin, c_end):
        pos, k_tile, v_tile = load_chunk(p, b, kv_head, c)
        for w in range(WARPS):
            j = pos[16 * w:16 * w + 16]
            empty = j < 0
            kd = np.where(empty, NO_KEY, np.clip(j - qs, -K_FAR, K_FAR))
            is_global = ~empty & (j < p["G"])
            seen_local = ~empty & (kd <= last_t) & (kd > -n_local)
            seen_global = is_global & (last_t - kd >= n_local)
            all_local = bool((~empty & (kd <= 0) & (last_t - kd < n_local)).all())
            need_local, need_global = bool(seen_local.any()), bool(seen_global.any())
            if not need_local and not need_global:
                prev[w] = [None] * 8
                continue
            k_raw = k_tile[16 * w:16 * w + 16].copy()
            v_warp = v_tile[16 * w:16 * w + 16].copy()
            v_warp[empty] = 0.0  # the warp zeroes its empty slots' values

            acc_global = q_cap @ k_raw.T if need_global else np.full((ROWS, 16), np.nan)
            if need_local:
                rotated = np.full((16, dim), np.nan)  # keys left unrotated must not be used
                for n in range(8):
                    d0 = int(kd[2 * n]) if seen_local[2 * n] else None
                    d1 = int(kd[2 * n + 1]) if seen_local[2 * n + 1] else None
                    if d0 is not None:
                        if prev[w][n] is not None and d0 == prev[w][n] + CHUNK:
                            state[w][n] = complex_step(*state[w][n], *step64)
                        else:
                            state[w][n] = rope_sincos_f32(d0, inv_freq)
                        rotated[2 * n] = rotate(k_raw[2 * n], *state[w][n])
                    prev[w][n] = d0
                    if d1 is not None:
                        if d0 is not None and d1 == d0 + 1:
                            cs1 = complex_step(*state[w][n], *step1)
                        else:
                            cs1 = rope_sincos_f32(d1, inv_freq)
                        rotated[2 * n + 1] = rotate(k_raw[2 * n + 1], *cs1)
                with np.errstate(invalid="ignore"):
                    acc_local = q_local @ rotated.T
            else:
                prev[w] = [None] * 8
                acc_local = np.full((ROWS, 16), np.nan)

            if all_local:
                score = acc_local
            else:
                d = row_t[:, None] - kd[None, :]
                local = row_valid[:, None] & (d >= 0) & (d < n_local)
                glob = row_valid[:, None] & is_global[None, :] & (d >= n_local)
                score = np.where(local, acc_local, np.where(glob, acc_global, -np.inf))
            # (Padding rows' NaN queries may reach their own scores under all_local: the
            # epilogue discards them.)
            assert not np.isnan(score[row_valid]).any(), "a skipped or unrotated value was used"

            new_max = np.maximum(warp_max[w], score.max(1))
            ref = np.where(new_max == -np.inf, 0.0, new_max * scale_log2)
            correction = np.exp2(warp_max[w] * scale_log2 - ref)
            prob = np.exp2(score * scale_log2 - ref[:, None])
            warp_max[w] = new_max
            warp_sum[w] = warp_sum[w] * correction + prob.sum(1)
            warp_out[w] = warp_out[w] * correction[:, None] + prob @ v_warp

    # Epilogue: the warps meet, then the output or this split's partial.
    max_all = warp_max.max(0)
    ref = np.where(max_all == -np.inf, 0.0, max_all * scale_log2)
    weight = np.exp2(warp_max * scale_log2 - ref[None, :])
    sum_all = (weight * warp_sum).sum(0)
    o = (weight[:, :, None] * warp_out).sum(0)
    o = np.where(sum_all[:, None] > 0, o / np.where(sum_all > 0, sum_all, 1)[:, None], 0.0)
    for r, info in enumerate(rows):
        if info is None:
            continue
        if not row_valid[r]:  # a padding row: zeros, and a partial that weighs nothing
            o[r], sum_all[r] = 0.0, 0.0
        head, t = info
        if n_splits == 1:
            out[b, head, t] = o[r]
        else:
            out_row = (b * hq + head) * n_q + t
            partial_out[out_row, split] = o[r]
            partial_lse[out_row, split] = ref[r] + np.log2(sum_all[r]) if sum_all[r] > 0 else -np.inf


def model(p, n_splits):
    """The launch: every (row tile x split, KV head, batch row) block, then the merge."""
    batch, hq, n_q, dim = p["q"].shape
    hkv = p["k"].shape[1]
    row_tiles = -(-(hq // hkv) * n_q // ROWS)
    out = np.full(p["q"].shape, np.nan)
    partial_out = np.full((batch * hq * n_q, n_splits, dim), np.nan)
    partial_lse = np.full((batch * hq * n_q, n_splits), np.nan)
    for b in range(batch):
        for kv_head in range(hkv):
            for x in range(row_tiles * n_splits):
                run_block(p, b, kv_head, x // n_splits, x % n_splits, n_splits, out, partial_out,
                          partial_lse)
    if n_splits > 1:  # decode_merge_kernel
        assert not np.isnan(partial_lse).any() and not np.isnan(partial_out).any()
        lse_max = partial_lse.max(1)
        ref = np.where(lse_max == -np.inf, 0.0, lse_max)
        w = np.exp2(partial_lse - ref[:, None])
        total = w.sum(1)
        merged = (w[:, :, None] * partial_out).sum(1) / np.where(total > 0, total, 1)[:, None]
        out = merged.reshape(batch, hq, n_q, dim)
    return out


def make_inputs(batch, hq, hkv, dim, n_q, G, L, seen, offset=0, shuffle=False, cap=None, seed=0,
                pad=0):
    """Sequence b's real rows t >= pad_b at positions seen_b + offset_b + (t - pad_b) against a
    ring cache of the first G and last L tokens (as RingKVCache holds them after seen_b tokens;
    positions >= G shifted by offset_b); seen, offset and pad are one value or a list per
    sequence. Each sequence has its own row of slot positions (the same rows when they agree:
    the kernel reads a shared row the same way). Empty slots and padding rows hold NaN."""
    rng = np.random.default_rng(seed)
    seen, offset, pad = (per_sequence(x, batch) for x in (seen, offset, pad))
    cache_pos = np.stack([ring_positions(G, L, int(n), int(o)) for n, o in zip(seen, offset)])
    p = dict(q=rng.standard_normal((batch, hq, n_q, dim)),
             k=rng.standard_normal((batch, hkv, n_q, dim)),
             v=rng.standard_normal((batch, hkv, n_q, dim)),
             cache_k=rng.standard_normal((batch, hkv, G + L, dim)),
             cache_v=rng.standard_normal((batch, hkv, G + L, dim)))
    if shuffle:  # slots in any order: the kernel must not rely on the ring layout
        order = rng.permutation(G + L)
        cache_pos, p["cache_k"], p["cache_v"] = (cache_pos[:, order], p["cache_k"][:, :, order],
                                                 p["cache_v"][:, :, order])
    for b in range(batch):
        for name in ("cache_k", "cache_v"):
            p[name][b, :, cache_pos[b] < 0] = np.nan
        for name in ("q", "k", "v"):
            p[name][b, :, :pad[b]] = np.nan
    p.update(cache_pos=cache_pos, cache_len=G + L, qs=seen + offset, pad=pad, n_q=n_q, G=G, L=L,
             D=L if cap is None else cap, scale=dim ** -0.5,
             inv_freq=(1.0 / 10000 ** (np.arange(0, dim, 2) / dim)).astype(F32))
    return p


def case(batch, hq, hkv, dim, n_q, G, L, seen, *, n_splits=None, sm_count=132, blocks_per_sm=2,
         offset=0, shuffle=False, cap=None, pad=0, seed=0):
    """One shape through the model against the reference; n_splits defaults to the planner's.
    With padding or sequences at different positions, each sequence must also give exactly the
    bits of the model run on it alone with the same splits (a block depends on its own
    sequence only; other split counts move the recurrences' seeds, covered by the reference)."""
    p = make_inputs(batch, hq, hkv, dim, n_q, G, L, seen, offset, shuffle, cap, seed, pad)
    if n_splits is None:
        n_splits = plan_decode(batch, hq, hkv, n_q, G + L, sm_count, blocks_per_sm)[1]
    out = model(p, n_splits)
    ref = reference(p)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    batched = p["pad"].any() or len(set(p["qs"])) > 1
    print(f"batch={batch} heads={hq}/{hkv} dim={dim} n_q={n_q} G={G} L={L} "
          f"start={p['qs'].tolist() if batched else p['qs'][0]} "
          f"{'pad=' + str(p['pad'].tolist()) + ' ' if p['pad'].any() else ''}"
          f"splits={n_splits}{' shuffled' if shuffle else ''}: rel err {err:.1e}", end="")
    assert np.isfinite(out).all() and err < 1e-5, err
    for b in range(batch):
        assert not out[b, :, :p["pad"][b]].any(), "a padding row is not zeros"
    if batched:
        for b in range(batch):
            if p["pad"][b] < n_q:
                assert np.array_equal(out[b, :, p["pad"][b]:], model(alone(p, b), n_splits)[0]), b
        print(", each sequence as alone", end="")
    print()
    return out


def main():
    # The benchmark's shapes at their planned splits (H200: 132 SMs; 2 blocks/SM at head_dim
    # 128, 4 at 64): a wrapped ring, GQA 4:1 and 3:1.
    assert plan_decode(1, 32, 8, 1, 4100, 132, 2) == (1, 33)
    assert plan_decode(16, 32, 8, 1, 4100, 132, 2) == (1, 2)
    case(1, 32, 8, 128, 1, 4, 4096, 10_000)
    case(1, 9, 3, 64, 1, 4, 4096, 10_000, blocks_per_sm=4)
    # 1 to 16 queries; GQA 8:1 (16 queries: 8 row tiles), MHA, no global keys; one split.
    for n_q in (2, 5, 16):
        case(1, 16, 2, 64, n_q, 4, 300, 999)
    case(2, 6, 6, 64, 3, 0, 77, 5000, n_splits=1)
    # Queries that see the global keys as local and beyond the window in one chunk (n_q 5 at
    # the window's edge), an unfull cache (empty slots), a fresh ring (splits that see nothing).
    case(1, 8, 2, 64, 5, 4, 100, 100, n_splits=3)
    case(2, 9, 3, 64, 4, 10, 200, 150)
    case(1, 4, 2, 128, 16, 4, 300, 0, n_splits=6)
    # Slots in any position order (recurrences reseed), a distance_cap other than n_local.
    case(1, 8, 2, 64, 3, 4, 200, 1000, n_splits=4, shuffle=True, cap=150)
    # Positions near 10^9: the same window gives bit-identical outputs (only differences are
    # ever taken), and both match the reference.
    near = case(1, 8, 2, 128, 5, 4, 256, 1000, n_splits=5)
    far = case(1, 8, 2, 128, 5, 4, 256, 1000, n_splits=5, offset=10**9 - 1000 + 17)
    assert np.array_equal(near, far), "a shift of the stream changed the result"
    # Batches of different sequences (issue 16): per-sequence starts and slot rows, leading
    # padding (a row tile of padding rows only, a sequence that is all padding, its splits),
    # GQA 4:1 and 8:1, empty slots and a fresh ring beside a wrapped one, shuffled slots.
    case(3, 32, 8, 128, 1, 4, 4096, [10_000, 5000, 4200], blocks_per_sm=2)
    case(4, 16, 2, 64, 5, 4, 300, [999, 40, 0, 5000], pad=[0, 2, 4, 5], n_splits=3)
    case(2, 8, 2, 128, 16, 4, 200, [1000, 150], pad=[9, 0])
    case(3, 9, 3, 64, 3, 10, 200, [150, 3000, 7], pad=[1, 0, 2], shuffle=True, cap=120)
    case(2, 4, 4, 64, 2, 0, 77, [5000, 60], pad=[1, 2], n_splits=4)  # MHA; one all padding
    # One sequence moved near 10^9: every output bit stays as it was.
    near = case(3, 8, 2, 128, 4, 4, 256, [1000, 2000, 600], pad=[0, 1, 3], n_splits=3, seed=3)
    far = case(3, 8, 2, 128, 4, 4, 256, [1000, 2000, 600], pad=[0, 1, 3], n_splits=3, seed=3,
               offset=[0, 10**9 - 2000 + 17, 10**9 + 5])
    assert np.array_equal(near, far), "a per-sequence shift changed a batched result"
    assert LARGEST_ANGLE_ARGUMENT[0] <= 4096 + 16, LARGEST_ANGLE_ARGUMENT[0]
    print(f"largest distance given to sin/cos: {LARGEST_ANGLE_ARGUMENT[0]}")
    print("the decode model matches the reference")


if __name__ == "__main__":
    main()
