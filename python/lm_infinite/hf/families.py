"""Which Hugging Face models LM-Infinite applies to, and where their parts live."""

from __future__ import annotations

from torch import nn

__all__ = ["SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "attention_of", "decoder_of",
           "sliding_layers", "training_length"]

# Decoder-only models whose attention modules rotate q and k with the base model's
# `rotary_emb` and then call the attention function named by `config._attn_implementation`.
# gemma3_text: Λ attention on its full-attention layers; its sliding-window layers keep their
# own window (sliding_layers). gpt_neox: its attention modules are `layer.attention`.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gpt_neox")


class UnsupportedModelError(ValueError):
    """The model does not use rotary position embeddings in a form LM-Infinite can take over."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The base decoder (the module holding `layers` and `rotary_emb`) of a supported model,
    given either the model with a head (`...ForCausalLM`) or the base model itself."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = (" For a multimodal Gemma 3 (gemma3), load its text model (Gemma3ForCausalLM, "
                "model type gemma3_text)." if model_type == "gemma3" else "")
        raise UnsupportedModelError(
            f"lm_infinite supports models of type {', '.join(SUPPORTED_MODEL_TYPES)} (rotary "
            f"position embeddings); got model_type={model_type!r}. Models with absolute or ALiBi "
            f"positions (gpt2, opt, bloom, mpt, ...) cannot use LM-Infinite.{hint}"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("lm_infinite applies to causal language models; this one has "
                                    "use_bidirectional_attention=True")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise UnsupportedModelError(
            f"lm_infinite does not implement attention logit soft-capping "
            f"(attn_logit_softcapping={config.attn_logit_softcapping})")
    decoder = getattr(model, "base_model", model)
    if not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "layers"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no base model with `rotary_emb` and `layers`; "
            "pass a Hugging Face causal LM or its base model"
        )
    return decoder


def attention_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention module: `self_attn`, or `attention` (GPT-NeoX)."""
    attention = getattr(layer, "self_attn", None)
    return attention if attention is not None else layer.attention


def sliding_layers(config) -> dict[int, int]:
    """{layer index: window} of the layers the model itself restricts to a sliding window
    (Gemma 3's "sliding_attention" layers): they keep that window, and LM-Infinite's Λ shape
    applies to the other layers. A query sees the keys at distances 0 .. window - 1, as in
    transformers' sliding_window_overlay."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if not layer_types or window is None:
        return {}
    return {i: int(window) for i, kind in enumerate(layer_types) if kind == "sliding_attention"}


def training_length(config) -> int:
    """The sequence length the model was trained on: `original_max_position_embeddings` for
    scaled RoPE (llama3, yarn, longrope), else `max_position_embeddings`."""
    rope = getattr(config, "rope_parameters", None) or {}
    # Per layer type (Gemma 3): the full-attention layers' RoPE is the one that can be scaled.
    rope = rope.get("full_attention", rope)
    original = rope.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None
    )
    return int(original or config.max_position_embeddings)
