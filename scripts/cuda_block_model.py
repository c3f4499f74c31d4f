"""A NumPy model of csrc/cuda/lambda_attention_mma.cu, block by block, checked against the
float64 reference.

It mirrors the kernel's control flow, not its fragments or shared-memory layout: the tile list
(tile_list.cuh), key splits and their log-sum-exp merge (lse_merge.cu), the rotation anchor and
window, the per-lane rotation recurrence, the per-warp "all local" shortcut, the per-element
masks and the online softmax. Rows of the rotated-key buffer that the kernel leaves stale are
NaN here, and so are empty cache slots, so any use of them shows. rope_sincos is modelled in
float32 like the device code. Use it to check a change to that logic without a GPU:

    python scripts/cuda_block_model.py        # a minute or two; one line per case
"""

from __future__ import annotations

import numpy as np
import torch

import lm_infinite as li

BM = BN = 64  # query rows per block, keys per tile
WARPS = 4
F32 = np.float32
SKIPPED = []  # cache tiles skipped without loading, over the whole run


def rope_sincos(delta: int, inv_freq: float) -> tuple[F32, F32]:
    """common.cuh's rope_sincos: reduction by pi/2 in double, float32 polynomials."""
    angle = float(delta) * float(F32(inv_freq))
    quadrant = np.rint(angle * 0.63661977236758134308)
    x = F32(angle - quadrant * 1.5707963267948966 - quadrant * 6.123233995736766036e-17)
    x2 = F32(x * x)
    s = F32(x * x2) * (x2 * (x2 * F32(-1.9515295891e-4) + F32(8.3321608736e-3))
                       + F32(-1.6666654611e-1)) + x
    c = F32(x2 * x2) * (x2 * (x2 * F32(2.443315711809948e-5) + F32(-1.388731625493765e-3))
                        + F32(4.166664568298827e-2)) + (F32(-0.5) * x2 + F32(1.0))
    return [(c, s), (-s, c), (-c, -s), (s, -c)][int(quadrant) & 3]


def rotate(x: np.ndarray, delta: int, inv_freq: np.ndarray, half: int) -> np.ndarray:
    y = x.copy()
    for f in range(half):
        c, s = rope_sincos(delta, inv_freq[f])
        y[f], y[f + half] = x[f] * c - x[f + half] * s, x[f + half] * c + x[f] * s
    return y


