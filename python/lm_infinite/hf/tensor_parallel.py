"""Models loaded with transformers' tensor-parallel plan (`tp_plan="auto"`): which rank counts
their attention can be split over.

LM-Infinite needs nothing else from the plan: the attention function sees each rank's own
query and KV heads, and the caches size themselves from the keys they are given, so every
rank keeps the cache of its heads only (1/N of it). What cannot work is a plan that cuts a
head in two: with "colwise" attention projections, the rank count must divide the query and
the KV head counts. transformers loads such a model anyway and fails in its first forward
(a `view` of a shape that is not a whole number of heads), hence this check.
"""

from __future__ import annotations

import math

from torch import nn

from ..distributed import tensor_parallel_size
from .families import UnsupportedModelError

__all__ = ["check_head_split", "rank_counts"]

# Plan styles that leave each rank a slice of the projection's output features (its heads);
# the "..._gather_output" styles give every rank all of them (Phi-3's fused qkv_proj).
_HEAD_SHARDING_STYLES = ("colwise", "packed_colwise")


def rank_counts(n_heads: int, n_kv_heads: int) -> list[int]:
    """The rank counts that split both head counts evenly (e.g. [1, 3] for 9 query / 3 KV)."""
    common = math.gcd(n_heads, n_kv_heads)
    return [n for n in range(1, common + 1) if common % n == 0]


def check_head_split(model: nn.Module) -> None:
    """Raise UnsupportedModelError if `model`'s tensor-parallel plan splits its attention heads
    over a rank count that does not divide them."""
    n_ranks = tensor_parallel_size(model)
    if n_ranks == 1:
        return
    plan = getattr(model, "tp_plan", None) or {}
    attention_keys = (".self_attn.", ".attention.")  # GPT-NeoX: layers.*.attention.query_key_value
    if not any(any(name in key for name in attention_keys) and style in _HEAD_SHARDING_STYLES
               for key, style in plan.items()):
        return  # attention replicated on every rank: nothing is split
    config = model.config
    n_heads = config.num_attention_heads
    n_kv_heads = getattr(config, "num_key_value_heads", None) or n_heads
    if n_heads % n_ranks or n_kv_heads % n_ranks:
        raise UnsupportedModelError(
            f"tensor parallelism over {n_ranks} ranks cannot split {n_heads} query / {n_kv_heads} "
            f"KV heads: every rank needs whole heads. Run on a number of ranks that divides both: "
            f"{', '.join(map(str, rank_counts(n_heads, n_kv_heads)))}"
        )
