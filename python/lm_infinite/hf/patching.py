"""enable / disable: switch a Hugging Face model to LM-Infinite attention in place."""

from __future__ import annotations

import copy
import inspect
import warnings

from torch import nn

from .attention import ATTENTION_NAME
from .cache import LambdaCache
from .families import attention_of, decoder_of, sliding_layers
from .padding import padding_from_mask
from .rotary import UnrotatedRotaryEmbedding
from .settings import LambdaSettings, settings_from_keywords, top_k_defaults
from .state import CONTEXT_KEYWORD, ForwardContext, LambdaState, LayerRule, state_of
from .tensor_parallel import check_head_split

__all__ = ["enable", "disable", "cache_argument_name", "top_k_defaults"]


def cache_argument_name(module: nn.Module) -> str:
    """The forward's cache keyword: `cache` in newer transformers (5.24), `past_key_values` in
    older ones (5.17), where passing `cache=` would be silently ignored."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def enable(model: nn.Module, settings: LambdaSettings | None = None, *, preset: str | None = None,
           n_global: int | None = None, n_local: int | None = None, distance_cap: int | None = None,
           **top_k_keywords) -> nn.Module:
    """Make `model` compute LM-Infinite attention (in place; returns the model).

    settings: a LambdaSettings (n_global, n_local, distance_cap, and top_k, a TopK for the
    paper's top-k middle attention); None: the paper's defaults (G = 10, L = the model's
    training length, D = L). preset: named settings measured best for one use ("retrieval":
    lm_infinite.hf.presets), which `settings` and the keywords refine. n_global, n_local,
    distance_cap: shorthand for those fields. The top_k_* keywords of earlier versions still
    work and warn (use LambdaSettings(top_k=TopK(...))).

    Sequences up to n_local give the stock model's result. Calling it again re-applies the
    new settings. A model loaded with transformers' tensor-parallel plan works as it is, each
    rank attending with (and caching) its own heads.
    """
    decoder = decoder_of(model)  # first: a model of another family is refused by name
    check_head_split(model)
    wanted = settings_from_keywords(settings, preset, model, n_global=n_global, n_local=n_local,
                                    distance_cap=distance_cap, **top_k_keywords)
    if top_k_keywords:
        warnings.warn(f"lm_infinite.enable: {', '.join(sorted(top_k_keywords))} are deprecated; pass "
                      "settings=LambdaSettings(top_k=TopK(...))", DeprecationWarning, stacklevel=2)
    resolved = wanted.resolve(model)
    if getattr(model, "_lm_infinite", None) is not None:
        disable(model)

    _own_config(model)
    rotary = UnrotatedRotaryEmbedding(decoder.rotary_emb)
    state = LambdaState(resolved, inv_freq=rotary.inv_freq, attention_scaling=rotary.attention_scaling,
                        layers=_layer_rules(model.config, resolved, rotary, len(decoder.layers)))
    decoder.rotary_emb = rotary
    for layer in decoder.layers:
        attention_of(layer)._lm_infinite = state
    state.previous_attn_implementation = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    state.hooks = (decoder.register_forward_pre_hook(_binder(state, cache_argument_name(decoder)),
                                                     with_kwargs=True),)
    model._lm_infinite = decoder._lm_infinite = state
    return model


def disable(model: nn.Module) -> nn.Module:
    """Undo `enable`: stock rotary embedding, attention and forward again."""
    state = state_of(model)
    decoder = decoder_of(model)
    decoder.rotary_emb = decoder.rotary_emb.original
    for layer in decoder.layers:
        del attention_of(layer)._lm_infinite
    for hook in state.hooks:
        hook.remove()
    model.set_attn_implementation(state.previous_attn_implementation)
    del decoder._lm_infinite
    if model is not decoder:
        del model._lm_infinite
    return model


def _layer_rules(config, settings, rotary: UnrotatedRotaryEmbedding, n_layers: int) -> tuple:
    """One LayerRule per layer: the layers the model restricts to a sliding window keep it
    (G = 0, L = window); the others follow `settings`. Each rotates with its layer type's RoPE."""
    windows = sliding_layers(config)
    layer_types = getattr(config, "layer_types", None) or [None] * n_layers
    rules = []
    for i in range(n_layers):
        inv_freq, scaling = rotary.frequencies(layer_types[i])
        if i in windows:
            rules.append(LayerRule(0, windows[i], windows[i], inv_freq, scaling, sliding=True))
        else:
            rules.append(LayerRule(settings.n_global, settings.n_local, settings.distance_cap,
                                   inv_freq, scaling))
    return tuple(rules)


def _own_config(model: nn.Module) -> None:
    """Give the model a config object of its own. Modules read `config._attn_implementation`
    from a config shared by every model built from it; without this, enabling one model would
    switch the others' attention too."""
    shared = model.config
    own = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = own


def _binder(state: LambdaState, cache_name: str):
    # The hook gets the decoder as `module`: a closure over the decoder would make every
    # enabled model a reference cycle (decoder -> hook -> decoder), kept after it is dropped.
    def bind_context(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = module.config.use_cache and not module.training
        if cache is None and use_cache:
            # What transformers would do with a DynamicCache, with memory that stays bounded.
            cache = LambdaCache(module)
            kwargs.pop("past_key_values", None)
            kwargs[cache_name] = cache
        if isinstance(cache, LambdaCache) and cache.settings != state.settings:
            raise ValueError(
                f"lm_infinite: this LambdaCache was made for other settings ({cache.settings}) than the "
                f"model's now ({state.settings}); make a new LambdaCache(model) after enable()")
        given = kwargs.get(CONTEXT_KEYWORD) or ForwardContext()
        mask_padding = _forward_padding(args, kwargs, cache)
        padding_rows = given.padding_rows if mask_padding is None else mask_padding.chunk
        kwargs[CONTEXT_KEYWORD] = ForwardContext(cache=cache, padding_rows=padding_rows,
                                                 mask_padding=mask_padding, top_k_rows=given.top_k_rows)
        return args, kwargs

    return bind_context


def _forward_padding(args, kwargs, cache):
    """The left padding the forward's attention_mask describes (hf/padding.py), checked
    against the tokens fed and the columns the cache already holds."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return None
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        raise ValueError("lm_infinite: a forward with an attention_mask needs input_ids or inputs_embeds")
    past = 0 if cache is None else cache.get_seq_length()
    return padding_from_mask(mask, tokens.shape[0], tokens.shape[1], past)
