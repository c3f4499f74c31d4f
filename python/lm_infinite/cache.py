"""RingKVCache: one layer's fixed-size LM-Infinite KV cache on top of the extension's ops.

State changes are all-or-nothing: `append` and `reorder` either complete or raise with the
cache (ring, positions and middle store) as it was.
"""

from __future__ import annotations

import copy

import torch

from . import ops
from .paged_middle import PagedMiddleStore

__all__ = ["MiddleStore", "RingKVCache", "middle_store", "row_positions"]


def row_positions(start: torch.Tensor, n_rows: int, padding: torch.Tensor | None) -> torch.Tensor:
    """Positions [batch, n_rows] of a chunk's rows: sequence b's row t sits at
    start[b] + t - padding[b], and padding rows (t < padding[b]) at -1. start: int64 [batch]
    (or [1], shared); padding: int64 [batch] or None. Computed on the device, no host read."""
    rows = torch.arange(n_rows, dtype=torch.int64, device=start.device)
    if padding is None:
        return start[:, None] + rows
    offsets = rows - padding[:, None]
    return torch.where(offsets >= 0, start[:, None] + offsets, -1)


def _allocate(what: str, shape: tuple[int, ...], dtype: torch.dtype, device, fill: float = 0):
    """torch.full, with a size that does not fit (or overflows int64) reported as a
    MemoryError naming what was being allocated, instead of a deep RuntimeError."""
    elements = 1
    for size in shape:
        elements *= size
    nbytes = elements * torch.empty((), dtype=dtype).element_size()
    if nbytes >= 2**63:
        raise MemoryError(f"{what}: {list(shape)} {dtype} would take {nbytes} bytes, more than "
                          "int64 can address")
    try:
        return torch.full(shape, fill, dtype=dtype, device=device)
    except RuntimeError as error:  # CPU: "can't allocate memory"; CUDA: torch.OutOfMemoryError
        raise MemoryError(f"{what}: cannot allocate {list(shape)} {dtype} "
                          f"({nbytes / 2**30:.1f} GiB) on {device}: {error}") from None


def _check_beam_index(beam_idx, batch: int) -> torch.Tensor:
    if not isinstance(beam_idx, torch.Tensor) or beam_idx.dtype not in (torch.int64, torch.int32) \
            or beam_idx.shape != (batch,):
        raise ValueError(f"reorder: beam_idx must be an int64 tensor of shape [{batch}] (one "
                         f"source row per batch row), got {beam_idx!r}")
    if batch and not bool(((beam_idx >= 0) & (beam_idx < batch)).all()):
        raise ValueError(f"reorder: beam_idx must hold batch rows in [0, {batch}), got "
                         f"{beam_idx.tolist()}")
    return beam_idx


