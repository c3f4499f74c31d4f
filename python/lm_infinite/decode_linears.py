"""A CPU decode step's linear layers on lminf's matrix-vector kernel.

A decode step multiplies one row of activations per sequence by every weight matrix of the
model, so its time is the time to read the weights. PyTorch's CPU linear runs that shape on
one thread at a fraction of the memory bandwidth; lminf::decode_linear streams the weights on
every thread (bench/decode_linear_cpu.py measures both). `DecodeLinears(modules)` routes the
nn.Linear layers under `modules` through it while the context is active, for inputs of at
most MAX_ROWS[dtype] rows; anything else (a prompt's chunk, another device, mixed dtypes, a forward
with gradients) still goes to F.linear. StaticDecodeStep uses it on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.lminf)

__all__ = ["DecodeLinears", "MAX_ROWS", "decode_linears_if"]

# Rows up to which the kernel beats F.linear, per dtype (bench/decode_linear_cpu.py, 2 cores,
# SmolLM2's weights: bf16 2.12x at 1 row, 1.31x at 4, 0.76x at 8, F.linear taking 31 ms for 8
# rows; float32 1.58x, 1.95x, 1.15x, and the server's batched step of 8 conversations 127 -> 73
# ms). Each row costs a load of x per multiply-add here, which a GEMM library's register tiles
# avoid. CPUs differ: on an AVX2-only EPYC, F.linear in bf16 took 145-153 ms for 8 rows against
# the kernel's 57 (4 rows a pass over W); a choice by the CPU would route more rows there.
MAX_ROWS = {torch.float32: 8, torch.bfloat16: 4, torch.float16: 4}
_DTYPES = tuple(MAX_ROWS)


# id(linear) -> how many active contexts route it: contexts may nest (a stream and its step)
# and overlap (two streams of one model), and the last one out restores the layer.
_routed: dict[int, int] = {}


class DecodeLinears:
    """Context manager: inside it, the plain nn.Linear layers of `modules` whose weights are on
    the CPU compute inputs of at most MAX_ROWS[dtype] rows with lminf::decode_linear. Their `forward`
    is set on the instance on entry and removed when the last context routing it exits, so
    nothing outlives the contexts, and torch.compile traces (and guards on) whichever forward
    is in place."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        linears: dict[int, nn.Linear] = {}
        for module in modules:
            for sub in module.modules():
                if _routable(sub):
                    linears[id(sub)] = sub
        self._linears = list(linears.values())
        # Built once: torch.compile guards on the forward object, so a new one per entry
        # would recompile a compiled step at every token.
        self._forwards = [functools.partial(_forward, linear) for linear in self._linears]

    def __len__(self) -> int:
        return len(self._linears)

    def __enter__(self) -> DecodeLinears:
        for linear, forward in zip(self._linears, self._forwards):
            count = _routed.get(id(linear), 0)
            if count == 0:
                linear.forward = forward
            _routed[id(linear)] = count + 1
        return self

    def __exit__(self, *exc) -> None:
        for linear in self._linears:
            count = _routed.pop(id(linear)) - 1
            if count == 0:
                linear.__dict__.pop("forward", None)
            else:
                _routed[id(linear)] = count


# model -> the DecodeLinears of its decoder and head, shared by every stream and step of the
# model. torch.compile guards on each routed layer's forward object: per-stream partials would
# recompile a compiled step for every new stream (and the compiled code of a dead stream's
# partials would linger until the cyclic collector ran). The value holds the model's linear
# layers, which hold no reference to the model, so the entry goes when the model does.
_shared: weakref.WeakKeyDictionary[nn.Module, DecodeLinears] = weakref.WeakKeyDictionary()


def decode_linears_if(enabled: bool, model: nn.Module, modules: Iterable[nn.Module]):
    """The DecodeLinears of `modules` (parts of `model`) when enabled, else a context that
    changes nothing. One instance per model is reused while its routable layers stay the same."""
    if not enabled:
        return contextlib.nullcontext()
    fresh = DecodeLinears(modules)
    shared = _shared.get(model)
    if shared is None or [id(m) for m in shared._linears] != [id(m) for m in fresh._linears]:
        _shared[model] = shared = fresh
    return shared


def _routable(module: nn.Module) -> bool:
    """A plain CPU linear layer whose forward is nn.Linear's own: not a subclass (a quantized
    layer, a LoRA wrapper), not one whose instance already carries a forward (a tensor-
    parallel plan's), not weights of a tensor subclass (DTensor shards)."""
    own = module.__dict__.get("forward")
    ours = isinstance(own, functools.partial) and own.func is _forward  # an active context's
    return (type(module) is nn.Linear and (own is None or ours)
            and type(module.weight.data) is torch.Tensor and module.weight.device.type == "cpu"
            and module.weight.dtype in _DTYPES)


def _forward(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, bias = linear.weight, linear.bias
    # The kernel has no backward: a forward that may be differentiated stays PyTorch's.
    differentiable = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    if (x.device.type == "cpu" and x.dtype == weight.dtype and 0 < x.numel() <= MAX_ROWS[x.dtype] * x.shape[-1]
            and not differentiable):
        # The op itself: the wrapper's argument checks are settled here, once per layer call.
        return torch.ops.lminf.decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)
