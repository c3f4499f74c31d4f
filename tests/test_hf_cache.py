"""LambdaCache: chunk independence, bounded memory, generate(), and both cache keywords."""

import inspect

import pytest
import torch
from transformers import DynamicCache

import lm_infinite.hf as lminf_hf
from hf_tiny_models import TRAINING_LENGTH, VOCAB, build

N_GLOBAL, N_LOCAL = 3, 8


@pytest.fixture(scope="module")
def model():
    return lminf_hf.enable(build("qwen3"), n_global=N_GLOBAL, n_local=N_LOCAL)


def _ids(length, batch=2):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(7))


def _feed(model, ids, chunk, cache):
    with torch.no_grad():
        cache_keyword = {lminf_hf.cache_argument_name(model): cache}
        return torch.cat([model(ids[:, i : i + chunk], **cache_keyword).logits
                          for i in range(0, ids.shape[1], chunk)], dim=1)


@pytest.mark.parametrize("chunk", [1, 5, N_LOCAL + N_GLOBAL + 2])
def test_chunked_feeding_equals_whole_forward(model, chunk):
    ids = _ids(5 * N_LOCAL + 3)
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
    cache = lminf_hf.LambdaCache(model)
    torch.testing.assert_close(_feed(model, ids, chunk, cache), whole, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]


def test_memory_is_bounded_by_global_plus_local_tokens(model):
    cache = lminf_hf.LambdaCache(model)
    _feed(model, _ids(N_LOCAL), N_LOCAL, cache)
    size = cache.nbytes()
    _feed(model, _ids(20 * N_LOCAL), 7, cache)
    assert cache.nbytes() == size
    layer = cache.layers[0]
    assert layer.ring.k.shape[-2] == N_GLOBAL + N_LOCAL
    assert cache.get_seq_length() == 21 * N_LOCAL


def test_standard_dynamic_cache_gives_the_same_logits(model):
    """A DynamicCache hands the attention every past key; the result must not change."""
    ids = _ids(4 * N_LOCAL)
    expected = _feed(model, ids, 5, lminf_hf.LambdaCache(model))
    torch.testing.assert_close(_feed(model, ids, 5, DynamicCache(config=model.config)), expected,
                               atol=1e-4, rtol=1e-4)


def test_plain_forward_returns_a_lambda_cache_that_continues_the_stream(model):
    ids = _ids(3 * N_LOCAL)
    with torch.no_grad():
        first = model(ids[:, :N_LOCAL])
        assert isinstance(first.past_key_values, lminf_hf.LambdaCache)
        rest = model(ids[:, N_LOCAL:], **{lminf_hf.cache_argument_name(model): first.past_key_values}).logits
        whole = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat([first.logits, rest], 1), whole, atol=1e-4, rtol=1e-4)


def _greedy_by_recomputation(model, ids, new_tokens):
    with torch.no_grad():
        for _ in range(new_tokens):
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
    return ids


def test_generate_with_lambda_cache_equals_greedy_recomputation(model):
    prompt = _ids(3 * N_LOCAL, batch=1)
    new_tokens = 2 * N_LOCAL  # the window slides during generation
    expected = _greedy_by_recomputation(model, prompt, new_tokens)
    cache_name = lminf_hf.cache_argument_name(model)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                   min_new_tokens=new_tokens, **{cache_name: lminf_hf.LambdaCache(model)})
    assert torch.equal(generated, expected)


@pytest.mark.skipif("cache" not in inspect.signature(build("llama").forward).parameters,
                    reason="this transformers has no `cache=` keyword")
def test_cache_keyword_and_past_key_values_keyword_agree(model):
    ids = _ids(3 * N_LOCAL)
    with torch.no_grad(), pytest.warns(FutureWarning):
        old = model(ids, past_key_values=lminf_hf.LambdaCache(model)).logits
    with torch.no_grad():
        new = model(ids, cache=lminf_hf.LambdaCache(model)).logits
    torch.testing.assert_close(old, new)


def test_windows_far_into_the_stream_do_not_depend_on_absolute_position(model):
    """The same global tokens and probe, after 1 or 9 windows of other filler, give the probe's
    last tokens the same logits: no angle depends on absolute position. (The probe spans the
    receptive field of the last tokens: n_local per layer.)"""
    ids = _ids(12 * N_LOCAL, batch=1)
    probe = ids[:, -(3 * N_LOCAL):]
    short = torch.cat([ids[:, :N_GLOBAL], _ids(N_LOCAL, batch=1), probe], 1)
    long = torch.cat([ids[:, :N_GLOBAL], _ids(9 * N_LOCAL, batch=1), probe], 1)
    a = _feed(model, short, 4, lminf_hf.LambdaCache(model))[:, -4:]
    b = _feed(model, long, 4, lminf_hf.LambdaCache(model))[:, -4:]
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_masks_other_than_left_padding_are_rejected(model):
    """Left padding is taken (tests/test_batching.py); a hole or right padding is refused with
    what is supported, not silently ignored."""
    ids = _ids(6)
    for row, column in ((0, 3), (1, 5)):  # a hole; right padding
        mask = torch.ones_like(ids)
        mask[row, column] = 0
        with pytest.raises(ValueError, match="zeros form a prefix of each row"):
            model(ids, attention_mask=mask)


def test_lambda_cache_needs_an_enabled_model():
    with pytest.raises(ValueError, match="enable"):
        lminf_hf.LambdaCache(build("llama"))
