"""A batch of prompts of different lengths through LambdaStream, against one prompt at a time (CPU).

Eight prompts of mixed lengths (1K-12K tokens of pydoc text, by default) on SmolLM2-135M with
LM-Infinite: prefill and greedy decode of the whole batch in one stream, and of each prompt in a
stream of its own, in the same run. Tokens/s count real tokens only (prefill: prompt tokens;
decode: generated tokens of all sequences). The batch's greedy tokens are checked against the
one-by-one run (they must be identical). The CPU is shared in development, so only the ratios
measured side by side mean anything: decode steps are interleaved (one batched step, then one
step of each single stream, and so on), so that a change of load hits both alike; prefill runs
the batch, then the prompts one by one.

    nice -n -10 python bench/batch_cpu.py --new-tokens 32 --json bench/results/batch_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import DTYPES
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.report import write_json
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream

DEFAULT_LENGTHS = "1024,12288,2048,8192,3072,6144,1536,4096"


def prompts_of(corpus: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Prompts of the given lengths from different places of the corpus (wrapping around)."""
    prompts, offset = [], 0
    for length in lengths:
        start = offset % max(1, corpus.numel() - length)
        prompts.append(corpus[start:start + length])
        offset += 7919 * (len(prompts) + 1)
    return prompts


def prefilled(model, prompts: list[torch.Tensor], chunk_size: int) -> tuple[LambdaStream, float]:
    """A stream fed `prompts` (a batch when several) and the seconds the feed took."""
    stream = LambdaStream(model, chunk_size=chunk_size)
    start = time.perf_counter()
    stream.feed(prompts if len(prompts) > 1 else prompts[0])
    return stream, time.perf_counter() - start


def timed_next(steps, clock: list[float]):
    start = time.perf_counter()
    value = next(steps)
    clock[0] += time.perf_counter() - start
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=DEFAULT_LENGTHS, help="prompt lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per sequence")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tokenizer = load_model(dtype=DTYPES[args.dtype])
    lminf_hf.enable(model)
    prompts = prompts_of(default_corpus_tokens(tokenizer, 2 * max(lengths)), lengths)
    prompt_tokens, generated = sum(lengths), len(lengths) * args.new_tokens

    with torch.inference_mode():
        warm, _ = prefilled(model, [prompts[0][:64], prompts[1][:32]], args.chunk_size)  # allocator, threads
        list(warm.generate(2))
        batch, batch_prefill = prefilled(model, prompts, args.chunk_size)
        singles, alone_prefill = [], 0.0
        for prompt in prompts:
            single, seconds = prefilled(model, [prompt], args.chunk_size)
            singles.append(single)
            alone_prefill += seconds
        batch_clock, alone_clock = [0.0], [0.0]
        batch_steps = batch.generate(args.new_tokens)
        single_steps = [single.generate(args.new_tokens) for single in singles]
        batch_tokens, alone_tokens = [[] for _ in prompts], [[] for _ in prompts]
        for _ in range(args.new_tokens):
            for tokens, token in zip(batch_tokens, timed_next(batch_steps, batch_clock)):
                tokens.append(token)
            for tokens, steps in zip(alone_tokens, single_steps):
                tokens.append(timed_next(steps, alone_clock))
        batch_decode, alone_decode = batch_clock[0], alone_clock[0]
    if batch_tokens != alone_tokens:
        raise SystemExit(f"the batch's greedy tokens differ from one by one:\n{batch_tokens}\n{alone_tokens}")

    rows = {
        "batched": dict(prefill_s=batch_prefill, decode_s=batch_decode),
        "one_by_one": dict(prefill_s=alone_prefill, decode_s=alone_decode),
    }
    for row in rows.values():
        row["prefill_tokens_per_s"] = prompt_tokens / row["prefill_s"]
        row["decode_tokens_per_s"] = generated / row["decode_s"]
    ratios = {what: rows["batched"][f"{what}_tokens_per_s"] / rows["one_by_one"][f"{what}_tokens_per_s"]
              for what in ("prefill", "decode")}
    print(f"{len(lengths)} prompts {lengths} ({prompt_tokens} tokens), {args.new_tokens} new tokens each, "
          f"{args.dtype}, {torch.get_num_threads()} threads; greedy tokens identical")
    print(f"{'':<12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, row in rows.items():
        print(f"{name:<12} {row['prefill_tokens_per_s']:>14.1f} {row['decode_tokens_per_s']:>13.2f}")
    print(f"{'ratio':<12} {ratios['prefill']:>14.2f} {ratios['decode']:>13.2f}")
    if args.json:
        write_json(args.json, dict(lengths=lengths, new_tokens=args.new_tokens, dtype=args.dtype,
                                   chunk_size=args.chunk_size, threads=torch.get_num_threads(),
                                   rows=rows, ratios=ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
