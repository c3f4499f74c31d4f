"""How much of the exact top-k the paged middle store finds, on a real model's keys.

SmolLM2-135M-Instruct (the default model, float32 on the CPU) reads the first --tokens tokens of
the default corpus (pydoc's topics) under LM-Infinite with the retrieval preset's distance_cap
(n_local / 4; no top-k while reading, so every setting below sees the same keys). Forward hooks
on each layer's q_proj and k_proj keep the unrotated keys of every token and the queries of the
last --rows tokens. Then, for each layer from --first-layer (the preset's top-k layers) and each
head, per query row at position i:

  exact:  the top_k keys of the whole middle (positions n_global <= j <= i - n_local), scored as
          the kernel does, (R_D q) . k with q placed at top_k_distance (n_local / 2);
  paged:  the top_k among the keys of the blocks a PagedMiddleStore (blocks of 64) fetches for
          that row: the union over the layer's query heads of each head's --blocks best blocks,
          which is what the op is handed. "own" counts only the head's own blocks (what a
          per-head fetch would give).

Recall is |paged top-k ∩ exact top-k| / top_k, averaged over layers, heads and rows. Two ways to
select, as the retrieval preset does: "decode" selects for each row alone (a generated token),
"prompt" once for all --rows rows (the prompt's last 64 rows in one forward).

    python bench/middle_store_recall.py --tokens 16384 --blocks 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from lm_infinite import enable
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.hf import decoder_of, training_length
from lm_infinite.models import load_model
from lm_infinite.paged_middle import PagedMiddleStore
from lm_infinite.reference import apply_rotary
from lm_infinite.streaming import LambdaStream

N_GLOBAL, BLOCK_SIZE = 10, 64


def captured_projections(model, tokenizer, n_tokens: int, rows: int, n_local: int, chunk_size: int):
    """Per layer: keys [heads_kv, n_tokens, head_dim] of every token and queries
    [heads_q, rows, head_dim] of the last `rows`, unrotated, as the model computes them under
    LM-Infinite (distance_cap n_local / 4)."""
    decoder = decoder_of(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    keys = [[] for _ in decoder.layers]
    queries = [torch.zeros(0, config.num_attention_heads * head_dim) for _ in decoder.layers]

    def keep_keys(layer):
        return lambda module, args, out: keys[layer].append(out[0].detach().clone())

    def keep_queries(layer):
        def hook(module, args, out):
            queries[layer] = torch.cat([queries[layer], out[0].detach()])[-rows:]
        return hook

    hooks = []
    for index, layer in enumerate(decoder.layers):
        hooks.append(layer.self_attn.k_proj.register_forward_hook(keep_keys(index)))
        hooks.append(layer.self_attn.q_proj.register_forward_hook(keep_queries(index)))
    enable(model, n_global=N_GLOBAL, n_local=n_local, distance_cap=n_local // 4)
    ids = default_corpus_tokens(tokenizer, n_tokens)[None]
    try:
        with torch.inference_mode():
            LambdaStream(model, chunk_size=chunk_size).feed(ids)
    finally:
        for hook in hooks:
            hook.remove()
    heads_kv = config.num_key_value_heads
    return ([torch.cat(k).reshape(n_tokens, heads_kv, head_dim).transpose(0, 1) for k in keys],
            [q.reshape(rows, -1, head_dim).transpose(0, 1) for q in queries])


def top_k_sets(scores: torch.Tensor, allowed: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [heads_q, rows, top_k] of the top_k scores ([heads_q, rows, n]) where allowed."""
    return scores.masked_fill(~allowed, float("-inf")).topk(top_k, dim=-1).indices


