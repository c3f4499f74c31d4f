"""The extension's ops, with Python defaults and fake (meta) implementations.

Every op is defined once in lminf_ext/ (TORCH_LIBRARY) with CPU and CUDA kernels, except the
CUDA implementation of lambda_attention_chunk_top_k, registered here (a composition of the plain
kernel and PyTorch ops until a CUDA kernel exists); the fakes here let torch.compile and opcheck
trace them without running a kernel.

Validation: the wrappers check what only Python can see (a numpy array is not a tensor, a
bool is not an int, a position must fit in int64); the C++ glue and core check every shape,
size and value against what the kernels index, for Python and C++ callers alike.
"""

from __future__ import annotations

import numbers

import torch

from . import _C  # loading the library registers torch.ops.lminf
from .top_k_rows import top_k_rows_attention

__all__ = ["decode_linear", "lambda_attention", "lambda_attention_chunk",
           "lambda_attention_chunk_top_k", "ring_cache_append"]


# The largest position or size the kernels accept (lminf/limits.h).
MAX_POSITION = 2**62


def _position_tensor(op: str, name: str, position: int | torch.Tensor,
                     device: torch.device) -> torch.Tensor:
    """Positions travel as int64 tensors on the op's device, so that a captured CUDA graph can
    advance them in place. A Python int is converted (int64, not float: see docs/design.md section 1) and
    range-checked here, where it is still on the host."""
    if isinstance(position, torch.Tensor):
        return position
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"{op}: {name}: position must be an int or an int64 tensor, "
                        f"got {type(position).__name__}")
    if not 0 <= position <= MAX_POSITION:
        raise ValueError(f"{op}: {name} must be in [0, 2^62], got {position}")
    return torch.tensor([position], dtype=torch.int64, device=device)


def _check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Every tensor argument is a torch.Tensor (the dispatcher's own error for a numpy array
    names no argument), and all share one device (mixed devices would otherwise reach
    whichever kernel the dispatcher picks first)."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(
                f"{op}: {name} must be on {first_name}'s device ({first.device}), got {tensor.device}"
            )


def _given(**tensors):
    """The optional tensor arguments that were passed (None means absent)."""
    return {name: t for name, t in tensors.items() if t is not None}


def _check_ints(op: str, **values) -> None:
    """Python ints (not bools, not floats): the kernels' range checks name the bad value."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__} {value!r}")


def _defaults(op: str, q: torch.Tensor, n_global, n_local, distance_cap, scale):
    """distance_cap and scale with their defaults, after the type checks; the kernels check
    the ranges (and that scale is finite)."""
    distance_cap = n_local if distance_cap is None else distance_cap
    _check_ints(op, n_global=n_global, n_local=n_local, distance_cap=distance_cap)
    if scale is None:
        if q.shape[-1] == 0:
            raise ValueError(f"{op}: q must have head_dim >= 1 (its last dimension), got shape {tuple(q.shape)}")
        scale = q.shape[-1] ** -0.5
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a real number, got {type(scale).__name__} {scale!r}")
    return distance_cap, float(scale)


def lambda_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    n_global: int = 10,
    n_local: int,
    distance_cap: int | None = None,
    scale: float | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """LM-Infinite attention over a whole sequence at positions 0..seq-1.

    q: [batch, heads_q, seq, head_dim]; k, v: [batch, heads_kv, seq, head_dim] (heads_q a
    multiple of heads_kv), unrotated. inv_freq: float32 [rotary_dim / 2]; RoPE acts on the
    first rotary_dim features (rotate_half convention). distance_cap defaults to n_local,
    scale to head_dim ** -0.5. Returns [batch, heads_q, seq, head_dim] in q's dtype.

    padding: optional int64 [batch] on q's device, the count of leading padding tokens of
    each sequence (left padding, in [0, seq]): row t of sequence b sits at position
    t - padding[b]; padding rows are no key of any query and come out as zeros, so each
    sequence gets the result it would get alone.
    """
    op = "lambda_attention"
    _check_tensors(op, q=q, k=k, v=v, inv_freq=inv_freq, **_given(padding=padding))
    distance_cap, scale = _defaults(op, q, n_global, n_local, distance_cap, scale)
    return torch.ops.lminf.lambda_attention(q, k, v, inv_freq, n_global, n_local, distance_cap,
                                            scale, padding)


def lambda_attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cache_positions: torch.Tensor,
    query_start: int | torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    n_global: int = 10,
    n_local: int,
    distance_cap: int | None = None,
    scale: float | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attend a chunk of queries at positions [query_start, query_start + seq) to the chunk's
    own keys (k, v: [batch, heads_kv, seq, head_dim]) and to cached earlier tokens
    (cache_k, cache_v: [batch, heads_kv, slots, head_dim]; cache_positions: int64 [slots]
    shared by the batch or [batch, slots] per sequence, negative = empty). query_start: int,
    or int64 tensor [1] (shared) or [batch] (per sequence) on q's device.

    Batches of different lengths: padding (optional int64 [batch], in [0, seq]) counts each
    sequence's leading padding rows; row t >= padding[b] sits at position
    query_start[b] + t - padding[b], so query_start is the position of the first real row.
    Padding rows are no key of any query and come out as zeros.

    Top-k middle attention: lambda_attention_chunk_top_k."""
    op = "lambda_attention_chunk"
    _check_tensors(op, q=q)
    query_start = _position_tensor(op, "query_start", query_start, q.device)
    _check_tensors(op, q=q, k=k, v=v, cache_k=cache_k, cache_v=cache_v,
                   cache_positions=cache_positions, query_start=query_start, inv_freq=inv_freq,
                   **_given(padding=padding))
    distance_cap, scale = _defaults(op, q, n_global, n_local, distance_cap, scale)
    return torch.ops.lminf.lambda_attention_chunk(
        q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq,
        n_global, n_local, distance_cap, scale, padding,
    )


