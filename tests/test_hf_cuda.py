"""The Hugging Face integration on a CUDA GPU gives what it gives on the CPU: a stream with
top-k middle attention (the kernels plus the composed top-k rows) against the CPU path."""

import pytest
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.hf import LambdaSettings, TopK
from hf_tiny_models import VOCAB, build
from lm_infinite.streaming import LambdaStream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_stream_with_top_k_on_cuda_matches_cpu(family):
    settings = LambdaSettings(2, 10, top_k=TopK(k=3, first_layer=1, distance=5, rows=4))
    cpu = lminf_hf.enable(build(family), settings)
    gpu = lminf_hf.enable(build(family).cuda(), settings)
    ids = torch.randint(0, VOCAB, (1, 83), generator=torch.Generator().manual_seed(3))
    nll_cpu = LambdaStream(cpu, chunk_size=16).nll(ids)
    nll_gpu = LambdaStream(gpu, chunk_size=16).nll(ids)
    torch.testing.assert_close(nll_gpu, nll_cpu, atol=1e-4, rtol=1e-4, equal_nan=True)
    streams = [LambdaStream(model, chunk_size=32) for model in (cpu, gpu)]
    tokens = [(stream.feed(ids), list(stream.generate(5)))[1] for stream in streams]
    assert tokens[0] == tokens[1]
