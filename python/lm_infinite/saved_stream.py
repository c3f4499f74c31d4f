"""A LambdaStream saved to a file and loaded back: LambdaStream.save / LambdaStream.load.

The file is a torch.save'd dict of tensors and plain values only (so that
torch.load(weights_only=True) reads it, and a file cannot run code):

    format          "lm_infinite.LambdaStream"
    format_version  FORMAT_VERSION (a file of another version is refused)
    lm_infinite     the version that wrote it (informative)
    model           the model's fingerprint (model_fingerprint): the config values that shape the
                    cache and the logits, the parameters' dtype, a hash of a few weight tensors
    settings        the cache's resolved LambdaSettings, as plain values (settings.as_dict)
    chunk_size      the stream's prefill chunk size (the loaded stream takes it by default)
    pinned_tokens   the stream's pinned prefix (LambdaCache; version 2 on, 0 in version 1)
    next_logits     float32 [batch, vocab] or None
    layers          per layer: None (an empty ring) or {k, v, positions, next_position (the
                    ring's tensors, whole), n_seen, padded, middle: None or {k, v, positions
                    (the filled part of an exact top-k middle store), length}}

Loading into a model or settings other than the saved ones raises a ValueError naming what
differs. The restore is exact: the loaded stream's feeds and generations are bit-identical to
the saved stream's. Writes are atomic (a temporary file in the same directory, then os.replace),
so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from ._version import __version__
from .cache import MiddleStore
from .distributed import tensor_parallel_size
from .hf import state_of
from .hf.settings import as_dict

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "model_fingerprint", "save_stream", "load_stream"]

FORMAT = "lm_infinite.LambdaStream"
FORMAT_VERSION = 2
# Versions this one reads: version 1 had no pinned prefix (pinned_tokens 0).
READABLE_VERSIONS = (1, 2)

# Config values that decide the cache's shape and what the logits mean.
_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
# Elements hashed from each of a few parameters: enough to tell two checkpoints of one
# architecture apart, cheap enough to compute at every save.
_HASHED_ELEMENTS = 4096


def model_fingerprint(model) -> dict:
    """Plain values that identify `model` for a saved stream: config fields, the dtype of its
    parameters and a blake2b of the first elements of its first, middle and last parameters."""
    config = model.config
    fingerprint = {name: _plain(getattr(config, name, None)) for name in _CONFIG_FIELDS}
    parameters = list(model.named_parameters())
    fingerprint["dtype"] = str(parameters[0][1].dtype).removeprefix("torch.")
    digest = hashlib.blake2b(digest_size=16)
    for name, parameter in {id(p): (n, p) for n, p in
                            (parameters[0], parameters[len(parameters) // 2], parameters[-1])}.values():
        head = parameter.detach().reshape(-1)[:_HASHED_ELEMENTS].contiguous().cpu()
        digest.update(name.encode())
        digest.update(head.view(torch.uint8).numpy().tobytes())
    fingerprint["weights_blake2b"] = digest.hexdigest()
    return fingerprint


def _plain(value):
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _settings_dict(settings) -> dict:
    values = as_dict(settings)
    values["top_k_store_options"] = {k: _plain(v) for k, v in values["top_k_store_options"].items()}
    return values


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    # A copy, never a view: torch.save would otherwise write the whole storage it views.
    return tensor.detach().to("cpu", copy=True).contiguous()


def stream_state(stream) -> dict:
    """The dict save_stream writes (tensors copied to the CPU)."""
    if tensor_parallel_size(stream.model) > 1:
        raise ValueError("LambdaStream.save: a stream of a tensor-parallel model cannot be saved "
                         "(each rank holds a shard of its cache)")
    layers = []
    for index, layer in enumerate(stream.cache.layers):
        ring = layer.ring
        if ring is None:
            layers.append(None)
            continue
        middle = None
        if ring.middle is not None:
            if not isinstance(ring.middle, MiddleStore):
                raise ValueError(f"LambdaStream.save: layer {index} keeps a {type(ring.middle).__name__} "
                                 "(the paged top-k store), which cannot be saved yet; the exact store "
                                 "(TopK(store='exact')) can")
            n = ring.middle.length
            middle = dict(k=_cpu(ring.middle.k[:, :, :n]), v=_cpu(ring.middle.v[:, :, :n]),
                          positions=_cpu(ring.middle.positions[:, :n]), length=n)
        layers.append(dict(k=_cpu(ring.k), v=_cpu(ring.v), positions=_cpu(ring.positions),
                           next_position=_cpu(ring.next_position), n_seen=ring.n_seen,
                           padded=ring.padded, middle=middle))
    return dict(format=FORMAT, format_version=FORMAT_VERSION, lm_infinite=__version__,
                model=model_fingerprint(stream.model), settings=_settings_dict(stream.cache.settings),
                chunk_size=stream.chunk_size, pinned_tokens=stream.pinned_tokens,
                next_logits=None if stream.next_logits is None else _cpu(stream.next_logits),
                layers=layers)


def save_stream(stream, path) -> None:
    """Write `stream` to `path` atomically (see the module's docstring for the format)."""
    state = stream_state(stream)
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _differences(what: str, saved: dict, current: dict) -> list[str]:
    return [f"{what}.{name}: saved {saved.get(name)!r}, this one {current.get(name)!r}"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


def load_stream(cls, path, model, **stream_options):
    """A LambdaStream of `model` holding what the file at `path` holds."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # pickle errors, truncated zip archives, unsafe globals
        raise ValueError(f"LambdaStream.load: {path} is not a readable saved stream: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"LambdaStream.load: {path} is not a saved LambdaStream")
    if state.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"LambdaStream.load: {path} has format version {state.get('format_version')!r} "
                         f"(written by lm_infinite {state.get('lm_infinite')}); this lm_infinite "
                         f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    differences = _differences("model", state["model"], model_fingerprint(model))
    differences += _differences("settings", state["settings"], _settings_dict(state_of(model).settings))
    if differences:
        raise ValueError(f"LambdaStream.load: {path} was saved from another model or with other "
                         f"LM-Infinite settings: {'; '.join(differences)}")
    stream_options.setdefault("chunk_size", state["chunk_size"])
    pinned = state.get("pinned_tokens", 0)
    if stream_options.setdefault("pinned_tokens", pinned) != pinned:
        raise ValueError(f"LambdaStream.load: {path} was saved with pinned_tokens={pinned}, not "
                         f"{stream_options['pinned_tokens']} (a ring's global slots cannot change)")
    stream = cls(model, **stream_options)
    layers = state["layers"]
    if len(layers) != len(stream.cache.layers):  # the fingerprint's layer count says the same
        raise ValueError(f"LambdaStream.load: {path} has {len(layers)} layers, the model {len(stream.cache.layers)}")
    device = stream._device
    for layer, saved in zip(stream.cache.layers, layers):
        if saved is None:
            continue
        k = saved["k"]
        empty = k[:, :, :0].to(device)
        layer.lazy_initialization(empty, empty)
        ring = layer.ring
        if ring.k.shape != k.shape:
            raise ValueError(f"LambdaStream.load: {path} holds rings of shape {tuple(k.shape)}, this "
                             f"model's are {tuple(ring.k.shape)}")
        for name in ("k", "v", "positions", "next_position"):
            getattr(ring, name).copy_(saved[name])
        ring.n_seen, ring.padded = int(saved["n_seen"]), bool(saved["padded"])
        middle = saved["middle"]
        if (middle is None) != (ring.middle is None):
            raise ValueError(f"LambdaStream.load: {path} and the model's settings disagree on top-k middle stores")
        if middle is not None:
            n = int(middle["length"])
            ring.middle.reserve(ring.middle.n_global, n)  # room for n tokens past the globals
            ring.middle.k[:, :, :n] = middle["k"]
            ring.middle.v[:, :, :n] = middle["v"]
            ring.middle.positions[:, :n] = middle["positions"]
            ring.middle.length = n
    if state["next_logits"] is not None:
        stream.next_logits = state["next_logits"].to(device)
    return stream
