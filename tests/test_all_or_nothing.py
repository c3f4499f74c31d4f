"""State changes are all-or-nothing: a refused feed, append or reorder leaves the stream and
the cache exactly as they were; the top-k middle store follows beam reordering."""

import copy

import pytest
import torch

import lm_infinite as li
import lm_infinite.hf as lminf_hf
from lm_infinite.hf import LambdaSettings, TopK
from hf_tiny_models import VOCAB, build
from lm_infinite.streaming import LambdaStream


def _ids(length, seed=3):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return lminf_hf.enable(build("llama"), n_global=2, n_local=10)


def test_a_bad_id_in_a_later_chunk_leaves_the_stream_unfed(model):
    """The out-of-vocabulary id sat in the second chunk: the first chunk used to stay fed."""
    stream = LambdaStream(model, chunk_size=4)
    stream.feed(_ids(6))
    before = copy.deepcopy(stream.cache), stream.next_logits.clone()
    bad = _ids(9, seed=4)
    bad[0, 6] = VOCAB
    with pytest.raises(ValueError, match=f"input_ids must be token ids in \\[0, {VOCAB}\\).*got {VOCAB}"):
        stream.feed(bad)
    with pytest.raises(ValueError, match="got -1"):
        stream.nll(torch.tensor([[1, 2, -1]]))
    assert stream.position == 6
    torch.testing.assert_close(stream.next_logits, before[1])
    for layer, old in zip(stream.cache.layers, before[0].layers):
        torch.testing.assert_close(layer.ring.k, old.ring.k)
        assert torch.equal(layer.ring.positions, old.ring.positions)
    # And it continues exactly as an unbroken stream.
    fresh = LambdaStream(model, chunk_size=4)
    fresh.feed(_ids(6))
    torch.testing.assert_close(stream.feed(_ids(5, seed=5)), fresh.feed(_ids(5, seed=5)))


@pytest.mark.parametrize("bad,error,message", [
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids"),
    ({"input_ids": [1, 2]}, TypeError, "must be a torch.Tensor"),
    ([[1, 2, VOCAB]], ValueError, "token ids in"),  # a list of sequences, checked whole too
    (torch.zeros(2, 3, dtype=torch.int64), ValueError, "continue the stream's batch of 1"),
])
def test_feed_refuses_malformed_ids_before_any_change(model, bad, error, message):
    stream = LambdaStream(model)
    stream.feed(_ids(3))
    with pytest.raises(error, match=message):
        stream.feed(bad)
    assert stream.position == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature must be a finite number >= 0"),
])
def test_generate_refuses_bad_settings(model, kwargs, message):
    stream = LambdaStream(model)
    stream.feed(_ids(3))
    with pytest.raises(ValueError, match=message):
        list(stream.generate(**kwargs))
    assert stream.position == 3


def test_a_refused_append_changes_nothing_in_ring_or_middle_store():
    cache = li.RingKVCache(1, 2, 8, n_global=2, n_local=4, keep_middle=True)
    cache.append(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    state = [t.clone() for t in (cache.k, cache.v, cache.positions, cache.next_position, cache.middle.k)]
    for k, v in [(torch.randn(1, 2, 3, 7), torch.randn(1, 2, 3, 7)),  # head_dim
                 (torch.randn(1, 2, 3, 8), torch.randn(1, 2, 2, 8)),  # v's shape
                 (torch.randn(1, 2, 3, 8, dtype=torch.float64),) * 2]:  # dtype
        with pytest.raises(RuntimeError):
            cache.append(k, v)
    for old, new in zip(state, (cache.k, cache.v, cache.positions, cache.next_position, cache.middle.k)):
        assert torch.equal(old, new)
    assert cache.n_seen == 5 and cache.middle.length == 3


def test_reorder_moves_the_middle_store_with_the_ring():
    """Beam search with top-k left the middle store unreordered."""
    cache = li.RingKVCache(3, 1, 4, n_global=1, n_local=2, keep_middle=True)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 6, 4).contiguous()
    cache.append(k, k + 10)
    cache.reorder(torch.tensor([2, 2, 0]))
    assert cache.k[:, 0, 0, 0].tolist() == [2, 2, 0]
    assert cache.middle.v[:, 0, 0, 0].tolist() == [12, 12, 10]
    for bad in (torch.tensor([0, 1]), torch.tensor([0, 1, 3]), torch.tensor([0.0, 1.0, 2.0]), [0, 1, 2]):
        with pytest.raises(ValueError, match="beam_idx must"):
            cache.reorder(bad)
    assert cache.k[:, 0, 0, 0].tolist() == [2, 2, 0]


def test_hf_reorder_cache_reorders_the_middle_store():
    model = lminf_hf.enable(build("llama"), LambdaSettings(1, 4, top_k=TopK(k=2, first_layer=0)))
    cache = lminf_hf.LambdaCache(model)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, **{lminf_hf.cache_argument_name(model): cache})
    layer = cache.layers[0]
    before = layer.ring.middle.k.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.ring.middle.k, before.flip(0))


def test_top_k_first_layer_past_the_last_layer_is_refused():
    """It silently turned top-k off."""
    with pytest.raises(ValueError, match=r"top_k.first_layer must be an int in \[0, 1\], got 99"):
        lminf_hf.enable(build("llama"), LambdaSettings(top_k=TopK(k=5, first_layer=99)))


def test_enable_with_a_huge_window_fails_cleanly():
    """n_local = 2^62 used to abort the process at the first forward: now enable refuses it,
    and a window just small enough fails at the cache's allocation, not in a kernel."""
    with pytest.raises(ValueError, match=r"n_global \+ n_local must be at most 2\^62, got 10 \+ 4611686018427387904"):
        lminf_hf.enable(build("llama"), n_local=2**62)
    model = lminf_hf.enable(build("llama"), n_local=2**62 - 10)
    ids = _ids(5)
    with torch.no_grad():
        with pytest.raises(MemoryError, match="RingKVCache .* more than int64 can address"):
            model(ids)
        # Without a cache it is plain causal attention: the stock model's logits.
        out = model(ids, use_cache=False).logits
    lminf_hf.disable(model)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids, use_cache=False).logits, atol=1e-4, rtol=1e-4)


def test_ring_cache_too_large_for_memory_is_a_memory_error():
    with pytest.raises(MemoryError, match="RingKVCache"):
        li.RingKVCache(1, 1, 8, n_local=10**15)
    with pytest.raises(ValueError, match=r"n_local must be an int in \[1, 2\^62\]"):
        li.RingKVCache(1, 1, 8, n_local=2**63)
