"""A NumPy model of the Hopper prefill kernel's blocks (csrc/cuda/lambda_attention_hopper.cu),
checked against the float64 reference: what differs from the mma.sync kernel's scheme, which
scripts/cuda_block_model.py models (and whose pre-pass and rotation this one reuses).

Modelled: 128-row blocks of two 64-row consumer groups; HopperTileList (global tiles, the
band's window tiles, its chunk tiles, in effective rows so that leading padding rows shift the
chunk); 128-key tiles whose window state combines two of the pre-pass's 64-row states (a tile
no slot fills is skipped by every role, so the producer's and the consumers' tile sequences
and stage numbers agree); the per-group "no select" shortcut, asserted exact wherever it is
taken; the masks of mixed tiles; the online softmax; key splits and their merge; per-sequence
query starts and padding rows (rows t < p see nothing and output zeros; chunk row t >= p sits
at a + t - p). Also the barrier protocol on its own (check_pipeline_protocol): the producer,
the two consumers and the TMA unit interleaved at random over mbarrier phases, transaction
bytes and the named turn barriers. Not modelled: fragments, descriptors, shared-memory layout
(the one-tile test and the GPU tests check those).

    python scripts/cuda_block_model_hopper.py     # a minute or two; one line per case
"""

from __future__ import annotations

import numpy as np
import torch

import lm_infinite as li
from cuda_block_model import EMPTY, FULL, F32, gather_index, reference_case, rotate

BM = BN = 128  # query rows per block, keys per tile
GROUP = 64     # query rows per consumer warpgroup
STATE_ROWS = 64  # the pre-pass's window tile states are per 64 rows
SKIPPED, SHORTCUTS = [], []
INT_MAX, INT_MIN = np.iinfo(np.int32).max, np.iinfo(np.int32).min


def pre_pass(p, b, kv_head, a, pad):
    """rotate_chunk_keys.cu for one sequence with anchor a and `pad` leading padding rows, as
    the kernel expects it: window row u at position a - W + u rotated by pos - a, chunk row t
    (>= pad) rotated by t - pad, the raw global keys (a global position held by the chunk is
    chunk row j - a + pad)."""
    n_q, dim, half = p["n_q"], p["q"].shape[3], p["rotary_dim"] // 2
    W, R, window_slot, global_source, state = gather_index(p, b, a, pad)
    keys, values = np.zeros((W + n_q, dim)), np.zeros((W, dim))
    for u, slot in enumerate(window_slot):
        if slot >= 0:
            keys[u] = rotate(p["cache_k"][b, kv_head, slot], int(p["cache_pos"][b, slot]) - a,
                             p["inv_freq"], half)
            values[u] = p["cache_v"][b, kv_head, slot]
    for t in range(pad, n_q):
        keys[W + t] = rotate(p["k"][b, kv_head, t], t - pad, p["inv_freq"], half)
    global_keys, global_values = np.zeros((R, dim)), np.zeros((R, dim))
    for j, source in enumerate(global_source):
        if 0 <= source < p["cache_len"]:
            global_keys[j] = p["cache_k"][b, kv_head, source]
            global_values[j] = p["cache_v"][b, kv_head, source]
        elif source >= 0:
            t = source - p["cache_len"]
            global_keys[j], global_values[j] = p["k"][b, kv_head, t], p["v"][b, kv_head, t]
    return dict(W=W, R=R, keys=keys, values=values, global_keys=global_keys,
                global_values=global_values, window_slot=window_slot,
                global_source=global_source, state=state)


