"""GPU benchmark: Λ-attention kernels against FlexAttention (same Λ block mask, compiled) and SDPA.

Prefill, bf16: a whole sequence (lm_infinite.lambda_attention), and its last --chunk tokens
against a full cache of the first n_global and last n_local tokens before them
(lambda_attention_chunk), vs FlexAttention given the same Λ mask over the same positions
(its block mask skips the same tiles) on pre-rotated q, k, and, for whole sequences, dense
causal SDPA (flash backend). Useful TFLOP/s counts only the unmasked (query, key) pairs:
4 * head_dim flops each (Q K^T and P V), for every query head; a bf16 matmul measured in the
same run gives the ceiling they are read against.

Decode: one new token per sequence against a full window of n_global + n_local cached keys,
bf16. lm_infinite.lambda_attention_chunk (the decode kernel + its merge) vs SDPA over a
contiguous cache. Effective TB/s counts the K/V bytes each call must read once; the same run
measures the device's copy bandwidth (a large device-to-device copy, read + write bytes) and
reports each configuration's fraction of it. Calls are captured in a CUDA graph (launch gaps
out of the numbers) that cycles through enough caches to exceed twice the L2 cache, so the
reads come from HBM.

Times are medians of CUDA-event timings after warm-up. Prints a table, writes JSON and a PNG.

    python bench/attention_gpu.py                         # the issue's configurations
    python bench/attention_gpu.py --lengths 8192 32768 --heads 32/8 --chunk 0
    python bench/attention_gpu.py --decode-only           # decode at batch 1 and 16, both heads
    python bench/attention_gpu.py --kernel mma --no-flex  # the step-2 prefill kernel, for A/B

--kernel sets LMINF_PREFILL_KERNEL (csrc/cuda/hopper_prefill.cuh) before the first call: the
extension reads it once per process, so an A/B comparison is two runs (scripts/gpu_check.sh's
prefill_bench phases do both and read the mma run against the first run's FlexAttention).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics

import torch
import torch.nn.functional as F

import lm_infinite as li
from lm_infinite.reference import apply_rotary

HEAD_CONFIGS = {"9/3": (9, 3, 64), "32/8": (32, 8, 128)}
DEV = "cuda"


def median_ms(fn, warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def unmasked_pairs(n: int, n_global: int, n_local: int, first_row: int = 0) -> int:
    """(query, key) pairs Λ-attention scores for query rows first_row .. n-1 of a sequence of
    n: the band plus each row's global keys beyond it."""
    i = torch.arange(first_row, n, dtype=torch.int64)
    band = torch.clamp(i + 1, max=n_local).sum().item()
    extra_global = torch.clamp(i + 1 - n_local, min=0, max=n_global).sum().item()
    return int(band + extra_global)


