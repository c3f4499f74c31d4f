"""Named settings for `enable(model, preset=...)`: measured best choices for one use, so that
users need not rediscover them. The defaults of `enable` stay the paper's."""

from __future__ import annotations

__all__ = ["PRESETS", "preset_settings"]


def _retrieval(n_local: int) -> dict:
    # docs/top_k_passkey.md: passkey at 16K went from 9/20 (distance_cap n_local) to 19/20 with
    # the first tokens placed at n_local / 4 and top-k on the prompt's last 64 rows; k, the first
    # layer and the placement distance barely mattered. The paged store bounds what each top-k
    # row reads (each head's 8 best blocks of 64 keys) instead of every key of the stream.
    # The first top-k layer stays enable()'s default: layer 4, as measured, or the last layer of
    # a shallower model.
    return dict(distance_cap=n_local // 4, top_k_middle=5, top_k_distance=n_local // 2, top_k_rows=64, top_k_store="paged",
                top_k_blocks=8, top_k_block_size=64)


PRESETS = {"retrieval": _retrieval}


def preset_settings(name: str, n_local: int) -> dict:
    """The `enable` arguments the preset `name` sets for a window of n_local tokens."""
    if name not in PRESETS:
        raise ValueError(f"lm_infinite.enable: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name](n_local)