def tile_list(p, W, a, pad, r_lo, r_hi):
    """HopperTileList: (kind, first row) for the block's real rows r_lo..r_hi."""
    if r_lo > r_hi:
        return []
    global_keys = max(0, min(p["G"], a + r_hi - pad - p["L"] + 1))
    tiles = [("global", g * BN) for g in range(-(-global_keys // BN))]
    band_lo, band_hi = W + r_lo - pad - p["L"] + 1, W + r_hi - pad
    lo, hi = max(0, band_lo), min(W - 1, band_hi)
    if lo <= hi:
        tiles += [("window", u * BN) for u in range(lo // BN, hi // BN + 1)]
    lo, hi = max(W, band_lo) + pad, band_hi + pad
    if lo <= hi:
        tiles += [("chunk", u * BN) for u in range(lo // BN, hi // BN + 1)]
    return tiles


def needed(ws, kind, first):
    if kind != "window":
        return True
    s = first // STATE_ROWS
    return ws["state"][s] != EMPTY or ws["state"][s + 1] != EMPTY


def run_block(p, ws, b, head, kv_head, a, pad, row_tile, split, n_splits, out, partial):
    n_q, dim, L, W, half = p["n_q"], p["q"].shape[3], p["L"], ws["W"], p["rotary_dim"] // 2
    t_lo = row_tile * BM
    tiles = tile_list(p, W, a, pad, max(t_lo, pad), min(t_lo + BM, n_q) - 1)
    tiles = tiles[len(tiles) * split // n_splits: len(tiles) * (split + 1) // n_splits]
    loaded = [t for t in tiles if needed(ws, *t)]  # the producer's sequence: stage = n % S
    for kind, first in tiles:
        if not needed(ws, kind, first):  # skipped by every role: it must hold no key
            assert (ws["window_slot"][first:first + BN] < 0).all()
            SKIPPED.append(first)
    scale_log2 = p["scale"] * 1.4426950408889634
    for group in range(2):
        g0 = t_lo + GROUP * group
        t = np.arange(g0, g0 + GROUP)
        real = (t >= pad) & (t < n_q)
        q_local, q_cap = np.zeros((GROUP, dim)), np.zeros((GROUP, dim))
        for r in range(GROUP):  # rows past the chunk are TMA zeros; padding rows are masked
            if t[r] < n_q:
                q = p["q"][b, head, t[r]]
                q_local[r] = rotate(q, int(t[r]) - pad, p["inv_freq"], half)
                q_cap[r] = rotate(q, p["D"], p["inv_freq"], half)
        lo = np.where(real, W + t - pad - L + 1, INT_MAX)
        hi = np.where(real, W + t - pad, INT_MIN)
        chunk_lo, chunk_hi = np.where(real, lo + pad, INT_MAX), np.where(real, hi + pad, INT_MIN)
        g_hi = np.where(real, np.clip(a + t - pad - L, -1, ws["R"]), -1)
        group_real = g0 >= pad and g0 + GROUP <= n_q
        band_lo, band_hi = W + g0 + GROUP - 1 - pad - L + 1, W + g0 - pad
        row_max, row_sum, acc = np.full(GROUP, -np.inf), np.zeros(GROUP), np.zeros((GROUP, dim))
        for kind, first in loaded:
            u = np.arange(first, first + BN)
            if kind == "global":
                k_tile, v_tile = ws["global_keys"][u], ws["global_values"][u]
                seen = (ws["global_source"][u] >= 0)[None, :] & (u[None, :] <= g_hi[:, None])
                all_seen = False
            elif kind == "window":
                k_tile, v_tile = ws["keys"][u], ws["values"][u]
                s = first // STATE_ROWS
                seen = ((ws["window_slot"][u] >= 0)[None, :] & (u[None, :] >= lo[:, None])
                        & (u[None, :] <= hi[:, None]))
                all_seen = (group_real and first >= band_lo and first + BN - 1 <= band_hi
                            and ws["state"][s] == FULL and ws["state"][s + 1] == FULL)
            else:
                inside = u < W + n_q  # TMA zeros past the chunk
                k_tile = np.where(inside[:, None], ws["keys"][np.minimum(u, W + n_q - 1)], 0.0)
                v_tile = np.where(inside[:, None],
                                  p["v"][b, kv_head, np.minimum(u - W, n_q - 1)], 0.0)
                valid = (u >= W + pad) & inside
                seen = (valid[None, :] & (u[None, :] >= chunk_lo[:, None])
                        & (u[None, :] <= chunk_hi[:, None]))
                all_seen = (group_real and first >= W + pad and first + BN <= W + n_q
                            and first - pad >= band_lo and first + BN - 1 - pad <= band_hi)
            if all_seen:  # the shortcut skips the select: it must be exact
                assert seen.all(), (kind, first, g0)
                SHORTCUTS.append(first)
            score = (q_cap if kind == "global" else q_local) @ k_tile.T
            score = np.where(seen, score, -np.inf)
            new_max = np.maximum(row_max, score.max(1))
            ref = np.where(new_max == -np.inf, 0.0, new_max * scale_log2)
            correction = np.exp2(row_max * scale_log2 - ref)
            prob = np.exp2(score * scale_log2 - ref[:, None])
            row_max, row_sum = new_max, row_sum * correction + prob.sum(1)
            acc = acc * correction[:, None] + prob @ v_tile
        for r in range(GROUP):
            if t[r] >= n_q:
                continue
            normalised = acc[r] / row_sum[r] if row_sum[r] > 0 else np.zeros(dim)
            lse = row_max[r] * scale_log2 + np.log2(row_sum[r]) if row_sum[r] > 0 else -np.inf
            if n_splits == 1:
                out[b, head, t[r]] = normalised
            else:
                partial[b, head, t[r], split] = (normalised, lse)  # a dict key


def model(p, starts, pads, n_splits):
    batch, hq, n_q, dim = p["q"].shape
    group = hq // p["k"].shape[1]
    out = np.full(p["q"].shape, np.nan)
    partial = {}  # (b, head, t, split) -> (normalised output, log2-sum-exp)
    for b in range(batch):
        for kv_head in range(p["k"].shape[1]):
            ws = pre_pass(p, b, kv_head, starts[b], pads[b])
            for head in range(kv_head * group, (kv_head + 1) * group):
                for row_tile in range(-(-n_q // BM)):
                    for split in range(n_splits):
                        run_block(p, ws, b, head, kv_head, starts[b], pads[b], row_tile, split,
                                  n_splits, out, partial)
    if n_splits > 1:  # lse_merge.cu
        for index in np.ndindex(batch, hq, n_q):
            parts = [partial[(*index, z)] for z in range(n_splits)]
            lse = np.array([part[1] for part in parts])
            weights = np.exp2(lse - (lse.max() if lse.max() > -np.inf else 0.0))
            values = np.stack([part[0] for part in parts])
            out[index] = (weights[:, None] * values).sum(0) / weights.sum() if weights.sum() else 0
    return out


def case(batch, hq, hkv, dim, n_q, G, L, seen, n_splits=1, pads=None, start_shift=None,
         **kwargs):
    """Queries of sequence b at positions start_b + t - pad_b (start_b = seen + offset +
    start_shift[b]) against the ring cache of `seen` tokens; the reference per sequence."""
    pads = pads or [0] * batch
    shifts = start_shift or [0] * batch
    p, _ = reference_case(batch, hq, hkv, dim, n_q, G, L, seen, **kwargs)
    starts = [int(p["qs"][b]) + s for b, s in enumerate(shifts)]
    out = model(p, starts, pads, n_splits)
    ref_all = np.zeros_like(out)
    for b in range(batch):
        present = p["cache_pos"][b] >= 0
        t = np.arange(n_q)
        q_pos = np.where(t >= pads[b], starts[b] + t - pads[b], -1)
        ref = li.lambda_attention_reference(
            torch.from_numpy(p["q"][b:b + 1]),
            torch.from_numpy(np.concatenate([p["cache_k"][b:b + 1, :, present], p["k"][b:b + 1]], 2)),
            torch.from_numpy(np.concatenate([p["cache_v"][b:b + 1, :, present], p["v"][b:b + 1]], 2)),
            torch.from_numpy(p["inv_freq"]), n_global=G, n_local=L, distance_cap=p["D"],
            query_positions=torch.from_numpy(q_pos),
            key_positions=torch.from_numpy(np.concatenate([p["cache_pos"][b][present], q_pos])),
        ).numpy()
        ref[:, :, :pads[b]] = 0.0  # padding rows: zeros
        ref_all[b:b + 1] = ref
    err = np.linalg.norm(out - ref_all) / np.linalg.norm(ref_all)
    print(f"batch={batch} heads={hq}/{hkv} dim={dim} n_q={n_q} G={G} L={L} starts={starts} "
          f"pads={pads} splits={n_splits} cache={p['cache_len']}: rel err {err:.1e}")
    assert np.isfinite(out).all() and err < 1e-5, err
    return out


# ---------------------------------------------------------------------------------------------
# The barrier protocol of one block, as three roles (producer, consumer 0, consumer 1) and the
# TMA unit interleaved at random: mbarrier phases and transaction bytes, the named barriers of
# the consumers' turns. Checks that every interleaving finishes (no deadlock), that a consumer
# only reads a stage holding the tile it expects, that no load overwrites a stage a consumer
# still reads, and that each named barrier phase gets exactly its 256 arrivals.

class MBarrier:
    def __init__(self, arrivals):
        self.expected, self.arrived, self.tx, self.completed = arrivals, 0, 0, 0

    def _maybe_complete(self):
        if self.arrived == self.expected and self.tx == 0:
            self.completed, self.arrived = self.completed + 1, 0

    def arrive(self, tx=0):
        self.arrived += 1
        self.tx += tx
        self._maybe_complete()

    def complete_tx(self, n):
        self.tx -= n
        assert self.tx >= 0
        self._maybe_complete()

    def passed(self, parity):  # mbarrier.try_wait.parity
        return self.completed % 2 != parity


class NamedBarrier:
    def __init__(self):
        self.count, self.generation = 0, 0

    def arrive(self):  # 128 threads (one warpgroup)
        self.count += 128
        assert self.count <= 256, "two phases of a named barrier merged"
        if self.count == 256:
            self.count, self.generation = 0, self.generation + 1


def protocol_run(n_tiles, stages, rng):
    full = [MBarrier(1) for _ in range(stages)]
    empty = [MBarrier(2) for _ in range(stages)]
    turn = [NamedBarrier(), NamedBarrier()]
    stage_tile = [None] * stages   # the tile a stage holds once its load lands
    reading = [set() for _ in range(stages)]  # consumers between full-wait and empty-arrive
    in_flight = []                 # (stage, tile)
    tile_bytes = 2

    def producer():
        for n in range(n_tiles):
            st = n % stages
            if n >= stages:
                while not empty[st].passed((n // stages - 1) & 1):
                    yield
            assert not reading[st], f"tile {n} loaded over a stage consumer {reading[st]} reads"
            full[st].arrive(tx=tile_bytes)
            in_flight.append((st, n))

    def consumer(c):
        if c == 1 and n_tiles > 0:
            turn[0].arrive()
        for n in range(n_tiles):
            st = n % stages
            while not full[st].passed((n // stages) & 1):
                yield
            assert stage_tile[st] == n, (c, n, stage_tile[st])
            reading[st].add(c)
            gen = turn[c].generation
            turn[c].arrive()  # bar.sync: arrive, then wait for the phase to complete
            while turn[c].generation == gen:
                yield
            yield  # Q K^T issued
            if c == 0 or n + 1 < n_tiles:
                turn[1 - c].arrive()
            yield  # softmax, P V
            assert stage_tile[st] == n
            reading[st].discard(c)
            empty[st].arrive()

    def tma():
        while True:
            if in_flight:
                st, n = in_flight.pop(rng.integers(len(in_flight)))
                stage_tile[st] = n  # the bytes land, then complete on the barrier
                full[st].complete_tx(tile_bytes)
            yield

    roles = {"producer": producer(), "consumer 0": consumer(0), "consumer 1": consumer(1)}
    engine, steps = tma(), 0
    while roles:
        name = list(roles)[rng.integers(len(roles))] if rng.random() < 0.8 else None
        if name is None:
            next(engine)
        else:
            try:
                next(roles[name])
            except StopIteration:
                del roles[name]
        steps += 1
        assert steps < 100_000, f"deadlock: {sorted(roles)} never finish ({n_tiles} tiles)"
    assert not in_flight and all(b.count == 0 for b in turn), "barriers left mid-phase"


def check_pipeline_protocol():
    rng = np.random.default_rng(0)
    runs = 0
    for stages in (2, 3):
        for n_tiles in range(0, 9):
            for _ in range(40):
                protocol_run(n_tiles, stages, rng)
                runs += 1
    print(f"barrier protocol: {runs} random interleavings of producer, two consumers and TMA, "
          f"0-8 tiles, 2 and 3 stages: no deadlock, no stale or overwritten stage")


def main():
    check_pipeline_protocol()
    # Whole sequences: one block, block and group edges, band edges inside and across tiles,
    # global tiles (G beyond a tile), rows i < L, splits, partial rotary, G = 0.
    case(1, 2, 1, 16, 17, 3, 8, 0, cache=False)
    case(1, 2, 2, 16, 300, 0, 64, 0, cache=False)
    case(1, 2, 1, 16, 400, 3, 130, 0, 3, cache=False)
    case(1, 2, 1, 16, 520, 200, 129, 0, 2, cache=False, rotary_dim=8, cap=50)
    case(1, 2, 1, 16, 700, 4, 300, 0, cache=False)  # tiles strictly inside the band
    case(1, 3, 3, 16, 129, 10, 500, 0, cache=False)  # the window covers the sequence
    # Chunks against a wrapped ring: chunk sizes across a block, GQA, MHA, empty slots
    # (partial window tiles), a fresh ring (every window tile skipped), splits.
    for n_q in (17, 127, 128, 129, 300):
        case(1, 4, 2, 16, n_q, 4, 300, 1000, 2 if n_q < 128 else 1)
    case(1, 4, 4, 16, 40, 10, 300, 150, 3)  # cache half full
    case(1, 2, 1, 16, 200, 4, 300, 0)  # a fresh ring
    case(1, 2, 1, 16, 600, 4, 200, 1000, 2)  # a chunk longer than the window
    case(1, 2, 1, 16, 90, 0, 129, 777)  # G = 0, window not a tile multiple
    case(1, 2, 1, 16, 150, 200, 256, 180)  # global positions held by the chunk itself
    # Per-sequence starts and padding rows: pads that cut groups and tiles off-centre, a
    # sequence that is all padding, with and without a cache, with splits.
    case(4, 2, 1, 16, 300, 4, 100, 0, pads=[0, 1, 63, 130], cache=False)
    case(2, 2, 1, 16, 200, 4, 300, 1000, pads=[5, 129], start_shift=[0, 40])
    case(2, 2, 1, 16, 70, 4, 300, 1000, 3, pads=[70, 7])
    assert SKIPPED, "no window tile was skipped"
    assert SHORTCUTS, "the no-select shortcut was never taken"
    # Relative only: bit-identical near 10^3 and near 10^9.
    near = case(1, 4, 2, 16, 200, 4, 300, 1000, seed=1)
    far = case(1, 4, 2, 16, 200, 4, 300, 1000, seed=1, offset=10**9 - 1000 + 17)
    assert np.array_equal(near, far), "the 10^9 shift changed the output"
    # The real head dims.
    case(1, 2, 1, 128, 140, 3, 130, 0, cache=False)
    case(1, 4, 2, 64, 150, 4, 200, 1000, 2, rotary_dim=32)
    print(f"the Hopper model matches the reference ({len(SKIPPED)} window tiles skipped, "
          f"{len(SHORTCUTS)} select-free tiles)")


if __name__ == "__main__":
    main()
