"""lm-infinite: LM-Infinite (Λ-shaped attention with a distance cap) for RoPE language models."""

import torch as _torch  # noqa: F401  (libtorch must be loaded before the extension _C)

from ._version import __version__
from .build import build_info
from .cache import RingKVCache
from .ops import lambda_attention, lambda_attention_chunk, ring_cache_append
from .reference import lambda_attention_reference

__all__ = [
    "__version__",
    "build_info",
    "lambda_attention",
    "lambda_attention_chunk",
    "ring_cache_append",
    "RingKVCache",
    "lambda_attention_reference",
]
