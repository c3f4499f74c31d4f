"""Passkey retrieval with top-k middle attention: a sweep of its settings against the stock
model, the truncated window and pure LM-Infinite, on the default model (or --model).

For each prompt and distance_cap, the prefix (all but the last max(--rows) tokens) is read once
with pure LM-Infinite into a stream whose every layer keeps a middle store. Each setting forks
that stream, reads the last tokens (top-k on the last `rows` of them) and generates the answer
with its own top-k options (every generated token uses top-k). Top-k only acts on those rows,
so this gives exactly what a fresh run per setting would, at a fraction of the cost.
--rows 1 is the official variant (the last row of the forward).

    python bench/passkey_top_k.py --lengths 16384 --samples 20
    python bench/passkey_top_k.py --lengths 16384 32768 --samples 20 --k 5 20 --first-layers 0 4 \\
        --distances 2048 4096 --rows 1 64 --device cuda --dtype bfloat16

Records go to --out/passkey_top_k_<lengths>.json after every prompt; a table is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import time
from dataclasses import replace

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import DTYPES
from lm_infinite.apps.eval.passkey import build_passkey_prompt, passkey_answer
from lm_infinite.hf import LambdaSettings, TopK, state_of, training_length
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream


@torch.inference_mode()
def stock_answer(model, tokenizer, ids, max_new_tokens) -> str:
    device = next(model.parameters()).device
    context = ids[None].to(device)
    out = model.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, context.shape[1]:], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory or GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--samples", type=int, default=20, help="prompts per length, depths spread evenly")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--first-layers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--distances", type=int, nargs="+", default=None,
                        help="top-k placement distances (default: n_local/4, n_local/2)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64],
                        help="how many trailing prompt tokens use top-k (1: the official variant)")
    parser.add_argument("--distance-caps", type=int, nargs="+", default=None,
                        help="LM-Infinite distance caps (default: n_local)")
    parser.add_argument("--store", choices=["exact", "paged"], default="exact",
                        help="top-k middle store (paged: blocks chosen through summaries)")
    parser.add_argument("--top-k-blocks", type=int, default=8, help="paged store: blocks per head")
    parser.add_argument("--block-size", type=int, default=64, help="paged store: tokens per block")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock model (slow on a CPU)")
    parser.add_argument("--no-truncated", action="store_true", help="skip the truncated window")
    parser.add_argument("--only-samples", type=int, nargs="+", default=None,
                        help="run these sample indices only (same prompts as in the full run)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results"))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    n_local = training_length(model.config)
    distances = args.distances or [n_local // 4, n_local // 2]
    caps = args.distance_caps or [n_local]
    settings = list(itertools.product(args.k, args.first_layers, distances, args.rows))
    tail = max(args.rows)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"passkey_top_k_{'_'.join(map(str, args.lengths))}{'_paged' if args.store == 'paged' else ''}.json"
    meta = dict(model=args.model or "SmolLM2-135M-Instruct (default)", device=str(args.device),
                dtype=args.dtype, n_local=n_local, chunk_size=args.chunk_size,
                max_new_tokens=args.max_new_tokens, store=args.store)
    store = dict(store=args.store)
    if args.store == "paged":
        store.update(blocks=args.top_k_blocks, block_size=args.block_size)
        meta.update(top_k_blocks=args.top_k_blocks, block_size=args.block_size)
    records = []
    for length in args.lengths:
        for sample in range(args.samples):
            depth = (sample + 0.5) / args.samples
            key = rng.randint(1, 50000)
            if args.only_samples is not None and sample not in args.only_samples:
                continue
            prompt = build_passkey_prompt(tokenizer, length, depth, key)
            ids = prompt.ids

            def record(method, text, **extra):
                answer = passkey_answer(text)
                records.append(dict(length=length, prompt_tokens=ids.numel(), depth=depth, key=prompt.key,
                                    method=method, answer=answer, correct=answer == prompt.key,
                                    continuation=text, **extra))

            start = time.perf_counter()
            if not args.no_stock:
                record("stock", stock_answer(model, tokenizer, ids, args.max_new_tokens))
            if not args.no_truncated:  # the window leaves room for the answer inside the training length
                record("truncated", stock_answer(model, tokenizer, ids[-(n_local - args.max_new_tokens):],
                                                 args.max_new_tokens))
            for cap in caps:
                # Every layer keeps a middle store; top-k stays off while the prefix is read.
                lminf_hf.enable(model, LambdaSettings(distance_cap=cap, top_k=TopK(k=1, first_layer=0, **store)))
                prefix = LambdaStream(model, chunk_size=args.chunk_size)
                state = state_of(model)
                switch_top_k(state, prefix, k=0)
                prefix.feed(ids[None, :-tail])
                for method, (k, first_layer, distance, rows) in [("lm-infinite", (0, 0, 0, 1))] + [
                        ("lm-infinite+top-k", s) for s in settings]:
                    stream = prefix.fork()
                    switch_top_k(state, stream, k=k, first_layer=first_layer, distance=distance, rows=rows)
                    stream.feed(ids[None, -tail:])  # top-k on its last `rows` rows
                    text = tokenizer.decode(list(stream.generate(args.max_new_tokens)),
                                            skip_special_tokens=True)
                    record(method, text, distance_cap=cap, **(
                        dict(top_k=k, first_layer=first_layer, distance=distance, rows=rows) if k else {}))
                lminf_hf.disable(model)
            path.write_text(json.dumps(dict(meta, records=records), indent=1))
            print(f"length {length} sample {sample + 1}/{args.samples} depth {depth:.2f}: "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    print_table(records, args.lengths)


def switch_top_k(state, stream, *, k, first_layer=0, distance=0, rows=1) -> None:
    """Change the top-k settings of an enabled model in place, and its stream's cache with it:
    the sweep reads one prefix (every layer keeping its middle store) and then tries each
    setting on a fork of it, which enable() (a fresh state, a fresh cache) cannot do."""
    state.settings = replace(state.settings, top_k=k, top_k_first_layer=first_layer, top_k_distance=distance,
                             top_k_rows=rows)
    stream.cache.settings = state.settings


def setting_of(r: dict) -> tuple:
    return (r["method"], r.get("distance_cap"), r.get("top_k"), r.get("first_layer"), r.get("distance"),
            r.get("rows"))


def print_table(records, lengths) -> None:
    keys = list(dict.fromkeys(setting_of(r) for r in records))
    print("\n| method | distance cap | k | first layer | distance | rows | "
          + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(lengths))
    for key in keys:
        cells = []
        for n in lengths:
            sel = [r for r in records if r["length"] == n and setting_of(r) == key]
            cells.append(f"{sum(r['correct'] for r in sel)}/{len(sel)}" if sel else "")
        print("| " + " | ".join("" if x is None else str(x) for x in key) + " | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
