"""Batches of sequences of different lengths (issue #16): every sequence computes what it would
alone. Lengths mix prompts shorter than the window and prompts several windows long; top-k
middle attention on and off; whole, chunked and token-by-token feeding; the HF forward,
HF generate() (with a LambdaCache, a DynamicCache and none), LambdaStream and its decode step.
"""

import pytest
import torch
from transformers import DynamicCache

import lm_infinite.hf as lminf_hf
from lm_infinite.hf import LambdaSettings, TopK
from hf_tiny_models import VOCAB, build, left_padded_ids
from lm_infinite.cache import RingKVCache
from lm_infinite import streaming
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL = 2, 8
# Below the window, at it, and past it (several windows): the ring wraps for some rows only.
LENGTHS = (3, 21, 8, 13)
TOL = dict(atol=2e-5, rtol=2e-5)


def _enabled(top_k: bool):
    model = build("llama")
    middle = TopK(k=2, first_layer=1, distance=N_LOCAL // 2) if top_k else None
    return lminf_hf.enable(model, LambdaSettings(N_GLOBAL, N_LOCAL, top_k=middle))


@pytest.fixture(scope="module", params=[False, True], ids=["lambda", "top-k"])
def model(request):
    return _enabled(request.param)


@pytest.fixture(scope="module")
def plain_model():
    return _enabled(False)


def _prompts(lengths=LENGTHS, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]


def _cache_kwargs(model, cache):
    return {lminf_hf.cache_argument_name(model.model): cache}


# --- the Hugging Face forward ---------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [False, True], ids=["no-cache", "lambda-cache"])
def test_hf_forward_left_padded_rows_equal_each_sequence_alone(model, use_cache):
    prompts = _prompts()
    ids, mask = left_padded_ids(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=use_cache).logits
        for b, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=use_cache).logits[0]
            torch.testing.assert_close(batched[b, ids.shape[1] - prompt.numel():], alone, **TOL)


def test_pad_token_ids_do_not_matter(model):
    prompts = _prompts()
    with torch.no_grad():
        a = model(*left_padded_ids(prompts, pad_id=1)).logits
        b = model(*left_padded_ids(prompts, pad_id=VOCAB - 1)).logits
    real = left_padded_ids(prompts)[1].bool()
    torch.testing.assert_close(a[real], b[real], atol=0, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5])
def test_hf_forward_fed_in_chunks_with_the_growing_mask_equals_alone(model, chunk):
    """A LambdaCache fed a padded block chunk by chunk, each forward given the mask of every
    column so far (as generate() does): the real rows' logits are each sequence's alone, fed
    in the same pieces (top-k serves the last row of each forward, padding rows counted)."""
    prompts = _prompts()
    ids, mask = left_padded_ids(prompts)
    width = ids.shape[1]
    cache = lminf_hf.LambdaCache(model)
    pieces = []
    with torch.no_grad():
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            out = model(ids[:, start:end], attention_mask=mask[:, :end], **_cache_kwargs(model, cache))
            pieces.append(out.logits)
        batched = torch.cat(pieces, 1)
        for b, prompt in enumerate(prompts):
            padding, alone_cache, alone = width - prompt.numel(), lminf_hf.LambdaCache(model), []
            for start in range(0, width, chunk):
                end = min(start + chunk, width)
                piece = prompt[max(0, start - padding):max(0, end - padding)]
                if piece.numel():
                    alone.append(model(piece[None], **_cache_kwargs(model, alone_cache)).logits[0])
            torch.testing.assert_close(batched[b, padding:], torch.cat(alone), **TOL)
    # Each sequence's own position: its real tokens, not the block's width.
    ring = cache.layers[0].ring
    assert ring.next_position.tolist() == [p.numel() for p in prompts]
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("cache_kind", ["lambda", "dynamic", "default"])
def test_hf_generate_left_padded_gives_each_sequence_its_greedy_tokens_alone(model, cache_kind):
    prompts = _prompts()
    ids, mask = left_padded_ids(prompts)
    new = 2 * N_LOCAL

    def cache():
        return {"lambda": lambda: _cache_kwargs(model, lminf_hf.LambdaCache(model)),
                "dynamic": lambda: _cache_kwargs(model, DynamicCache()),
                "default": dict}[cache_kind]()

    options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **options, **cache())
        for b, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], **options, **cache())
            assert batched[b, ids.shape[1]:].tolist() == alone[0, prompt.numel():].tolist()


# --- LambdaStream ----------------------------------------------------------------------------

