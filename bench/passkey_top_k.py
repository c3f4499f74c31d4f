"""Passkey retrieval with top-k middle attention: a sweep of its settings against the
truncated window and pure LM-Infinite, on the default model (or --model).

Each prompt's prefix (all but its last --rows tokens) is read once with pure LM-Infinite into
a stream whose every layer keeps a middle store; each setting then forks that stream and
reads the last tokens (top-k on every one of them) and the answer with its own top-k options.
Top-k only acts on those rows, so this gives exactly what a fresh run per setting would, at a
fraction of the cost. --rows 1 is the official variant (the last row of the forward).

    python bench/passkey_top_k.py --lengths 16384 --samples 20
    python bench/passkey_top_k.py --lengths 16384 32768 --samples 20 --k 1 5 20 --first-layers 0 4 --distances 0 4096 8192
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.eval.passkey import build_passkey_prompt, passkey_answer
from lm_infinite.hf.families import training_length
from lm_infinite.hf.state import state_of
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream


def truncated_answer(model, tokenizer, ids, window, max_new_tokens) -> str:
    with torch.inference_mode():
        context = ids[-window:][None]
        out = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, context.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--samples", type=int, default=20, help="prompts per length, depths spread evenly")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--first-layers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--distances", type=int, nargs="+", default=None,
                        help="top-k placement distances (default: 0, n_local/2, n_local)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1],
                        help="how many trailing prompt tokens use top-k (1: the official variant)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    n_local = training_length(model.config)
    distances = args.distances or [0, n_local // 2, n_local]
    settings = list(itertools.product(args.k, args.first_layers, distances, args.rows))
    tail = max(args.rows)
    rng = random.Random(args.seed)
    records = []
    for length in args.lengths:
        for sample in range(args.samples):
            depth = (sample + 0.5) / args.samples
            prompt = build_passkey_prompt(tokenizer, length, depth, rng.randint(1, 50000))
            ids = prompt.ids

            def record(method, text, **extra):
                answer = passkey_answer(text)
                records.append(dict(length=length, depth=depth, key=prompt.key, method=method, answer=answer,
                                    correct=answer == prompt.key, continuation=text, **extra))

            start = time.perf_counter()
            # The window leaves room for the answer inside the training length.
            record("truncated", truncated_answer(model, tokenizer, ids, n_local - args.max_new_tokens,
                                                 args.max_new_tokens))
            # Every layer keeps a middle store; top-k stays off while the prefix is read.
            lminf_hf.enable(model, top_k_middle=1, top_k_first_layer=0)
            state = state_of(model)
            prefix = LambdaStream(model, chunk_size=args.chunk_size)
            state.top_k, state.top_k_rows = 0, "all"
            prefix.feed(ids[None, :-tail])
            for method, (k, first_layer, distance, rows) in [("lm-infinite", (0, 0, 0, 1))] + [
                    ("lm-infinite+top-k", s) for s in settings]:
                state.top_k = 0
                stream = prefix.fork()
                if rows < tail:
                    stream.feed(ids[None, -tail:-rows])
                state.top_k, state.top_k_first_layer, state.top_k_distance = k, first_layer, distance
                stream.feed(ids[None, -rows:])  # one chunk: top-k on each of its rows
                text = tokenizer.decode(list(stream.generate(args.max_new_tokens)), skip_special_tokens=True)
                record(method, text, top_k=k, first_layer=first_layer, distance=distance, rows=rows)
            lminf_hf.disable(model)
            print(f"length {length} sample {sample + 1}/{args.samples} depth {depth:.2f}: "
                  f"{time.perf_counter() - start:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "passkey_top_k.json").write_text(json.dumps(records, indent=2))
    print_table(records, args.lengths)


def print_table(records, lengths) -> None:
    keys = []
    for r in records:
        key = (r["method"], r.get("top_k"), r.get("first_layer"), r.get("distance"), r.get("rows"))
        if key not in keys:
            keys.append(key)
    print("\n| method | k | first layer | distance | rows | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|---|---|---|---|" + "---|" * len(lengths))
    for method, k, first_layer, distance, rows in keys:
        cells = []
        for n in lengths:
            sel = [r for r in records if r["length"] == n and r["method"] == method and r.get("top_k") == k
                   and r.get("first_layer") == first_layer and r.get("distance") == distance
                   and r.get("rows") == rows]
            cells.append(f"{sum(r['correct'] for r in sel)}/{len(sel)}")
        top_k = method.endswith("top-k")
        print(f"| {method} | {k if top_k else ''} | {first_layer if top_k else ''} | "
              f"{distance if top_k else ''} | {rows if top_k else ''} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
