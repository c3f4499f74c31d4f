"""PagedMiddleStore: the middle tokens in fixed-size blocks, each scored through a small summary.

The exact MiddleStore (cache.py) hands the kernel every middle key, so memory and the time of a
top-k row grow with the stream. Here keys and values live in blocks of `block_size` tokens and
each block keeps, on the compute device, the per-channel minimum and maximum of its keys (Quest,
Tang et al. 2024). For a query q placed at top_k_distance the kernel scores a key k as
s * (R_D q) . k with k unrotated, so with q' = R_D q

    sum_c max(q'_c * kmin_c, q'_c * kmax_c)  >=  q' . k   for every key k of the block:

an upper bound, two small matmuls over the summaries. Each query head keeps its `top_k_blocks`
best blocks (its bound maximised over the chunk's top-k rows), the union over heads and batch is
gathered into one compact middle tensor, and the kernel takes its exact top-k among those keys.
The gathered middle has a fixed size, min(blocks, batch x heads_q x top_k_blocks) blocks, the
slots outside the union hidden by position -1: no step waits for the device to count the union.
Per call, only the scoring pass reads O(blocks) memory (the summaries); the gather copies at most
batch x heads_q x top_k_blocks blocks, whatever the stream's length.
Whenever the true top-k keys lie in the fetched blocks the result is the exact store's; with
every block fetched it always is. Otherwise it is an approximation: a block is missed only if
top_k_blocks others have a higher bound for every row of that head.

Bounds: `max_middle_tokens` keeps the newest tokens only (whole blocks; the oldest block goes
when a new one opens), which bounds memory and the scoring time. With `offload=True` the blocks
live in host memory (pinned when the compute device is CUDA, copied in asynchronously per
selection) and only the summaries, 2 * head_dim values per block and head, stay on the device.
"""

from __future__ import annotations

import copy
import math

import torch

from .reference import apply_rotary

__all__ = ["PagedMiddleStore"]

_NO_POSITION = 2**62  # a block's first position while it holds none: visible to no row


