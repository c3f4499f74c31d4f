"""Hugging Face transformers integration: `enable(model, LambdaSettings(...))` and `LambdaCache(model)`.

This package's public names are the ones below; its modules (families, patching, settings,
state, ...) are internal and may change. Applications (lm_infinite.apps, bench/) import from here."""

from .cache import LambdaCache
from .families import SUPPORTED_MODEL_TYPES, UnsupportedModelError, decoder_of, training_length
from .patching import cache_argument_name, disable, enable
from .presets import PRESETS, preset_settings
from .settings import LambdaSettings, ResolvedSettings, TopK, top_k_defaults
from .state import ForwardContext, LambdaState, state_of
from .tensor_parallel import check_head_split

__all__ = ["enable", "disable", "LambdaCache", "LambdaSettings", "TopK", "ResolvedSettings", "ForwardContext",
           "LambdaState", "state_of", "cache_argument_name", "decoder_of", "training_length", "top_k_defaults",
           "PRESETS", "preset_settings", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "check_head_split"]
