"""LM-Infinite model architectures for vLLM: the stock Llama, Mistral, Qwen2 and Qwen3 models
with an identity rotary embedding and LM-Infinite attention layers.

Selected per model with `hf_overrides` (see lm_infinite.vllm.hf_overrides): the architecture
name, e.g. "LMInfiniteLlamaForCausalLM", and the settings under the config key "lm_infinite":
{"n_global": 10, "n_local": ..., "distance_cap": ...}. Positions never reach a rotary table:
the layers' `rotary_emb` return q and k unchanged, the attention backend rotates them by
relative position (never above n_local + a chunk), so a request may run far past the model's
training length.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from vllm.model_executor.layers.attention import Attention

from .backend import LambdaAttentionBackend
from .kv_cache import LambdaSpec

__all__ = ["ARCHITECTURES", "LambdaAttention", "IdentityRotary", "lambda_settings"]

# vLLM architecture name -> (stock architecture, vLLM module, stock class, modules whose
# attention layers the model builds through their `Attention` global).
FAMILIES = {
    "LMInfiniteLlamaForCausalLM": ("LlamaForCausalLM", "llama", "LlamaForCausalLM", ("llama",)),
    "LMInfiniteMistralForCausalLM": ("MistralForCausalLM", "mistral", "MistralForCausalLM", ("llama", "mistral")),
    "LMInfiniteQwen2ForCausalLM": ("Qwen2ForCausalLM", "qwen2", "Qwen2ForCausalLM", ("qwen2",)),
    "LMInfiniteQwen3ForCausalLM": ("Qwen3ForCausalLM", "qwen3", "Qwen3ForCausalLM", ("qwen3", "qwen2")),
}
ARCHITECTURES = {family[0]: name for name, family in FAMILIES.items()}  # stock -> ours
CONFIG_KEY = "lm_infinite"


def _training_length(config) -> int:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    original = rope.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None)
    return int(original or config.max_position_embeddings)


def lambda_settings(config) -> dict:
    """n_global, n_local, distance_cap from the HF config's "lm_infinite" entry (a dict, or an
    object with those attributes), with the project's defaults: n_global 10, n_local the
    training length, distance_cap n_local."""
    given = getattr(config, CONFIG_KEY, None) or {}
    if not isinstance(given, dict):
        given = dict(vars(given))
    unknown = set(given) - {"n_global", "n_local", "distance_cap"}
    if unknown:
        raise ValueError(f"lm_infinite: unknown settings {sorted(unknown)} in hf_overrides['{CONFIG_KEY}'] "
                         "(known: n_global, n_local, distance_cap)")
    n_local = given.get("n_local")
    n_local = _training_length(config) if n_local is None else n_local
    distance_cap = given.get("distance_cap")
    settings = dict(n_global=given.get("n_global", 10), n_local=n_local,
                    distance_cap=n_local if distance_cap is None else distance_cap)
    for name, value in settings.items():
        low = 1 if name == "n_local" else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"lm_infinite: {name} must be an int >= {low}, got {value!r}")
    return settings


class IdentityRotary(nn.Module):
    """Stands in for a layer's rotary embedding: q and k reach attention (and the KV cache)
    unrotated, whatever the positions."""

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        return query, key


class LambdaAttention(Attention):
    """vLLM's Attention layer with the LM-Infinite backend and a KV cache that keeps the first
    n_global tokens and the last n_local (LambdaSpec). Built in place of `Attention` while a
    family's model is constructed (see _lambda_attention_layers)."""

    settings: dict = {}  # set by _lambda_attention_layers for the model being built

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 cache_config=None, quant_config=None, logits_soft_cap=None,
                 per_layer_sliding_window=None, prefix="", attn_type="decoder", **kwargs):
        # A sliding window of the model (Mistral's config, layer_types) gives way to LM-Infinite's.
        kwargs.pop("attn_backend", None)
        super().__init__(num_heads, head_size, scale, num_kv_heads=num_kv_heads,
                         alibi_slopes=alibi_slopes, cache_config=cache_config,
                         quant_config=quant_config, logits_soft_cap=logits_soft_cap,
                         per_layer_sliding_window=None, prefix=prefix, attn_type=attn_type,
                         attn_backend=LambdaAttentionBackend, **kwargs, **LambdaAttention.settings)
        self.sliding_window = None
        self.lambda_settings = dict(LambdaAttention.settings)

    def get_kv_cache_spec(self, vllm_config):
        from vllm.v1.kv_cache_interface import get_kv_quant_mode

        return LambdaSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=self.num_kv_heads,
            head_size=self.head_size,
            head_size_v=self.head_size_v,
            dtype=self.kv_cache_torch_dtype,
            kv_quant_mode=get_kv_quant_mode(self.kv_cache_dtype),
            sliding_window=self.lambda_settings["n_local"],
            n_global=self.lambda_settings["n_global"],
        )


