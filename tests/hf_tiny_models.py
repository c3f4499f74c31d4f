"""Tiny random-weight models of every supported family, built in-process (no downloads)."""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers import (
    Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
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


GEMMA3_SLIDING_WINDOW = 7  # below TRAINING_LENGTH: the sliding layers wrap inside the Λ window


def _gemma3():
    # Sliding layers 0 and 2 (local RoPE base), a full layer 1 with linearly scaled global RoPE;
    # query_pre_attn_scalar != head_dim so that the model's own scaling is checked; QK-norm.
    rope = {"full_attention": dict(rope_type="linear", rope_theta=1000000.0, factor=2.0),
            "sliding_attention": dict(rope_type="default", rope_theta=10000.0)}
    config = Gemma3TextConfig(**{**_SIZES, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24,
                              max_position_embeddings=TRAINING_LENGTH, sliding_window=GEMMA3_SLIDING_WINDOW,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma3ForCausalLM(config)


def _gpt_neox(rotary_pct: float, parallel_residual: bool):
    def builder():
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=TRAINING_LENGTH,
                               rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                    partial_rotary_factor=rotary_pct),
                               use_parallel_residual=parallel_residual, tie_word_embeddings=False)
        return GPTNeoXForCausalLM(config)
    return builder


BUILDERS = {"llama": _llama, "llama3-scaled": _llama3_scaled, "mistral": _mistral,
            "qwen2-yarn": _qwen2_yarn, "qwen3": _qwen3, "phi3-partial": _phi3, "gemma3": _gemma3,
            # Pythia's partial rotary (25% of each head) and parallel residual; and the other way.
            "gpt-neox": _gpt_neox(0.25, True), "gpt-neox-full-rotary": _gpt_neox(1.0, False)}


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
    rule = state.layer(module.layer_idx)  # Gemma 3's sliding layers: G = 0, L = their window
    top_k = {}
    if state.uses_top_k(module.layer_idx):
        top_k = dict(top_k=state.top_k, top_k_distance=state.top_k_distance,
                     top_k_first_row=state.top_k_first_row(query.shape[-2]))
    out = lambda_attention_reference(
        query.double(), key.double(), value.double(), rule.inv_freq, n_global=rule.n_global,
        n_local=rule.n_local, distance_cap=rule.distance_cap,
        scale=scaling * rule.attention_scaling**2, **top_k,
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


def left_padded_ids(prompts, pad_id: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token prompts as one left-padded [batch, width] block and its 0/1 attention mask."""
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():] = p
        mask[b, width - p.numel():] = 1
    return ids, mask
