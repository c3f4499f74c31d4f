"""The paged middle store and the retrieval preset through the Hugging Face integration and
the CLI: with every block fetched a stream gives the exact store's logits, with few blocks it
still runs within its bound, beam reordering reaches the store, and the preset sets exactly
what hf/presets.py documents."""

import json
from dataclasses import replace

import pytest
import torch

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build
from lm_infinite.apps.cli import main
from lm_infinite.hf import LambdaSettings, TopK, state_of
from lm_infinite.paged_middle import PagedMiddleStore
from lm_infinite.streaming import LambdaStream
from tiny_model_dir import save_tiny_model

N_GLOBAL, N_LOCAL = 2, 10
TOP_K = TopK(k=3, first_layer=1, distance=5, rows=16)


def _ids(length, seed=5):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def paged_enabled(**store):
    top_k = replace(TOP_K, store="paged", **store)
    return lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=top_k))


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_stream_with_every_block_fetched_equals_the_exact_store(chunk_size):
    exact = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TOP_K))
    paged = paged_enabled(blocks=1000, block_size=4)
    ids = _ids(150)
    expected = LambdaStream(exact, chunk_size=chunk_size).nll(ids)
    stream = LambdaStream(paged, chunk_size=chunk_size)
    torch.testing.assert_close(stream.nll(ids), expected, atol=0, rtol=0, equal_nan=True)
    stores = [layer.ring.middle for layer in stream.cache.layers if layer.ring.middle is not None]
    assert stores and all(isinstance(store, PagedMiddleStore) for store in stores)


def test_bounded_offloaded_store_stays_within_its_bound():
    model = paged_enabled(blocks=2, block_size=4, max_middle_tokens=32, offload=True)
    stream = LambdaStream(model, chunk_size=16)
    stream.feed(_ids(200))
    tokens = list(stream.generate(4))
    assert len(tokens) == 4
    for layer in stream.cache.layers[TOP_K.first_layer:]:
        store = layer.ring.middle
        assert store.length <= 32 and store.dropped_blocks > 0 and store.offload


def test_beam_reorder_reaches_the_paged_store():
    model = paged_enabled(blocks=2, block_size=4)
    ids = torch.cat([_ids(60, seed=1), _ids(60, seed=2)])
    stream = LambdaStream(model, chunk_size=16)
    stream.feed(ids)
    with torch.inference_mode():  # the stream's tensors are inference tensors
        stream.cache.reorder_cache(torch.tensor([1, 1]))
    twin = LambdaStream(model, chunk_size=16)
    twin.feed(ids[[1, 1]])
    for layer, other in zip(stream.cache.layers[1:], twin.cache.layers[1:]):
        torch.testing.assert_close(layer.ring.middle.k, other.ring.middle.k, atol=0, rtol=0)
        torch.testing.assert_close(layer.ring.middle.kmax, other.ring.middle.kmax, atol=0, rtol=0)
    step = torch.tensor([[3], [3]])
    torch.testing.assert_close(stream.feed(step), twin.feed(step), atol=0, rtol=0)


def test_retrieval_preset_sets_the_documented_values_and_explicit_ones_override():
    model = lminf_hf.enable(build("llama"), n_local=64, preset="retrieval")
    state = state_of(model)
    assert (state.distance_cap, state.top_k, state.top_k_first_layer, state.top_k_distance,
            state.top_k_rows) == (16, 5, min(4, state.num_layers - 1), 32, 64)
    assert state.top_k_store == "paged"
    assert dict(state.top_k_store_options) == dict(top_k_blocks=8, block_size=64, max_middle_tokens=None,
                                                   offload=False)
    retrieval = LambdaSettings.preset("retrieval", model, n_local=64)
    state = state_of(lminf_hf.enable(model, replace(retrieval, distance_cap=64,
                                                    top_k=replace(retrieval.top_k, store="exact"))))
    assert (state.distance_cap, state.top_k_store, state.top_k_store_options) == (64, "exact", ())
    default = state_of(lminf_hf.enable(model, n_local=64))
    assert (default.distance_cap, default.top_k, default.top_k_store) == (64, 0, "exact")
    with pytest.raises(ValueError, match="preset"):
        lminf_hf.enable(model, preset="fast")
    with pytest.raises(ValueError, match="max_middle_tokens and offload need the 'paged' top-k store"):
        lminf_hf.enable(model, LambdaSettings(top_k=TopK(k=5, max_middle_tokens=1024)))


def test_cli_preset_retrieval(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    out = tmp_path / "passkey.json"
    status = main(["passkey", "--model", str(model_dir), "--lengths", "200", "--depths", "0",
                   "--methods", "lm-infinite,lm-infinite+top-k", "--max-new-tokens", "2",
                   "--preset", "retrieval", "--n-local", "64", "--no-progress", "--json", str(out)])
    assert status == 0
    settings = json.loads(out.read_text())["settings"]
    assert {k: settings[k] for k in ("preset", "distance_cap", "top_k_middle", "top_k_distance",
                                     "top_k_rows", "top_k_store", "top_k_blocks")} == dict(
        preset="retrieval", distance_cap=16, top_k_middle=5, top_k_distance=32, top_k_rows=64,
        top_k_store="paged", top_k_blocks=8)
