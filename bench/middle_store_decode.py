"""Per-token decode time of one top-k layer after a long stream: exact middle store against the
paged one (in memory and offloaded), with the store's bytes on the compute device.

SmolLM2-135M shapes (9 query / 3 KV heads, head_dim 64, n_local 8192, G 10), batch 1, random
keys and values: what is timed is one decode step's `RingKVCache.attend` with top-5 (block
selection, gather and the kernel's exact top-k over what it is given), the stream filled to
each length first, a fresh random query each call (so the paged store fetches other blocks
each time, as in decoding, not the same cached ones). Timings are the minimum over
--rounds x --repeats calls, interleaved across configurations (the least-disturbed one: the
development machine's 2 cores are shared), on --threads threads (default 1, which keeps OpenMP
waits on a loaded machine out of the numbers). The "candidates" column is the store's own share
of the step (`candidates()`: block scoring, selection and gather for the paged store, views for
the exact one), timed the same way. A model's decode step adds this once per top-k layer (26
for SmolLM2 with top-k from layer 4) on top of its constant Λ attention and MLPs. On a CPU
machine offload moves nothing (host and compute device are one): its rows time the same path
and differ in what is counted as device memory.

    nice -n -10 python bench/middle_store_decode.py --lengths 16384 65536 262144 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from lm_infinite.cache import RingKVCache

HEADS_Q, HEADS_KV, DIM, N_GLOBAL = 9, 3, 64, 10
STORES = {
    "exact": None,
    "paged": dict(kind="paged", block_size=64, top_k_blocks=8),
    "paged+offload": dict(kind="paged", block_size=64, top_k_blocks=8, offload=True),
    "paged+offload, max 64K": dict(kind="paged", block_size=64, top_k_blocks=8, offload=True,
                                   max_middle_tokens=65536),
}


def filled_ring(n_tokens: int, n_local: int, middle_options, device: str) -> RingKVCache:
    ring = RingKVCache(1, HEADS_KV, DIM, n_global=N_GLOBAL, n_local=n_local, device=device,
                       keep_middle=True, middle_options=middle_options)
    g = torch.Generator(device=device).manual_seed(0)
    for start in range(0, n_tokens, 8192):
        n = min(8192, n_tokens - start)
        ring.append(torch.randn(1, HEADS_KV, n, DIM, generator=g, device=device),
                    torch.randn(1, HEADS_KV, n, DIM, generator=g, device=device))
    return ring


def min_seconds(step, ring: RingKVCache, repeats: int) -> float:
    """Minimum over `repeats` calls of step(q, k, v), a fresh decode token each call (the
    first call only warms up)."""
    g = torch.Generator(device=ring.k.device).manual_seed(1)
    times = []
    for _ in range(repeats + 1):
        q = torch.randn(1, HEADS_Q, 1, DIM, generator=g, device=ring.k.device)
        k, v = torch.randn(2, 1, HEADS_KV, 1, DIM, generator=g, device=ring.k.device)
        start = time.perf_counter()
        step(q, k, v)
        if ring.k.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def decode_step_seconds(ring: RingKVCache, inv_freq, n_local: int, top_k: int, repeats: int) -> float:
    return min_seconds(lambda q, k, v: ring.attend(q, k, v, inv_freq, top_k=top_k, top_k_distance=n_local // 2),
                       ring, repeats)


def candidates_seconds(ring: RingKVCache, inv_freq, n_local: int, repeats: int) -> float:
    return min_seconds(lambda q, k, v: ring.middle.candidates(q, ring.n_seen, inv_freq, top_k_distance=n_local // 2,
                                                              n_local=n_local), ring, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536, 262144])
    parser.add_argument("--n-local", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10, help="calls per configuration and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stores", nargs="+", choices=list(STORES), default=list(STORES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32, device=args.device) / DIM))
    # Every ring is filled first, then timed in interleaved rounds (each configuration in turn,
    # --rounds times, the minimum kept): on a shared machine a disturbed period then hits every
    # configuration alike instead of one length's whole measurement.
    rings = {(n, name): filled_ring(n, args.n_local, STORES[name], args.device)
             for n in args.lengths for name in args.stores}
    timers = dict(
        top_k_ms=lambda ring: decode_step_seconds(ring, inv_freq, args.n_local, 5, args.repeats),
        plain_ms=lambda ring: decode_step_seconds(ring, inv_freq, args.n_local, 0, args.repeats),
        candidates_ms=lambda ring: candidates_seconds(ring, inv_freq, args.n_local, args.repeats))
    best = {(key, what): float("inf") for key in rings for what in timers}
    for round_ in range(args.rounds):
        for key, ring in rings.items():
            for what, timer in timers.items():
                best[key, what] = min(best[key, what], 1e3 * timer(ring))
        print(f"round {round_ + 1}/{args.rounds}:",
              {f"{n // 1024}K {name}": round(best[(n, name), "top_k_ms"], 2) for n, name in rings}, flush=True)
    rows = []
    for (n, name), ring in rings.items():
        middle = ring.middle
        device_bytes = middle.device_nbytes() if hasattr(middle, "device_nbytes") else middle.nbytes()
        rows.append(dict(tokens=n, store=name, **{what: best[(n, name), what] for what in timers},
                         device_mib=device_bytes / 2**20, total_mib=middle.nbytes() / 2**20))
    print("\n| store | " + " | ".join(f"{n // 1024}K: top-k ms (candidates; no top-k)" for n in args.lengths)
          + f" | growth {args.lengths[0] // 1024}K->{args.lengths[-1] // 1024}K | device MiB | total MiB |")
    print("|---|" + "---|" * (len(args.lengths) + 3))
    for name in args.stores:
        sel = [r for r in rows if r["store"] == name]
        cells = [f"{r['top_k_ms']:.2f} ({r['candidates_ms']:.2f}; {r['plain_ms']:.2f})" for r in sel]
        growth = sel[-1]["top_k_ms"] / sel[0]["top_k_ms"]
        mib = lambda key: " / ".join(f"{r[key]:.1f}" for r in sel)
        print(f"| {name} | " + " | ".join(cells) + f" | {growth:.2f}x | {mib('device_mib')} | {mib('total_mib')} |")
    if args.json:
        args.json.write_text(json.dumps(dict(vars(args), json=str(args.json), rows=rows), indent=1))


if __name__ == "__main__":
    main()
