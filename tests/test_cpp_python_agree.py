"""The C++ API (lminf::KVCache, driven by csrc/tests/kv_cache_stream.cpp) and the Python ops
(lm_infinite.RingKVCache over lambda_attention_chunk / ring_cache_append) give the same numbers
on the same inputs, exchanged as raw float32 files.

The C++ side is built with CMake into $LMINF_CPP_BUILD_DIR/release (default build/cpp/release,
the tree scripts/cpp_ci.sh uses); the build is incremental, so it always tests current sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

lm_infinite = pytest.importorskip("lm_infinite")

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Same kernels on both sides: at most one rounding of the output apart (thread counts differ).
TOLERANCE = {"float32": (1e-6, 1e-5), "bfloat16": (1e-3, 8e-3), "float16": (2e-4, 1e-3)}


def _run(command: list) -> None:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="module")
def kv_cache_stream() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = Path(os.environ.get("LMINF_CPP_BUILD_DIR", REPO / "build" / "cpp")) / "release"
    _run(["cmake", "-S", REPO, "-B", build, "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", build, "--target", "kv_cache_stream", "-j", os.cpu_count() or 1])
    return build / "csrc" / "tests" / "kv_cache_stream"


def _stream_through_cpp(
    tool: Path, workdir: Path, config: dict, chunks: list, tensors: dict
) -> torch.Tensor:
    lines = [f"{key} {value}" for key, value in config.items()]
    lines.append("chunks " + " ".join(map(str, chunks)))
    (workdir / "config.txt").write_text("\n".join(lines) + "\n")
    for name, tensor in tensors.items():
        tensor.to(torch.float32).contiguous().numpy().tofile(workdir / f"{name}.f32")
    _run([tool, workdir])
    out = torch.from_numpy(np.fromfile(workdir / "out.f32", dtype=np.float32))
    return out.reshape(tensors["q"].shape)


def _stream_through_python(
    config: dict, chunks: list, tensors: dict, dtype: torch.dtype
) -> torch.Tensor:
    cache = lm_infinite.RingKVCache(
        config["batch"], config["n_heads_kv"], config["head_dim"],
        n_global=config["n_global"], n_local=config["n_local"], dtype=dtype,
    )
    outputs, begin = [], 0
    for n in chunks:
        part = {name: tensors[name][:, :, begin : begin + n].to(dtype) for name in "qkv"}
        outputs.append(cache.attend_and_append(
            part["q"], part["k"], part["v"], tensors["inv_freq"],
            distance_cap=config["distance_cap"], scale=config["scale"],
        ))
        begin += n
    return torch.cat(outputs, dim=2).to(torch.float32)


CASES = {
    # GQA, globals, a window wrapped several times, chunks longer and shorter than the window.
    "gqa": dict(batch=2, n_heads_q=4, n_heads_kv=2, head_dim=64, rotary_dim=64, n_global=4,
                n_local=16, distance_cap=16, chunks=[7, 1, 1, 33, 16, 5, 1, 30]),
    # MQA, partial rotary, no globals, distance_cap != n_local, head_dim 128.
    "mqa_partial_rotary": dict(batch=1, n_heads_q=6, n_heads_kv=1, head_dim=128, rotary_dim=32,
                               n_global=0, n_local=9, distance_cap=4, chunks=[20, 1, 19, 2, 40]),
}


def _random_stream(config: dict, seed: int) -> dict:
    """q, k, v of the whole stream (uniform in [-1, 1)) and RoPE frequencies, for `config`."""
    generator = torch.Generator().manual_seed(seed)
    shape_q = (config["batch"], config["n_heads_q"], config["n_tokens"], config["head_dim"])
    shape_kv = (config["batch"], config["n_heads_kv"], config["n_tokens"], config["head_dim"])
    return {
        "q": torch.rand(shape_q, generator=generator) * 2 - 1,
        "k": torch.rand(shape_kv, generator=generator) * 2 - 1,
        "v": torch.rand(shape_kv, generator=generator) * 2 - 1,
        "inv_freq": 10000.0 ** (-torch.arange(0, config["rotary_dim"], 2, dtype=torch.float32)
                                / config["rotary_dim"]),
    }


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_kv_cache_matches_python_ring_cache(kv_cache_stream, tmp_path, case, dtype_name):
    config = dict(CASES[case])
    chunks = config.pop("chunks")
    config.update(dtype=dtype_name, n_tokens=sum(chunks), scale=config["head_dim"] ** -0.5)
    tensors = _random_stream(config, seed=0)
    cpp = _stream_through_cpp(kv_cache_stream, tmp_path, config, chunks, tensors)
    python = _stream_through_python(config, chunks, tensors, DTYPES[dtype_name])
    atol, rtol = TOLERANCE[dtype_name]
    torch.testing.assert_close(cpp, python, atol=atol, rtol=rtol)

    if dtype_name == "float32":  # and both are right, not merely equal
        reference = lm_infinite.lambda_attention_reference(
            *(tensors[name].double() for name in "qkv"), tensors["inv_freq"],
            n_global=config["n_global"], n_local=config["n_local"],
            distance_cap=config["distance_cap"], scale=config["scale"],
        )
        torch.testing.assert_close(cpp.double(), reference, atol=2e-6, rtol=1e-5)


def _stream_ragged_through_python(config: dict, chunks: list, padding: list, tensors: dict,
                                  dtype: torch.dtype) -> torch.Tensor:
    """The ops themselves with per-sequence positions (what KVCache runs for a ragged batch)."""
    batch, slots = config["batch"], config["n_global"] + config["n_local"]
    cache_k = torch.zeros(batch, config["n_heads_kv"], slots, config["head_dim"], dtype=dtype)
    cache_v = torch.zeros_like(cache_k)
    positions = torch.full((batch, slots), -1, dtype=torch.int64)
    seen = torch.zeros(batch, dtype=torch.int64)
    options = dict(n_global=config["n_global"], n_local=config["n_local"])
    outputs, begin = [], 0
    for n, pad in zip(chunks, padding):
        part = {name: tensors[name][:, :, begin : begin + n].to(dtype) for name in "qkv"}
        pad = torch.tensor(pad, dtype=torch.int64)
        outputs.append(lm_infinite.lambda_attention_chunk(
            part["q"], part["k"], part["v"], cache_k, cache_v, positions, seen.clone(),
            tensors["inv_freq"], distance_cap=config["distance_cap"], scale=config["scale"],
            padding=pad, **options))
        lm_infinite.ring_cache_append(cache_k, cache_v, positions, part["k"], part["v"], seen.clone(),
                                      padding=pad, **options)
        seen += n - pad
        begin += n
    return torch.cat(outputs, dim=2).to(torch.float32)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_kv_cache_ragged_batch_matches_the_python_ops(kv_cache_stream, tmp_path, dtype_name):
    """Sequences of different lengths, left-padded chunk by chunk (uniform chunks first, then
    ragged ones, then decode steps where a sequence has ended): the C++ cache and the Python
    ops with per-sequence positions agree, padding rows zeros on both sides."""
    config = dict(batch=3, n_heads_q=4, n_heads_kv=2, head_dim=64, rotary_dim=64, n_global=4,
                  n_local=16, distance_cap=16)
    chunks = [8, 8, 20, 1, 1, 5, 1]
    padding = [[0, 0, 0], [0, 0, 0], [3, 0, 15], [0, 0, 1], [0, 1, 1], [4, 0, 5], [1, 0, 0]]
    config.update(dtype=dtype_name, n_tokens=sum(chunks), scale=config["head_dim"] ** -0.5)
    tensors = _random_stream(config, seed=1)
    config_lines = dict(config, padding=" ".join(str(p) for row in padding for p in row))
    cpp = _stream_through_cpp(kv_cache_stream, tmp_path, config_lines, chunks, tensors)
    python = _stream_ragged_through_python(config, chunks, padding, tensors, DTYPES[dtype_name])
    atol, rtol = TOLERANCE[dtype_name]
    torch.testing.assert_close(cpp, python, atol=atol, rtol=rtol)
    # Padding rows are zeros, real rows are not.
    begin = 0
    for n, pad in zip(chunks, padding):
        for b, p in enumerate(pad):
            assert (cpp[b, :, begin : begin + p] == 0).all()
            assert (cpp[b, :, begin + p : begin + n].abs().sum(-1) > 0).all()
        begin += n