def matmul_tflops(size: int = 8192) -> float:
    """The bf16 dense matmul rate of this GPU, measured now: the ceiling useful TFLOP/s are
    read against."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=DEV)
    return 2 * size**3 / median_ms(lambda: a @ b, warmup=5, repeats=20) / 1e9


def flex_attention_fn(q_positions, k_positions, n_global: int, n_local: int):
    """FlexAttention with the Λ mask over explicit positions (a whole sequence, or a chunk
    against a cache laid out as [global keys, window, chunk])."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def lambda_mask(b, h, q_idx, kv_idx):
        i, j = q_positions[q_idx], k_positions[kv_idx]
        return (i >= j) & ((i - j < n_local) | (j < n_global))

    block_mask = create_block_mask(lambda_mask, B=None, H=None, Q_LEN=len(q_positions),
                                   KV_LEN=len(k_positions), device=DEV)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def bench_prefill(n: int, heads: str, n_global: int, n_local: int, with_flex: bool,
                  chunk: int | None = None, matmul: float | None = None) -> dict:
    """A whole sequence of n tokens, or (chunk) its last `chunk` tokens against a full cache
    of the first n_global and the last n_local tokens before them."""
    hq, hkv, dim = HEAD_CONFIGS[heads]
    dtype = torch.bfloat16
    n_q = chunk or n
    start = n - n_q
    q = torch.randn(1, hq, n_q, dim, dtype=dtype, device=DEV)
    k = torch.randn(1, hkv, n_q, dim, dtype=dtype, device=DEV)
    v = torch.randn(1, hkv, n_q, dim, dtype=dtype, device=DEV)
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(DEV)
    q_positions = torch.arange(start, n, device=DEV)
    cache_positions = torch.cat([torch.arange(min(n_global, start)),
                                 torch.arange(max(n_global, start - n_local), start)]).to(DEV)
    cache_k = torch.randn(1, hkv, len(cache_positions), dim, dtype=dtype, device=DEV)
    cache_v = torch.randn(1, hkv, len(cache_positions), dim, dtype=dtype, device=DEV)
    k_positions = torch.cat([cache_positions, q_positions])

    useful = 4 * dim * hq * unmasked_pairs(n, n_global, n_local, first_row=start)
    row = dict(kind="prefill", n=n, chunk=chunk, heads=heads, n_global=n_global,
               n_local=n_local)
    if chunk:
        start_t = torch.tensor([start], dtype=torch.int64, device=DEV)
        row["lminf_ms"] = median_ms(lambda: li.lambda_attention_chunk(
            q, k, v, cache_k, cache_v, cache_positions, start_t, inv_freq, n_global=n_global,
            n_local=n_local))
        row["sdpa_causal_ms"] = None
    else:
        row["lminf_ms"] = median_ms(lambda: li.lambda_attention(
            q, k, v, inv_freq, n_global=n_global, n_local=n_local))
    q_rot = apply_rotary(q, q_positions, inv_freq)
    k_all = torch.cat([cache_k, k], 2) if chunk else k
    v_all = torch.cat([cache_v, v], 2) if chunk else v
    k_rot = apply_rotary(k_all, k_positions, inv_freq)
    if not chunk:
        dense_causal = 4 * dim * hq * n * (n + 1) // 2
        row["sdpa_causal_ms"] = median_ms(lambda: F.scaled_dot_product_attention(
            q_rot, k_rot, v_all, is_causal=True, enable_gqa=True))
        row["sdpa_tflops"] = dense_causal / row["sdpa_causal_ms"] / 1e9
    row["flex_ms"] = None
    if with_flex:
        flex = flex_attention_fn(q_positions, k_positions, n_global, n_local)
        row["flex_ms"] = median_ms(lambda: flex(q_rot, k_rot, v_all))
    row["lminf_tflops"] = useful / row["lminf_ms"] / 1e9
    row["flex_tflops"] = useful / row["flex_ms"] / 1e9 if row["flex_ms"] else None
    row["speedup_vs_flex"] = row["flex_ms"] / row["lminf_ms"] if row["flex_ms"] else None
    row["lminf_of_matmul"] = row["lminf_tflops"] / matmul if matmul else None
    return row


def prefill_kernel(choice: str) -> str:
    """The prefill kernel LMINF_PREFILL_KERNEL=choice runs here: "hopper" or "mma"."""
    built = li.build_info().get("hopper_prefill", False)
    hopper = built and torch.cuda.get_device_capability() == (9, 0)
    return "hopper" if choice == "hopper" or (choice == "auto" and hopper) else "mma"


