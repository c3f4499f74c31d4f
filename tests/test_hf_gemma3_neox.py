"""Gemma 3 (text) and GPT-NeoX (Pythia) beyond the per-family logits checks of
test_hf_families.py: per-layer windows and RoPE, the cache, generate(), LambdaStream (chunk
independence, generation past the window) and left-padded batches."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import lm_infinite.hf as lminf_hf
from hf_tiny_models import GEMMA3_SLIDING_WINDOW, TRAINING_LENGTH, VOCAB, build, left_padded_ids, reference_logits
from lm_infinite.streaming import LambdaStream, decode_rows

FAMILIES = ["gemma3", "gpt-neox", "gpt-neox-full-rotary"]
N_GLOBAL, N_LOCAL = 2, 10
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return lminf_hf.enable(build(request.param), n_global=N_GLOBAL, n_local=N_LOCAL)


def _ids(length, batch=2, seed=11):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _whole(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _cache_kwargs(model, cache):
    return {lminf_hf.cache_argument_name(model.base_model): cache}


# --- per-layer rules --------------------------------------------------------------------------

def test_gemma3_sliding_layers_keep_their_window_and_local_rope():
    model = lminf_hf.enable(build("gemma3"), n_global=N_GLOBAL, n_local=N_LOCAL)
    state = model._lm_infinite
    sliding, full = state.layer(0), state.layer(1)
    assert (sliding.n_global, sliding.n_local, sliding.sliding) == (0, GEMMA3_SLIDING_WINDOW, True)
    assert (full.n_global, full.n_local, full.distance_cap) == (N_GLOBAL, N_LOCAL, N_LOCAL)
    assert not full.sliding
    rotary = model.model.rotary_emb.original
    torch.testing.assert_close(sliding.inv_freq, rotary.sliding_attention_inv_freq.float())
    torch.testing.assert_close(full.inv_freq, rotary.full_attention_inv_freq.float())
    assert not torch.allclose(sliding.inv_freq, full.inv_freq)  # local base and linear scaling
    cache = lminf_hf.LambdaCache(model)
    _feed(model, _ids(4 * N_LOCAL), 5, cache)
    assert [layer.ring.k.shape[-2] for layer in cache.layers] == [GEMMA3_SLIDING_WINDOW, N_GLOBAL + N_LOCAL,
                                                                  GEMMA3_SLIDING_WINDOW]


def test_gemma3_sliding_layers_keep_their_window_when_n_local_is_smaller():
    """n_local below the sliding window: the full layer follows n_local, the sliding layers
    still see their 7 keys (the reference reads each layer's rule; the rule is checked above)."""
    stock = build("gemma3")
    enabled = lminf_hf.enable(copy.deepcopy(stock), n_global=1, n_local=4)
    assert enabled._lm_infinite.layer(0).n_local == GEMMA3_SLIDING_WINDOW
    ids = _ids(3 * TRAINING_LENGTH)
    torch.testing.assert_close(_whole(enabled, ids), reference_logits(enabled, ids), atol=2e-4, rtol=1e-4)


def test_gemma3_with_every_window_at_least_the_sequence_is_the_stock_model_with_a_dynamic_cache():
    """Chunked decoding with a LambdaCache equals the stock model decoding with its own cache,
    sliding layers included, while the sequence fits n_local."""
    stock = build("gemma3")
    enabled = lminf_hf.enable(copy.deepcopy(stock))
    ids = _ids(TRAINING_LENGTH)
    with torch.no_grad():
        cache = DynamicCache(config=stock.config)
        expected = torch.cat([stock(ids[:, i:i + 5], **_cache_kwargs(stock, cache)).logits
                              for i in range(0, ids.shape[1], 5)], 1)
    torch.testing.assert_close(_feed(enabled, ids, 5, lminf_hf.LambdaCache(enabled)), expected, **TOL)


def test_bidirectional_gemma3_is_refused():
    model = build("gemma3")
    model.config.use_bidirectional_attention = True
    with pytest.raises(lminf_hf.UnsupportedModelError, match="use_bidirectional_attention"):
        lminf_hf.enable(model)


def test_gpt_neox_rotates_only_its_rotary_fraction():
    model = lminf_hf.enable(build("gpt-neox"))
    head_size = model.config.hidden_size // model.config.num_attention_heads
    assert model._lm_infinite.layer(0).inv_freq.numel() * 2 == head_size // 4


# --- the cache and generate() -------------------------------------------------------------------

def _feed(model, ids, chunk, cache):
    with torch.no_grad():
        return torch.cat([model(ids[:, i:i + chunk], **_cache_kwargs(model, cache)).logits
                          for i in range(0, ids.shape[1], chunk)], 1)


@pytest.mark.parametrize("chunk", [1, 6, N_GLOBAL + N_LOCAL + 3])
def test_chunked_feeding_equals_whole_forward(model, chunk):
    ids = _ids(5 * N_LOCAL + 3)
    cache = lminf_hf.LambdaCache(model)
    torch.testing.assert_close(_feed(model, ids, chunk, cache), _whole(model, ids), **TOL)
    assert cache.get_seq_length() == ids.shape[1]


def test_dynamic_cache_gives_the_same_logits(model):
    ids = _ids(4 * N_LOCAL)
    expected = _feed(model, ids, 5, lminf_hf.LambdaCache(model))
    torch.testing.assert_close(_feed(model, ids, 5, DynamicCache(config=model.config)), expected, **TOL)


def _greedy_by_recomputation(model, ids, new_tokens):
    for _ in range(new_tokens):
        next_id = _whole(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], 1)
    return ids


