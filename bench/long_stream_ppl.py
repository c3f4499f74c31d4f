"""Perplexity over one very long stream, by bucket, against fresh streams over the same text.

The paper's claim is that LM-Infinite's perplexity stays flat however long the stream (to
200M tokens). One LambdaStream reads `--tokens` tokens of the default corpus (pydoc topics,
then the standard library's sources, repeated as needed); for each bucket of `--bucket`
tokens, a fresh stream that starts one window (n_local tokens) before the bucket scores the
same bucket text. If the long stream's state (positions in the billions, rings rewritten
millions of times) changed anything, its bucket would score differently from the fresh one.
Progress on stderr; table, JSON and PNG plot at the end; tokens/s of the long stream.

    python bench/long_stream_ppl.py --tokens 10000000 --bucket 1000000 --dtype bfloat16 \\
        --device cuda --json bench/results/long_stream.json --plot bench/results/long_stream.png
    python bench/long_stream_ppl.py --tokens 3072 --bucket 1024 --n-local 256   # CPU smoke
"""

from __future__ import annotations

import argparse
import math
import sys
import time

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
        tick = time.perf_counter()
        long_nll = mean_nll(long_stream, bucket, args.chunk_size)
        streamed_seconds += time.perf_counter() - tick
        # The fresh stream reads the window before the bucket, then scores the bucket itself.
        fresh = LambdaStream(model, chunk_size=args.chunk_size)
        if begin > 0:
            fresh.feed(ids[None, max(0, begin - n_local):begin])
        fresh_nll = mean_nll(fresh, bucket, args.chunk_size)
        row = dict(first_token=begin, tokens=bucket.numel(), ppl_long=math.exp(long_nll),
                   ppl_fresh=math.exp(fresh_nll))
        row["ratio"] = row["ppl_long"] / row["ppl_fresh"]
        rows.append(row)
        print(f"tokens {begin:>11,}..{begin + bucket.numel():>11,}  long stream ppl {row['ppl_long']:8.3f}  "
              f"fresh stream ppl {row['ppl_fresh']:8.3f}  ratio {row['ratio']:.4f}  "
              f"{long_stream.position / streamed_seconds:8.0f} tok/s  {time.perf_counter() - start:7.0f} s",
              file=sys.stderr, flush=True)
    tokens_per_s = long_stream.position / streamed_seconds
    print(f"{'bucket start':>12} {'tokens':>9} {'long ppl':>9} {'fresh ppl':>9} {'ratio':>7}")
    for row in rows:
        print(f"{row['first_token']:>12} {row['tokens']:>9} {row['ppl_long']:9.3f} {row['ppl_fresh']:9.3f} "
              f"{row['ratio']:7.4f}")
    print(f"long stream: {long_stream.position} tokens at {tokens_per_s:.0f} tokens/s; "
          f"largest |ratio - 1| = {max(abs(r['ratio'] - 1) for r in rows):.4f}")
    if args.json:
        write_json(args.json, dict(n_local=n_local, bucket=args.bucket, dtype=args.dtype, device=args.device,
                                   tokens_per_s=tokens_per_s, rows=rows))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        starts = [r["first_token"] + r["tokens"] / 2 for r in rows]
        axis.plot(starts, [r["ppl_long"] for r in rows], marker="o", label="one long stream")
        axis.plot(starts, [r["ppl_fresh"] for r in rows], marker="x", label="fresh stream per bucket")
        axis.set(xlabel="position in the stream (tokens)", ylabel="perplexity",
                 title=f"LM-Infinite, bucket {args.bucket} tokens, window {n_local}")
        axis.legend()
        figure.tight_layout()
        atomic_write(args.plot, lambda temporary: figure.savefig(temporary, format="png", dpi=120))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
