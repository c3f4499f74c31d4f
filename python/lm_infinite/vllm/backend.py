"""The attention backend: LM-Infinite attention (docs/design.md section 1) over vLLM's paged KV cache,
with the project's op `lambda_attention_chunk`.

Keys and values are stored unrotated (the model's rotary embedding is an identity, see
models.py); the op rotates by relative position. Per layer and step:
1. each request's live cache entries, the first min(n_global, context) tokens and the window
   [context - n_local + 1, context), are gathered through the block table into a dense
   [heads_kv, slots, head_dim] view with their positions (the blocks vLLM freed are never read:
   their ids stay in the worker's block table);
2. the op attends the request's new tokens (queries and their own keys) to those slots;
3. the new tokens' keys and values are written to their slots (slot_mapping).
Decode rows (one new token) of a batch go through the op together, one row per request;
every request with more new tokens (prefill chunks) gets its own call. The gather indices are
computed once per step by the metadata builder and shared by every layer.

KV cache page: logical [block, head, token, 2 * head_dim] (key then value), physical layout
LBNHC, so that the cache is one [blocks * block_size, heads, 2 * head_dim] tensor of slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from .. import ops

__all__ = ["LambdaAttentionBackend", "LambdaAttentionImpl", "LambdaMetadata", "live_positions"]

BACKEND_NAME = "CUSTOM"  # a name vLLM's AttentionBackendEnum has (the plugin registers it)


@dataclass
class RowGroup:
    """Requests attended in one op call. rows: the batch's token rows of their new tokens
    (int64 [n] for the decode group) or a (start, end) range (one prefill request);
    slots: int64 [requests, width] cache slots to gather; positions: int64 [requests, width]
    their token positions (-1: nothing, the slot is padding); starts: int64 [requests], the
    position of each request's first new token."""

    rows: torch.Tensor | tuple[int, int]
    slots: torch.Tensor
    positions: torch.Tensor
    starts: torch.Tensor


@dataclass
class LambdaMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]: where each new token's K/V goes
    groups: list[RowGroup] = field(default_factory=list)


def live_positions(context: torch.Tensor, n_global: int, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, counts): for requests with `context` tokens before their new ones (int64 [n]),
    the cached tokens LM-Infinite attends to are [0, heads) and [max(heads, context - n_local
    + 1), context); counts = how many that is."""
    heads = context.clamp(max=n_global)
    window_start = torch.maximum(heads, context - n_local + 1)
    return heads, heads + (context - window_start)


def _gather_plan(block_table: torch.Tensor, context: torch.Tensor, n_global: int, n_local: int,
                 block_size: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, positions), int64 [requests, width], for the requests' block table rows."""
    heads, counts = live_positions(context, n_global, n_local)
    window_start = torch.maximum(heads, context - n_local + 1)
    j = torch.arange(width, device=context.device)[None]
    position = torch.where(j < heads[:, None], j, window_start[:, None] + (j - heads[:, None]))
    live = j < counts[:, None]
    position = torch.where(live, position, 0)
    blocks = torch.gather(block_table, 1, torch.div(position, block_size, rounding_mode="floor"))
    slots = blocks.to(torch.int64) * block_size + position % block_size
    return torch.where(live, slots, 0), torch.where(live, position, -1)


class LambdaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = True
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBNHC,)

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        return LambdaAttentionImpl

    @staticmethod
    def get_builder_cls():
        return LambdaMetadataBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class LambdaMetadataBuilder(AttentionMetadataBuilder[LambdaMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.n_local = kv_cache_spec.sliding_window
        self.n_global = getattr(kv_cache_spec, "n_global", 0)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> LambdaMetadata:
        common = common_attn_metadata
        n = common.num_reqs
        starts_cpu = common.query_start_loc_cpu[: n + 1].to(torch.int64)
        query_lens = starts_cpu[1:] - starts_cpu[:-1]
        seq_lens = common.seq_lens[:n].to("cpu", torch.int64)
        context = seq_lens - query_lens
        _, counts = live_positions(context, self.n_global, self.n_local)
        block_table = common.block_table_tensor[:n]
        device = block_table.device
        groups = []
        decode = torch.nonzero(query_lens == 1).flatten()
        if decode.numel():
            width = max(1, int(counts[decode].max()))
            slots, positions = _gather_plan(block_table[decode.to(device)], context[decode].to(device),
                                            self.n_global, self.n_local, self.block_size, width)
            groups.append(RowGroup(rows=starts_cpu[decode].to(device), slots=slots, positions=positions,
                                   starts=context[decode].to(device)))
        for r in torch.nonzero(query_lens > 1).flatten().tolist():
            width = int(counts[r])
            slots, positions = _gather_plan(block_table[r: r + 1], context[r: r + 1].to(device),
                                            self.n_global, self.n_local, self.block_size, width)
            groups.append(RowGroup(rows=(int(starts_cpu[r]), int(starts_cpu[r + 1])), slots=slots,
                                   positions=positions, starts=context[r: r + 1].to(device)))
        num_tokens = common.num_actual_tokens
        return LambdaMetadata(num_actual_tokens=num_tokens,
                              slot_mapping=common.slot_mapping[:num_tokens].to(torch.int64),
                              groups=groups)


class LambdaAttentionImpl(AttentionImpl):
    """One layer's LM-Infinite attention. The layer (models.LambdaAttention) passes the settings
    and, once the model is built, the rotary frequencies (set_rotary)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, *,
                 n_global: int = 10, n_local: int, distance_cap: int | None = None) -> None:
        if alibi_slopes is not None or logits_soft_cap or kv_sharing_target_layer_name is not None:
            raise ValueError("lm_infinite: ALiBi, logit soft-capping and shared KV layers are not "
                             "supported by LM-Infinite attention")
        if attn_type != AttentionType.DECODER:
            raise ValueError(f"lm_infinite: only decoder attention is supported, got {attn_type}")
        if kv_cache_dtype != "auto":
            raise ValueError(f"lm_infinite: kv_cache_dtype must be 'auto', got {kv_cache_dtype!r}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.n_global, self.n_local = n_global, n_local
        self.distance_cap = n_local if distance_cap is None else distance_cap
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.inv_freq: torch.Tensor | None = None
        self.attention_scaling = 1.0

    def set_rotary(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        """The model's RoPE frequencies (float32 [rotary_dim / 2], rotate-half convention) and
        its cos/sin factor (scaled RoPE), which every score carries squared."""
        self.inv_freq = inv_freq.detach().to(torch.float32)
        self.attention_scaling = float(attention_scaling)

    def _slots(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The layer's cache as [slots, heads_kv, 2 * head_dim] (a view: writes land in it)."""
        blocks, heads, block_size, content = kv_cache.shape
        try:
            return kv_cache.permute(0, 2, 1, 3).view(blocks * block_size, heads, content)
        except RuntimeError:
            raise RuntimeError(
                "lm_infinite: the KV cache is not laid out token-major (LBNHC) as the LM-Infinite "
                f"backend asks (strides {tuple(kv_cache.stride())}); unset VLLM_KV_CACHE_LAYOUT") from None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        """query [tokens, heads_q, head_dim], key/value [tokens, heads_kv, head_dim], output
        [tokens, heads_q, head_dim] (written); kv_cache: the layer's pages."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("lm_infinite: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output
        if self.inv_freq is None:
            raise RuntimeError("lm_infinite: the layer has no rotary frequencies (set_rotary)")
        if self.inv_freq.device != query.device:
            self.inv_freq = self.inv_freq.to(query.device)
        n = attn_metadata.num_actual_tokens
        slots = self._slots(kv_cache)
        d = self.head_size
        settings = dict(n_global=self.n_global, n_local=self.n_local, distance_cap=self.distance_cap,
                        scale=self.scale * self.attention_scaling**2)
        for group in attn_metadata.groups:
            width = group.slots.shape[1]
            cached = slots.index_select(0, group.slots.flatten()).view(group.slots.shape[0], width,
                                                                       self.num_kv_heads, 2 * d)
            cache_k = cached[..., :d].permute(0, 2, 1, 3)  # [requests, heads_kv, width, d]
            cache_v = cached[..., d:].permute(0, 2, 1, 3)
            if isinstance(group.rows, tuple):  # one request, its new tokens as one chunk
                start, end = group.rows
                q = query[start:end].permute(1, 0, 2).unsqueeze(0)
                k = key[start:end].permute(1, 0, 2).unsqueeze(0)
                v = value[start:end].permute(1, 0, 2).unsqueeze(0)
                out = ops.lambda_attention_chunk(q, k, v, cache_k, cache_v, group.positions, group.starts,
                                                 self.inv_freq, **settings)
                output[start:end] = out[0].permute(1, 0, 2)
            else:  # decode rows: one new token per request
                rows = group.rows
                q = query.index_select(0, rows).unsqueeze(2)
                k = key.index_select(0, rows).unsqueeze(2)
                v = value.index_select(0, rows).unsqueeze(2)
                out = ops.lambda_attention_chunk(q, k, v, cache_k, cache_v, group.positions, group.starts,
                                                 self.inv_freq, **settings)
                output.index_copy_(0, rows, out.squeeze(2).to(output.dtype))
        # The new tokens' keys and values, after every group has read the cache as it was.
        slot_mapping = attn_metadata.slot_mapping
        new = torch.cat([key[:n], value[:n]], dim=-1).to(slots.dtype)
        slots.index_copy_(0, slot_mapping, new)
        return output