def graph_of(calls, repeat: int):
    """A CUDA graph running calls[i % len(calls)] for i < repeat (warmed up first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(repeat):
            calls[i % len(calls)]()
    return graph


def bench_decode(batch: int, heads: str, n_global: int, n_local: int) -> dict:
    hq, hkv, dim = HEAD_CONFIGS[heads]
    dtype = torch.bfloat16
    slots = n_global + n_local
    kv_bytes = 2 * batch * hkv * slots * dim * 2  # K and V, bf16, read once
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    n_sets = max(1, -(-2 * l2 // kv_bytes))  # enough caches to spill the L2 twice
    inv_freq = (1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))).to(DEV)
    start = torch.tensor([10**6], dtype=torch.int64, device=DEV)  # a stream far into its life
    positions = torch.cat([torch.arange(n_global), torch.arange(10**6 - n_local, 10**6)]).to(DEV)
    sets = []
    for _ in range(n_sets):
        sets.append(dict(
            q=torch.randn(batch, hq, 1, dim, dtype=dtype, device=DEV),
            k=torch.randn(batch, hkv, 1, dim, dtype=dtype, device=DEV),
            v=torch.randn(batch, hkv, 1, dim, dtype=dtype, device=DEV),
            cache_k=torch.randn(batch, hkv, slots, dim, dtype=dtype, device=DEV),
            cache_v=torch.randn(batch, hkv, slots, dim, dtype=dtype, device=DEV),
        ))

    def ours(s):
        return lambda: li.lambda_attention_chunk(s["q"], s["k"], s["v"], s["cache_k"], s["cache_v"],
                                                 positions, start, inv_freq, n_global=n_global,
                                                 n_local=n_local)

    def sdpa(s):
        return lambda: F.scaled_dot_product_attention(s["q"], s["cache_k"], s["cache_v"],
                                                      enable_gqa=True)

    repeat = 20 * n_sets if n_sets > 1 else 20
    row = dict(kind="decode", batch=batch, heads=heads, n_global=n_global, n_local=n_local,
               kv_mb=kv_bytes / 1e6, cache_sets=n_sets)
    for name, make in (("lminf", ours), ("sdpa", sdpa)):
        graph = graph_of([make(s) for s in sets], repeat)
        row[f"{name}_us"] = median_ms(graph.replay) * 1e3 / repeat
        row[f"{name}_tbps"] = kv_bytes / (row[f"{name}_us"] * 1e-6) / 1e12
    return row


def copy_bandwidth_tbps(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy of n_bytes: (read + written bytes) / median time, in TB/s."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, repeats=10)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / (ms * 1e-3) / 1e12


def plot(rows, path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    prefill = [r for r in rows if r["kind"] == "prefill" and not r["chunk"]]
    decode = [r for r in rows if r["kind"] == "decode"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for heads in sorted({r["heads"] for r in prefill}):
        sel = [r for r in prefill if r["heads"] == heads]
        ns = [r["n"] for r in sel]
        axes[0].plot(ns, [r["lminf_tflops"] for r in sel], "o-", label=f"lm-infinite {heads}")
        if all(r["flex_tflops"] for r in sel):
            axes[0].plot(ns, [r["flex_tflops"] for r in sel], "s--", label=f"FlexAttention {heads}")
        axes[0].plot(ns, [r["sdpa_tflops"] for r in sel], "^:", label=f"SDPA causal {heads}")
    axes[0].set(xscale="log", xlabel="sequence length", ylabel="useful TFLOP/s", title="prefill, bf16")
    axes[0].legend(fontsize=8)
    labels = [f"b={r['batch']} {r['heads']}" for r in decode]
    if not prefill:
        axes[0].set_visible(False)
    x = range(len(decode))
    axes[1].bar([i - 0.2 for i in x], [r["lminf_tbps"] for r in decode], 0.4, label="lm-infinite")
    axes[1].bar([i + 0.2 for i in x], [r["sdpa_tbps"] for r in decode], 0.4, label="SDPA")
    axes[1].set_xticks(list(x), labels)
    axes[1].set(ylabel="effective TB/s (K/V read)", title="decode, 1 token, bf16")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--chunk", type=int, default=4096,
                        help="also time the last CHUNK tokens against a full cache (0: skip)")
    parser.add_argument("--heads", nargs="+", default=list(HEAD_CONFIGS), choices=list(HEAD_CONFIGS))
    parser.add_argument("--n-local", type=int, default=4096)
    parser.add_argument("--n-global", type=int, default=4)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (no compile)")
    parser.add_argument("--decode-only", action="store_true",
                        help="decode only: every --heads config at every --decode-batches")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    parser.add_argument("--kernel", choices=["auto", "hopper", "mma"],
                        default=os.environ.get("LMINF_PREFILL_KERNEL") or "auto",
                        help="prefill kernel (sets LMINF_PREFILL_KERNEL; default: its value, "
                             "else auto = Hopper on sm_90)")
    args = parser.parse_args()
    os.environ["LMINF_PREFILL_KERNEL"] = args.kernel  # before the extension's first call

    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} build={li.build_info()}")
    rows = []
    if not args.decode_only:
        matmul = matmul_tflops()
        print(f"bf16 matmul 8192^3: {matmul:.0f} TFLOP/s")
        rows.append(dict(kind="matmul", tflops=matmul))
        for heads in args.heads:
            for n in args.lengths:
                for chunk in ([None, args.chunk] if args.chunk and args.chunk < n else [None]):
                    rows.append(dict(bench_prefill(n, heads, args.n_global, args.n_local,
                                                   not args.no_flex, chunk, matmul),
                                     kernel=args.kernel, kernel_ran=prefill_kernel(args.kernel)))
    copy_tbps = copy_bandwidth_tbps()
    rows.append(dict(kind="copy", tbps=copy_tbps))
    for heads in args.heads if args.decode_only else ["32/8"]:
        for batch in args.decode_batches:
            row = bench_decode(batch, heads, args.n_global, args.n_local)
            row["lminf_copy_fraction"] = row["lminf_tbps"] / copy_tbps
            row["sdpa_copy_fraction"] = row["sdpa_tbps"] / copy_tbps
            row["speedup_vs_sdpa"] = row["sdpa_us"] / row["lminf_us"]
            rows.append(row)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_gpu.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "attention_gpu.png")

    def fmt(x, spec):
        return format(x, spec) if x is not None else "-"

    if not args.decode_only:
        print(f"\nprefill ({args.kernel} kernel), bf16, G={args.n_global} L={args.n_local} (useful TFLOP/s: unmasked pairs "
              f"only; bf16 matmul {matmul:.0f} TFLOP/s)")
        print(f"{'heads':>6} {'N':>7} {'chunk':>6} {'lminf ms':>9} {'flex ms':>8} {'sdpa ms':>8} "
              f"{'lminf TF/s':>10} {'of mm':>6} {'flex TF/s':>9} {'sdpa TF/s':>9} {'vs flex':>7}")
        for r in rows:
            if r["kind"] == "prefill":
                print(f"{r['heads']:>6} {r['n']:>7} {fmt(r['chunk'], 'd'):>6} {r['lminf_ms']:>9.3f} "
                      f"{fmt(r['flex_ms'], '8.3f'):>8} {fmt(r['sdpa_causal_ms'], '8.3f'):>8} "
                      f"{r['lminf_tflops']:>10.1f} {r['lminf_of_matmul']:>6.2f} "
                      f"{fmt(r['flex_tflops'], '9.1f'):>9} {fmt(r.get('sdpa_tflops'), '9.1f'):>9} "
                      f"{fmt(r['speedup_vs_flex'], '6.2f'):>6}x")
    print(f"\ndecode, 1 token, bf16, {args.n_global}+{args.n_local} cached keys; device copy "
          f"bandwidth {copy_tbps:.2f} TB/s (read + write), 'of copy' = K/V TB/s / that")
    print(f"{'heads':>6} {'batch':>6} {'K/V MB':>8} {'lminf us':>9} {'lminf TB/s':>10} {'of copy':>7} "
          f"{'sdpa us':>8} {'sdpa TB/s':>9} {'of copy':>7} {'vs sdpa':>7}")
    for r in rows:
        if r["kind"] == "decode":
            print(f"{r['heads']:>6} {r['batch']:>6} {r['kv_mb']:>8.1f} {r['lminf_us']:>9.2f} "
                  f"{r['lminf_tbps']:>10.2f} {r['lminf_copy_fraction']:>7.0%} {r['sdpa_us']:>8.2f} "
                  f"{r['sdpa_tbps']:>9.2f} {r['sdpa_copy_fraction']:>7.0%} {r['speedup_vs_sdpa']:>6.2f}x")


if __name__ == "__main__":
    main()
