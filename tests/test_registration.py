"""Op registration: schemas, fake tensors and autograd registration (opcheck), torch.compile,
build information, and the torch-free core."""

import pathlib
import re

import pytest
import torch

import lm_infinite as li
from helpers import random_qkv, rope_inv_freq

ROOT = pathlib.Path(__file__).resolve().parents[1]


def attention_samples():
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = random_qkv(2, 4, 2, 13, 64, dtype)
        yield (q, k, v, rope_inv_freq(64), 2, 5, 5, 0.125)
        yield (q, k, v, rope_inv_freq(64), 2, 5, 5, 0.125, torch.tensor([4, 0]))  # ragged batch


def chunk_samples():
    q, k, v = random_qkv(1, 6, 3, 7, 64)
    cache_k, cache_v = torch.randn(1, 3, 9, 64), torch.randn(1, 3, 9, 64)
    positions = torch.tensor([0, 1, 2, 93, 94, 95, 96, -1, 97])
    yield (q, k, v, cache_k, cache_v, positions, torch.tensor([98]), rope_inv_freq(64), 3, 5, 4, 0.1)
    # A ragged batch: per-sequence starts and slot positions, padding.
    q, k, v = random_qkv(2, 6, 3, 7, 64)
    cache_k, cache_v = torch.randn(2, 3, 9, 64), torch.randn(2, 3, 9, 64)
    positions = torch.tensor([[0, 1, 2, 93, 94, 95, 96, -1, 97], [0, 1, 2, 3, -1, -1, -1, -1, -1]])
    yield (q, k, v, cache_k, cache_v, positions, torch.tensor([98, 4]), rope_inv_freq(64), 3, 5, 4,
           0.1, torch.tensor([0, 3]))


def chunk_top_k_samples():
    q, k, v = random_qkv(1, 6, 3, 7, 64)
    cache_k, cache_v = torch.randn(1, 3, 9, 64), torch.randn(1, 3, 9, 64)
    positions = torch.tensor([0, 1, 2, 93, 94, 95, 96, -1, 97])
    middle_k, middle_v = torch.randn(1, 3, 90, 64), torch.randn(1, 3, 90, 64)
    yield (q, k, v, cache_k, cache_v, positions, torch.tensor([98]), rope_inv_freq(64), 3, 5, 4, 0.1,
           middle_k, middle_v, torch.arange(3, 93), 4, 2, 6)
    # top_k = 0: the plain chunk, the store unread.
    yield (q, k, v, cache_k, cache_v, positions, torch.tensor([98]), rope_inv_freq(64), 3, 5, 4, 0.1,
           middle_k, middle_v, torch.arange(3, 93), 0, 2, 0)
    # A ragged batch: per-sequence starts, slot and middle positions, padding.
    q, k, v = random_qkv(2, 6, 3, 7, 64)
    cache_k, cache_v = torch.randn(2, 3, 9, 64), torch.randn(2, 3, 9, 64)
    positions = torch.tensor([[0, 1, 2, 93, 94, 95, 96, -1, 97], [0, 1, 2, 3, -1, -1, -1, -1, -1]])
    middle_k, middle_v = torch.randn(2, 3, 90, 64), torch.randn(2, 3, 90, 64)
    yield (q, k, v, cache_k, cache_v, positions, torch.tensor([98, 4]), rope_inv_freq(64), 3, 5, 4,
           0.1, middle_k, middle_v, torch.stack([torch.arange(3, 93), torch.arange(-86, 4)]), 4, 2, 0,
           torch.tensor([0, 3]))


def append_samples():
    k, v = torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    yield (torch.zeros(2, 3, 6, 16), torch.zeros(2, 3, 6, 16), torch.full((6,), -1), k, v,
           torch.tensor([5]), 2, 4)
    yield (torch.zeros(2, 3, 6, 16), torch.zeros(2, 3, 6, 16), torch.full((2, 6), -1), k, v,
           torch.tensor([5, 0]), 2, 4, torch.tensor([3, 11]))


def linear_samples():
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(7, 33, dtype=dtype)
        yield (torch.randn(3, 33, dtype=dtype), weight, torch.randn(7, dtype=dtype))
        yield (torch.randn(2, 1, 33, dtype=dtype), weight)  # leading dimensions, no bias


@pytest.mark.parametrize("op,samples", [
    (torch.ops.lminf.lambda_attention.default, attention_samples),
    (torch.ops.lminf.lambda_attention_chunk.default, chunk_samples),
    (torch.ops.lminf.lambda_attention_chunk_top_k.default, chunk_top_k_samples),
    (torch.ops.lminf.ring_cache_append.default, append_samples),
    (torch.ops.lminf.decode_linear.default, linear_samples),
])
def test_opcheck(op, samples):
    for args in samples():
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    q, k, v = random_qkv(1, 4, 2, 33, 64)
    inv_freq = rope_inv_freq(64)

    def block(q, k, v):
        return torch.nn.functional.silu(li.lambda_attention(q * 2, k, v, inv_freq, n_global=2, n_local=8)) + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), block(q, k, v))


def test_torch_compile_fullgraph_with_padding():
    q, k, v = random_qkv(2, 4, 2, 17, 64)
    inv_freq, padding = rope_inv_freq(64), torch.tensor([5, 0])

    def block(q, k, v, padding):
        return li.lambda_attention(q, k, v, inv_freq, n_global=2, n_local=8, padding=padding) * 3

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, padding), block(q, k, v, padding))


def test_build_info():
    info = li.build_info()
    assert info["version"] == li.__version__
    assert "cpu" in info["backends"]
    assert ("cuda" in info["backends"]) == (info["cuda_archs"] is not None)
    assert info["compiler"]


def test_versions_agree():
    header = (ROOT / "csrc/include/lminf/version.h").read_text()
    assert f'#define LMINF_VERSION "{li.__version__}"' in header


def test_core_is_torch_free():
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    offenders = [str(p) for p in (ROOT / "csrc").rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"}
                 and pattern.search(p.read_text())]
    assert offenders == []
