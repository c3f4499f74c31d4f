"""A NumPy model of the tensor-core prefill path, block by block, checked against the float64
reference: the pre-pass of csrc/cuda/rotate_chunk_keys.cu (keys rotated by j - a with a the
chunk start, the cache window gathered by position, the raw global tile, the window tile
states) and the blocks of csrc/cuda/lambda_attention_mma.cu (prefill_tile_list.cuh, Q rotated
once by t = i - a and by D, the per-warp "no select" shortcut, the masks of mixed tiles, the
online softmax, key splits and their log-sum-exp merge in lse_merge.cu).

Batches (issue 16): every sequence has its own start, leading padding rows and, optionally, its
own row of cache positions. The pre-pass index has a row per sequence (one shared row when the
batch shares its positions), the key sequence is the window then the sequence's real rows, and
padding rows are never keys and output zeros. Padding rows of q, k and v hold NaN here, so a
padding row that leaks into a real one shows; each sequence of a batch is checked against the
reference for that sequence alone and against the model run on it alone.

It mirrors control flow and index arithmetic, not fragments or shared-memory layout. Empty
cache slots hold NaN, so any use of them shows; rope_sincos is modelled in float32 like the
device code. The decode and Hopper kernels have their own models
(scripts/cuda_block_model_decode.py, cuda_block_model_hopper.py), which take their inputs'
ring layout, the per-sequence reference and the batch-of-one view from here.

    python scripts/cuda_block_model.py        # a minute or two; one line per case
"""

from __future__ import annotations

import numpy as np
import torch

import lm_infinite as li

BM = BN = 64  # query rows per block, keys per tile
WARPS = 4
F32 = np.float32
EMPTY, PARTIAL, FULL = 0, 1, 2  # window tile states (kTileEmpty, kTilePartial, kTileFull)
SKIPPED = []  # window tiles skipped without loading, over the whole run


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


ROW_ALIGN = 128  # kPrefillRowAlign: the window and the global rows, in whole 128-key tiles


