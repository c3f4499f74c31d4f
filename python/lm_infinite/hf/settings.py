"""LambdaSettings: what `enable` is asked for, and the settings it resolves them to for a model.

`LambdaSettings` (with `TopK` for the optional top-k middle attention) is what a user writes:
fields left None take their defaults, which depend on the model (its training length, its
depth). `resolve(model)` fills them in and checks every value once, naming the field; the
resulting `ResolvedSettings` is what the attention, the cache and the streams read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

from ..ops import MAX_POSITION
from .families import decoder_of, training_length
from .presets import preset_settings

__all__ = ["LambdaSettings", "ResolvedSettings", "TopK", "settings_from_keywords", "top_k_defaults"]


@dataclass(frozen=True)
class TopK:
    """The paper's top-k middle attention. In layers >= first_layer, the last `rows` rows of
    each forward ("all": every row) also attend, per head, to their k highest-scoring keys
    among those the Λ mask hides, placed at rotary distance `distance`.

    store "exact" keeps every middle key (memory and time grow with the stream); "paged"
    (lm_infinite.paged_middle) keeps blocks of block_size keys, scores each head's `blocks`
    best blocks through per-block summaries, and can bound the kept tokens
    (max_middle_tokens, whole blocks, oldest dropped first) and keep the blocks in host memory
    (offload). None: the defaults, layer 4 (or the last layer of a shallower model) and
    n_local // 2 (2048 for the official code's 4096 window)."""
    k: int = 5
    first_layer: int | None = None
    distance: int | None = None
    rows: int | Literal["all"] = 1
    store: Literal["exact", "paged"] = "exact"
    blocks: int = 8
    block_size: int = 64
    max_middle_tokens: int | None = None
    offload: bool = False


@dataclass(frozen=True)
class LambdaSettings:
    """LM-Infinite's settings. n_global: leading tokens every query may see (G). n_local: the
    window of most recent tokens (L; None: the model's training length). distance_cap: the
    rotary distance the global tokens are placed at (D; None: n_local). top_k: top-k middle
    attention, or None for the plain Λ shape. Sequences up to n_local give the stock model's
    result."""
    n_global: int = 10
    n_local: int | None = None
    distance_cap: int | None = None
    top_k: TopK | None = None

    @classmethod
    def preset(cls, name: str, model, *, n_global: int = 10, n_local: int | None = None) -> "LambdaSettings":
        """The named preset (hf/presets.py) for `model`'s window: "retrieval" is the measured
        best setting for recall beyond the window."""
        window = training_length(model.config) if n_local is None else n_local
        values = preset_settings(name, window)
        top_k = TopK(k=values["top_k_middle"], distance=values["top_k_distance"], rows=values["top_k_rows"],
                     store=values["top_k_store"], blocks=values["top_k_blocks"],
                     block_size=values["top_k_block_size"])
        return cls(n_global=n_global, n_local=n_local, distance_cap=values["distance_cap"], top_k=top_k)

    def resolve(self, model) -> "ResolvedSettings":
        """Every default filled in for `model`, every value checked (ValueError naming it)."""
        n_local = training_length(model.config) if self.n_local is None else self.n_local
        _check_int("n_local", n_local, 1)
        _check_int("n_global", self.n_global, 0)
        if self.n_global + n_local > MAX_POSITION:
            raise ValueError(f"lm_infinite.enable: n_global + n_local must be at most 2^62, got "
                             f"{self.n_global} + {n_local}")
        distance_cap = n_local if self.distance_cap is None else self.distance_cap
        _check_int("distance_cap", distance_cap, 0)
        n_layers = len(decoder_of(model).layers)
        resolved = ResolvedSettings(n_global=self.n_global, n_local=n_local, distance_cap=distance_cap,
                                    num_layers=n_layers)
        if self.top_k is None:
            return resolved
        top_k = self.top_k
        if not isinstance(top_k, TopK):
            raise ValueError(f"lm_infinite.enable: top_k must be a TopK or None, got {top_k!r}")
        _check_int("top_k.k", top_k.k, 0)
        if top_k.k == 0:
            return resolved
        first_layer, distance = top_k_defaults(model, n_local)
        first_layer = first_layer if top_k.first_layer is None else top_k.first_layer
        # A first layer past the last would silently turn top-k off.
        _check_int("top_k.first_layer", first_layer, 0, n_layers - 1)
        distance = distance if top_k.distance is None else top_k.distance
        _check_int("top_k.distance", distance, 0)
        if top_k.rows == "all":
            rows = None
        else:
            _check_int("top_k.rows", top_k.rows, 1, message="an int >= 1 or 'all'")
            rows = top_k.rows
        return replace(resolved, top_k=top_k.k, top_k_first_layer=first_layer, top_k_distance=distance,
                       top_k_rows=rows, top_k_store=top_k.store, top_k_store_options=_store_options(top_k))


