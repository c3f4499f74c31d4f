"""One rank of test_tensor_parallel: started by torchrun, it loads a model folder with
transformers' tensor-parallel plan and writes what `scenarios` computes to OUT_DIR/rank<R>.pt.
The test computes the same with the model in one process and compares.

    python -m torch.distributed.run --nproc-per-node 2 --standalone tests/tp_worker.py \
        MODEL_DIR UNSPLITTABLE_MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from lm_infinite import enable
from lm_infinite.hf import LambdaCache, LambdaSettings, TopK, UnsupportedModelError, cache_argument_name
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL, CHUNK = 2, 16, 7
TEXT_TOKENS, NEW_TOKENS = 60, 32
SETTINGS = {"lm-infinite": LambdaSettings(N_GLOBAL, N_LOCAL),
            "top-k": LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TopK(k=2, rows=3))}


def text(vocab_size: int) -> torch.Tensor:
    """[1, TEXT_TOKENS] ids, the same on every rank and in the reference process."""
    return torch.randint(0, vocab_size, (1, TEXT_TOKENS), generator=torch.Generator().manual_seed(7))


def kv_bytes(cache: LambdaCache) -> int:
    """Bytes of the keys and values the cache holds (the rings, and top-k's middle stores)."""
    total = 0
    for layer in cache.layers:
        for store in (layer.ring, layer.ring.middle):
            if store is not None:
                total += store.k.nbytes + store.v.nbytes
    return total


@torch.inference_mode()
def scenarios(model, sampling_seed: int) -> dict:
    """For each SETTINGS entry: the logits of one forward over the text (longer than N_LOCAL),
    the NLL and last logits of a chunked LambdaStream, NEW_TOKENS greedy tokens from it and from
    a fork of it, sampled tokens (generator seeded with `sampling_seed`), transformers'
    generate() with a LambdaCache, and the stream's cache size."""
    ids = text(model.config.vocab_size)
    results = {}
    for name, settings in SETTINGS.items():
        enable(model, settings)
        stream = LambdaStream(model, chunk_size=CHUNK)
        nll = stream.nll(ids)
        twin = stream.fork()
        sampler = stream.fork()
        cache = LambdaCache(model)
        generated = model.generate(ids, max_new_tokens=8, do_sample=False,
                                   **{cache_argument_name(model): cache})
        results[name] = dict(
            logits=model(ids).logits,
            nll=nll,
            last_logits=stream.next_logits.clone(),
            greedy=list(stream.generate(NEW_TOKENS)),
            fork_greedy=list(twin.generate(NEW_TOKENS)),
            sampled=list(sampler.generate(NEW_TOKENS, temperature=1.0,
                                          generator=torch.Generator().manual_seed(sampling_seed))),
            hf_generate=generated[0, ids.shape[1]:].tolist(),
            kv_bytes=kv_bytes(stream.cache),
        )
    return results


def main(model_dir: str, unsplittable_dir: str, out_dir: str) -> None:
    model, _ = load_model(model_dir, tensor_parallel=True)
    rank = dist.get_rank()
    # Each rank seeds its sampler differently: the stream must still feed rank 0's tokens.
    results = scenarios(model, sampling_seed=1000 + rank)
    results["tp_size"] = model.tp_size
    unsplittable, _ = load_model(unsplittable_dir, tensor_parallel=True)
    try:
        enable(unsplittable)
        results["unsplittable_error"] = None
    except UnsupportedModelError as error:
        results["unsplittable_error"] = str(error)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
