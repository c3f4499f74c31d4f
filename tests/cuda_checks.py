"""What the CUDA test files share: the device, the low-precision dtypes, random inputs on the
GPU, NaN left in the allocator's free blocks, and the check against the float64 reference."""

from __future__ import annotations

import torch

import lm_infinite as li
from helpers import rel_error

DEV = "cuda"
LOW_PRECISION = [torch.bfloat16, torch.float16]


def poison_allocator(*like: torch.Tensor) -> None:
    """Leave NaN in the caching allocator's free blocks of these sizes, so that an output the
    kernel fails to write shows up as NaN (rel_error rejects it)."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    del blocks


def randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype, device=DEV)


def check_close(out, q, k, v, inv_freq, dtype, **reference_kwargs):
    """out (any dtype) against the float64 reference; low precision within twice PyTorch's
    error in that dtype, float32 within 2e-5."""
    exact = li.lambda_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                          inv_freq, **reference_kwargs)
    err = rel_error(out.cpu(), exact)
    if dtype == torch.float32:
        assert err < 2e-5, err
        return err
    own = {key: (val.to(DEV) if isinstance(val, torch.Tensor) else val)
           for key, val in reference_kwargs.items()}
    torch_low = li.lambda_attention_reference(q, k, v, inv_freq.to(DEV), **own)
    bound = 2 * rel_error(torch_low.cpu(), exact) + 1e-4
    assert err <= bound, (err, bound)
    return err
