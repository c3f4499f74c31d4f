"""Perplexity over one very long stream, by bucket, against fresh streams over the same text.

The paper's claim is that LM-Infinite's perplexity stays flat however long the stream (to
200M tokens). One LambdaStream reads `--tokens` tokens of the default corpus (pydoc topics,
then the standard library's sources, repeated as needed); for each bucket of `--bucket`
tokens, a fresh stream that starts one window (n_local tokens) before the bucket scores the
same bucket text. If the long stream's state (positions in the billions, rings rewritten
millions of times) changed anything, its bucket would score differently from the fresh one.
Each bucket also records the long stream's own tokens/s over that bucket (wall clock, and per
CPU-second of this process, which other jobs on the machine do not move) and the process's RSS
after it: both must stay flat (constant memory, constant work per token).
Progress on stderr; table, JSON and PNG plot at the end.

    python bench/long_stream_ppl.py --tokens 10000000 --bucket 1000000 --dtype bfloat16 \\
        --device cuda --json bench/results/long_stream.json --plot bench/results/long_stream.png
    python bench/long_stream_ppl.py --tokens 3072 --bucket 1024 --n-local 256   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import psutil
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import DTYPES
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.report import atomic_write, write_json
from lm_infinite.models import load_model
from lm_infinite.streaming import DEFAULT_CHUNK_SIZE, LambdaStream


def mean_nll(stream: LambdaStream, ids: torch.Tensor, chunk: int) -> float:
    """Mean NLL of ids appended to the stream, fed `chunk` tokens per call (NaN-free: the
    stream's very first token, which nothing predicts, is left out)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel(), chunk):
        nll = stream.nll(ids[None, start:start + chunk])[0]
        nll = nll[~nll.isnan()]
        total += nll.double().sum().item()
        count += nll.numel()
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--bucket", type=int, default=1_000_000)
    parser.add_argument("--n-local", type=int, help="default: the model's training length")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    model, tokenizer = load_model(dtype=DTYPES[args.dtype], device=args.device)
    lminf_hf.enable(model, n_local=args.n_local)
    n_local = model._lm_infinite.n_local
    if args.bucket < n_local:
        parser.error(f"--bucket ({args.bucket}) must be at least n_local ({n_local})")
    ids = default_corpus_tokens(tokenizer, args.tokens, repeat=True)
    long_stream, rows, start = LambdaStream(model, chunk_size=args.chunk_size), [], time.perf_counter()
    streamed_seconds = 0.0
    for begin in range(0, ids.numel(), args.bucket):
        bucket = ids[begin:begin + args.bucket]
        tick, cpu_tick = time.perf_counter(), time.process_time()
        long_nll = mean_nll(long_stream, bucket, args.chunk_size)
        bucket_seconds, bucket_cpu_seconds = time.perf_counter() - tick, time.process_time() - cpu_tick
        streamed_seconds += bucket_seconds
        # The fresh stream reads the window before the bucket, then scores the bucket itself.
        fresh = LambdaStream(model, chunk_size=args.chunk_size)
        if begin > 0:
            fresh.feed(ids[None, max(0, begin - n_local):begin])
        fresh_nll = mean_nll(fresh, bucket, args.chunk_size)
        row = dict(first_token=begin, tokens=bucket.numel(), ppl_long=math.exp(long_nll),
                   ppl_fresh=math.exp(fresh_nll), tokens_per_s=bucket.numel() / bucket_seconds,
                   # wall-clock speed moves with whatever else the machine runs; CPU time per token does not
                   tokens_per_cpu_s=bucket.numel() / bucket_cpu_seconds)
        row["ratio"] = row["ppl_long"] / row["ppl_fresh"]
        del fresh  # the RSS below is the long stream's and the model's, not a fresh stream's
        row["rss_mib"] = psutil.Process().memory_info().rss / 2**20
        rows.append(row)
        print(f"tokens {begin:>11,}..{begin + bucket.numel():>11,}  long stream ppl {row['ppl_long']:8.3f}  "
              f"fresh stream ppl {row['ppl_fresh']:8.3f}  ratio {row['ratio']:.4f}  "
              f"{row['tokens_per_s']:6.0f} tok/s  RSS {row['rss_mib']:6.0f} MiB  {time.perf_counter() - start:7.0f} s",
              file=sys.stderr, flush=True)
    tokens_per_s = long_stream.position / streamed_seconds
    print(f"{'bucket start':>12} {'tokens':>9} {'long ppl':>9} {'fresh ppl':>9} {'ratio':>7} {'tok/s':>7} "
          f"{'RSS MiB':>8}")
    for row in rows:
        print(f"{row['first_token']:>12} {row['tokens']:>9} {row['ppl_long']:9.3f} {row['ppl_fresh']:9.3f} "
              f"{row['ratio']:7.4f} {row['tokens_per_s']:7.0f} {row['rss_mib']:8.0f}")
    summary = dict(max_ratio_error=max(abs(r["ratio"] - 1) for r in rows),
                   tokens_per_s_last_over_first=rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"],
                   rss_last_over_first=rows[-1]["rss_mib"] / rows[0]["rss_mib"])
    print(f"long stream: {long_stream.position} tokens at {tokens_per_s:.0f} tokens/s; "
          f"largest |ratio - 1| = {summary['max_ratio_error']:.4f}; last bucket / first: "
          f"tokens/s {summary['tokens_per_s_last_over_first']:.3f}, RSS {summary['rss_last_over_first']:.3f}")
    if args.json:
        write_json(args.json, dict(n_local=n_local, bucket=args.bucket, dtype=args.dtype, device=args.device,
                                   tokens_per_s=tokens_per_s, threads=torch.get_num_threads(),
                                   **summary, rows=rows))
    if args.plot:
        plot(args.plot, rows, args.bucket, n_local)
    return 0


def plot(path: str, rows: list[dict], bucket: int, n_local: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ppl_axis, speed_axis, rss_axis) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    starts = [r["first_token"] + r["tokens"] / 2 for r in rows]
    ppl_axis.plot(starts, [r["ppl_long"] for r in rows], marker="o", label="one long stream")
    ppl_axis.plot(starts, [r["ppl_fresh"] for r in rows], marker="x", label="fresh stream per bucket")
    ppl_axis.set(ylabel="perplexity", title=f"LM-Infinite, bucket {bucket} tokens, window {n_local}")
    ppl_axis.legend()
    speed_axis.plot(starts, [r["tokens_per_s"] for r in rows], marker="o", label="per second (wall clock)")
    speed_axis.plot(starts, [r["tokens_per_cpu_s"] for r in rows], marker="x", label="per CPU-second")
    speed_axis.set(ylabel="long stream tokens", ylim=(0, None))
    speed_axis.legend()
    rss_axis.plot(starts, [r["rss_mib"] for r in rows], marker="o")
    rss_axis.set(xlabel="position in the stream (tokens)", ylabel="RSS (MiB)", ylim=(0, None))
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
