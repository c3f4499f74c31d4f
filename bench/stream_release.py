"""Memory that comes back: RSS of one process running stream after stream, each dropped.

Each stream reads --tokens of the default corpus, generates --generate tokens, and is then
dropped (`del`, no gc.collect()). Two series on the default model (SmolLM2, bf16): the
compiled decode step, and the retrieval preset (top-k middle attention with its paged store,
which runs eagerly). Before the fix of issue 25 each dropped stream stayed alive in a
reference cycle (RSS grew by ~430 MiB per 8K-token stream); the bar is RSS after the last
stream within 5% of RSS after the first.

    python bench/stream_release.py --json bench/results/stream_release.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import rss_mib
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.report import write_json
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream

# The compiled decode step; the retrieval preset (top-k middle attention, paged store: eager).
SERIES = {"compiled": dict(settings={}, compile=True),
          "top-k-retrieval": dict(settings={"preset": "retrieval"}, compile=False)}


def run_series(model, ids, name: str, streams: int, generate: int, chunk_size: int, n_local: int) -> dict:
    options = SERIES[name]
    lminf_hf.enable(model, n_local=n_local, **options["settings"])
    rss = []
    for index in range(streams):
        start = time.perf_counter()
        stream = LambdaStream(model, chunk_size=chunk_size, compile=options["compile"])
        stream.feed(ids[None])
        tokens = list(stream.generate(generate))
        del stream
        rss.append(round(rss_mib(), 1))
        print(f"{name}: stream {index + 1}: {len(tokens)} tokens generated, RSS after del "
              f"{rss[-1]:.0f} MiB ({time.perf_counter() - start:.0f} s)", flush=True)
    ratio = rss[-1] / rss[0]
    print(f"{name}: RSS after stream {streams} / after stream 1 = {ratio:.3f}", flush=True)
    return {"rss_mib_after_each": rss, "last_over_first": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--generate", type=int, default=16)
    parser.add_argument("--n-local", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--series", default=",".join(SERIES), help=f"comma-separated subset of: {', '.join(SERIES)}")
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16)
    ids = default_corpus_tokens(tokenizer, args.tokens)
    print(f"RSS with the model loaded: {rss_mib():.0f} MiB", flush=True)
    results = {name: run_series(model, ids, name, args.streams, args.generate, args.chunk_size, args.n_local)
               for name in args.series.split(",")}
    ok = all(r["last_over_first"] <= 1 + args.tolerance for r in results.values())
    if args.json:
        write_json(args.json, {"streams": args.streams, "tokens": args.tokens, "n_local": args.n_local,
                               "dtype": "bfloat16", "tolerance": args.tolerance, "series": results, "passed": ok})
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