def _alone(model, prompt, chunk_size, new_tokens=0, stop=()):
    stream = LambdaStream(model, chunk_size=chunk_size)
    logits = stream.feed(prompt)[0].clone()
    tokens = list(stream.generate(new_tokens, stop_token_ids=stop)) if new_tokens else []
    return logits, tokens, stream


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_stream_fed_a_list_gives_each_sequence_its_logits_alone(model, chunk_size):
    prompts = _prompts()
    stream = LambdaStream(model, chunk_size=chunk_size)
    logits = stream.feed(prompts)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(logits[b], _alone(model, prompt, chunk_size)[0], **TOL)
    assert stream.cache.layers[0].ring.next_position.tolist() == list(LENGTHS)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_stream_prefill_by_sequence_and_padded_prefill_agree(plain_model, monkeypatch, chunk_size):
    """The two ways a ragged batch is prefilled (each sequence into its row of the cache, or
    padded chunks) give the same logits and the same stream afterwards."""
    prompts, more = _prompts(), _prompts(lengths=(2, 5, 1, 3), seed=9)
    runs = []
    for waste in (1.0, float("inf")):  # always by sequence; never
        monkeypatch.setattr(streaming, "PADDED_PREFILL_WASTE", waste)
        stream = LambdaStream(plain_model, chunk_size=chunk_size)
        runs.append((stream.feed(prompts), stream.feed(more), list(stream.generate(4)),
                     stream.position, stream.cache.layers[1].ring.next_position.tolist()))
    (first, second, tokens, position, positions), other = runs
    torch.testing.assert_close(other[0], first, **TOL)
    torch.testing.assert_close(other[1], second, **TOL)
    assert (tokens, position, positions) == other[2:]


def test_stream_fed_a_padded_block_with_its_mask_equals_the_list(plain_model):
    prompts = _prompts()
    from_list = LambdaStream(plain_model, chunk_size=4).feed(prompts)
    from_block = LambdaStream(plain_model, chunk_size=4).feed(*left_padded_ids(prompts))
    torch.testing.assert_close(from_block, from_list, atol=0, rtol=0)


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_stream_generate_runs_each_sequence_to_its_own_stop_token(model, chunk_size):
    prompts = _prompts()
    new = 2 * N_LOCAL + 3
    # A stop token that some sequences meet early and others never: the second token that
    # sequence 0 generates alone.
    stop = [_alone(model, prompts[0], chunk_size, new)[1][1]]
    expected = [_alone(model, p, chunk_size, new, stop)[1] for p in prompts]
    stream = LambdaStream(model, chunk_size=chunk_size)
    stream.feed(prompts)
    steps = list(stream.generate(new, stop_token_ids=stop))
    assert len(steps) == max(len(tokens) for tokens in expected)
    for b, tokens in enumerate(expected):
        column = [step[b] for step in steps]
        assert column[:len(tokens)] == tokens
        assert all(token is None for token in column[len(tokens):])  # finished: nothing more
    # Finished sequences no longer changed: their positions and next logits are those alone,
    # and the stream continues each sequence as it would alone.
    ring = stream.cache.layers[0].ring
    assert ring.next_position.tolist() == [n + len(t) for n, t in zip(LENGTHS, expected)]
    more = _prompts(lengths=(2, 5, 1, 3), seed=9)
    continued = stream.feed(more)
    for b, prompt in enumerate(prompts):
        _, _, alone = _alone(model, prompt, chunk_size, new, stop)
        torch.testing.assert_close(continued[b], alone.feed(more[b])[0], **TOL)


def test_stream_nll_of_a_list_equals_each_sequence_alone(plain_model):
    prompts = _prompts()
    stream = LambdaStream(plain_model, chunk_size=4)
    first = stream.nll(prompts)
    second = stream.nll(_prompts(lengths=(4, 1, 6, 2), seed=2))
    for b, prompt in enumerate(prompts):
        alone = LambdaStream(plain_model, chunk_size=4)
        expected_first = alone.nll(prompt)[0]
        expected_second = alone.nll(_prompts(lengths=(4, 1, 6, 2), seed=2)[b])[0]
        assert first[b].shape == prompt.shape and torch.isnan(first[b][0])
        torch.testing.assert_close(first[b][1:], expected_first[1:], **TOL)
        torch.testing.assert_close(second[b], expected_second, **TOL)


def test_sampled_batch_generation_is_seeded_and_stays_in_the_vocabulary(plain_model):
    runs = []
    for _ in range(2):
        stream = LambdaStream(plain_model, chunk_size=4)
        stream.feed(_prompts())
        generator = torch.Generator().manual_seed(7)
        runs.append(list(stream.generate(6, temperature=0.8, generator=generator)))
    assert runs[0] == runs[1]
    assert all(0 <= token < VOCAB for step in runs[0] for token in step)


