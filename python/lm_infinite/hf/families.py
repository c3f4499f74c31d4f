"""Which Hugging Face models LM-Infinite applies to, and where their parts live."""

from __future__ import annotations

from torch import nn

__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "decoder_of", "training_length"]

# Decoder-only models whose attention modules rotate q and k with the base model's
# `rotary_emb` and then call the attention function named by `config._attn_implementation`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


class UnsupportedModelError(ValueError):
    """The model does not use rotary position embeddings in a form LM-Infinite can take over."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The base decoder (the module holding `layers` and `rotary_emb`) of a supported model,
    given either the model with a head (`...ForCausalLM`) or the base model itself."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"lm_infinite supports models of type {', '.join(SUPPORTED_MODEL_TYPES)} (rotary "
            f"position embeddings); got model_type={model_type!r}. Models with absolute or ALiBi "
            "positions (gpt2, opt, bloom, mpt, ...) cannot use LM-Infinite."
        )
    decoder = getattr(model, "base_model", model)
    if not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no base model with `rotary_emb` and `layers`; "
            "pass a Hugging Face causal LM or its base model"
        )
    return decoder


def training_length(config) -> int:
    """The sequence length the model was trained on: `original_max_position_embeddings` for
    scaled RoPE (llama3, yarn, longrope), else `max_position_embeddings`."""
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original or config.max_position_embeddings)
