"""Memory of an LM-Infinite stream of 100K tokens on the CPU: resident set size per chunk.

Streams the default corpus (pydoc topics, then standard library sources) through the default
model with LambdaStream and records the process RSS after every chunk; checks that it stays
flat after the first window fills, and that the streamed NLL of a prefix equals a single
whole-prefix forward (no cache, no chunks). Writes a JSON record and a PNG plot.

    python bench/stream_memory.py --tokens 100000 --json bench/results/stream_memory.json --plot bench/results/stream_memory.png
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import rss_mib
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.methods import whole_sequence_nll
from lm_infinite.apps.eval.report import atomic_write, write_json
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--n-local", type=int, help="default: the model's training length")
    parser.add_argument("--check-tokens", type=int, help="prefix checked against a whole forward "
                        "(default: n_local + 2 chunks)")
    parser.add_argument("--max-growth-mib", type=float, default=64.0,
                        help="allowed RSS growth after the first window is full")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_model(args.model)
    lminf_hf.enable(model, n_local=args.n_local)
    n_local = model._lm_infinite.n_local
    ids = default_corpus_tokens(tokenizer, args.tokens)

    check_tokens = args.check_tokens or n_local + 2 * args.chunk_size
    stream = LambdaStream(model, chunk_size=args.chunk_size)
    streamed = stream.nll(ids[None, :check_tokens])[0]
    reference = whole_sequence_nll(model, ids[:check_tokens])
    prefix_error = (streamed[1:] - reference[1:]).abs().max().item()
    print(f"prefix of {check_tokens} tokens: max |streamed NLL - whole-forward NLL| = {prefix_error:.2e}")

    stream = LambdaStream(model, chunk_size=args.chunk_size)
    records, nll_sum, start = [], 0.0, time.perf_counter()
    for begin in range(0, ids.numel(), args.chunk_size):
        nll = stream.nll(ids[None, begin : begin + args.chunk_size])[0]
        nll_sum += nll.nan_to_num(0.0).double().sum().item()
        records.append({"tokens": stream.position, "rss_mib": round(rss_mib(), 1),
                        "cache_mib": round(stream.cache.nbytes() / 2**20, 2),
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"{records[-1]['tokens']:>8} tokens  RSS {records[-1]['rss_mib']:8.1f} MiB  "
              f"cache {records[-1]['cache_mib']:6.2f} MiB  {records[-1]['seconds']:7.1f} s", flush=True)

    settled = [r["rss_mib"] for r in records if r["tokens"] >= n_local + args.chunk_size]
    # Growth over the RSS once the window is full (a drop, e.g. a shorter last chunk, is no growth).
    growth = max(settled) - settled[0] if settled else 0.0
    result = {"tokens": stream.position, "n_local": n_local, "chunk_size": args.chunk_size,
              "rss_growth_after_first_window_mib": growth, "prefix_check_tokens": check_tokens,
              "prefix_max_abs_nll_error": prefix_error,
              "perplexity": math.exp(nll_sum / (stream.position - 1)), "chunks": records}
    print(f"RSS growth after the first window: {growth:.1f} MiB; perplexity {result['perplexity']:.2f}")
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(args.plot, records, n_local)
    ok = growth <= args.max_growth_mib and prefix_error < 1e-3
    return 0 if ok else 1


def plot(path, records, n_local):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["tokens"] for r in records], [r["rss_mib"] for r in records], marker=".")
    axes.axvline(n_local, color="gray", linestyle="--", linewidth=1, label=f"n_local = {n_local}")
    axes.set(xlabel="tokens streamed", ylabel="process RSS (MiB)", ylim=(0, None),
             title="LM-Infinite streaming memory (CPU)")
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
