"""A batch of prompts of different lengths through LambdaStream, against one prompt at a time (CPU).

Eight prompts of mixed lengths (1K-12K tokens of pydoc text, by default) on SmolLM2-135M with
LM-Infinite: prefill and greedy decode of the whole batch in one stream, and of each prompt in a
stream of its own, in the same run. Tokens/s count real tokens only (prefill: prompt tokens;
decode: generated tokens of all sequences). The batch's greedy tokens are checked against the
one-by-one run (they must be identical). The CPU is shared in development, so only the ratios
measured side by side mean anything.

    nice -n -10 python bench/batch_cpu.py --new-tokens 32 --json bench/results/batch_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.cli.common import DTYPES
from lm_infinite.eval.corpus import default_corpus_tokens
from lm_infinite.eval.report import write_json
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


def run_stream(model, prompts: list[torch.Tensor], new_tokens: int, chunk_size: int):
    """(prefill seconds, decode seconds, tokens per sequence) of one stream over `prompts`
    (a batch when several)."""
    stream = LambdaStream(model, chunk_size=chunk_size)
    start = time.perf_counter()
    stream.feed(prompts if len(prompts) > 1 else prompts[0])
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    steps = list(stream.generate(new_tokens))
    decode = time.perf_counter() - start
    if len(prompts) == 1:
        return prefill, decode, [steps]
    return prefill, decode, [[step[b] for step in steps] for b in range(len(prompts))]


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
        run_stream(model, [prompts[0][:64]], 2, args.chunk_size)  # warm-up: allocator, threads
        batch_prefill, batch_decode, batch_tokens = run_stream(model, prompts, args.new_tokens, args.chunk_size)
        alone_prefill = alone_decode = 0.0
        alone_tokens = []
        for prompt in prompts:
            prefill, decode, tokens = run_stream(model, [prompt], args.new_tokens, args.chunk_size)
            alone_prefill, alone_decode = alone_prefill + prefill, alone_decode + decode
            alone_tokens += tokens
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