def overlap(found: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per (head, row): the fraction of exact's indices that found holds ([heads_q, rows])."""
    return (found[..., :, None] == exact[..., None, :]).any(-2).float().mean(-1)


def layer_recall(keys, queries, inv_freq, *, n_local, top_k, top_k_distance, blocks_list):
    """{blocks: {mode: (union recall, own recall, blocks fetched per selection)}} for one layer."""
    heads_kv, n_tokens, head_dim = keys.shape
    heads_q, rows, _ = queries.shape
    group = heads_q // heads_kv
    stored = n_tokens - rows  # the store holds the tokens before the query rows
    first = stored             # position of the first query row
    placed = apply_rotary(queries, torch.full((rows,), top_k_distance), inv_freq)  # [heads_q, rows, d]
    middle = keys[:, :stored]
    scores = torch.einsum("hgrd,hnd->hgrn", placed.reshape(heads_kv, group, rows, head_dim),
                          middle).reshape(heads_q, rows, stored)
    positions = torch.arange(stored)
    row_positions = first + torch.arange(rows)
    visible = (positions[None] >= N_GLOBAL) & (positions[None] <= (row_positions - n_local)[:, None])
    exact = top_k_sets(scores, visible[None].expand(heads_q, -1, -1), top_k)
    # The store's blocks hold positions N_GLOBAL.. (the first tokens live in the ring).
    block_of = (positions - N_GLOBAL).clamp(min=0) // BLOCK_SIZE
    result = {}
    for blocks in blocks_list:
        store = PagedMiddleStore(1, heads_kv, head_dim, n_global=N_GLOBAL, dtype=torch.float32,
                                 device="cpu", block_size=BLOCK_SIZE, top_k_blocks=blocks)
        store.reserve(0, stored)
        store.append(middle[None], middle[None], 0)
        start_of_slot = store.block_start[: store.n_blocks]
        per_mode = {}
        for mode, selections in (("decode", [(r, r + 1) for r in range(rows)]), ("prompt", [(0, rows)])):
            union_hits, own_hits, fetched = [], [], []
            for lo, hi in selections:
                q = queries[None, :, lo:hi]
                best, chosen = store._best_blocks(q, first + lo, inv_freq, top_k_distance=top_k_distance,
                                                  n_local=n_local)
                own_blocks = (start_of_slot[chosen[0].reshape(heads_q, -1)] - N_GLOBAL) // BLOCK_SIZE  # [heads_q, t]
                own_blocks = own_blocks.masked_fill(best[0].reshape(heads_q, -1) == float("-inf"), -1)
                union = torch.unique(own_blocks[own_blocks >= 0])
                in_union = torch.isin(block_of, union)                                   # [stored]
                in_own = (block_of[None, :, None] == own_blocks[:, None, :]).any(-1)     # [heads_q, stored]
                allowed = visible[None, lo:hi] & in_union[None, None]
                union_hits.append(overlap(top_k_sets(scores[:, lo:hi], allowed.expand(heads_q, -1, -1), top_k),
                                          exact[:, lo:hi]))
                allowed = visible[None, lo:hi] & in_own[:, None]
                own_hits.append(overlap(top_k_sets(scores[:, lo:hi], allowed, top_k), exact[:, lo:hi]))
                fetched.append(union.numel())
            per_mode[mode] = (torch.cat(union_hits, 1).mean().item(), torch.cat(own_hits, 1).mean().item(),
                              sum(fetched) / len(fetched))
        result[blocks] = per_mode
    visible_blocks = int(block_of[(positions >= N_GLOBAL) & (positions <= first - n_local)].max()) + 1
    return result, visible_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=64, help="query rows: the last ROWS tokens")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--first-layer", type=int, default=4)
    parser.add_argument("--n-local", type=int, default=None, help="default: the model's training length")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model()
    n_local = args.n_local or training_length(model.config)
    started = time.perf_counter()
    keys, queries = captured_projections(model, tokenizer, args.tokens, args.rows, n_local, args.chunk_size)
    inv_freq = decoder_of(model).rotary_emb.inv_freq  # the frequencies the cache rotates with
    print(f"captured {len(keys)} layers x {args.tokens} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    layers = range(args.first_layer, len(keys))
    per_layer = {}
    for layer in layers:
        per_layer[layer], visible_blocks = layer_recall(
            keys[layer], queries[layer], inv_freq, n_local=n_local, top_k=args.top_k,
            top_k_distance=n_local // 2, blocks_list=args.blocks)
        print(layer, {b: {m: tuple(round(x, 3) for x in r) for m, r in v.items()}
                      for b, v in per_layer[layer].items()}, flush=True)

    def mean(blocks, mode, index):
        return sum(per_layer[layer][blocks][mode][index] for layer in layers) / len(layers)

    def worst(blocks, mode):
        return min(per_layer[layer][blocks][mode][0] for layer in layers)

    print(f"\n{args.tokens} tokens, layers {args.first_layer}-{len(keys) - 1}, top-{args.top_k}, "
          f"blocks of {BLOCK_SIZE}, {visible_blocks} blocks visible to the first row")
    print("| blocks per head | recall, decode (worst layer) | own blocks only | blocks fetched | "
          f"recall, {args.rows}-row prompt (worst layer) | own blocks only | blocks fetched |")
    print("|---|---|---|---|---|---|---|")
    for b in args.blocks:
        cells = []
        for mode in ("decode", "prompt"):
            cells += [f"{mean(b, mode, 0):.3f} ({worst(b, mode):.3f})", f"{mean(b, mode, 1):.3f}",
                      f"{mean(b, mode, 2):.0f}"]
        print(f"| {b} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(dict(vars(args), json=str(args.json), visible_blocks=visible_blocks,
                                             per_layer=per_layer), indent=1))


if __name__ == "__main__":
    main()