def round_up(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def gather_index(p, row, a=None, pad=None):
    """gather_index_kernel for one index row (sequence `row`, or 0 for a shared index): the
    window slots, the global sources (chunk rows counted with padding) and the tile states.
    a, pad: the row's start and padding (default: the case's own)."""
    a = int(p["qs"][row]) if a is None else a
    pad = int(p["pad"][row]) if pad is None else pad
    n_q = p["n_q"]
    W = round_up(p["L"] - 1) if p["cache_len"] else 0
    R = round_up(p["G"])
    window_slot = np.full(W, -1)
    global_source = np.full(R, -1)
    for slot, pos in enumerate(p["cache_pos"][row]):
        if pos < 0:
            continue
        if 0 <= pos - (a - W) < W:
            window_slot[pos - (a - W)] = slot
        if pos < p["G"]:
            global_source[pos] = slot
    for j in range(max(a, 0), min(p["G"], a + n_q - pad)):  # the chunk's real rows
        global_source[j] = p["cache_len"] + pad + j - a
    held = (window_slot >= 0).reshape(-1, BN).sum(1) if W else np.zeros(0, int)
    tile_state = np.where(held == 0, EMPTY, np.where(held == BN, FULL, PARTIAL))
    return W, R, window_slot, global_source, tile_state


def pre_pass(p, b, kv_head):
    """rotate_chunk_keys.cu for one (batch, kv head): the key sequence (window gathered by
    position, then the chunk's real rows) rotated by j - a, the window's values, the raw global
    tile, and the index arrays (of the sequence's index row). Window rows no slot holds are
    zero, as the kernel writes them; rows past the real rows are never written (NaN here)."""
    a, pad, n_q, dim, half = (int(p["qs"][b]), int(p["pad"][b]), p["n_q"], p["q"].shape[3],
                              p["rotary_dim"] // 2)
    W, R, window_slot, global_source, tile_state = gather_index(p, 0 if p["shared"] else b)

    keys, values = np.full((W + n_q, dim), np.nan), np.zeros((W, dim))
    keys[:W] = 0.0
    for u, slot in enumerate(window_slot):
        if slot >= 0:
            delta = int(p["cache_pos"][b, slot]) - a  # an int64 difference, in [-W, 0)
            keys[u] = rotate(p["cache_k"][b, kv_head, slot], delta, p["inv_freq"], half)
            values[u] = p["cache_v"][b, kv_head, slot]
    for t in range(n_q - pad):  # real row t is chunk row pad + t, offset t from a
        keys[W + t] = rotate(p["k"][b, kv_head, pad + t], t, p["inv_freq"], half)
    global_keys, global_values = np.zeros((R, dim)), np.zeros((R, dim))
    for j, source in enumerate(global_source):
        if 0 <= source < p["cache_len"]:
            global_keys[j], global_values[j] = (p["cache_k"][b, kv_head, source],
                                                p["cache_v"][b, kv_head, source])
        elif source >= 0:
            t = source - p["cache_len"]
            global_keys[j], global_values[j] = p["k"][b, kv_head, t], p["v"][b, kv_head, t]
    return dict(W=W, R=R, keys=keys, values=values, global_keys=global_keys,
                global_values=global_values, window_slot=window_slot,
                global_source=global_source, tile_state=tile_state)


def tile_list(p, a, W, t_lo, t_hi):
    """PrefillTileList: (global, first row) of the tiles a block with real queries t_lo..t_hi
    (positions a + t) visits; none when t_hi < t_lo (padding rows only)."""
    if t_hi < t_lo:
        return []
    global_keys = max(0, min(p["G"], a + t_hi - p["L"] + 1))
    band_begin = max(0, t_lo + W - p["L"] + 1) // BN
    band_end = (t_hi + W) // BN + 1
    return ([(True, g * BN) for g in range(-(-global_keys // BN))]
            + [(False, u * BN) for u in range(band_begin, band_end)])


def run_block(p, ws, b, head, row_tile, split, n_splits, out, partial_out, partial_lse):
    n_q, hq, dim = p["n_q"], p["q"].shape[1], p["q"].shape[3]
    W, L, half = ws["W"], p["L"], p["rotary_dim"] // 2
    a, pad = int(p["qs"][b]), int(p["pad"][b])  # read once per block
    n_real = n_q - pad
    t_lo, t_hi = row_tile * BM, min(row_tile * BM + BM, n_q) - 1  # rows of q and out
    tiles = tile_list(p, a, W, max(t_lo - pad, 0), t_hi - pad)
    tiles = tiles[len(tiles) * split // n_splits: len(tiles) * (split + 1) // n_splits]

    # Q rotated once by t' = i - a (local) and by D (global); rows past the chunk are zero.
    q_local, q_cap = np.zeros((BM, dim)), np.zeros((BM, dim))
    for r in range(BM):
        if t_lo + r < n_q:
            q = p["q"][b, head, t_lo + r]
            q_local[r] = rotate(q, t_lo + r - pad, p["inv_freq"], half)
            q_cap[r] = rotate(q, p["D"], p["inv_freq"], half)
    t = np.arange(t_lo, t_lo + BM)
    real = t - pad
    valid_row = (t < n_q) & (real >= 0)
    u_lo = np.where(valid_row, real + W - L + 1, np.iinfo(np.int32).max)
    u_hi = np.where(valid_row, real + W, np.iinfo(np.int32).min)
    g_hi = np.where(valid_row, np.clip(a + real - L, -1, ws["R"]), -1)
    row_max, row_sum, acc = np.full(BM, -np.inf), np.zeros(BM), np.zeros((BM, dim))
    scale_log2 = p["scale"] * 1.4426950408889634

    for is_global, first in tiles:
        rows = np.arange(first, first + BN)
        if is_global:
            k_tile, v_tile = ws["global_keys"][rows], ws["global_values"][rows]
            valid = ws["global_source"][rows] >= 0
            full = False
        elif first < W:
            state = ws["tile_state"][first // BN]
            if state == EMPTY:  # never loaded: check that no row could see a key of it
                assert (ws["window_slot"][rows] < 0).all()
                SKIPPED.append(first)
                continue
            k_tile, v_tile = ws["keys"][rows], ws["values"][rows]
            valid, full = ws["window_slot"][rows] >= 0, state == FULL
        else:
            inside = rows < W + n_real  # rows past the real rows are zero-filled
            k_tile = np.where(inside[:, None], ws["keys"][np.minimum(rows, W + n_real - 1)], 0.0)
            v_tile = np.where(inside[:, None],  # in place, from the first real row
                              p["v"][b, p["kv_head"], pad + np.minimum(rows - W, n_real - 1)], 0.0)
            valid, full = inside, first + BN <= W + n_real
        for w in range(WARPS):
            ws_rows = slice(16 * w, 16 * w + 16)
            warp_t0 = t_lo + 16 * w
            if warp_t0 >= n_q or warp_t0 + 15 < pad:  # no real row
                continue
            # The band every real row of the warp covers (the shortcut leaves padding rows
            # with scores the epilogue discards).
            warp_r0, warp_r1 = max(warp_t0 - pad, 0), min(warp_t0 + 15, n_q - 1) - pad
            select = not (full and first >= warp_r1 + W - L + 1 and first + BN - 1 <= warp_r0 + W)
            if select:
                if is_global:
                    seen = valid[None, :] & (rows[None, :] <= g_hi[ws_rows, None])
                else:
                    seen = (valid[None, :] & (rows[None, :] >= u_lo[ws_rows, None])
                            & (rows[None, :] <= u_hi[ws_rows, None]))
                if not seen.any():
                    continue
            else:
                seen = np.ones((16, BN), bool)
                # The shortcut must only skip the select where every pair is visible.
                exact = (rows[None, :] >= u_lo[ws_rows, None]) & (rows[None, :] <= u_hi[ws_rows, None])
                assert exact[valid_row[ws_rows]].all() and valid.all()
            with np.errstate(invalid="ignore"):  # NaN padding queries, discarded at the end
                score = (q_cap if is_global else q_local)[ws_rows] @ k_tile.T
            score = np.where(seen, score, -np.inf)
            new_max = np.maximum(row_max[ws_rows], score.max(1))
            ref = np.where(new_max == -np.inf, 0.0, new_max * scale_log2)
            correction = np.exp2(row_max[ws_rows] * scale_log2 - ref)
            prob = np.exp2(score * scale_log2 - ref[:, None])
            row_max[ws_rows] = new_max
            row_sum[ws_rows] = row_sum[ws_rows] * correction + prob.sum(1)
            acc[ws_rows] = acc[ws_rows] * correction[:, None] + prob @ v_tile

    for r in range(BM):
        if t_lo + r >= n_q:
            continue
        if t_lo + r < pad:  # a padding row: zeros, and a partial that weighs nothing
            row_sum[r], acc[r] = 0.0, 0.0
        out_row = (b * hq + head) * n_q + t_lo + r
        normalised = acc[r] / row_sum[r] if row_sum[r] > 0 else np.zeros(dim)
        if n_splits == 1:
            out[b, head, t_lo + r] = normalised
        else:
            partial_out[out_row, split] = normalised
            partial_lse[out_row, split] = (row_max[r] * scale_log2 + np.log2(row_sum[r])
                                           if row_sum[r] > 0 else -np.inf)


def model(p, n_splits):
    """The launch: the pre-pass per (batch, kv head), every (batch, head, row tile, split)
    block, then the merge."""
    batch, hq, n_q, dim = p["q"].shape
    group = hq // p["k"].shape[1]
    out = np.full(p["q"].shape, np.nan)
    partial_out = np.full((batch * hq * n_q, n_splits, dim), np.nan)
    partial_lse = np.full((batch * hq * n_q, n_splits), np.nan)
    for b in range(batch):
        for kv_head in range(p["k"].shape[1]):
            ws = pre_pass(p, b, kv_head)
            p["kv_head"] = kv_head
            for head in range(kv_head * group, (kv_head + 1) * group):
                for row_tile in range(-(-n_q // BM)):
                    for split in range(n_splits):
                        run_block(p, ws, b, head, row_tile, split, n_splits, out, partial_out,
                                  partial_lse)
    if n_splits > 1:
        for row in range(batch * hq * n_q):
            lse = partial_lse[row]
            weights = np.exp2(lse - (lse.max() if lse.max() > -np.inf else 0.0))
            t, head, b = row % n_q, row // n_q % hq, row // (n_q * hq)
            total = weights.sum()  # 0 for a padding row: every partial is (0, -inf)
            out[b, head, t] = ((weights[:, None] * partial_out[row]).sum(0) / total
                               if total > 0 else 0.0)
    return out


def per_sequence(value, batch):
    """An int for every sequence, or one value per sequence."""
    return np.array([value] * batch if np.isscalar(value) else value, dtype=np.int64)


def ring_positions(G, L, seen, offset, cache=True):
    """A RingKVCache's slot positions after `seen` tokens (positions >= G shifted by offset)."""
    cache_pos = np.full(G + L if cache else 0, -1, dtype=np.int64)
    if cache:
        for pos in range(max(0, seen - L), seen):
            cache_pos[pos if pos < G else G + (pos - G) % L] = pos
        cache_pos[:min(G, seen)] = np.arange(min(G, seen))
        cache_pos = np.where(cache_pos >= G, cache_pos + offset, cache_pos)
    return cache_pos


def reference_case(batch, hq, hkv, dim, n_q, G, L, seen, rotary_dim=None, offset=0, cap=None,
                   cache=True, seed=0, pad=0, shared=None):
    """Inputs for a batch of chunks and the float64 reference. seen, offset and pad are one
    value for every sequence or a list per sequence: sequence b's real rows t >= pad_b sit at
    positions seen_b + offset_b + (t - pad_b), against a ring cache of the first G and last L
    tokens as RingKVCache holds them after seen_b tokens (positions >= G shifted by offset_b).
    Padding rows of q, k and v and empty slots hold NaN. shared: one row of cache positions and
    one start for the whole batch (the default when every sequence sits at the same positions
    without padding). The reference of sequence b is that sequence run alone; padding rows are
    zeros."""
    rng = np.random.default_rng(seed)
    rotary_dim = rotary_dim or dim
    seen, offset, pad = (per_sequence(x, batch) for x in (seen, offset, pad))
    same = (seen == seen[0]).all() and (offset == offset[0]).all() and not pad.any()
    shared = same if shared is None else shared
    assert same or not shared
    cache_pos = np.stack([ring_positions(G, L, int(n), int(o), cache)
                          for n, o in zip(seen, offset)])
    p = dict(q=rng.standard_normal((batch, hq, n_q, dim)),
             k=rng.standard_normal((batch, hkv, n_q, dim)),
             v=rng.standard_normal((batch, hkv, n_q, dim)),
             cache_k=rng.standard_normal((batch, hkv, cache_pos.shape[1], dim)),
             cache_v=rng.standard_normal((batch, hkv, cache_pos.shape[1], dim)),
             cache_pos=cache_pos, cache_len=cache_pos.shape[1], qs=seen + offset, pad=pad,
             shared=shared, n_q=n_q, G=G, L=L,
             D=L if cap is None else cap, scale=dim ** -0.5, rotary_dim=rotary_dim,
             inv_freq=(1.0 / 10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim)).astype(F32))
    for b in range(batch):
        for name in ("cache_k", "cache_v"):
            p[name][b, :, cache_pos[b] < 0] = np.nan
        for name in ("q", "k", "v"):
            p[name][b, :, :pad[b]] = np.nan
    return p, reference(p)


def reference(p):
    """The float64 reference of a batch of chunks: each sequence alone (its real rows against
    its present slots and its chunk's real rows); padding rows are zeros."""
    out = np.zeros(p["q"].shape)
    for b in range(p["q"].shape[0]):
        present, qs, pad = p["cache_pos"][b] >= 0, int(p["qs"][b]), int(p["pad"][b])
        n_real = p["n_q"] - pad
        if n_real == 0:
            continue
        real = slice(pad, p["n_q"])
        out[b, :, real] = li.lambda_attention_reference(
            torch.from_numpy(p["q"][b:b + 1, :, real]),
            torch.from_numpy(np.concatenate([p["cache_k"][b:b + 1, :, present],
                                             p["k"][b:b + 1, :, real]], 2)),
            torch.from_numpy(np.concatenate([p["cache_v"][b:b + 1, :, present],
                                             p["v"][b:b + 1, :, real]], 2)),
            torch.from_numpy(p["inv_freq"]), n_global=p["G"], n_local=p["L"],
            distance_cap=p["D"], query_positions=torch.arange(qs, qs + n_real),
            key_positions=torch.from_numpy(np.concatenate([p["cache_pos"][b][present],
                                                           np.arange(qs, qs + n_real)])),
        ).numpy()[0]
    return out


def alone(p, b):
    """Sequence b of a batch as a batch of one without padding."""
    real = slice(int(p["pad"][b]), p["n_q"])
    q = dict(p, q=p["q"][b:b + 1, :, real], k=p["k"][b:b + 1, :, real],
             v=p["v"][b:b + 1, :, real], cache_k=p["cache_k"][b:b + 1],
             cache_v=p["cache_v"][b:b + 1], cache_pos=p["cache_pos"][b:b + 1],
             qs=p["qs"][b:b + 1], pad=np.zeros(1, np.int64), shared=True,
             n_q=p["n_q"] - int(p["pad"][b]))
    return q


def case(batch, hq, hkv, dim, n_q, G, L, seen, n_splits=1, **kwargs):
    """The model against the reference; for a batch of different sequences, also each sequence
    against the model run on it alone (to float64 rounding: the blocks cut its rows
    differently)."""
    p, ref = reference_case(batch, hq, hkv, dim, n_q, G, L, seen, **kwargs)
    out = model(p, n_splits)
    err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    print(f"batch={batch} heads={hq}/{hkv} dim={dim} n_q={n_q} G={G} L={L} "
          f"start={p['qs'].tolist() if not p['shared'] else p['qs'][0]} "
          f"{'pad=' + str(p['pad'].tolist()) + ' ' if p['pad'].any() else ''}"
          f"splits={n_splits} rotary={p['rotary_dim']} cache={p['cache_len']}: rel err {err:.1e}",
          end="")
    assert np.isfinite(out).all() and err < 1e-5, err
    for b in range(batch):
        assert not out[b, :, :p["pad"][b]].any(), "a padding row is not zeros"
    if not p["shared"]:
        worst = 0.0
        for b in range(batch):
            if p["pad"][b] == n_q:
                continue
            own = model(alone(p, b), n_splits)[0]
            worst = max(worst, np.abs(out[b, :, p["pad"][b]:] - own).max())
        print(f", alone max diff {worst:.1e}", end="")
        assert worst < 1e-12, worst
    print()
    return out


if __name__ == "__main__":
    # Whole sequences: band edges, a window of one key, global tiles, splits, G beyond a tile,
    # rows i < L (plain causal), partial rotary, G = 0.
    case(1, 2, 1, 16, 300, 3, 70, 0, cache=False)
    case(1, 2, 2, 16, 200, 0, 64, 0, cache=False)
    case(1, 1, 1, 16, 260, 5, 1, 0, cache=False, cap=0)
    case(1, 2, 1, 16, 300, 3, 70, 0, 3, cache=False)
    case(1, 2, 1, 16, 130, 70, 20, 0, 2, cache=False, rotary_dim=8)
    case(1, 2, 1, 16, 400, 4, 300, 0, cache=False)  # tiles strictly inside the band
    case(1, 3, 3, 16, 19, 10, 500, 0, cache=False)  # the window covers the sequence: causal
    # Chunks against a wrapped ring (slots in any order): chunk sizes 1 .. > L, GQA, MHA,
    # empty slots, global keys in the window and beyond it, splits.
    for n_q in (1, 3, 17, 70, 250):
        case(1, 4, 2, 16, n_q, 4, 100, 1000, 2 if n_q < 20 else 1)
    case(2, 6, 2, 16, 16, 2, 130, 5000, 5, rotary_dim=8)
    case(1, 4, 4, 16, 9, 10, 200, 60, 4)  # cache not full: empty slots, partial window tiles
    case(1, 2, 1, 16, 100, 10, 50, 5)  # global keys in the cache and the chunk
    case(1, 2, 1, 16, 150, 4, 300, 0)  # a fresh (empty) ring: window tiles skipped
    case(1, 2, 1, 16, 400, 4, 200, 1000, 2)  # a chunk longer than the window
    case(1, 2, 1, 16, 90, 0, 129, 777)  # G = 0, window not a tile multiple
    assert SKIPPED, "no window tile was skipped"
    # Relative only: the same window near 10^3 and near 10^9 gives bit-identical outputs.
    for n_q in (5, 200):
        near = case(1, 4, 2, 16, n_q, 4, 100, 1000, seed=1)
        far = case(1, 4, 2, 16, n_q, 4, 100, 1000, seed=1, offset=10**9 - 1000 + 17)
        assert np.array_equal(near, far), "the 10^9 shift changed the output"
    # The real head dims.
    case(1, 2, 1, 128, 140, 3, 70, 0, cache=False)
    case(1, 4, 2, 64, 80, 4, 100, 1000, 2, rotary_dim=32)
    # Batches of different sequences (issue 16): per-sequence starts and cache rows, leading
    # padding (a block of padding rows only, a warp straddling the first real row, a sequence
    # that is all padding), whole sequences and chunks against wrapped rings, GQA and splits.
    case(3, 4, 2, 16, 150, 3, 70, 0, cache=False, pad=[0, 37, 100])
    case(2, 2, 1, 16, 300, 4, 100, 0, 3, cache=False, pad=[70, 5])
    case(3, 4, 2, 16, 90, 4, 100, [1000, 300, 57], pad=[0, 20, 64])
    case(3, 4, 2, 16, 250, 4, 200, [5000, 999, 0], 2, pad=[3, 130, 0])
    case(2, 6, 2, 16, 40, 10, 50, [5, 60], pad=[7, 40])  # the second sequence is all padding
    case(2, 2, 2, 16, 120, 4, 100, [2000, 2000], pad=[0, 0], shared=False)  # own rows, same
    case(1, 2, 1, 16, 80, 4, 100, 1000, pad=[17])  # padding alone changes the index row
    case(2, 4, 2, 64, 100, 4, 100, [800, 3000], 2, rotary_dim=32, pad=[1, 66])
    # Relative only, per sequence: one sequence moved near 10^9 leaves every output bit as it
    # was (the others stay put).
    near = case(3, 4, 2, 16, 130, 4, 100, [1000, 1200, 700], seed=2, pad=[0, 9, 80])
    far = case(3, 4, 2, 16, 130, 4, 100, [1000, 1200, 700], seed=2, pad=[0, 9, 80],
               offset=[0, 10**9 - 1200 + 17, 10**9 + 3])
    assert np.array_equal(near, far), "the 10^9 shift changed a batched output"
    print("the model matches the reference")
    # The decode kernel (lambda_attention_decode.cu) has its own model.
    import cuda_block_model_decode
    cuda_block_model_decode.main()
    # The Hopper kernel's blocks and barrier protocol (lambda_attention_hopper.cu) too.
    import cuda_block_model_hopper
    cuda_block_model_hopper.main()