def test_a_compiled_decode_step_gives_the_eager_tokens(plain_model):
    prompts = _prompts()
    stop = [_alone(plain_model, prompts[1], 4, 8)[1][2]]
    runs = []
    for compile in (False, True):
        stream = LambdaStream(plain_model, chunk_size=4, compile=compile)
        stream.feed(prompts)
        runs.append(list(stream.generate(8, stop_token_ids=stop)))
    assert runs[0] == runs[1]


# --- the ring itself -------------------------------------------------------------------------

def test_ring_with_padding_rows_holds_what_separate_rings_hold():
    generator = torch.Generator().manual_seed(0)
    batch, heads, dim = 3, 2, 8
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    together = RingKVCache(batch, heads, dim, n_global=N_GLOBAL, n_local=N_LOCAL)
    alone = [RingKVCache(1, heads, dim, n_global=N_GLOBAL, n_local=N_LOCAL) for _ in range(batch)]
    paddings = ([4, 0, 6], [0, 0, 5], [0, 3, 0], [1, 0, 0])  # chunk rows: 6, 5, 3, 1
    for padding, rows in zip(paddings, (6, 5, 3, 1)):
        q = torch.randn(batch, 2 * heads, rows, dim, generator=generator)
        k, v = (torch.randn(batch, heads, rows, dim, generator=generator) for _ in range(2))
        pad = torch.tensor(padding)
        out = together.attend_and_append(q, k, v, inv_freq, padding=pad)
        for b, ring in enumerate(alone):
            p = padding[b]
            assert (out[b, :, :p] == 0).all()
            if p < rows:
                expected = ring.attend_and_append(q[b:b + 1, :, p:], k[b:b + 1, :, p:], v[b:b + 1, :, p:], inv_freq)
                torch.testing.assert_close(out[b:b + 1, :, p:], expected, atol=1e-6, rtol=1e-6)
    for b, ring in enumerate(alone):
        assert together.next_position[b] == ring.next_position[0]
        order, expected_order = together.positions[b].argsort(), ring.positions[0].argsort()
        assert together.positions[b][order].tolist() == ring.positions[0][expected_order].tolist()


# --- what is refused -------------------------------------------------------------------------

def test_masks_other_than_left_padding_are_refused_naming_what_is_supported(plain_model):
    ids, mask = left_padded_ids(_prompts())
    hole = mask.clone()
    hole[1, 5] = 0
    right = torch.ones_like(mask)
    right[0, -2:] = 0
    four_d = torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1])
    halves = mask.float() * 0.5
    for bad in (hole, right, four_d, halves):
        with pytest.raises(ValueError, match="left padding"):
            plain_model(ids, attention_mask=bad)
    for bad_shape in (mask[:2], mask[:, 1:]):
        with pytest.raises(ValueError, match=r"expected shape \[4, 0 \+ 21\]"):
            plain_model(ids, attention_mask=bad_shape)


def test_right_padding_in_a_cached_step_is_refused(plain_model):
    ids, mask = left_padded_ids(_prompts())
    cache = lminf_hf.LambdaCache(plain_model)
    with torch.no_grad():
        plain_model(ids, attention_mask=mask, **_cache_kwargs(plain_model, cache))
        step = torch.cat([mask, torch.tensor([[1], [0], [1], [1]])], 1)
        with pytest.raises(ValueError, match="row 1 has a 0 after a 1"):
            plain_model(ids[:, -1:], attention_mask=step, **_cache_kwargs(plain_model, cache))
        # A mask that does not cover the cached columns and the chunk.
        with pytest.raises(ValueError, match=r"expected shape \[4, 21 \+ 1\]"):
            plain_model(ids[:, -1:], attention_mask=mask, **_cache_kwargs(plain_model, cache))


def test_stream_refuses_empty_sequences_and_a_mask_with_a_list(plain_model):
    stream = LambdaStream(plain_model)
    with pytest.raises(ValueError, match=r"input_ids\[1\] must be a non-empty 1-D sequence"):
        stream.feed([[4, 5], []])
    with pytest.raises(ValueError, match="attention_mask goes with a padded input_ids tensor"):
        stream.feed([[4, 5]], attention_mask=torch.ones(1, 2))
    ids, mask = left_padded_ids(_prompts())
    mask[2] = 0
    with pytest.raises(ValueError, match="row 2 is all padding"):
        stream.feed(ids, attention_mask=mask)
    assert stream.position == 0 and stream.next_logits is None  # nothing was fed
    stream.feed([[4, 5], [6]])
    with pytest.raises(ValueError, match="continue the stream's batch of 2"):
        stream.feed([[4], [5], [6]])