def tile_list(p: dict, qs: int, t_lo: int, t_hi: int) -> list[tuple[bool, int]]:
    """TileList: (from_cache, first row) of the key tiles a block with queries t_lo..t_hi visits."""
    cache_tiles = -(-p["cache_len"] // BN)
    local_begin = max(0, t_lo - p["L"] + 1) // BN
    local_end = t_hi // BN + 1
    n_global_keys = max(0, min(p["G"] - qs, t_hi - p["L"] + 1, p["n_q"]))
    global_tiles = min(-(-n_global_keys // BN), local_begin)
    return ([(True, i * BN) for i in range(cache_tiles)]
            + [(False, i * BN) for i in range(global_tiles)]
            + [(False, i * BN) for i in range(local_begin, local_end)])


def rotate_key_tile(k_tile, pos, q0, window_hi, p):
    """The prepare pass: rows in the window (-L, window_hi] rotated by j - q0, through the same
    per-lane recurrence as the kernel; other rows stay NaN (stale in the kernel)."""
    dim, half = k_tile.shape[1], p["rotary_dim"] // 2
    lanes_per_row = min(32, dim // 4)
    row_step = WARPS * (32 // lanes_per_row)
    k_rot = np.full_like(k_tile, np.nan)
    for first_row in range(row_step):
        have_prev, prev = False, 0
        cos_sin = [None] * half
        for r in range(first_row, BN, row_step):
            delta = pos[r] - q0
            if pos[r] < 0 or delta <= -p["L"] or delta > window_hi:
                have_prev = False
                continue
            step = have_prev and delta == prev + row_step
            for f in range(half):
                if step:
                    c, s = cos_sin[f]
                    sc, ss = rope_sincos(row_step, p["inv_freq"][f])
                    cos_sin[f] = (F32(c * sc - s * ss), F32(s * sc + c * ss))
                else:
                    cos_sin[f] = rope_sincos(delta, p["inv_freq"][f])
                c, s = cos_sin[f]
                x1, x2 = k_tile[r, f], k_tile[r, f + half]
                k_rot[r, f], k_rot[r, f + half] = x1 * c - x2 * s, x2 * c + x1 * s
            k_rot[r, 2 * half:] = k_tile[r, 2 * half:]
            prev, have_prev = delta, True
    return k_rot


def cache_tile_visible(p, first, i_lo, i_hi):
    """cache_tile_bounds.cu plus the kernel's test: can a query in [i_lo, i_hi] see a position
    of the tile? Prefill mode only (decode visits every tile)."""
    held = p["cache_pos"][first:first + BN]
    held = held[held >= 0]
    if held.size == 0:
        return False
    lo, hi = held.min(), held.max()
    return bool((hi > i_lo - p["L"] and lo <= i_hi) or (lo < p["G"] and i_hi - lo >= p["L"]))


def run_block(p, b, y, row_tile, split, heads, n_splits, out, partial_out, partial_lse):
    n_q, hq = p["n_q"], p["q"].shape[1]
    rows_total, r0, head0 = heads * n_q, row_tile * BM, y * heads
    kv_head = head0 // (hq // p["k"].shape[1])
    qs, dim = p["qs"], p["q"].shape[3]
    t_lo = r0 if heads == 1 else 0
    t_hi = min(r0 + BM, n_q) - 1 if heads == 1 else n_q - 1
    q0 = qs + t_lo
    tiles = tile_list(p, qs, t_lo, t_hi)
    tiles = tiles[len(tiles) * split // n_splits: len(tiles) * (split + 1) // n_splits]

    rows = [(head0 + row // n_q, row % n_q) if row < rows_total else None
            for row in range(r0, r0 + BM)]
    half = p["rotary_dim"] // 2
    q_local, q_cap = np.zeros((BM, dim)), np.zeros((BM, dim))
    for r, info in enumerate(rows):
        if info:
            q = p["q"][b, info[0], info[1]]
            q_local[r] = rotate(q, info[1] - t_lo, p["inv_freq"], half)
            q_cap[r] = rotate(q, p["D"], p["inv_freq"], half)
    row_max, row_sum, acc = np.full(BM, -np.inf), np.zeros(BM), np.zeros((BM, dim))
    scale_log2 = p["scale"] * 1.4426950408889634

    for from_cache, first in tiles:
        prefill_mode = heads == 1 and n_q > 16
        if from_cache and prefill_mode and not cache_tile_visible(p, first, q0, qs + t_hi):
            # Skipped unloaded: check that the test is conservative (no pair of the block).
            held = p["cache_pos"][first:first + BN]
            d = (qs + np.arange(t_lo, t_hi + 1))[:, None] - held[None, :]
            seen = (held >= 0) & (d >= 0) & ((d < p["L"]) | (held < p["G"]))
            assert not seen.any(), (first, q0)
            SKIPPED.append(first)
            continue
        src_k, src_v = (p["cache_k"], p["cache_v"]) if from_cache else (p["k"], p["v"])
        n_rows = p["cache_len"] if from_cache else n_q
        pos = np.full(BN, -1, dtype=np.int64)
        k_tile, v_tile = np.zeros((BN, dim)), np.zeros((BN, dim))
        for r in range(min(BN, n_rows - first)):
            pos[r] = p["cache_pos"][first + r] if from_cache else qs + first + r
            k_tile[r], v_tile[r] = src_k[b, kv_head, first + r], src_v[b, kv_head, first + r]
        v_tile[pos < 0] = 0.0  # the kernel zeroes empty slots' values
        k_rot = rotate_key_tile(k_tile, pos, q0, t_hi - t_lo, p)

        for w in range(WARPS):
            warp_row0 = r0 + 16 * w
            if warp_row0 >= rows_total:
                continue
            wt_lo = warp_row0 if heads == 1 else 0
            wt_hi = min(warp_row0 + 15, n_q - 1) if heads == 1 else n_q - 1
            ws = slice(16 * w, 16 * w + 16)
            local = np.zeros((16, BN), bool)
            glob = np.zeros((16, BN), bool)
            if (not from_cache and first + BN <= n_q and first + BN - 1 <= wt_lo
                    and wt_hi - first < p["L"]):
                local[:] = True  # the "all local" shortcut: no masks
            else:
                for a in range(16):
                    if rows[16 * w + a] is None:
                        continue
                    d = qs + rows[16 * w + a][1] - pos
                    present = (pos >= 0) & (d >= 0)
                    local[a] = present & (d < p["L"])
                    glob[a] = present & (d >= p["L"]) & (pos < p["G"])
            if not local.any() and not glob.any():
                continue
            with np.errstate(invalid="ignore"):
                s_local = q_local[ws] @ k_rot.T
                s_global = q_cap[ws] @ k_tile.T
            score = np.where(local, s_local, np.where(glob, s_global, -np.inf))
            new_max = np.maximum(row_max[ws], score.max(1))
            ref = np.where(new_max == -np.inf, 0.0, new_max * scale_log2)
            correction = np.exp2(row_max[ws] * scale_log2 - ref)
            prob = np.exp2(score * scale_log2 - ref[:, None])
            row_max[ws] = new_max
            row_sum[ws] = row_sum[ws] * correction + prob.sum(1)
            acc[ws] = acc[ws] * correction[:, None] + prob @ v_tile

    for r, info in enumerate(rows):
        if info is None:
            continue
        out_row = (b * hq + info[0]) * n_q + info[1]
        normalised = acc[r] / row_sum[r] if row_sum[r] > 0 else np.zeros(dim)
        if n_splits == 1:
            out[b, info[0], info[1]] = normalised
        else:
            partial_out[out_row, split] = normalised
            partial_lse[out_row, split] = (row_max[r] * scale_log2 + np.log2(row_sum[r])
                                           if row_sum[r] > 0 else -np.inf)


def model(p, heads, n_splits):
    """The launch: every (batch, head pack, row tile, split) block, then the merge."""
    batch, hq, n_q, dim = p["q"].shape
    out = np.full(p["q"].shape, np.nan)
    partial_out = np.full((batch * hq * n_q, n_splits, dim), np.nan)
    partial_lse = np.full((batch * hq * n_q, n_splits), np.nan)
    row_tiles = -(-heads * n_q // BM)
    for b in range(batch):
        for y in range(hq // heads):
            for row_tile in range(row_tiles):
                for split in range(n_splits):
                    run_block(p, b, y, row_tile, split, heads, n_splits, out, partial_out,
                              partial_lse)
    if n_splits > 1:
        for row in range(batch * hq * n_q):
            lse = partial_lse[row]
            weights = np.exp2(lse - (lse.max() if lse.max() > -np.inf else 0.0))
            t, head, b = row % n_q, row // n_q % hq, row // (n_q * hq)
            out[b, head, t] = (weights[:, None] * partial_out[row]).sum(0) / weights.sum()
    return out


def case(batch, hq, hkv, dim, n_q, G, L, seen, decode, n_splits, rotary_dim=None, offset=0,
         cap=None, cache=True):
    """Queries at seen + offset .. against a ring cache of the first G and last L tokens (as
    RingKVCache holds them after `seen` tokens, positions >= G shifted by offset)."""
    rng = np.random.default_rng(0)
    rotary_dim = rotary_dim or dim
    cache_pos = np.full(G + L if cache else 0, -1, dtype=np.int64)
    if cache:
        for pos in range(max(0, seen - L), seen):
            cache_pos[pos if pos < G else G + (pos - G) % L] = pos
        cache_pos[:min(G, seen)] = np.arange(min(G, seen))
        cache_pos = np.where(cache_pos >= G, cache_pos + offset, cache_pos)
    qs = seen + offset
    p = dict(q=rng.standard_normal((batch, hq, n_q, dim)),
             k=rng.standard_normal((batch, hkv, n_q, dim)),
             v=rng.standard_normal((batch, hkv, n_q, dim)),
             cache_k=rng.standard_normal((batch, hkv, len(cache_pos), dim)),
             cache_v=rng.standard_normal((batch, hkv, len(cache_pos), dim)),
             cache_pos=cache_pos, cache_len=len(cache_pos), qs=qs, n_q=n_q, G=G, L=L,
             D=L if cap is None else cap, scale=dim ** -0.5, rotary_dim=rotary_dim,
             inv_freq=(1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(F32))
    p["cache_k"][:, :, cache_pos < 0] = np.nan
    p["cache_v"][:, :, cache_pos < 0] = np.nan
    out = model(p, hq // hkv if decode else 1, n_splits)

    present = cache_pos >= 0
    ref = li.lambda_attention_reference(
        torch.from_numpy(p["q"]),
        torch.from_numpy(np.concatenate([p["cache_k"][:, :, present], p["k"]], 2)),
        torch.from_numpy(np.concatenate([p["cache_v"][:, :, present], p["v"]], 2)),
        torch.from_numpy(p["inv_freq"]), n_global=G, n_local=L, distance_cap=p["D"],
        query_positions=torch.arange(qs, qs + n_q),
        key_positions=torch.from_numpy(
            np.concatenate([cache_pos[present], np.arange(qs, qs + n_q)])),
    ).numpy()
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"batch={batch} heads={hq}/{hkv} dim={dim} n_q={n_q} G={G} L={L} start={qs} "
          f"decode={decode} splits={n_splits} rotary={rotary_dim}: rel err {err:.1e}")
    assert np.isfinite(out).all() and err < 1e-5, err


if __name__ == "__main__":
    # Whole sequences: band edges, a window of one key, global tiles, splits, G beyond a tile.
    case(1, 2, 1, 16, 300, 3, 70, 0, False, 1, cache=False)
    case(1, 2, 2, 16, 200, 0, 64, 0, False, 1, cache=False)
    case(1, 1, 1, 16, 260, 5, 1, 0, False, 1, cache=False, cap=0)
    case(1, 2, 1, 16, 300, 3, 70, 0, False, 3, cache=False)
    case(1, 2, 1, 16, 130, 70, 20, 0, False, 2, cache=False, rotary_dim=8)
    case(1, 2, 1, 16, 400, 4, 300, 0, False, 1, cache=False)  # tiles strictly inside the band
    # Chunks against a wrapped ring: decode packing, splits, partial rotary, near 10^9.
    case(1, 4, 2, 16, 1, 4, 100, 1000, True, 3)
    case(1, 4, 2, 16, 3, 4, 100, 1000, True, 1)
    case(2, 6, 2, 16, 16, 2, 130, 5000, True, 5, rotary_dim=8)
    case(1, 4, 2, 16, 5, 4, 100, 1000, True, 2, offset=10**9 - 1000 + 17)
    case(1, 4, 2, 16, 70, 4, 100, 1000, False, 2)  # prefill mode with a cache
    case(1, 4, 4, 16, 9, 10, 200, 60, True, 4)  # cache not full: empty slots
    case(1, 2, 1, 16, 100, 10, 50, 5, False, 1)  # global keys in the cache and the chunk
    # Prefill-mode chunks that skip cache tiles: a fresh (empty) ring, and a long chunk.
    case(1, 2, 1, 16, 150, 4, 300, 0, False, 1)
    case(1, 2, 1, 16, 400, 4, 200, 1000, False, 2)
    assert SKIPPED, "no cache tile was skipped"
    # The real head dims: 16-row recurrences (128), two rows per pass (64).
    case(1, 2, 1, 128, 140, 3, 70, 0, False, 1, cache=False)
    case(1, 4, 2, 64, 3, 4, 100, 1000, True, 2, rotary_dim=32)
    print("the model matches the reference")
    # The decode kernel (lambda_attention_decode.cu) has its own model.
    import cuda_block_model_decode
    cuda_block_model_decode.main()