class PagedMiddleStore:
    """Keys and values of the tokens at positions >= n_global, in blocks with min/max summaries.

    Storage (blocks: on `device`, or on the host with offload):
      k, v:        [batch, heads_kv, capacity, block_size, head_dim]
    On `device`:
      kmin, kmax:  float32 [batch, heads_kv, capacity, head_dim]  per-block key summaries
      positions:   int64 [batch, capacity, block_size]  each stored token's position in its
                   sequence (-1: padding or not yet filled). Blocks are filled column by
                   column across the batch; a sequence's padding rows (left padding, or a
                   finished sequence fed a placeholder) take a slot but no position.
      first_position: int64 [batch, capacity]  each block's smallest position per sequence
                   (2^62 while it holds none): what the selection tests visibility with.
    Blocks form a ring of slots: while the store grows, slot i is the i-th block; once
    max_middle_tokens is reached the newest block overwrites the oldest.
    """

    def __init__(self, batch: int, n_heads_kv: int, head_dim: int, *, n_global: int,
                 dtype: torch.dtype, device: torch.device | str, block_size: int = 64,
                 top_k_blocks: int = 8, max_middle_tokens: int | None = None,
                 offload: bool = False, capacity: int = 16) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"PagedMiddleStore: block_size must be an int >= 1, got {block_size!r}")
        if not isinstance(top_k_blocks, int) or top_k_blocks < 1:
            raise ValueError(f"PagedMiddleStore: top_k_blocks must be an int >= 1, got {top_k_blocks!r}")
        if max_middle_tokens is not None and (not isinstance(max_middle_tokens, int)
                                              or max_middle_tokens < block_size):
            raise ValueError(f"PagedMiddleStore: max_middle_tokens must be None or an int >= "
                             f"block_size ({block_size}), got {max_middle_tokens!r}")
        self.n_global, self.block_size, self.top_k_blocks = n_global, block_size, top_k_blocks
        self.device, self.offload = torch.device(device), offload
        self.block_device = torch.device("cpu") if offload else self.device
        self.pinned = offload and self.device.type == "cuda"
        self.max_blocks = None if max_middle_tokens is None else math.ceil(max_middle_tokens / block_size)
        if self.max_blocks is not None:
            capacity = min(capacity, self.max_blocks)
        shape = (batch, n_heads_kv, capacity, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.block_device, pin_memory=self.pinned)
        self.v = torch.zeros(shape, dtype=dtype, device=self.block_device, pin_memory=self.pinned)
        # float32 whatever the blocks' dtype: the scoring matmuls then read the summaries as
        # they are (no per-call conversion), and the min/max of bf16/fp16 keys is exact in them.
        self.kmin = torch.zeros(batch, n_heads_kv, capacity, head_dim, dtype=torch.float32,
                                device=self.device)
        self.kmax = torch.zeros_like(self.kmin)
        self.positions = torch.full((batch, capacity, block_size), -1, dtype=torch.int64, device=self.device)
        self.first_position = torch.full((batch, capacity), _NO_POSITION, dtype=torch.int64, device=self.device)
        self.n_blocks = 0   # slots in use: always slots 0 .. n_blocks - 1
        self.newest = -1    # slot of the block being filled
        self.fill = 0       # tokens in the newest block
        self.dropped_blocks = 0
        # Flat buffers the selected blocks are gathered into, reused from call to call (fresh
        # multi-MB allocations cost more than the gather on the CPU); pinned with offload on CUDA.
        self._gathered = None
        self._copied = None  # CUDA event: the last copy out of the pinned buffer is done
        # Small reused tensors of the selection: the bounds buffer, arange(capacity).
        self._bounds = self._arange = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def block_start(self) -> torch.Tensor:
        """int64 [capacity]: the first sequence's position of each block's first token (in an
        unpadded batch, every sequence's)."""
        return self.positions[0, :, 0]

    @property
    def length(self) -> int:
        """Tokens held now (dropped ones excluded)."""
        return 0 if self.n_blocks == 0 else (self.n_blocks - 1) * self.block_size + self.fill

    def reserve(self, start: int, n_tokens: int) -> None:
        """Make room for append(k, v, start) of n_tokens tokens: the one step of an append that
        can fail (it allocates), so RingKVCache calls it before it writes the ring."""
        tokens = n_tokens - max(0, min(n_tokens, self.n_global - start))  # globals live in the ring
        free = self.block_size - self.fill if self.n_blocks else 0
        needed = self.n_blocks + -(-max(0, tokens - free) // self.block_size)
        if self.max_blocks is not None:
            needed = min(needed, self.max_blocks)
        while self.capacity < needed:
            self._grow()

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int,
               positions: torch.Tensor | None = None) -> None:
        """Store a chunk's keys and values ([batch, heads_kv, n, head_dim]) that starts at
        column `start` of the stream. positions: int64 [batch, n] per row (-1: padding, left
        out of the summaries); None: start + t for every sequence. A row's position never
        exceeds its column, so the first n_global - start rows are globals or padding in every
        sequence: they live in the ring."""
        skip = max(0, min(k.shape[-2], self.n_global - start))
        done, n = skip, k.shape[-2]
        while done < n:
            if self.n_blocks == 0 or self.fill == self.block_size:
                self._open_block()
            m = min(n - done, self.block_size - self.fill)
            piece_k, piece_v = k[:, :, done:done + m], v[:, :, done:done + m]
            slot, end = self.newest, self.fill + m
            self.k[:, :, slot, self.fill:end].copy_(piece_k)
            self.v[:, :, slot, self.fill:end].copy_(piece_v)
            if positions is None:
                self.positions[:, slot, self.fill:end] = torch.arange(
                    start + done, start + done + m, device=self.device)
                self.first_position[:, slot].clamp_(max=start + done)
                low, high = piece_k.amin(2), piece_k.amax(2)
            else:
                piece_positions = positions[:, done:done + m]
                self.positions[:, slot, self.fill:end] = piece_positions
                real = piece_positions.masked_fill(piece_positions < 0, _NO_POSITION).amin(1)
                self.first_position[:, slot] = torch.minimum(self.first_position[:, slot], real)
                padding = (piece_positions < 0)[:, None, :, None]
                low = piece_k.masked_fill(padding, float("inf")).amin(2)
                high = piece_k.masked_fill(padding, float("-inf")).amax(2)
            self.kmin[:, :, slot] = torch.minimum(self.kmin[:, :, slot], low)
            self.kmax[:, :, slot] = torch.maximum(self.kmax[:, :, slot], high)
            self.fill, done = end, done + m

    def _open_block(self) -> None:
        if self.max_blocks is not None and self.n_blocks == self.max_blocks:
            slot = (self.newest + 1) % self.n_blocks  # the oldest block: dropped whole
            self.dropped_blocks += 1
        else:
            if self.n_blocks == self.capacity:
                self._grow()
            slot = self.n_blocks
            self.n_blocks += 1
        self.newest, self.fill = slot, 0
        self.positions[:, slot] = -1
        self.first_position[:, slot] = _NO_POSITION
        self.kmin[:, :, slot] = float("inf")
        self.kmax[:, :, slot] = float("-inf")

    def _grow(self) -> None:
        """Double the slots (never past max_blocks); only happens before the ring wraps."""
        capacity = 2 * self.capacity
        if self.max_blocks is not None:
            capacity = min(capacity, self.max_blocks)
        n, grown = self.n_blocks, {}
        # Every new buffer is allocated before any replaces the old one: a failed allocation
        # leaves the store as it was.
        for name, dim in (("k", 2), ("v", 2), ("kmin", 2), ("kmax", 2), ("positions", 1),
                          ("first_position", 1)):
            old = getattr(self, name)
            shape = list(old.shape)
            shape[dim] = capacity
            grown[name] = torch.empty(shape, dtype=old.dtype, device=old.device,
                                      pin_memory=self.pinned and old.device.type == "cpu")
            grown[name].narrow(dim, 0, n).copy_(old.narrow(dim, 0, n))
        for name, new in grown.items():
            setattr(self, name, new)

    def candidates(self, queries: torch.Tensor, query_positions: torch.Tensor | int, inv_freq: torch.Tensor, *,
                   top_k_distance: int, n_local: int) -> dict:
        """The middle keys to hand the op for these top-k rows, as its middle_k / middle_v /
        middle_positions arguments: the union of each query head's best blocks.

        queries: [batch, heads_q, rows, head_dim], unrotated; query_positions: int64
        [batch, rows] their positions (-1: padding rows, which choose nothing), or an int: the
        first row's position in every sequence.

        Every size here follows from shapes and host-side counts, never from the selection: a
        fixed number of slots is gathered (all blocks, or one per head's choice when that is
        fewer) and the slots outside the union get positions -1, which the kernel skips. So
        nothing waits on the device to learn how many blocks were chosen (offload excepted: the
        host must know which blocks to copy).
        """
        if queries.shape[2] == 0 or self.n_blocks == 0:
            return self.gather(torch.zeros(0, dtype=torch.int64, device=self.device))
        best, chosen = self._best_blocks(queries, query_positions, inv_freq,
                                         top_k_distance=top_k_distance, n_local=n_local)
        n = self.n_blocks
        if chosen.numel() >= n:
            # Room for every block: take them all in slot order, flag the chosen ones.
            slots = self._all_slots(n)
            flagged = torch.zeros(n + 1, dtype=torch.bool, device=self.device)
            flagged[torch.where(best > float("-inf"), chosen, n).flatten()] = True
            keep = flagged[:n]
        else:
            # One slot per choice, ascending; repeats and unusable choices (-inf bound, sorted
            # last as slot n) are kept out by position.
            keyed = torch.where(best > float("-inf"), chosen, n).flatten().sort().values
            keep = keyed < n
            keep[1:] &= keyed[1:] != keyed[:-1]
            slots = keyed.clamp(max=n - 1)
        # The gather buffer is sized for what this many choices can take at the capacity, so
        # that a store still growing block by block does not reallocate it each step.
        return self.gather(slots, keep, room=min(self.capacity, chosen.numel()))

    def select_blocks(self, queries, query_positions, inv_freq, *, top_k_distance, n_local):
        """Slots (int64, ascending, on the compute device) of the blocks the union holds: the
        ones `candidates` keeps. Its size depends on the data (a device sync on CUDA), so the
        hot path does not use it; tests and bench/middle_store_recall.py do."""
        if queries.shape[2] == 0 or self.n_blocks == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device)
        best, chosen = self._best_blocks(queries, query_positions, inv_freq,
                                         top_k_distance=top_k_distance, n_local=n_local)
        return torch.unique(chosen[best > float("-inf")])

    def _best_blocks(self, queries, query_positions, inv_freq, *, top_k_distance, n_local):
        """(bound, slot) of each query head's top_k_blocks blocks, both [batch, heads_kv, group,
        min(top_k_blocks, n_blocks)]: the block's bound maximised over the rows, -inf for a
        block that no row may read (every row's own choice would be the same blocks).

        The bound is one pass over the summaries: two matmuls with each KV head's group of
        query rows stacked (no copy of the summaries per query head), written into a reused
        buffer, then a top-k over blocks. No Python runs per block."""
        batch, heads_q, rows, head_dim = queries.shape
        heads_kv, n = self.kmin.shape[1], self.n_blocks
        group = heads_q // heads_kv
        placed = apply_rotary(queries.float().reshape(batch, heads_kv, group * rows, head_dim),
                              torch.full((group * rows,), top_k_distance, device=queries.device), inv_freq)
        placed = placed.reshape(batch * heads_kv, group * rows, head_dim)
        kmax = self.kmax[:, :, :n].view(batch * heads_kv, n, head_dim).transpose(1, 2)
        kmin = self.kmin[:, :, :n].view(batch * heads_kv, n, head_dim).transpose(1, 2)
        bound = self._scratch(batch * heads_kv, group * rows, n)
        torch.bmm(placed.clamp(min=0), kmax, out=bound)
        bound.baddbmm_(placed.clamp(max=0), kmin)
        bound = bound.view(batch, heads_kv, group, rows, n)
        # A block helps row i only if it starts at or before i - n_local (the kernel masks the
        # rest of it by position); blocks the bound cannot rank stay out. Per sequence: its own
        # positions. A padding row (-1) sees no block.
        if not isinstance(query_positions, torch.Tensor):
            query_positions = query_positions + torch.arange(rows, device=self.device).expand(batch, rows)
        last_visible = torch.where(query_positions >= 0, query_positions - n_local, -1)
        hidden = self.first_position[:, None, :n] > last_visible[:, :, None]  # [b, rows, n]
        bound.masked_fill_(hidden[:, None, None], float("-inf"))
        per_head = bound[:, :, :, 0] if rows == 1 else bound.amax(dim=3)  # [b, kv, group, n]
        return per_head.topk(min(self.top_k_blocks, n), dim=-1)

    def _scratch(self, *shape: int) -> torch.Tensor:
        """A float32 buffer of `shape` (its last dimension the blocks held) for the block
        bounds, reused across calls: sized for the capacity, so it is reallocated only when
        the store doubles or more rows come, not per call nor per new block."""
        size = math.prod(shape)
        if self._bounds is None or self._bounds.numel() < size:
            room = math.prod(shape[:-1]) * self.capacity
            self._bounds = torch.empty(room, dtype=torch.float32, device=self.device)
        return self._bounds[:size].view(shape)

    def _all_slots(self, n: int) -> torch.Tensor:
        """arange(n) on the compute device, from a cached arange over the capacity."""
        if self._arange is None or self._arange.numel() < n:
            self._arange = torch.arange(self.capacity, device=self.device)
        return self._arange[:n]

    def gather(self, slots: torch.Tensor, keep: torch.Tensor | None = None, room: int = 0) -> dict:
        """The blocks at `slots` as one compact middle: [batch, heads_kv, len(slots) * block_size,
        head_dim] on the compute device, positions -1 for the newest block's empty tail and for
        blocks where `keep` ([len(slots)] bool, default all) is False. The tensors are views of
        a buffer that the next call overwrites: hand them to the op now. room: blocks to size
        that buffer for when it must grow (at least len(slots))."""
        m = slots.numel()
        batch, heads_kv, _, block_size, head_dim = self.k.shape
        pages = self._buffer(m, max(m, room))
        host_slots = slots.to(self.block_device)
        torch.index_select(self.k, 2, host_slots, out=pages[0])
        torch.index_select(self.v, 2, host_slots, out=pages[1])
        if self.offload:
            pages = self._to_device(pages)
        positions = self.positions.index_select(1, slots)  # the newest block's empty tail: -1
        if keep is not None:
            positions.masked_fill_(~keep[None, :, None], -1)
        k, v = pages.reshape(2, batch, heads_kv, m * block_size, head_dim)
        return dict(middle_k=k, middle_v=v, middle_positions=positions.reshape(batch, -1))

    def _buffer(self, m: int, room: int) -> torch.Tensor:
        """[2 (k, v), batch, heads_kv, m, block_size, head_dim], contiguous, from the reused
        flat buffer (grown to `room` blocks when m blocks do not fit)."""
        shape = (2, *self.k.shape[:2], m, *self.k.shape[3:])
        size = math.prod(shape)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy out of the pinned buffer is done
        if self._gathered is None or self._gathered.numel() < size:
            per_block = math.prod(shape) // m if m else 0
            self._gathered = torch.empty(max(per_block * room, size, 1), dtype=self.k.dtype,
                                         device=self.block_device, pin_memory=self.pinned)
        return self._gathered[:size].view(shape)

    def _to_device(self, pages: torch.Tensor) -> torch.Tensor:
        """Host pages -> compute device: asynchronous from pinned memory on CUDA, with an event
        that guards the pinned buffer's reuse."""
        on_device = pages.to(self.device, non_blocking=self.pinned)
        if self.pinned:
            self._copied = torch.cuda.Event()
            self._copied.record()
        return on_device

    def __deepcopy__(self, memo) -> "PagedMiddleStore":
        """The stored blocks and summaries, not the transient gather buffer and its CUDA event
        (which cannot be copied), e.g. for LambdaStream.fork."""
        twin = copy.copy(self)
        for name in ("k", "v", "kmin", "kmax", "positions", "first_position"):
            setattr(twin, name, copy.deepcopy(getattr(self, name), memo))
        twin._gathered = twin._copied = None
        twin._bounds = twin._arange = None
        return twin

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow a beam search's reordering of the batch (beam_idx already checked): every
        reordered copy exists before the first tensor is overwritten, and the tensors keep
        their storage (pinned host blocks stay pinned)."""
        stores = (self.k, self.v, self.kmin, self.kmax, self.positions, self.first_position)
        reordered = [t.index_select(0, beam_idx.to(t.device)) for t in stores]
        for store, new in zip(stores, reordered):
            store.copy_(new)

    def device_nbytes(self) -> int:
        """Bytes on the compute device: summaries and positions, plus the blocks unless
        offloaded. Not counted: the transient gather of at most batch x heads_q x top_k_blocks
        blocks per top-k call."""
        held = [self.kmin, self.kmax, self.positions, self.first_position]
        if not self.offload:
            held += [self.k, self.v]
        return sum(t.numel() * t.element_size() for t in held)

    def host_nbytes(self) -> int:
        """Bytes of offloaded blocks in host memory (0 without offload)."""
        if not self.offload:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k, self.v))

    def nbytes(self) -> int:
        return self.device_nbytes() + self.host_nbytes()
