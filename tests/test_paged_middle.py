"""PagedMiddleStore against the exact MiddleStore: with every block fetched, or with fetched
blocks that hold the true top-k keys, top-k attention is the exact store's; the bound keeps the
newest whole blocks; offload leaves only the summaries on the compute device; beam reordering
follows. Random tensors through RingKVCache (the CPU kernel does the exact top-k)."""

import copy
import math

import pytest
import torch

from lm_infinite import ops
from lm_infinite.cache import MiddleStore, RingKVCache
from lm_infinite.paged_middle import PagedMiddleStore
from lm_infinite.top_k_rows import _rotate

BATCH, HEADS_Q, HEADS_KV, DIM = 2, 6, 2, 16
N_GLOBAL, N_LOCAL, TOP_K, DISTANCE = 3, 16, 4, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


def _chunks(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n in lengths:
        yield (torch.randn(BATCH, HEADS_Q, n, DIM, generator=g),
               torch.randn(BATCH, HEADS_KV, n, DIM, generator=g),
               torch.randn(BATCH, HEADS_KV, n, DIM, generator=g))


def _ring(**paged):
    """A ring with the exact middle store, or with the paged one given its options."""
    return RingKVCache(BATCH, HEADS_KV, DIM, n_global=N_GLOBAL, n_local=N_LOCAL, keep_middle=True,
                       middle_options=dict(kind="paged", **paged) if paged else None)


def _attend(ring, q, k, v, first_row=0):
    return ring.attend_and_append(q, k, v, INV_FREQ, top_k=TOP_K, top_k_distance=DISTANCE,
                                  top_k_first_row=first_row)


@pytest.mark.parametrize("block_size", [1, 5, 64])
@pytest.mark.parametrize("lengths", [[37, 1, 1, 1], [7] * 12, [100, 19, 1]])
def test_every_block_fetched_equals_the_exact_store(block_size, lengths):
    exact, paged = _ring(), _ring(block_size=block_size, top_k_blocks=10_000)
    assert isinstance(paged.middle, PagedMiddleStore) and isinstance(exact.middle, MiddleStore)
    for q, k, v in _chunks(lengths):
        torch.testing.assert_close(_attend(paged, q, k, v), _attend(exact, q, k, v), atol=0, rtol=0)


def _true_top_k_positions(store: MiddleStore, q, first_position):
    """Positions of each row's exact top-k middle keys (what the kernel picks), as a set."""
    n = store.length
    group = HEADS_Q // HEADS_KV
    rows = q.shape[2]
    placed = _rotate(q.reshape(BATCH, HEADS_KV, group, rows, DIM),
                     torch.full((rows,), DISTANCE), INV_FREQ)
    scores = placed @ store.k[:, :, None, :n].transpose(-1, -2)  # [b, kv, group, rows, n]
    positions = store.positions[0, :n]  # [batch, n]: every sequence alike here
    row_positions = first_position + torch.arange(rows)
    visible = (positions[None] >= N_GLOBAL) & (positions[None] <= (row_positions - N_LOCAL)[:, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    best = scores.topk(min(TOP_K, n), dim=-1)
    return set(positions[best.indices[best.values > float("-inf")]].tolist())


def test_fetched_blocks_holding_the_true_top_k_give_the_exact_result():
    """The kernel's top-k among a subset of blocks is the exact one when the subset holds the
    true top-k: fetch exactly their blocks (and nothing else) and compare."""
    block_size = 4
    exact, paged = _ring(), _ring(block_size=block_size)
    for q, k, v in _chunks([90]):
        _attend(exact, q, k, v)
        _attend(paged, q, k, v)
    for q, k, v in _chunks([1, 3], seed=1):
        first = exact.n_seen
        wanted = _true_top_k_positions(exact.middle, q, first)
        store = paged.middle
        starts = store.block_start[: store.n_blocks]
        slots = torch.tensor(sorted({int(((starts <= p) & (starts + block_size > p)).nonzero()[0])
                                     for p in wanted}))
        assert 0 < slots.numel() < store.n_blocks  # a real subset
        options = dict(top_k=TOP_K, top_k_distance=DISTANCE, n_global=N_GLOBAL, n_local=N_LOCAL)
        subset = ops.lambda_attention_chunk(q, k, v, paged.k, paged.v, paged.positions, paged.n_seen,
                                            INV_FREQ, **store.gather(slots), **options)
        torch.testing.assert_close(subset, _attend(exact, q, k, v), atol=1e-6, rtol=1e-6)
        paged.append(k, v)


def test_summary_bound_is_an_upper_bound_and_selection_keeps_visible_blocks():
    paged = _ring(block_size=6, top_k_blocks=10_000)
    for q, k, v in _chunks([75]):
        _attend(paged, q, k, v)
    store = paged.middle
    q = next(_chunks([2], seed=3))[0]
    n = store.n_blocks
    placed = _rotate(q.reshape(BATCH, HEADS_KV, HEADS_Q // HEADS_KV, 2, DIM), torch.full((2,), DISTANCE), INV_FREQ)
    bound = placed.clamp(min=0) @ store.kmax[:, :, None, :n].transpose(-1, -2) \
        + placed.clamp(max=0) @ store.kmin[:, :, None, :n].transpose(-1, -2)
    keys = store.k[:, :, :n]  # [b, kv, blocks, block, dim]
    filled = torch.arange(6)[None, :] < torch.tensor([6] * (n - 1) + [store.fill])[:, None]
    actual = torch.einsum("bhgrd,bhnsd->bhgrns", placed, keys).masked_fill(~filled, float("-inf")).amax(-1)
    assert (bound >= actual - 1e-5).all()
    # With room for every block, selection keeps exactly those that start outside the window.
    slots = store.select_blocks(q, paged.n_seen, INV_FREQ, top_k_distance=DISTANCE, n_local=N_LOCAL)
    last_row = paged.n_seen + 1
    expected = (store.block_start[:n] <= last_row - N_LOCAL).nonzero().flatten()
    assert slots.tolist() == expected.tolist()


def test_max_middle_tokens_drops_the_oldest_whole_blocks():
    block_size, bound = 5, 23  # rounds up to 5 blocks = 25 tokens
    paged = _ring(block_size=block_size, top_k_blocks=10_000, max_middle_tokens=bound)
    history_k, history_v = [], []
    for q, k, v in _chunks([13, 9, 1, 1, 30, 1, 2]):
        store = paged.middle
        # Reference: the exact store holding the same tokens, the newest whole blocks.
        reference = MiddleStore(BATCH, HEADS_KV, DIM, n_global=N_GLOBAL, dtype=torch.float32, device="cpu")
        if history_k:
            oldest = int(store.block_start[: store.n_blocks].min())
            reference.append(torch.cat(history_k, 2)[:, :, oldest:], torch.cat(history_v, 2)[:, :, oldest:], oldest)
        expected = ops.lambda_attention_chunk(
            q, k, v, paged.k, paged.v, paged.positions, paged.n_seen, INV_FREQ, n_global=N_GLOBAL,
            n_local=N_LOCAL, top_k=TOP_K, top_k_distance=DISTANCE, **reference.views())
        torch.testing.assert_close(_attend(paged, q, k, v), expected, atol=0, rtol=0)
        history_k.append(k)
        history_v.append(v)
        assert store.length <= 5 * block_size and store.capacity <= 5
    tokens = paged.n_seen - N_GLOBAL
    assert store.dropped_blocks == math.ceil(tokens / block_size) - 5
    assert store.length == tokens - store.dropped_blocks * block_size
    held = torch.sort(store.block_start[: store.n_blocks]).values
    assert held.tolist() == list(range(paged.n_seen - store.length, paged.n_seen, block_size))


def test_offload_keeps_blocks_on_the_host_and_device_bytes_flat():
    paged = _ring(block_size=8, top_k_blocks=3, max_middle_tokens=64, offload=True)
    device_bytes = []
    for q, k, v in _chunks([40] + [24] * 8):
        _attend(paged, q, k, v)
        device_bytes.append(paged.middle.device_nbytes())
    store = paged.middle
    assert store.offload and store.block_device.type == "cpu" and store.k.device.type == "cpu"
    assert store.kmin.device == paged.k.device and store.block_start.device == paged.k.device
    assert store.device_nbytes() == sum(t.numel() * t.element_size()
                                        for t in (store.kmin, store.kmax, store.positions))
    assert store.host_nbytes() == 2 * store.k.numel() * store.k.element_size()
    assert len(set(device_bytes[1:])) == 1  # flat once the bound is reached (8 blocks)


def test_offloaded_store_gives_the_in_memory_result():
    on_device, offloaded = _ring(block_size=8, top_k_blocks=2), _ring(block_size=8, top_k_blocks=2, offload=True)
    for q, k, v in _chunks([50, 1, 7, 1]):
        torch.testing.assert_close(_attend(offloaded, q, k, v), _attend(on_device, q, k, v), atol=0, rtol=0)


def test_reorder_follows_the_beam():
    ring, chunks = _ring(block_size=4, top_k_blocks=3), list(_chunks([41, 1]))
    reference = _ring(block_size=4, top_k_blocks=3)
    beam = torch.tensor([1, 1])
    for q, k, v in chunks[:1]:
        _attend(ring, q, k, v)
        _attend(reference, q[beam], k[beam], v[beam])
    ring.middle.reorder(beam)
    for name in ("k", "v"):
        getattr(ring, name).copy_(getattr(ring, name)[beam])
    q, k, v = chunks[1]
    torch.testing.assert_close(_attend(ring, q, k, v), _attend(reference, q, k, v), atol=0, rtol=0)


@pytest.mark.parametrize("option,value", [("block_size", 0), ("top_k_blocks", 0), ("max_middle_tokens", 3)])
def test_bad_options_are_rejected(option, value):
    options = dict(block_size=4, top_k_blocks=2)
    options[option] = value
    with pytest.raises(ValueError, match=option):
        PagedMiddleStore(1, 1, 4, n_global=0, dtype=torch.float32, device="cpu", **options)


def test_a_copied_store_is_independent():
    paged = _ring(block_size=4, top_k_blocks=2)
    chunks = list(_chunks([30, 1, 1]))
    _attend(paged, *chunks[0])
    twin = copy.deepcopy(paged)
    assert twin.middle._gathered is None
    for q, k, v in chunks[1:]:
        torch.testing.assert_close(_attend(twin, q, k, v), _attend(paged, q, k, v), atol=0, rtol=0)
    assert twin.middle.k.data_ptr() != paged.middle.k.data_ptr()
