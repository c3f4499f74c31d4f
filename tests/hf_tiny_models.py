"""Tiny random-weight models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

VOCAB = 96
TRAINING_LENGTH = 24  # every tiny model's n_local default
_SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _llama():
    return LlamaForCausalLM(LlamaConfig(**_SIZES, max_position_embeddings=TRAINING_LENGTH))


def _llama3_scaled():
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=TRAINING_LENGTH)
    return LlamaForCausalLM(LlamaConfig(**_SIZES, max_position_embeddings=8 * TRAINING_LENGTH,
                                        rope_parameters=rope))


def _mistral():
    return MistralForCausalLM(MistralConfig(**_SIZES, max_position_embeddings=TRAINING_LENGTH,
                                            sliding_window=None))


def _qwen2_yarn():
    # yarn's attention_scaling != 1 checks that its square is folded into the scale.
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                original_max_position_embeddings=TRAINING_LENGTH)
    return Qwen2ForCausalLM(Qwen2Config(**_SIZES, max_position_embeddings=4 * TRAINING_LENGTH,
                                        rope_parameters=rope))


def _qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**_SIZES, head_dim=24, max_position_embeddings=TRAINING_LENGTH))


def _phi3():
    config = Phi3Config(**_SIZES, max_position_embeddings=TRAINING_LENGTH,
                        original_max_position_embeddings=TRAINING_LENGTH, partial_rotary_factor=0.5,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config)


BUILDERS = {"llama": _llama, "llama3-scaled": _llama3_scaled, "mistral": _mistral,
            "qwen2-yarn": _qwen2_yarn, "qwen3": _qwen3, "phi3-partial": _phi3}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    # Random init is small; sharpen attention so that the window's edges change the logits.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    return model


REFERENCE_ATTENTION = "lm_infinite_test_reference"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Whole-sequence LM-Infinite attention by the float64 reference, for an enabled model run
    without a cache (`use_cache=False`)."""
    from lm_infinite.reference import lambda_attention_reference

    state = module._lm_infinite
    top_k = {}
    if state.uses_top_k(module.layer_idx):
        top_k = dict(top_k=state.top_k, top_k_distance=state.top_k_distance,
                     top_k_first_row=state.top_k_first_row(query.shape[-2]))
    out = lambda_attention_reference(
        query.double(), key.double(), value.double(), state.inv_freq, n_global=state.n_global,
        n_local=state.n_local, distance_cap=state.distance_cap,
        scale=scaling * state.attention_scaling**2, **top_k,
    )
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_ATTENTION, _reference_attention)


def reference_logits(enabled_model, input_ids):
    """Logits of an enabled model with its attention op swapped for the reference."""
    model = enabled_model
    model.set_attn_implementation(REFERENCE_ATTENTION)
    try:
        with torch.no_grad():
            return model(input_ids, use_cache=False).logits
    finally:
        model.set_attn_implementation("lm_infinite")
