"""lm-infinite: LM-Infinite (Λ-shaped attention with a distance cap) for RoPE language models."""

import torch as _torch  # noqa: F401  (libtorch must be loaded before the extension _C)

from ._version import __version__
from .build import build_info
from .cache import RingKVCache
from .ops import (lambda_attention, lambda_attention_chunk, lambda_attention_chunk_top_k,
                  ring_cache_append)
from .reference import lambda_attention_reference

# The Hugging Face integration imports transformers (seconds); load it on first use.
_HF_NAMES = ("enable", "disable", "LambdaCache", "LambdaSettings", "TopK")


def __getattr__(name):
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'lm_infinite' has no attribute {name!r}")


__all__ = [
    "__version__",
    "enable",
    "disable",
    "LambdaCache",
    "LambdaSettings",
    "TopK",
    "build_info",
    "lambda_attention",
    "lambda_attention_chunk",
    "lambda_attention_chunk_top_k",
    "ring_cache_append",
    "RingKVCache",
    "lambda_attention_reference",
]
