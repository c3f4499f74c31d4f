"""What vLLM's scheduler keeps of an LM-Infinite request: its first n_global tokens and a window
of its last n_local, freeing every block in between.

`LambdaSpec` is a `SlidingWindowSpec` (window n_local) that also keeps the first
ceil(n_global / block_size) blocks, so vLLM sizes the pool and admits requests as for a window
plus those blocks. `LambdaWindowManager` is vLLM's sliding-window manager with one change: the
blocks it frees as the window moves never include the head blocks.

Prefix caching is off for these layers (the manager reports no cache hit and caches no block):
a sliding-window hit would reuse a window without the sink blocks its queries also read.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec

__all__ = ["LambdaSpec", "LambdaWindowManager", "register_kv_cache_spec", "max_blocks_per_request"]

logger = init_logger(__name__)


def max_blocks_per_request(n_global: int, n_local: int, block_size: int, in_flight: int = 1) -> int:
    """The blocks a request holds at most: the head blocks, plus the window of n_local - 1
    computed tokens and the `in_flight` tokens being computed (a decode step: 1), which may
    start inside a block (+1)."""
    return cdiv(n_global, block_size) + cdiv(n_local - 1 + in_flight, block_size) + 1


@dataclass(frozen=True, kw_only=True)
class LambdaSpec(SlidingWindowSpec):
    """KV cache of one LM-Infinite layer: sliding_window = n_local, plus the head blocks that
    hold the first n_global tokens."""

    n_global: int = 0

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return window + cdiv(self.n_global, self.block_size)


class LambdaWindowManager(SlidingWindowManager):
    """SlidingWindowManager that never frees the first ceil(n_global / block_size) blocks of a
    request, and takes no part in prefix caching."""

    _said_no_prefix_caching = False

    def __init__(self, kv_cache_spec: LambdaSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.head_blocks = cdiv(kv_cache_spec.n_global, self.block_size)
        if self.enable_caching and not LambdaWindowManager._said_no_prefix_caching:
            LambdaWindowManager._said_no_prefix_caching = True
            logger.info("lm_infinite: prefix caching is off for LM-Infinite attention layers "
                        "(every request computes its whole prompt)")

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        # The window of the next token starts at processed_computed_tokens - n_local + 1; whole
        # blocks before it are freed, except the head blocks (the global tokens).
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        blocks = self.req_to_blocks[request_id]
        last = min(skipped // self.block_size, len(blocks))
        # Frees [head_blocks, last) from the end backwards, stopping at the first block freed by
        # an earlier call.
        self._remove_blocks_in_range(request_id, self.head_blocks, last)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, block_pool,
                               kv_cache_spec, drop_eagle_block, alignment_tokens,
                               dcp_world_size: int = 1, pcp_world_size: int = 1):
        return tuple([] for _ in kv_cache_group_ids), 0

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries=()) -> None:
        return


def register_kv_cache_spec() -> None:
    """Register LambdaSpec with its manager, after vLLM's built-in specs (registering first
    would leave the built-ins unregistered: the registry fills itself only while empty)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(LambdaSpec, LambdaWindowManager, uniform_type_base_spec=LambdaSpec)
