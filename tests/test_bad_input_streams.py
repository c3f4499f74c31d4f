"""Streams, sampling and caches: what a careless caller passes is refused with a message naming
the argument, or computed correctly; never a silently wrong answer or a traceback from deep
inside. Regression cases of the second attack (issue 25)."""

import pytest
import torch

import lm_infinite as li
import lm_infinite.hf as lminf_hf
from hf_tiny_models import build
from lm_infinite.decode_step import choose_tokens, outside_nucleus
from lm_infinite.streaming import LambdaStream

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    return model


@pytest.fixture
def stream(model):
    stream = LambdaStream(model, chunk_size=5)
    stream.feed(torch.randint(0, VOCAB, (1, 30)))
    return stream


@pytest.mark.parametrize("temperature", [1e-40, 5e-39, 1e-45, 1e-300])
def test_a_tiny_temperature_is_greedy_decoding(stream, temperature):
    """Underflowed in float32: garbage tokens, or token 0 every time."""
    greedy = list(stream.fork().generate(8))
    sampled = list(stream.fork().generate(8, temperature=temperature, generator=torch.Generator().manual_seed(1)))
    assert sampled == greedy


def test_a_tiny_top_p_is_greedy_decoding(stream):
    greedy = list(stream.fork().generate(8))
    for top_p in (1e-50, 1e-45, 1e-12):
        sampled = list(stream.fork().generate(8, temperature=1.0, top_p=top_p,
                                              generator=torch.Generator().manual_seed(2)))
        assert sampled == greedy


def test_choose_tokens_is_defined_for_every_finite_temperature():
    logits = torch.randn(4, 50) * 30
    noise = torch.empty(4, 50).exponential_()
    for temperature in (1e-45, 1e-30, 1e-3, 1.0, 1e30, 3e38):
        chosen = choose_tokens(logits, temperature, noise)
        assert ((chosen >= 0) & (chosen < 50)).all()
    assert torch.equal(choose_tokens(logits, 1e-45, noise), logits.argmax(-1))
    # Uniform in the limit of a huge temperature: the argmax of the noise alone.
    assert torch.equal(choose_tokens(logits, 3e38, noise), (-noise.log()).argmax(-1))
    assert (~outside_nucleus(logits, 0.0)).sum(-1).eq(1).all()  # top_p underflowed to 0: the top token


@pytest.mark.parametrize("stop", [5, [[67]], [1.5], ["a"], "ab", [True]])
def test_stop_token_ids_must_be_int_ids(stream, stop):
    with pytest.raises(TypeError, match="stop_token_ids"):
        stream.generate(3, stop_token_ids=stop)


def test_stop_token_ids_none_means_none(stream):
    assert len(list(stream.fork().generate(3, stop_token_ids=None))) == 3
    assert list(stream.fork().generate(3, stop_token_ids=torch.tensor([-1, -2]))) == list(stream.fork().generate(3))


@pytest.mark.parametrize("sequences,error", [
    ([[28, 43, 83], [1.5, 2.0]], "input_ids\\[1\\] must hold integer token ids, got torch.float32"),
    ([[28, 43], [True, False]], "input_ids\\[1\\] must hold integer token ids, got torch.bool"),
    ([[28, 43], [1, [2]]], "input_ids\\[1\\] must be a 1-D sequence of int token ids"),
    ([[28, 43], [2**70]], "input_ids\\[1\\] must be a 1-D sequence of int token ids"),
    ([[28, 43], torch.tensor([3.0])], "input_ids\\[1\\] must hold integer token ids"),
])
def test_token_ids_are_never_truncated_or_cast(model, sequences, error):
    stream = LambdaStream(model)
    stream.feed([[1, 2, 3], [4, 5, 6]])
    before = stream.next_logits.clone()
    with pytest.raises((TypeError, ValueError), match=error):
        stream.feed(sequences)
    assert stream.position == 3 and torch.equal(stream.next_logits, before)  # nothing fed