@dataclass(frozen=True)
class ResolvedSettings:
    """LambdaSettings with every default filled in for one model (top_k = 0: no top-k)."""
    n_global: int
    n_local: int
    distance_cap: int
    num_layers: int
    top_k: int = 0
    top_k_first_layer: int = 0
    top_k_distance: int = 0
    top_k_rows: int | None = 1  # None: every row
    top_k_store: str = "exact"
    top_k_store_options: tuple = ()  # (name, value) pairs of the store's options

    def uses_top_k(self, layer_idx: int) -> bool:
        return self.top_k > 0 and layer_idx >= self.top_k_first_layer

    def top_k_first_row(self, n_query: int, rows: int | None = None) -> int:
        """First row of an n_query-row forward that uses top-k; `rows` overrides top_k_rows
        (a stream's chunk counts the rows of its whole prompt)."""
        rows = self.top_k_rows if rows is None else rows
        return 0 if rows is None else max(0, n_query - rows)


def top_k_defaults(model, n_local: int) -> tuple[int, int]:
    """(first layer, distance) of top-k when not given: the official code's layer 4 (or the
    last layer of a shallower model) and half the window (2048 for its 4096 window)."""
    return min(4, len(decoder_of(model).layers) - 1), n_local // 2


# enable()'s keywords before LambdaSettings, and the TopK field each one sets.
_TOP_K_KEYWORDS = {"top_k_middle": "k", "top_k_first_layer": "first_layer", "top_k_distance": "distance",
                   "top_k_rows": "rows", "top_k_store": "store", "top_k_blocks": "blocks",
                   "top_k_block_size": "block_size", "max_middle_tokens": "max_middle_tokens",
                   "offload": "offload"}


def settings_from_keywords(settings: LambdaSettings | None, preset: str | None, model, *,
                           n_global=None, n_local=None, distance_cap=None, **top_k_keywords) -> LambdaSettings:
    """enable()'s arguments as one LambdaSettings: a preset's values, then `settings`' (or the
    keywords'), then any keyword given. The old top_k_* keywords map onto TopK."""
    unknown = set(top_k_keywords) - set(_TOP_K_KEYWORDS)
    if unknown:
        raise TypeError(f"lm_infinite.enable: unexpected argument(s) {', '.join(sorted(unknown))}; "
                        f"settings go in a LambdaSettings (fields: {', '.join(f.name for f in fields(LambdaSettings))})")
    if settings is not None and not isinstance(settings, LambdaSettings):
        raise TypeError(f"lm_infinite.enable: settings must be a LambdaSettings, got {type(settings).__name__}")
    if preset is not None:
        base = LambdaSettings.preset(preset, model, n_local=n_local if settings is None else settings.n_local)
        if settings is not None:
            given = {f.name: getattr(settings, f.name) for f in fields(settings)
                     if getattr(settings, f.name) != getattr(LambdaSettings(), f.name)}
            base = replace(base, **given)
    else:
        base = settings or LambdaSettings()
    given = {name: value for name, value in dict(n_global=n_global, n_local=n_local,
                                                 distance_cap=distance_cap).items() if value is not None}
    base = replace(base, **given)
    given_top_k = {_TOP_K_KEYWORDS[name]: value for name, value in top_k_keywords.items() if value is not None}
    if given_top_k.get("offload") is False:
        del given_top_k["offload"]
    if given_top_k:
        base = replace(base, top_k=replace(base.top_k or TopK(k=0), **given_top_k))
    return base


def _store_options(top_k: TopK) -> tuple:
    """The paged store's options; asking the exact store for a bound or offload is an error
    rather than silently unbounded."""
    if top_k.store == "exact":
        if top_k.max_middle_tokens is not None or top_k.offload:
            raise ValueError("lm_infinite.enable: max_middle_tokens and offload need the 'paged' top-k store")
        return ()
    if top_k.store != "paged":
        raise ValueError(f"lm_infinite.enable: top_k.store must be 'exact' or 'paged', got {top_k.store!r}")
    _check_int("top_k.blocks", top_k.blocks, 1)
    _check_int("top_k.block_size", top_k.block_size, 1)
    if top_k.max_middle_tokens is not None:
        _check_int("top_k.max_middle_tokens", top_k.max_middle_tokens, top_k.block_size)
    if not isinstance(top_k.offload, bool):
        raise ValueError(f"lm_infinite.enable: top_k.offload must be a bool, got {top_k.offload!r}")
    return tuple(dict(top_k_blocks=top_k.blocks, block_size=top_k.block_size,
                      max_middle_tokens=top_k.max_middle_tokens, offload=top_k.offload).items())


def _check_int(name: str, value, low: int, high: int = MAX_POSITION, message: str | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        bound = "2^62" if high == MAX_POSITION else str(high)
        raise ValueError(f"lm_infinite.enable: {name} must be {message or f'an int in [{low}, {bound}]'}, "
                         f"got {value!r}")


def as_dict(settings: ResolvedSettings) -> dict:
    """The resolved settings as plain values (for reports)."""
    values = asdict(settings)
    values["top_k_store_options"] = dict(settings.top_k_store_options)
    return values
