"""CPU benchmark: one decode step of Λ-attention over a full ring cache, against SDPA over the
same keys (no rotary embedding, no mask: the cheapest dense attention a step could do).

Same inputs, same run, same threads; minimum of --repeats calls after a warm-up. The ratio is
what to compare across machines; the ring holds n_global + n_local keys.

    python bench/decode_attention_cpu.py                      # SmolLM2's heads, 8K window
    python bench/decode_attention_cpu.py --heads 32/8/128 --n-local 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from lm_infinite import ops


def best_ms(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default="9/3/64", help="query heads/kv heads/head_dim (default SmolLM2's)")
    parser.add_argument("--n-local", type=int, default=8192)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heads_q, heads_kv, head_dim = (int(x) for x in args.heads.split("/"))
    dtype, slots = getattr(torch, args.dtype), args.n_global + args.n_local
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    q, k, v = randn(1, heads_q, 1, head_dim), randn(1, heads_kv, 1, head_dim), randn(1, heads_kv, 1, head_dim)
    cache_k, cache_v = randn(1, heads_kv, slots, head_dim), randn(1, heads_kv, slots, head_dim)
    start = 10**6  # a stream far past the window: every slot full, the ring wrapped
    positions = torch.cat([torch.arange(args.n_global), torch.arange(start - args.n_local, start)])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    query_start = torch.tensor([start])

    def lambda_step():
        ops.lambda_attention_chunk(q, k, v, cache_k, cache_v, positions, query_start, inv_freq,
                                   n_global=args.n_global, n_local=args.n_local)

    def sdpa_step():
        F.scaled_dot_product_attention(q, cache_k, cache_v, enable_gqa=True)

    ours, sdpa = best_ms(lambda_step, args.repeats), best_ms(sdpa_step, args.repeats)
    bytes_read = 2 * cache_k.numel() * cache_k.element_size()
    result = {"heads": args.heads, "n_local": args.n_local, "dtype": args.dtype, "threads": args.threads,
              "lambda_ms": ours, "sdpa_ms": sdpa, "ratio": ours / sdpa,
              "lambda_gb_per_s": bytes_read / ours / 1e6}
    print(f"heads {args.heads}, {slots} keys, {args.dtype}, {args.threads} thread(s): "
          f"Λ-attention {ours:.3f} ms ({result['lambda_gb_per_s']:.1f} GB/s of K/V), "
          f"SDPA {sdpa:.3f} ms, ratio {ours / sdpa:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