def test_a_cache_made_under_other_settings_is_refused(stream, model):
    ids = torch.randint(0, VOCAB, (1, 3))
    try:
        li.enable(model, n_global=3, n_local=8)  # logits differed from a fresh run by up to 9
        with pytest.raises(ValueError, match="this LambdaCache was made for other settings"):
            stream.feed(ids)
        fresh = li.LambdaCache(model)
        with torch.inference_mode():
            model(ids, use_cache=True, **{lminf_hf.cache_argument_name(model): fresh})  # a new cache is fine
    finally:
        li.enable(model, n_global=2, n_local=8)


def test_a_cache_of_another_model_is_refused(model):
    deeper = build("llama")
    deeper.model.layers.append(type(deeper.model.layers[0])(deeper.config, 2))
    deeper.config.num_hidden_layers = 3
    li.enable(deeper, n_global=2, n_local=8)
    cache = li.LambdaCache(model)  # 2 layers
    with pytest.raises(ValueError, match="this LambdaCache was made for other settings"), torch.inference_mode():
        deeper(torch.randint(0, VOCAB, (1, 4)), use_cache=True, **{lminf_hf.cache_argument_name(deeper): cache})


def test_compiled_forward_with_gradients_works_as_eager_and_backward_is_refused():
    """torch.compile(model)(ids) with gradients on failed to compile (BackendCompilerFailed: the
    backward was traced and raised); eager runs the forward and refuses only the backward."""
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    ids = torch.randint(0, VOCAB, (1, 12))
    eager = model(ids).logits
    compiled = torch.compile(model)(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for logits in (eager, compiled):
        with pytest.raises(RuntimeError, match="has no backward"):
            logits.sum().backward()


def test_head_dim_zero_is_refused_not_a_division_by_zero():
    q = torch.zeros(1, 1, 3, 0)
    with pytest.raises(ValueError, match="head_dim >= 1"):
        li.lambda_attention(q, q, q, torch.zeros(0), n_local=4)


def _append(cache_k, cache_v, positions, k, v, start, n_global=2, n_local=4):
    li.ring_cache_append(cache_k, cache_v, positions, k, v, start, n_global=n_global, n_local=n_local)


def test_append_refuses_views_that_share_memory_when_not_contiguous():
    """With 2 KV heads the views are not contiguous and the overlap check gave up: the stored
    values came out wrong ([1, 1, 1, 7] instead of all 7)."""
    positions = torch.full((6,), -1)
    buffer = torch.zeros(1, 2, 6, 8)
    new = torch.full((1, 2, 1, 6), 7.0)
    with pytest.raises(RuntimeError, match="cache_k must not share memory with cache_v"):
        _append(buffer[..., :6], buffer[..., 2:], positions, new, new, 0)  # overlapping halves
    with pytest.raises(RuntimeError, match="cache_k must not share memory with k"):
        _append(buffer[..., :4], torch.zeros(1, 2, 6, 4), positions, buffer[:, :, :1, :4],
                torch.zeros(1, 2, 1, 4), 0)  # new keys read from the cache itself
    # Disjoint views of one buffer (a [.., 2, head_dim] K/V block split in halves) still work.
    kv = torch.zeros(1, 2, 6, 16)
    _append(kv[..., :8], kv[..., 8:], positions, torch.full((1, 2, 1, 8), 7.0), torch.full((1, 2, 1, 8), 3.0), 0)
    assert (kv[:, :, 0, :8] == 7).all() and (kv[:, :, 0, 8:] == 3).all() and (kv[:, :, 1:] == 0).all()


def test_append_refuses_a_start_behind_the_ring():
    cache_k, cache_v, positions = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8), torch.full((6,), -1)
    chunk = torch.randn(1, 1, 10, 8)
    _append(cache_k, cache_v, positions, chunk, chunk, 0)
    assert positions.tolist() == [0, 1, 6, 7, 8, 9]
    one = torch.randn(1, 1, 1, 8)
    for start in (0, 1, 5, 9):
        with pytest.raises(RuntimeError, match=f"start_position\\[0\\] must be after the positions the cache "
                                               f"holds \\(a ring cannot go back\\), got {start}"):
            _append(cache_k, cache_v, positions, one, one, start)
    assert positions.tolist() == [0, 1, 6, 7, 8, 9]  # unchanged
    _append(cache_k, cache_v, positions, one, one, 12)  # ahead, with a gap: allowed
    assert positions.tolist() == [0, 1, 6, 7, 12, 9]