@contextlib.contextmanager
def _lambda_attention_layers(module_names, settings):
    """While the model is built, its modules' `Attention` is LambdaAttention (model
    construction runs in one thread, once per model)."""
    modules = [importlib.import_module(f"vllm.model_executor.models.{m}") for m in module_names]
    saved = [m.Attention for m in modules]
    LambdaAttention.settings = settings
    try:
        for m in modules:
            m.Attention = LambdaAttention
        yield
    finally:
        for m, original in zip(modules, saved):
            m.Attention = original
        LambdaAttention.settings = {}


def _rotary_frequencies(rotary: nn.Module) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim / 2], cos/sin scaling) of a vLLM rotary embedding, for
    the rotation kinds whose angles are position * inv_freq (default and llama3 scaling)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    kind = type(rotary).__name__
    if not isinstance(rotary, RotaryEmbedding) or kind not in ("RotaryEmbedding", "Llama3RotaryEmbedding"):
        raise ValueError(f"lm_infinite: the model's rotary embedding {kind} is not supported "
                         "(supported: default RoPE and llama3 scaling)")
    if not rotary.is_neox_style:
        raise ValueError("lm_infinite: only rotate-half (neox-style) RoPE is supported")
    return rotary._compute_inv_freq(rotary.base).to(torch.float32), 1.0


def _take_over_rotary(model: nn.Module) -> int:
    """Give each LambdaAttention its layer's rotary frequencies and make the layer's rotary
    embedding an identity. Returns the number of layers changed."""
    changed = 0
    for module in model.modules():
        attn, rotary = getattr(module, "attn", None), getattr(module, "rotary_emb", None)
        if isinstance(attn, LambdaAttention) and rotary is not None and not isinstance(rotary, IdentityRotary):
            inv_freq, scaling = _rotary_frequencies(rotary)
            attn.impl.set_rotary(inv_freq, scaling)
            module.rotary_emb = IdentityRotary()
            changed += 1
    return changed


def _make_architecture(name: str):
    _, module_name, class_name, attention_modules = FAMILIES[name]
    stock = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), class_name)

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        settings = lambda_settings(config.get_text_config() if hasattr(config, "get_text_config") else config)
        with _lambda_attention_layers(attention_modules, settings):
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        if _take_over_rotary(self) == 0:
            raise RuntimeError(f"lm_infinite: {name} found no attention layer to take over")

    return type(name, (stock,), {"__init__": __init__, "__module__": __name__,
                                 "__doc__": f"{class_name} with LM-Infinite attention."})


LMInfiniteLlamaForCausalLM = _make_architecture("LMInfiniteLlamaForCausalLM")
LMInfiniteMistralForCausalLM = _make_architecture("LMInfiniteMistralForCausalLM")
LMInfiniteQwen2ForCausalLM = _make_architecture("LMInfiniteQwen2ForCausalLM")
LMInfiniteQwen3ForCausalLM = _make_architecture("LMInfiniteQwen3ForCausalLM")
