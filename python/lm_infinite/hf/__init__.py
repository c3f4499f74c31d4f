"""Hugging Face transformers integration: `enable(model)` and `LambdaCache(model)`."""

from .cache import LambdaCache
from .patching import cache_argument_name, disable, enable
from .families import SUPPORTED_MODEL_TYPES, UnsupportedModelError

__all__ = ["enable", "disable", "LambdaCache", "cache_argument_name", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError"]
