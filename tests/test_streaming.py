"""LambdaStream: chunked feeding, per-token NLL and generation against whole-sequence forwards."""

import pytest
import torch
import torch.nn.functional as F

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL = 2, 10


@pytest.fixture(scope="module")
def model():
    return lminf_hf.enable(build("llama3-scaled"), n_global=N_GLOBAL, n_local=N_LOCAL)


def _ids(length, batch=1, seed=3):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _whole_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_nll_over_several_calls_equals_whole_forward(model, chunk_size):
    ids = _ids(6 * N_LOCAL + 1, batch=2)
    log_probs = F.log_softmax(_whole_logits(model, ids), dim=-1)
    expected = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    stream = LambdaStream(model, chunk_size=chunk_size)
    nll = torch.cat([stream.nll(ids[:, :25]), stream.nll(ids[:, 25:])], dim=1)
    assert torch.isnan(nll[:, 0]).all()
    torch.testing.assert_close(nll[:, 1:], expected, atol=1e-4, rtol=1e-4)
    assert stream.position == ids.shape[1]


def test_feed_returns_the_next_token_logits_of_the_whole_forward(model):
    ids = _ids(4 * N_LOCAL, batch=2)
    stream = LambdaStream(model, chunk_size=6)
    stream.feed(ids[:, :5])
    torch.testing.assert_close(stream.feed(ids[:, 5:]), _whole_logits(model, ids)[:, -1], atol=1e-4, rtol=1e-4)


def test_generate_continues_greedily_past_the_window(model):
    prompt, new_tokens = _ids(2 * N_LOCAL), 2 * N_LOCAL
    expected = prompt
    for _ in range(new_tokens):
        next_id = _whole_logits(model, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, next_id], 1)
    stream = LambdaStream(model, chunk_size=8)
    stream.feed(prompt)
    generated = list(stream.generate(new_tokens))
    assert generated == expected[0, prompt.shape[1]:].tolist()
    assert stream.position == expected.shape[1]


def test_generate_stops_at_a_stop_token(model):
    stream = LambdaStream(model)
    stream.feed(_ids(5))
    first = next(stream.generate(1))
    stream2 = LambdaStream(model)
    stream2.feed(_ids(5))
    assert list(stream2.generate(10, stop_token_ids=[first])) == [first]


def test_memory_does_not_grow_with_the_stream(model):
    stream = LambdaStream(model, chunk_size=16)
    stream.nll(_ids(2 * N_LOCAL))
    size = stream.cache.nbytes()
    for seed in range(5):
        stream.nll(_ids(8 * N_LOCAL, seed=seed))
    assert stream.cache.nbytes() == size
    assert stream.next_logits.shape == (1, VOCAB)


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="enable"):
        LambdaStream(build("llama"))
    model = lminf_hf.enable(build("llama"))
    with pytest.raises(ValueError, match="chunk_size"):
        LambdaStream(model, chunk_size=0)
    stream = LambdaStream(model)
    with pytest.raises(ValueError, match="non-empty"):
        stream.nll(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="feed a prompt first"):
        next(stream.generate(3))


def test_fork_continues_independently(model):
    ids = _ids(3 * N_LOCAL)
    stream = LambdaStream(model, chunk_size=8)
    stream.feed(ids[:, :20])
    twin = stream.fork()
    a = stream.feed(ids[:, 20:])
    b = twin.feed(ids[:, 20:])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = twin.fork().feed(ids[:, :5])
    assert stream.position == twin.position == ids.shape[1]
    assert not torch.equal(other, b)
    torch.testing.assert_close(stream.feed(ids[:, :5]), other, rtol=0, atol=0)
