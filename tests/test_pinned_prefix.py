"""A pinned prefix (LambdaStream(pinned_tokens=P)): the stream's first P tokens stay global.

The reference is the float64 one of the model enabled with n_global = max(G, P): a pinned
stream must compute exactly what LM-Infinite with that many global tokens computes, on every
Λ layer, while the layers the model restricts to a sliding window (Gemma 3) keep their window.
"""

import pytest
import torch

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build, reference_logits
from lm_infinite.hf.cache import MAX_PINNED_TOKENS
from lm_infinite.saved_stream import FORMAT_VERSION
from lm_infinite.streaming import LambdaStream, decode_rows

N_GLOBAL, N_LOCAL, PINNED = 2, 16, 7


def _ids(n, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_pinned_stream_computes_lm_infinite_with_that_many_global_tokens(family):
    ids = _ids(5 * N_LOCAL)
    model = lminf_hf.enable(build(family), n_global=N_GLOBAL, n_local=N_LOCAL)
    reference = reference_logits(lminf_hf.enable(build(family), n_global=PINNED, n_local=N_LOCAL), ids)[0]
    # Token by token (the decode path) ...
    stream = LambdaStream(model, pinned_tokens=PINNED)
    logits = torch.stack([stream.feed(ids[:, t:t + 1])[0] for t in range(ids.shape[1])])
    torch.testing.assert_close(logits, reference.float(), atol=2e-4, rtol=2e-4)
    # ... and in chunks that straddle the pinned prefix and the window (the prefill path).
    nll = LambdaStream(model, chunk_size=5, pinned_tokens=PINNED).nll(ids)[0, 1:]
    expected = -torch.log_softmax(reference[:-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(nll.double(), expected, atol=2e-4, rtol=2e-4)
    # ... and what the unpinned model computes differs once the pinned tokens left the window.
    unpinned = reference_logits(model, ids)[0]
    assert (reference[N_LOCAL + PINNED:] - unpinned[N_LOCAL + PINNED:]).abs().max() > 1e-3
    torch.testing.assert_close(reference[:N_LOCAL], unpinned[:N_LOCAL].to(reference.dtype))


def test_sliding_layers_keep_their_window_and_lambda_layers_widen():
    model = lminf_hf.enable(build("gemma3"), n_global=N_GLOBAL, n_local=N_LOCAL)
    stream = LambdaStream(model, pinned_tokens=PINNED)
    state = model._lm_infinite
    for index, layer in enumerate(stream.cache.layers):
        rule = state.layer(index)
        assert layer.n_global == (0 if rule.sliding else PINNED), index
    assert any(state.layer(i).sliding for i in range(len(stream.cache.layers)))


def test_pinning_fewer_tokens_than_n_global_changes_nothing():
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    ids = _ids(4 * N_LOCAL)
    plain, pinned = LambdaStream(model), LambdaStream(model, pinned_tokens=N_GLOBAL - 1)
    assert torch.equal(plain.feed(ids), pinned.feed(ids))
    assert list(plain.generate(10)) == list(pinned.generate(10))


def test_generation_and_batched_decode_follow_the_pin():
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    wide = lminf_hf.enable(build("llama"), n_global=PINNED, n_local=N_LOCAL)
    prompt = _ids(3 * N_LOCAL)
    pinned, reference = LambdaStream(model, pinned_tokens=PINNED), LambdaStream(wide)
    pinned.feed(prompt), reference.feed(prompt)
    assert list(pinned.generate(20)) == list(reference.generate(20))
    # A batched decode step of a pinned and an unpinned conversation: each row as alone.
    alone = [LambdaStream(model, pinned_tokens=PINNED), LambdaStream(model)]
    rows = [LambdaStream(model, pinned_tokens=PINNED), LambdaStream(model)]
    for stream in alone + rows:
        stream.feed(prompt)
    for token in (5, 9, 13):
        expected = torch.cat([stream.feed(torch.tensor([[token]])) for stream in alone])
        torch.testing.assert_close(decode_rows(rows, [token, token]), expected, atol=1e-5, rtol=1e-5)


def test_a_saved_pinned_stream_loads_with_its_pin(tmp_path):
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    stream = LambdaStream(model, pinned_tokens=PINNED)
    stream.feed(_ids(3 * N_LOCAL))
    stream.save(tmp_path / "s.lminf")
    loaded = LambdaStream.load(tmp_path / "s.lminf", model)
    assert loaded.pinned_tokens == PINNED
    more = _ids(N_LOCAL, seed=2)
    assert torch.equal(stream.feed(more), loaded.feed(more))
    with pytest.raises(ValueError, match=f"saved with pinned_tokens={PINNED}, not 0"):
        LambdaStream.load(tmp_path / "s.lminf", model, pinned_tokens=0)


def test_a_version_1_file_loads_unpinned(tmp_path):
    assert FORMAT_VERSION == 2
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    stream = LambdaStream(model)
    stream.feed(_ids(2 * N_LOCAL))
    stream.save(tmp_path / "s.lminf")
    state = torch.load(tmp_path / "s.lminf", weights_only=True)
    del state["pinned_tokens"]
    state["format_version"] = 1
    torch.save(state, tmp_path / "v1.lminf")
    loaded = LambdaStream.load(tmp_path / "v1.lminf", model)
    assert loaded.pinned_tokens == 0
    more = _ids(N_LOCAL, seed=3)
    assert torch.equal(stream.feed(more), loaded.feed(more))


@pytest.mark.parametrize("value", [-1, 1.5, True, "7", MAX_PINNED_TOKENS + 1])
def test_bad_pinned_tokens_are_refused_by_name(value):
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    with pytest.raises(ValueError, match=rf"pinned_tokens must be an int in \[0, {MAX_PINNED_TOKENS}\]"):
        LambdaStream(model, pinned_tokens=value)
