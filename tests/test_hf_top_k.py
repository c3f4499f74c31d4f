"""Top-k middle attention through the Hugging Face integration: the float64 reference, the
cacheless forward and the chunked stream all agree, and only the chosen rows change."""

from dataclasses import replace

import pytest
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.hf import LambdaSettings, TopK
from hf_tiny_models import VOCAB, build, reference_logits
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL = 2, 10
TOP_K = TopK(k=3, first_layer=1, distance=5)


def _ids(length, seed=5):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "qwen3", "phi3-partial"])
def models(request):
    plain = lminf_hf.enable(build(request.param), n_global=N_GLOBAL, n_local=N_LOCAL)
    top_k = lminf_hf.enable(build(request.param), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TOP_K))
    return plain, top_k


def test_whole_forward_matches_reference_and_changes_only_the_last_row(models):
    plain, top_k = models
    ids = _ids(6 * N_LOCAL)
    with torch.no_grad():
        expected_plain = plain(ids, use_cache=False).logits
        actual = top_k(ids, use_cache=False).logits
    torch.testing.assert_close(actual, reference_logits(top_k, ids), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(actual[:, :-1], expected_plain[:, :-1], atol=1e-5, rtol=1e-5)
    assert (actual[:, -1] - expected_plain[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_stream_uses_top_k_for_the_prompt_end_only(models, chunk_size):
    _, top_k = models
    ids = _ids(5 * N_LOCAL + 3)
    with torch.no_grad():
        expected = top_k(ids, use_cache=False).logits[:, -1]
    stream = LambdaStream(top_k, chunk_size=chunk_size)
    torch.testing.assert_close(stream.feed(ids), expected, atol=2e-4, rtol=1e-4)
    # Generated tokens use top-k too: each equals a whole forward's greedy choice.
    tokens = list(stream.generate(3))
    seen = ids
    for token in tokens:
        with torch.no_grad():
            assert token == int(top_k(seen, use_cache=False).logits[0, -1].argmax())
        seen = torch.cat([seen, torch.tensor([[token]])], dim=1)


def test_only_top_k_layers_keep_a_middle_store(models):
    _, top_k = models
    stream = LambdaStream(top_k, chunk_size=16)
    stream.feed(_ids(40))
    kept = [layer.ring.middle is not None for layer in stream.cache.layers]
    assert kept == [i >= TOP_K.first_layer for i in range(len(kept))]


@pytest.mark.parametrize("rows", [4, "all"])
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_trailing_rows_use_top_k_in_a_whole_forward_and_in_a_stream(rows, chunk_size):
    plain = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    top_k = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=replace(TOP_K, rows=rows)))
    ids = _ids(5 * N_LOCAL + 3)
    with torch.no_grad():
        expected_plain = plain(ids, use_cache=False).logits
        whole = top_k(ids, use_cache=False).logits
    torch.testing.assert_close(whole, reference_logits(top_k, ids), atol=2e-4, rtol=1e-4)
    first_changed = ids.shape[1] - 4 if rows == 4 else N_LOCAL + N_GLOBAL  # earlier rows see no middle
    torch.testing.assert_close(whole[:, :first_changed], expected_plain[:, :first_changed], atol=1e-5, rtol=1e-5)
    assert (whole[:, first_changed:] - expected_plain[:, first_changed:]).abs().amax(-1).min() > 1e-4
    # A stream counts the trailing rows over its whole input, however it is chunked.
    expected_nll = -torch.log_softmax(whole[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    actual_nll = LambdaStream(top_k, chunk_size=chunk_size).nll(ids)[0, 1:]
    torch.testing.assert_close(actual_nll, expected_nll, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("option,value", [("k", -1), ("rows", "first"), ("rows", 0), ("distance", -3),
                                          ("first_layer", 1.5)])
def test_enable_rejects_bad_top_k_options(option, value):
    with pytest.raises(ValueError, match=f"top_k.{option} must be"):
        lminf_hf.enable(build("llama"), LambdaSettings(top_k=TopK(**{option: value})))


def test_the_old_top_k_keywords_still_work_and_warn():
    old = pytest.deprecated_call(match="top_k_distance, top_k_first_layer, top_k_middle are deprecated")
    with old:
        model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL, top_k_middle=3,
                                top_k_first_layer=1, top_k_distance=5)
    new = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TOP_K))
    assert lminf_hf.state_of(model).settings == lminf_hf.state_of(new).settings
