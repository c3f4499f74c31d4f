"""Tensor-parallel runs: a model loaded with transformers' tensor-parallel plan on
torch.distributed (one process per rank, started by torchrun). We do not distribute anything
ourselves; these helpers say which process this is and make the ranks agree where they could
otherwise diverge."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["broadcast_from_first_rank", "is_main_process", "launched_with_several_processes",
           "tensor_parallel_size"]


def launched_with_several_processes() -> bool:
    """True in a process that torchrun (or any launcher setting WORLD_SIZE) started as one of
    several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that prints and writes files. Answers before the
    process group exists too (transformers creates it while loading), from torchrun's RANK."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def tensor_parallel_size(model: nn.Module) -> int:
    """How many ranks share the model's weights (1 for a model loaded without a plan)."""
    return getattr(model, "tp_size", None) or 1


def _tensor_parallel_group(model: nn.Module):
    """The process group of the model's tensor-parallel ranks, from its sharded weights (a
    DTensor's mesh; its "tp" dimension where transformers builds a larger mesh)."""
    for parameter in model.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None:
            if mesh.ndim > 1:
                mesh = mesh["tp"]
            return mesh.get_group()
    raise ValueError(f"{type(model).__name__} has tp_size > 1 but no sharded (DTensor) weight")


def broadcast_from_first_rank(model: nn.Module, value: int) -> int:
    """The first tensor-parallel rank's `value` on every rank (`value` itself without tensor
    parallelism). For choices each rank makes on its own that must not differ, such as a
    sampled token: the ranks' random generators need not be in the same state."""
    if tensor_parallel_size(model) == 1:
        return value
    device = next(model.parameters()).device  # gloo takes CPU tensors, nccl CUDA ones
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    group = _tensor_parallel_group(model)
    dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return int(tensor.item())
