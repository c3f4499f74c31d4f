"""enable / disable: switch a Hugging Face model to LM-Infinite attention in place."""

from __future__ import annotations

import copy
import inspect

from torch import nn

from ..ops import MAX_POSITION
from .attention import ATTENTION_NAME
from .cache import LambdaCache
from .families import decoder_of, training_length
from .padding import padding_from_mask
from .presets import preset_settings
from .rotary import UnrotatedRotaryEmbedding
from .state import LambdaState, state_of
from .tensor_parallel import check_head_split

__all__ = ["enable", "disable", "cache_argument_name", "top_k_defaults"]


def cache_argument_name(module: nn.Module) -> str:
    """The forward's cache keyword: `cache` in newer transformers (5.24), `past_key_values` in
    older ones (5.17), where passing `cache=` would be silently ignored."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def top_k_defaults(model: nn.Module, n_local: int) -> tuple[int, int]:
    """(top_k_first_layer, top_k_distance) when not given: the official code's layer 4 (or the
    last layer of a shallower model) and half the window (2048 for its 4096 window)."""
    return min(4, len(decoder_of(model).layers) - 1), n_local // 2


def _check_int(name: str, value, low: int, high: int = MAX_POSITION) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        bound = "2^62" if high == MAX_POSITION else str(high)
        raise ValueError(f"lm_infinite.enable: {name} must be an int in [{low}, {bound}], got {value!r}")


def enable(model: nn.Module, n_global: int = 10, n_local: int | None = None,
           distance_cap: int | None = None, *, preset: str | None = None,
           top_k_middle: int | None = None, top_k_first_layer: int | None = None,
           top_k_distance: int | None = None, top_k_rows: int | str | None = None,
           top_k_store: str | None = None, top_k_blocks: int | None = None,
           top_k_block_size: int | None = None, max_middle_tokens: int | None = None,
           offload: bool = False) -> nn.Module:
    """Make `model` compute LM-Infinite attention (in place; returns the model).

    n_global: leading tokens every query may see (G). n_local: the window of most recent tokens
    (L), default the model's training length. distance_cap: the distance global tokens are
    placed at (D), default n_local. Sequences up to n_local give the stock model's result.
    Calling it again re-applies the new settings. A model loaded with transformers'
    tensor-parallel plan works as it is, each rank attending with (and caching) its own heads.

    top_k_middle > 0 adds the paper's top-k middle attention: in layers >= top_k_first_layer
    (default 4, as the official code) the last top_k_rows rows of each forward (default 1, the
    official variant; "all": every row) also attend, per head, to their top_k_middle
    highest-scoring keys among those the Λ mask hides, placed at rotary distance
    top_k_distance (default n_local // 2: 2048 for the official 4096 window). LambdaStream
    counts the rows over the whole prompt, however it is chunked; every generated token uses
    top-k.

    Those layers keep the middle in a store. top_k_store="exact" (the default, the paper's):
    every key, all scored by each top-k row; memory and time grow with the stream.
    "paged" (lm_infinite.paged_middle): blocks of top_k_block_size keys (default 64), each
    head's top_k_blocks best blocks (default 8) chosen through per-block min/max summaries,
    exact top-k among their keys. With the paged store, max_middle_tokens keeps only the newest
    tokens (whole blocks, the oldest dropped first; None: no bound) and offload=True keeps the
    blocks in host memory, only the summaries on the model's device.

    preset="retrieval" sets the measured best setting for recall beyond the window
    (hf/presets.py: distance_cap n_local // 4, top-5 from layer 4 (or the last layer, as by default) at n_local // 2 on the last
    64 rows, paged store); arguments given explicitly override the preset's.
    """
    decoder = decoder_of(model)
    check_head_split(model)
    n_local = training_length(model.config) if n_local is None else n_local
    _check_int("n_local", n_local, 1)
    given = dict(distance_cap=distance_cap, top_k_middle=top_k_middle,
                 top_k_first_layer=top_k_first_layer, top_k_distance=top_k_distance,
                 top_k_rows=top_k_rows, top_k_store=top_k_store, top_k_blocks=top_k_blocks,
                 top_k_block_size=top_k_block_size)
    settings = preset_settings(preset, n_local) if preset is not None else {}
    settings.update({name: value for name, value in given.items() if value is not None})
    distance_cap = settings.get("distance_cap", n_local)
    top_k_middle = settings.get("top_k_middle", 0)
    top_k_rows = settings.get("top_k_rows", 1)
    top_k_store = settings.get("top_k_store", "exact")
    _check_int("n_global", n_global, 0)
    if n_global + n_local > MAX_POSITION:
        raise ValueError(f"lm_infinite.enable: n_global + n_local must be at most 2^62, got "
                         f"{n_global} + {n_local}")
    _check_int("distance_cap", distance_cap, 0)
    _check_int("top_k_middle", top_k_middle, 0)
    default_first_layer, default_distance = top_k_defaults(model, n_local)
    top_k_first_layer = settings.get("top_k_first_layer", default_first_layer)
    # A first layer past the last would silently turn top-k off.
    _check_int("top_k_first_layer", top_k_first_layer, 0,
               len(decoder.layers) - 1 if top_k_middle > 0 else MAX_POSITION)
    top_k_distance = settings.get("top_k_distance", default_distance)
    _check_int("top_k_distance", top_k_distance, 0)
    if top_k_rows == "all":
        top_k_rows = None
    elif not isinstance(top_k_rows, int) or isinstance(top_k_rows, bool) or top_k_rows < 1:
        raise ValueError(f"lm_infinite.enable: top_k_rows must be an int >= 1 or 'all', got {top_k_rows!r}")
    store_options = _store_options(top_k_store, settings.get("top_k_blocks", 8),
                                   settings.get("top_k_block_size", 64), max_middle_tokens, offload)
    if getattr(model, "_lm_infinite", None) is not None:
        disable(model)

    _own_config(model)
    rotary = UnrotatedRotaryEmbedding(decoder.rotary_emb)
    state = LambdaState(
        n_global=n_global, n_local=n_local, distance_cap=distance_cap,
        num_layers=len(decoder.layers), inv_freq=rotary.inv_freq,
        attention_scaling=rotary.attention_scaling, top_k=top_k_middle,
        top_k_first_layer=top_k_first_layer, top_k_distance=top_k_distance, top_k_rows=top_k_rows,
        top_k_store=top_k_store, top_k_store_options=store_options,
    )
    decoder.rotary_emb = rotary
    for layer in decoder.layers:
        layer.self_attn._lm_infinite = state
    state.previous_attn_implementation = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    cache_name = cache_argument_name(decoder)
    state.hooks = (
        decoder.register_forward_pre_hook(_binder(state, cache_name), with_kwargs=True),
        decoder.register_forward_hook(_unbinder(state), always_call=True),
    )
    model._lm_infinite = decoder._lm_infinite = state
    return model


def _store_options(store: str, blocks, block_size, max_middle_tokens, offload) -> dict:
    """The paged store's options (the exact store has none; asking it for a bound or offload
    is an error rather than silently unbounded)."""
    if store == "exact":
        if max_middle_tokens is not None or offload:
            raise ValueError("lm_infinite.enable: max_middle_tokens and offload need top_k_store='paged'")
        return {}
    if store != "paged":
        raise ValueError(f"lm_infinite.enable: top_k_store must be 'exact' or 'paged', got {store!r}")
    _check_int("top_k_blocks", blocks, 1)
    _check_int("top_k_block_size", block_size, 1)
    if max_middle_tokens is not None:
        _check_int("max_middle_tokens", max_middle_tokens, block_size)
    if not isinstance(offload, bool):
        raise ValueError(f"lm_infinite.enable: offload must be a bool, got {offload!r}")
    return dict(top_k_blocks=blocks, block_size=block_size, max_middle_tokens=max_middle_tokens,
                offload=offload)


def disable(model: nn.Module) -> nn.Module:
    """Undo `enable`: stock rotary embedding, attention and forward again."""
    state = state_of(model)
    decoder = decoder_of(model)
    decoder.rotary_emb = decoder.rotary_emb.original
    for layer in decoder.layers:
        del layer.self_attn._lm_infinite
    for hook in state.hooks:
        hook.remove()
    model.set_attn_implementation(state.previous_attn_implementation)
    del decoder._lm_infinite
    if model is not decoder:
        del model._lm_infinite
    return model


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
    def bind_cache(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = module.config.use_cache and not module.training
        if cache is None and use_cache:
            # What transformers would do with a DynamicCache, with memory that stays bounded.
            cache = LambdaCache(module)
            kwargs.pop("past_key_values", None)
            kwargs[cache_name] = cache
        if isinstance(cache, LambdaCache) and cache.settings != state.cache_settings():
            raise ValueError(
                f"lm_infinite: this LambdaCache was made for other settings (layers, n_global, n_local, "
                f"distance_cap, top-k: {cache.settings}) than the model's now "
                f"({state.cache_settings()}); make a new LambdaCache(model) after enable()")
        state.forward_padding = _forward_padding(args, kwargs, cache)
        state.active_cache = cache
        return args, kwargs

    return bind_cache


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


def _unbinder(state: LambdaState):
    def unbind_cache(module, args, output):
        state.active_cache = None
        state.forward_padding = None

    return unbind_cache
