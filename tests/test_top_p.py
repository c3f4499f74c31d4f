"""Nucleus (top_p) sampling: the token choice against a direct construction of the nucleus,
and the stream's and the compiled step's draws against an eager loop."""

import math

import pytest
import torch

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build
from lm_infinite.decode_step import choose_tokens, draw_noise, outside_nucleus
from lm_infinite.streaming import LambdaStream


def _nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most probable tokens whose probability reaches top_p, built the
    textbook way: walk the tokens by decreasing probability until the mass reaches top_p."""
    chosen, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t]):
        if mass >= top_p:
            break
        chosen.add(token)
        mass += probs[token]
    return chosen


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.55, 0.9, 0.999, 1.0])
def test_the_mask_keeps_exactly_the_nucleus(top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 2
    outside = outside_nucleus(logits, top_p)
    for row, mask in zip(logits.softmax(-1).tolist(), outside):
        assert {t for t in range(50) if not mask[t]} == _nucleus(row, top_p)


def test_draws_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    top_p, n = 0.75, 20000  # nucleus {0, 1, 2}: 0.8 of the mass
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(n // 500):
        noise = draw_noise(torch.empty(500, 6), generator)
        counts += torch.bincount(choose_tokens(logits.expand(500, 6), 1.0, noise, top_p), minlength=6)
    assert counts[3:].sum() == 0
    expected = torch.tensor([0.4, 0.25, 0.15]) / 0.8
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts[:3] / n - expected).abs() < 5 * sigma).all(), counts


def _model():
    return lminf_hf.enable(build("llama"), n_global=2, n_local=10)


def _prompt():
    return torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("compile", [False, True])
def test_stream_draws_what_an_eager_nucleus_loop_draws(compile):
    model, prompt = _model(), _prompt()
    reference = LambdaStream(model)
    logits = reference.feed(prompt)
    generator, expected = torch.Generator().manual_seed(11), []
    for _ in range(40):
        noise = draw_noise(torch.empty_like(logits), generator)
        token = choose_tokens(logits, 1.3, noise, 0.6)
        logits = reference.feed(token.view(1, 1)).clone()
        expected.append(int(token))
    stream = LambdaStream(model, compile=compile)
    stream.feed(prompt)
    drawn = list(stream.generate(40, temperature=1.3, top_p=0.6, generator=torch.Generator().manual_seed(11)))
    assert drawn == expected
    assert len(set(drawn)) > 3  # sampled, not greedy


def test_a_tiny_top_p_is_greedy_and_top_p_one_changes_nothing():
    model, prompt = _model(), _prompt()

    def run(**options):
        stream = LambdaStream(model)
        stream.feed(prompt)
        return list(stream.generate(30, generator=torch.Generator().manual_seed(2), **options))

    assert run(temperature=1.0, top_p=1e-9) == run()
    assert run(temperature=1.0, top_p=1.0) == run(temperature=1.0)


@pytest.mark.parametrize("top_p", [0, -0.5, 1.5, math.nan, True, "0.5"])
def test_bad_top_p_is_refused(top_p):
    stream = LambdaStream(_model())
    stream.feed(_prompt())
    with pytest.raises(ValueError, match="top_p must be a number in \\(0, 1\\]"):
        stream.generate(4, temperature=1.0, top_p=top_p)
