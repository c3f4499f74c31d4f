"""Decode speed of LambdaStream.generate against transformers' generate() with a LambdaCache.

One process, one prefill per prompt length: the prompt (pydoc text) is fed once through a
LambdaStream, then each contender continues a copy of that stream, alternately, `--repeats`
times; the table gives the median ms per token of each. Both produce the same greedy tokens
(checked). The CPU is shared in development, so only the side-by-side ratio is meaningful.

    python bench/stream_vs_generate.py --prompts 2048,8192 --dtype float32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import DTYPES
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.report import write_json
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream


def time_stream(stream: LambdaStream, new_tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = list(stream.generate(new_tokens))
    return (time.perf_counter() - start) * 1e3 / new_tokens, tokens


def time_generate(model, prompt: torch.Tensor, stream: LambdaStream, new_tokens: int) -> tuple[float, list[int]]:
    """generate() continuing the stream's cache: input_ids are the prompt plus the token the
    stream's logits choose, so generate() computes the same steps as the stream does."""
    first = stream.next_logits[0].argmax().view(1, 1)
    ids = torch.cat([prompt[None], first], dim=1)
    keyword = {lminf_hf.cache_argument_name(model): stream.cache}
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens - 1, do_sample=False, min_new_tokens=new_tokens - 1,
                         pad_token_id=0, **keyword)
    elapsed = time.perf_counter() - start
    # generate() ran new_tokens - 1 forwards; the stream runs new_tokens (it feeds its last token).
    return elapsed * 1e3 / (new_tokens - 1), out[0, prompt.numel():].tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="2048,8192", help="prompt lengths, comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(dtype=DTYPES[args.dtype])
    lminf_hf.enable(model)
    lengths = [int(n) for n in args.prompts.split(",")]
    corpus = default_corpus_tokens(tokenizer, max(lengths))
    rows = []
    for length in lengths:
        prompt = corpus[:length]
        base = LambdaStream(model, chunk_size=2048)
        base.feed(prompt[None])
        stream_ms, generate_ms = [], []
        for _ in range(args.repeats):
            ms, stream_tokens = time_stream(base.fork(), args.new_tokens)
            stream_ms.append(ms)
            ms, generate_tokens = time_generate(model, prompt, base.fork(), args.new_tokens)
            generate_ms.append(ms)
            if stream_tokens != generate_tokens:
                raise SystemExit(f"stream and generate() disagree after {length} tokens:\n"
                                 f"{stream_tokens}\n{generate_tokens}")
        row = dict(prompt=length, dtype=args.dtype, stream_ms=statistics.median(stream_ms),
                   generate_ms=statistics.median(generate_ms), stream_all=stream_ms, generate_all=generate_ms)
        rows.append(row)
        print(f"prompt {length:>6}  {args.dtype:<9} LambdaStream.generate {row['stream_ms']:7.1f} ms/token   "
              f"generate(LambdaCache) {row['generate_ms']:7.1f} ms/token   ratio "
              f"{row['stream_ms'] / row['generate_ms']:.2f}", flush=True)
    if args.json:
        write_json(args.json, {"threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