class MiddleStore:
    """Keys and values of every token at position >= n_global, for top-k middle attention.

    The memory trade-off: top-k may pick any middle token, so an exact store grows with the
    stream (n_heads_kv * head_dim * 2 values per token and layer). It lives beside the ring,
    off the Λ hot path: the kernel reads it only for the rows that use top-k, and only the
    layers that use top-k keep one. Capacity doubles when full (amortised O(1) appends).
    """

    def __init__(self, batch: int, n_heads_kv: int, head_dim: int, *, n_global: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: int = 1024) -> None:
        self.n_global = n_global
        self.k, self.v = (_allocate("MiddleStore", (batch, n_heads_kv, capacity, head_dim), dtype,
                                    device) for _ in range(2))
        # Per sequence: sequences of a batch sit at their own positions (left padding, finished
        # sequences fed as padding), so slot i of sequence b has its own position; -1 = padding.
        self.positions = torch.full((batch, capacity), -1, dtype=torch.int64, device=device)
        self.length = 0

    def reserve(self, start: int, n_tokens: int) -> None:
        """Make room for append(k, v, start) of n_tokens tokens (the one step that can fail)."""
        n = n_tokens - max(0, min(n_tokens, self.n_global - start))
        if self.length + n > self.k.shape[2]:
            self._grow(self.length + n)

    def append(self, k: torch.Tensor, v: torch.Tensor, start: int,
               positions: torch.Tensor | None = None) -> None:
        """Store k, v (checked by the caller against the ring), the chunk that starts at column
        `start` of the stream. positions: int64 [batch, n] of its rows (-1: padding; see
        row_positions); None: start + t for every sequence. A row's position never exceeds
        its column, so the chunk's first n_global - start rows are globals or padding in every
        sequence: they live in the ring and are not stored."""
        skip = max(0, min(k.shape[-2], self.n_global - start))
        k, v = k[:, :, skip:], v[:, :, skip:]
        n = k.shape[-2]
        self.reserve(start + skip, n)
        end = self.length + n
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        if positions is None:
            self.positions[:, self.length:end] = torch.arange(start + skip, start + skip + n,
                                                              device=self.positions.device)
        else:
            self.positions[:, self.length:end] = positions[:, skip:]
        self.length = end

    def _grow(self, needed: int) -> None:
        """Every new buffer is allocated before any replaces the old one."""
        capacity = max(needed, 2 * self.k.shape[2])
        new = {}
        for name in ("k", "v"):
            old = getattr(self, name)
            new[name] = _allocate("MiddleStore", (*old.shape[:2], capacity, old.shape[3]),
                                  old.dtype, old.device)
            new[name][:, :, : self.length] = old[:, :, : self.length]
        new["positions"] = self.positions.new_full((self.positions.shape[0], capacity), -1)
        new["positions"][:, : self.length] = self.positions[:, : self.length]
        for name, tensor in new.items():
            setattr(self, name, tensor)

    def views(self) -> dict:
        """The filled part, as the op's middle_k / middle_v / middle_positions arguments."""
        n = self.length
        return dict(middle_k=self.k[:, :, :n], middle_v=self.v[:, :, :n],
                    middle_positions=self.positions[:, :n])

    def candidates(self, queries, query_positions, inv_freq, *, top_k_distance, n_local) -> dict:
        """What the op scores for top-k rows: every stored key (the paged store's interface;
        query_positions [batch, rows] are the rows' positions)."""
        return self.views()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow a beam search's reordering of the batch (beam_idx already checked): every
        reordered copy exists before the first tensor is overwritten."""
        stores = (self.k, self.v, self.positions)
        reordered = [t.index_select(0, beam_idx.to(t.device)) for t in stores]
        for store, new in zip(stores, reordered):
            store.copy_(new)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions))


def middle_store(batch: int, n_heads_kv: int, head_dim: int, *, n_global: int, dtype, device,
                 kind: str = "exact", **paged_options):
    """A middle store for top-k: "exact" (every key, scored in full) or "paged"
    (PagedMiddleStore: blocks chosen through summaries; paged_options are its own)."""
    if kind == "exact":
        if paged_options:
            raise ValueError(f"the exact middle store takes no {sorted(paged_options)}")
        return MiddleStore(batch, n_heads_kv, head_dim, n_global=n_global, dtype=dtype, device=device)
    if kind == "paged":
        return PagedMiddleStore(batch, n_heads_kv, head_dim, n_global=n_global, dtype=dtype,
                                device=device, **paged_options)
    raise ValueError(f"middle store kind must be 'exact' or 'paged', got {kind!r}")


class RingKVCache:
    """Keys and values of the first n_global tokens and the last n_local, unrotated.

    Storage is allocated once: k, v [batch, heads_kv, n_global + n_local, head_dim] and an
    int64 position per sequence and slot, `positions` [batch, slots] (-1 = empty). Each
    sequence of the batch has its own position: `next_position` (int64 [batch], on the device,
    so that kernels read it without a host round trip) is the position of its next token.
    A chunk may start with padding rows per sequence (`padding`: int64 [batch], leading rows;
    left padding, or a finished sequence fed a placeholder): they are neither attended to nor
    stored nor counted, so every sequence behaves as if it ran alone. `n_seen` (host int)
    counts the chunk rows (columns) appended, padding included; without padding it is every
    sequence's next position. With keep_middle=True a middle store (`middle_store(...,
    **middle_options)`: exact by default) also keeps the tokens past the first n_global, so that
    `attend` can use top-k middle attention.

    A compiled or captured decode step cannot advance a Python int from inside its graph: it
    sets `counts_on_append = False` while it runs and calls `count(n)` after each step.

    One ring bookkeeping: which slot holds which position, what survives a chunk and whether an
    append may happen at all (a ring only moves forward) is decided by the core alone
    (lminf/ring_kv_cache.h: ring_slot and ring_cache_append, which writes `positions`); this
    class computes no slot and keeps only what the core is handed, each sequence's next
    position (on the device, so that a captured step can advance it) and the host count.
    lminf::KVCache is the same thin owner for C++ pipelines, over the same core calls. Porting
    this class onto lminf::KVCache would move its tensors behind a C++ object that torch.compile
    and CUDA graphs cannot see through; keeping both thin keeps the rules in one place.
    """

    def __init__(
        self,
        batch: int,
        n_heads_kv: int,
        head_dim: int,
        *,
        n_global: int = 10,
        n_local: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        keep_middle: bool = False,
        middle_options: dict | None = None,
    ) -> None:
        for name, value, low in (("batch", batch, 1), ("n_heads_kv", n_heads_kv, 1),
                                 ("head_dim", head_dim, 1), ("n_global", n_global, 0),
                                 ("n_local", n_local, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= ops.MAX_POSITION:
                raise ValueError(f"RingKVCache: {name} must be an int in [{low}, 2^62], got {value!r}")
        self.n_global, self.n_local = n_global, n_local
        slots = n_global + n_local
        self.k, self.v = (_allocate(f"RingKVCache (n_global + n_local = {slots} slots)",
                                    (batch, n_heads_kv, slots, head_dim), dtype, device)
                          for _ in range(2))
        self.positions = torch.full((batch, slots), -1, dtype=torch.int64, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.int64, device=device)
        self.n_seen = 0
        # Once a chunk had padding, columns and positions part ways (n_seen counts columns).
        self.padded = False
        self.counts_on_append = True
        self.middle_options = dict(middle_options or {})
        self.middle = self._new_middle() if keep_middle else None

    def _new_middle(self):
        return middle_store(*self.k.shape[:2], self.k.shape[3], n_global=self.n_global,
                            dtype=self.k.dtype, device=self.k.device, **self.middle_options)

    def reset(self) -> None:
        self.positions.fill_(-1)
        self.next_position.zero_()
        self.n_seen = 0
        self.padded = False
        if self.middle is not None:
            self.middle = self._new_middle()

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inv_freq: torch.Tensor,
        *,
        distance_cap: int | None = None,
        scale: float | None = None,
        top_k: int = 0,
        top_k_distance: int | None = None,
        top_k_first_row: int = 0,
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output for the next chunk (q: [batch, heads_q, seq, head_dim]; k, v its
        keys and values), which sits right after the tokens seen so far, sequence by sequence.
        padding: int64 [batch] leading padding rows per sequence (their output rows are
        zeros), or None. Does not append. top_k > 0 (needs keep_middle=True): rows
        top_k_first_row.. (padding rows counted) also attend to their top_k middle keys (see
        ops.lambda_attention_chunk_top_k)."""
        window = dict(n_global=self.n_global, n_local=self.n_local, distance_cap=distance_cap,
                      scale=scale, padding=padding)
        if top_k <= 0:
            return ops.lambda_attention_chunk(q, k, v, self.k, self.v, self.positions,
                                              self.next_position, inv_freq, **window)
        if self.middle is None:
            raise ValueError("top_k > 0 needs a RingKVCache built with keep_middle=True")
        top_k_distance = self.n_local // 2 if top_k_distance is None else top_k_distance
        first_row = max(0, top_k_first_row)
        positions = row_positions(self.next_position, q.shape[2], padding)[:, first_row:]
        middle = self.middle.candidates(q[:, :, first_row:], positions, inv_freq,
                                        top_k_distance=top_k_distance, n_local=self.n_local)
        return ops.lambda_attention_chunk_top_k(
            q, k, v, self.k, self.v, self.positions, self.next_position, inv_freq,
            top_k=top_k, top_k_distance=top_k_distance, top_k_first_row=top_k_first_row,
            **middle, **window,
        )

    def append(self, k: torch.Tensor, v: torch.Tensor, padding: torch.Tensor | None = None) -> None:
        """Store the chunk's keys and values (padding: as in `attend`; padding rows are not
        stored) and advance each sequence's position by its real rows. The op checks k and v
        before it writes; the middle store makes room first, so once the ring is written
        nothing can fail."""
        if self.middle is not None and isinstance(k, torch.Tensor) and k.dim() == 4:
            self.middle.reserve(self.n_seen, k.shape[-2])
        # The middle store's row positions, taken before next_position moves.
        positions = None
        if self.middle is not None and padding is not None:
            positions = row_positions(self.next_position, k.shape[-2], padding)
        ops.ring_cache_append(
            self.k, self.v, self.positions, k, v, self.next_position,
            n_global=self.n_global, n_local=self.n_local, padding=padding,
        )
        if self.middle is not None:
            if positions is None and self.padded:
                positions = row_positions(self.next_position, k.shape[-2], None)
            self.middle.append(k, v, self.n_seen, positions)
        if padding is None:
            self.next_position += k.shape[-2]
        else:
            self.next_position += k.shape[-2] - padding
            self.padded = True
        if self.counts_on_append:
            self.n_seen += k.shape[-2]

    def row(self, b: int) -> "RingKVCache":
        """Sequence b alone, as a batch-1 ring over this ring's storage (views: what it appends
        lands in row b here). For feeding sequences of different lengths one at a time without
        computing padding rows; rings with a middle store (whose columns the batch shares)
        cannot be split."""
        if self.middle is not None:
            raise ValueError("RingKVCache.row: a ring with a middle store cannot be split by sequence")
        view = copy.copy(self)
        one = slice(b, b + 1)
        view.k, view.v = self.k[one], self.v[one]
        view.positions, view.next_position = self.positions[one], self.next_position[one]
        view.padded = False
        return view

    def count(self, n_tokens: int) -> None:
        """Advance the host-side count by tokens appended while counts_on_append was off."""
        self.n_seen += n_tokens

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: batch row b becomes row beam_idx[b] ([batch] ints), in the ring and the
        middle store alike; beam_idx is checked before anything moves."""
        beam_idx = _check_beam_index(beam_idx, self.k.shape[0]).to(self.k.device, torch.int64)
        # Every reordered copy exists before the first tensor is replaced: the ring's here, the
        # middle store's inside its own reorder, which runs before the ring changes.
        own = (self.k, self.v, self.positions, self.next_position)
        ring = [t.index_select(0, beam_idx) for t in own]
        if self.middle is not None:
            self.middle.reorder(beam_idx)
        for store, new in zip(own, ring):
            store.copy_(new)

    def attend_and_append(self, q, k, v, inv_freq, *, padding=None, **attend_options) -> torch.Tensor:
        out = self.attend(q, k, v, inv_freq, padding=padding, **attend_options)
        self.append(k, v, padding)
        return out

    def nbytes(self) -> int:
        """Bytes of the fixed ring (the middle store, if any, is counted separately)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions))
