"""CPU benchmark: Λ-attention (lm_infinite.lambda_attention) against dense causal SDPA.

Same inputs, same run, same threads. Prints a table (median seconds, speed-up, useful
GFLOP/s counting only unmasked query-key pairs) and writes JSON and a PNG plot.

    python bench/attention_cpu.py                 # the issue's grid: N = 4K, 16K, 64K
    python bench/attention_cpu.py --lengths 4096 8192 --heads 9/3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

import lm_infinite as li

HEAD_CONFIGS = {"9/3": (9, 3, 64), "32/8": (32, 8, 128)}


def median_seconds(fn, min_repeats: int, budget_s: float) -> float:
    fn()  # warm-up: thread pool start, first-touch of buffers
    times = []
    while len(times) < min_repeats or (sum(times) < budget_s and len(times) < 10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if times[-1] > budget_s:  # one long run is a good enough estimate
            break
    return statistics.median(times)


def unmasked_pairs(n: int, n_global: int, n_local: int) -> int:
    """(query, key) pairs Λ-attention scores: the band plus each row's global keys."""
    band = sum(min(i + 1, n_local) for i in range(n))
    extra_global = sum(min(n_global, max(0, i + 1 - n_local)) for i in range(n))
    return band + extra_global


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--heads", nargs="+", default=list(HEAD_CONFIGS), choices=list(HEAD_CONFIGS))
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per measurement")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = parser.parse_args()

    rows = []
    print(f"threads={torch.get_num_threads()} build={li.build_info()}")
    for heads in args.heads:
        hq, hkv, dim = HEAD_CONFIGS[heads]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        for n in args.lengths:
            torch.manual_seed(n)
            q, k, v = (torch.randn(1, h, n, dim) for h in (hq, hkv, hkv))
            k_full, v_full = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
            ours = median_seconds(
                lambda: li.lambda_attention(q, k, v, inv_freq, n_global=args.n_global, n_local=args.n_local),
                3, args.budget)
            sdpa = median_seconds(
                lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True), 1, args.budget)
            flops = 4 * dim * hq * unmasked_pairs(n, args.n_global, args.n_local)
            rows.append(dict(heads=heads, head_dim=dim, n=n, lambda_s=ours, sdpa_causal_s=sdpa,
                             speedup=sdpa / ours, lambda_gflops=flops / ours / 1e9,
                             sdpa_gflops=4 * dim * hq * n * (n + 1) / 2 / sdpa / 1e9))
            r = rows[-1]
            print(f"{heads:>5} N={n:>6}: lambda {ours:8.3f}s  sdpa {sdpa:8.3f}s  x{r['speedup']:.2f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_cpu.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "attention_cpu.png")
    print("\n| heads | head_dim | N | Λ-attention s | SDPA causal s | speed-up | Λ GFLOP/s | SDPA GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['heads']} | {r['head_dim']} | {r['n']} | {r['lambda_s']:.3f} | {r['sdpa_causal_s']:.3f} | "
              f"{r['speedup']:.2f}x | {r['lambda_gflops']:.0f} | {r['sdpa_gflops']:.0f} |")


def plot(rows, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for heads in dict.fromkeys(r["heads"] for r in rows):
        sel = [r for r in rows if r["heads"] == heads]
        ns = [r["n"] for r in sel]
        ax.plot(ns, [r["lambda_s"] for r in sel], "o-", label=f"Λ-attention {heads}")
        ax.plot(ns, [r["sdpa_causal_s"] for r in sel], "s--", label=f"SDPA causal {heads}")
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="seconds (median)",
           title="CPU attention time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
