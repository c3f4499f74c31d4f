"""enable() on every supported family: stock results inside the window, the reference beyond it."""

import copy

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel

import lm_infinite.hf as lminf_hf
from hf_tiny_models import BUILDERS, TRAINING_LENGTH, VOCAB, build, reference_logits

FAMILIES = sorted(BUILDERS)


def _ids(length, seed=1):
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_stock_model_when_sequence_fits_window(family):
    stock = build(family)
    enabled = lminf_hf.enable(copy.deepcopy(stock))
    ids = _ids(TRAINING_LENGTH)
    with torch.no_grad():
        expected, actual = stock(ids).logits, enabled(ids).logits
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_reference_beyond_window(family):
    stock = build(family)
    enabled = lminf_hf.enable(copy.deepcopy(stock), n_global=3)
    ids = _ids(3 * TRAINING_LENGTH + 5)
    with torch.no_grad():
        actual = enabled(ids, use_cache=False).logits
        stock_logits = stock(ids).logits
    torch.testing.assert_close(actual, reference_logits(enabled, ids), atol=2e-4, rtol=1e-4)
    # Not vacuous: past the window the stock model attends differently.
    beyond = slice(TRAINING_LENGTH, None)
    assert (actual[:, beyond] - stock_logits[:, beyond]).abs().max() > 1e-2


def test_without_global_tokens_equals_stock_sliding_window():
    """With n_global=0, LM-Infinite is a sliding window of n_local keys, which Mistral's stock
    mask computes independently of this project's attention."""
    window = 9
    stock = build("mistral")
    enabled = lminf_hf.enable(copy.deepcopy(stock), n_global=0, n_local=window)
    stock.config.sliding_window = window
    stock.set_attn_implementation("eager")
    ids = _ids(4 * window)
    with torch.no_grad():
        torch.testing.assert_close(enabled(ids).logits, stock(ids).logits, atol=2e-4, rtol=1e-4)


def test_defaults_come_from_training_length():
    model = lminf_hf.enable(build("llama3-scaled"))
    state = model._lm_infinite
    assert (state.n_global, state.n_local, state.distance_cap) == (10, TRAINING_LENGTH, TRAINING_LENGTH)
    assert model.config.max_position_embeddings == 8 * TRAINING_LENGTH


@pytest.mark.parametrize(
    "model",
    [lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB)),
     lambda: BloomForCausalLM(BloomConfig(n_layer=1, n_head=2, hidden_size=16, vocab_size=VOCAB))],
    ids=["gpt2-absolute", "bloom-alibi"],
)
def test_non_rope_models_are_rejected_naming_supported_families(model):
    with pytest.raises(lminf_hf.UnsupportedModelError,
                       match="llama, mistral, qwen2, qwen3, phi3, gemma3_text, gpt_neox"):
        lminf_hf.enable(model())


@pytest.mark.parametrize("argument, value", [("n_global", -1), ("n_local", 0), ("distance_cap", 1.5),
                                             ("n_local", "8")])
def test_bad_settings_name_the_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        lminf_hf.enable(build("llama"), **{argument: value})


def test_disable_restores_the_stock_model():
    stock = build("qwen3")
    model = lminf_hf.disable(lminf_hf.enable(copy.deepcopy(stock), n_local=5))
    ids = _ids(2 * TRAINING_LENGTH)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock(ids).logits)
    assert not hasattr(model, "_lm_infinite")


def test_enabling_one_model_leaves_a_model_with_the_same_config_stock():
    first = build("llama")
    second = type(first)(first.config).eval()
    second.load_state_dict(first.state_dict())
    lminf_hf.enable(first, n_local=5)
    assert second.config._attn_implementation != "lm_infinite"
    ids = _ids(2 * TRAINING_LENGTH)
    with torch.no_grad():
        assert (first(ids).logits - second(ids).logits).abs().max() > 1e-2