def test_generate_with_lambda_cache_equals_greedy_recomputation(model):
    prompt, new_tokens = _ids(2 * N_LOCAL, batch=1), 2 * N_LOCAL
    expected = _greedy_by_recomputation(model, prompt, new_tokens)
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0,
                                   **_cache_kwargs(model, lminf_hf.LambdaCache(model)))
        default = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
    assert torch.equal(generated, expected)
    assert torch.equal(default, expected)


# --- LambdaStream -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_stream_nll_is_chunk_independent_and_equals_whole_forward(model, chunk_size):
    ids = _ids(6 * N_LOCAL + 1)
    log_probs = F.log_softmax(_whole(model, ids), dim=-1)
    expected = -log_probs[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    stream = LambdaStream(model, chunk_size=chunk_size)
    nll = torch.cat([stream.nll(ids[:, :25]), stream.nll(ids[:, 25:])], dim=1)
    torch.testing.assert_close(nll[:, 1:], expected, **TOL)


def test_stream_generate_continues_greedily_past_the_window(model):
    prompt, new_tokens = _ids(2 * N_LOCAL, batch=1), 2 * N_LOCAL
    expected = _greedy_by_recomputation(model, prompt, new_tokens)
    stream = LambdaStream(model, chunk_size=8)
    torch.testing.assert_close(stream.feed(prompt), _whole(model, prompt)[:, -1], **TOL)
    assert list(stream.generate(new_tokens)) == expected[0, prompt.shape[1]:].tolist()


# --- batches ------------------------------------------------------------------------------------

LENGTHS = (3, 2 * N_LOCAL + 5, N_LOCAL)


def _prompts():
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in LENGTHS]


@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "lambda-cache"])
def test_left_padded_batch_rows_equal_each_sequence_alone(model, use_cache):
    prompts = _prompts()
    ids, mask = left_padded_ids(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=use_cache).logits
        for b, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=use_cache).logits[0]
            torch.testing.assert_close(batched[b, ids.shape[1] - prompt.numel():], alone, **TOL)


def test_left_padded_generate_gives_each_sequence_its_tokens_alone(model):
    prompts = _prompts()
    ids, mask = left_padded_ids(prompts)
    options = dict(max_new_tokens=N_LOCAL, min_new_tokens=N_LOCAL, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **options)
        for b, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **options)
            assert batched[b, ids.shape[1]:].tolist() == alone[0, prompt.numel():].tolist()


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_stream_fed_a_list_gives_each_sequence_its_logits_and_tokens_alone(model, chunk_size):
    prompts = _prompts()
    stream = LambdaStream(model, chunk_size=chunk_size)
    batched = stream.feed(prompts).clone()
    steps = list(stream.generate(N_LOCAL))
    for b, prompt in enumerate(prompts):
        alone = LambdaStream(model, chunk_size=chunk_size)
        torch.testing.assert_close(batched[b], alone.feed(prompt[None])[0], **TOL)
        assert [step[b] for step in steps] == list(alone.generate(N_LOCAL))


# --- saved streams and batched decode rows (the server's paths) --------------------------------

def test_a_saved_stream_continues_bit_identically(model, tmp_path):
    kept = LambdaStream(model, chunk_size=7)
    kept.feed(_ids(4 * N_LOCAL + 3, batch=1))
    kept.save(tmp_path / "s.lminf")
    loaded = LambdaStream.load(tmp_path / "s.lminf", model)
    more = _ids(9, batch=1, seed=4)
    assert torch.equal(kept.feed(more), loaded.feed(more))
    assert list(kept.generate(N_LOCAL)) == list(loaded.generate(N_LOCAL))


def test_decode_rows_of_different_streams_each_continue_their_own(model):
    alone = []
    for length in (5, 3 * N_LOCAL + 1, 12):
        stream = LambdaStream(model, chunk_size=8)
        stream.feed(_ids(length, batch=1, seed=length))
        alone.append(stream)
    batched = [stream.fork() for stream in alone]
    expected = [list(stream.generate(N_LOCAL)) for stream in alone]
    tokens = [int(stream.next_logits.argmax()) for stream in batched]
    got = [[] for _ in alone]
    for _ in range(N_LOCAL):
        for row, token in zip(got, tokens):
            row.append(token)
        tokens = decode_rows(batched, tokens).argmax(dim=-1).tolist()
    assert got == expected