def lambda_attention_chunk_top_k(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cache_positions: torch.Tensor,
    query_start: int | torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    middle_k: torch.Tensor,
    middle_v: torch.Tensor,
    middle_positions: torch.Tensor,
    top_k: int,
    top_k_distance: int | None = None,
    top_k_first_row: int = 0,
    n_global: int = 10,
    n_local: int,
    distance_cap: int | None = None,
    scale: float | None = None,
    padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """lambda_attention_chunk with top-k middle attention: rows top_k_first_row.. of the chunk
    also attend, per query head, to the top_k keys of the middle store (middle_k, middle_v:
    [batch, heads_kv, slots, head_dim]; middle_positions: int64 [slots] or [batch, slots],
    negative = empty; laid out like the cache) and of the chunk itself at positions in
    [n_global, i - n_local], scored and placed at rotary distance top_k_distance (default:
    n_local // 2), in the same softmax. top_k_first_row counts chunk rows, padding rows
    included. top_k = 0 gives lambda_attention_chunk's result.

    The CPU kernel computes it in one pass; on CUDA (no kernel yet) the plain kernel computes
    the chunk and PyTorch ops recompute its top-k rows (lm_infinite.top_k_rows)."""
    op = "lambda_attention_chunk_top_k"
    _check_tensors(op, q=q)
    query_start = _position_tensor(op, "query_start", query_start, q.device)
    _check_tensors(op, q=q, k=k, v=v, cache_k=cache_k, cache_v=cache_v,
                   cache_positions=cache_positions, query_start=query_start, inv_freq=inv_freq,
                   middle_k=middle_k, middle_v=middle_v, middle_positions=middle_positions,
                   **_given(padding=padding))
    distance_cap, scale = _defaults(op, q, n_global, n_local, distance_cap, scale)
    top_k_distance = n_local // 2 if top_k_distance is None else top_k_distance
    _check_ints(op, top_k=top_k, top_k_distance=top_k_distance, top_k_first_row=top_k_first_row)
    return torch.ops.lminf.lambda_attention_chunk_top_k(
        q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq,
        n_global, n_local, distance_cap, scale, middle_k, middle_v, middle_positions,
        top_k, top_k_distance, top_k_first_row, padding,
    )


def _lambda_attention_chunk_top_k_cuda(q, k, v, cache_k, cache_v, cache_positions, query_start,
                                       inv_freq, n_global, n_local, distance_cap, scale, middle_k,
                                       middle_v, middle_positions, top_k, top_k_distance,
                                       top_k_first_row, padding=None):
    """The op's CUDA implementation until a CUDA kernel exists: the plain kernel computes the
    chunk, then PyTorch ops recompute the rows that use top-k (a handful: a prompt's last rows,
    each decode step). The glue checks the arguments first, as for the CPU kernel."""
    _C.check_lambda_attention_chunk_top_k(
        q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, n_global, n_local,
        distance_cap, scale, middle_k, middle_v, middle_positions, top_k, top_k_distance,
        top_k_first_row, padding)
    out = torch.ops.lminf.lambda_attention_chunk(
        q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq,
        n_global, n_local, distance_cap, scale, padding,
    )
    if top_k > 0 and top_k_first_row < q.shape[2]:
        out[:, :, top_k_first_row:] = top_k_rows_attention(
            q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq,
            first_row=top_k_first_row, n_global=n_global, n_local=n_local,
            distance_cap=distance_cap, scale=scale, middle_k=middle_k, middle_v=middle_v,
            middle_positions=middle_positions, top_k=top_k, top_k_distance=top_k_distance,
            padding=padding,
        ).to(out.dtype)
    return out


torch.library.register_kernel("lminf::lambda_attention_chunk_top_k", "cuda",
                              _lambda_attention_chunk_top_k_cuda)


def ring_cache_append(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cache_positions: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_position: int | torch.Tensor,
    *,
    n_global: int,
    n_local: int,
    padding: torch.Tensor | None = None,
) -> None:
    """Write k, v ([batch, heads_kv, seq, head_dim], positions start_position + t) into a ring
    cache ([batch, heads_kv, n_global + n_local, head_dim]) in place, keeping the first
    n_global tokens and the last n_local.

    cache_positions: int64 [n_global + n_local] shared by the batch, or [batch, n_global +
    n_local] one row per sequence. start_position: int, or int64 tensor [1] (shared) or
    [batch] (per sequence). padding: optional int64 [batch], leading padding rows of each
    sequence (not written); row t >= padding[b] is the token at start_position[b] + t -
    padding[b]. Per-sequence starts or padding need per-sequence cache_positions."""
    op = "ring_cache_append"
    _check_tensors(op, k=k)
    start_position = _position_tensor(op, "start_position", start_position, k.device)
    _check_tensors(op, cache_k=cache_k, cache_v=cache_v, cache_positions=cache_positions, k=k, v=v,
                   start_position=start_position, **_given(padding=padding))
    _check_ints(op, n_global=n_global, n_local=n_local)
    torch.ops.lminf.ring_cache_append(
        cache_k, cache_v, cache_positions, k, v, start_position, n_global, n_local, padding
    )


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear, on the CPU kernel for the few rows of a decode step
    (lminf/decode_linear.h): the threads split the output features and stream the weights at
    memory speed, where PyTorch's CPU linear with one row reads them at a fraction of it on one
    thread. x [..., in_features], weight [out_features, in_features], bias [out_features] or
    None, all of one dtype (float32, bfloat16, float16), on the CPU; sums in float32. Any
    number of rows is correct; past about 4 (bench/decode_linear_cpu.py) F.linear is faster."""
    op = "decode_linear"
    _check_tensors(op, x=x, weight=weight, **_given(bias=bias))
    if x.device.type != "cpu":
        raise ValueError(f"{op}: x must be on the CPU (a GPU's own GEMMs serve this shape), got {x.device}")
    return torch.ops.lminf.decode_linear(x, weight, bias)


@torch.library.register_fake("lminf::decode_linear")
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lminf::lambda_attention")
def _(q, k, v, inv_freq, n_global, n_local, distance_cap, scale, padding=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("lminf::lambda_attention_chunk")
def _(q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, n_global, n_local,
      distance_cap, scale, padding=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("lminf::lambda_attention_chunk_top_k")
def _(q, k, v, cache_k, cache_v, cache_positions, query_start, inv_freq, n_global, n_local,
      distance_cap, scale, middle_k, middle_v, middle_positions, top_k, top_k_distance,
      top_k_first_row, padding=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("lminf::ring_cache_append")
def _(cache_k, cache_v, cache_positions, k, v, start_position, n_global, n_local, padding=None):
    return None


# No backward: the ops serve inference (the kernels keep no softmax statistics to differentiate
# through, and a backward would be a second kernel set to keep exact). Gradients are refused
# when they are asked for, not when the forward runs, so that a forward without no_grad (a Hugging
# Face model called directly) still works. lambda_attention_reference is plain PyTorch and
# differentiable, for whoever needs gradients of the semantics.
def _no_backward(op: str):
    def backward(ctx, *grads):
        # Returned as a gradient of the op's first input, so that the refusal runs when the
        # backward does: raising here instead would fail torch.compile of any forward with
        # gradients on (AOTAutograd traces the backward while compiling), where eager works.
        return (torch.ops.lminf.refuse_backward(grads[0], op, ctx.first_input_shape),
                *[None] * (ctx.n_inputs - 1))

    return backward


def _remember_inputs(ctx, inputs, output):
    ctx.first_input_shape, ctx.n_inputs = list(inputs[0].shape), len(inputs)


@torch.library.custom_op("lminf::refuse_backward", mutates_args=())
def _refuse_backward(grad: torch.Tensor, op: str, shape: list[int]) -> torch.Tensor:
    raise RuntimeError(
        f"lminf::{op} has no backward (the LM-Infinite ops are inference-only); run under "
        "torch.no_grad() / torch.inference_mode(), or differentiate "
        "lm_infinite.lambda_attention_reference instead"
    )


@_refuse_backward.register_fake
def _(grad, op, shape):
    return grad.new_empty(shape)


for _op in ("decode_linear", "lambda_attention", "lambda_attention_chunk",
            "lambda_attention_chunk_top_k"):
    torch.library.register_autograd(f"lminf::{_op}", _no_backward(_op), setup_context=_remember_inputs)
