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
from lm_infinite.reference import apply_rotary

BATCH, HEADS_Q, HEADS_KV, DIM = 2, 6, 2, 16
N_GLOBAL, N_LOCAL, TOP_K, DISTANCE = 3, 16, 4, 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


def _chunks(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n in lengths:
        yield (torch.randn(BATCH, HEADS_Q, n, DIM, generator=g),
               torch.randn(BATCH, HEADS_KV, n, DIM, generator=g),
               torch.randn(BATCH, HEADS_KV, n, DIM, generator=g))


def _ring(dtype=torch.float32, **paged):
    """A ring with the exact middle store, or with the paged one given its options."""
    return RingKVCache(BATCH, HEADS_KV, DIM, n_global=N_GLOBAL, n_local=N_LOCAL, keep_middle=True,
                       dtype=dtype, middle_options=dict(kind="paged", **paged) if paged else None)


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
    placed = apply_rotary(q.reshape(BATCH, HEADS_KV, group, rows, DIM),
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
        subset = ops.lambda_attention_chunk_top_k(q, k, v, paged.k, paged.v, paged.positions, paged.n_seen,
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
    placed = apply_rotary(q.reshape(BATCH, HEADS_KV, HEADS_Q // HEADS_KV, 2, DIM), torch.full((2,), DISTANCE), INV_FREQ)
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
        expected = ops.lambda_attention_chunk_top_k(
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
                                        for t in (store.kmin, store.kmax, store.positions, store.first_position))
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


def _op_with(ring, q, k, v, middle):
    return ops.lambda_attention_chunk_top_k(q, k, v, ring.k, ring.v, ring.positions, ring.n_seen,
                                            INV_FREQ, top_k=TOP_K, top_k_distance=DISTANCE,
                                            n_global=N_GLOBAL, n_local=N_LOCAL, **middle)


@pytest.mark.parametrize("top_k_blocks", [1, 2, 3, 40])
@pytest.mark.parametrize("rows", [1, 5])
def test_candidates_hand_the_op_exactly_the_union_of_chosen_blocks(top_k_blocks, rows):
    """candidates() gathers a fixed number of slots (all blocks when the heads' choices could
    cover them, else one per choice) and hides the rest by position; the op's result must be
    the one for the compact union that select_blocks names. top_k_blocks 1 and 2 take the
    one-slot-per-choice path (2 x 6 x t < 25 blocks), 3 and 40 the every-block path."""
    paged = _ring(block_size=4, top_k_blocks=top_k_blocks)
    for q, k, v in _chunks([100]):
        _attend(paged, q, k, v)
    store = paged.middle
    assert store.n_blocks == 25 and store.fill == 1  # the newest block's tail is empty
    lengths = set()
    for seed in range(4):
        q, k, v = next(_chunks([rows], seed=10 + seed))
        call = dict(top_k_distance=DISTANCE, n_local=N_LOCAL)
        slots = store.select_blocks(q, paged.n_seen, INV_FREQ, **call)
        union = _op_with(paged, q, k, v, store.gather(slots))
        handed = store.candidates(q, paged.n_seen, INV_FREQ, **call)
        lengths.add(handed["middle_positions"].shape[-1])  # [batch, slots]: one row per sequence
        for row in handed["middle_positions"]:
            held = row[row >= 0]
            assert sorted(held.tolist()) == sorted(set(held.tolist()))  # no key handed twice
        torch.testing.assert_close(_op_with(paged, q, k, v, handed), union, atol=0, rtol=0)
    # The middle's length follows from the sizes alone, not from which blocks were chosen.
    slots_handed = min(store.n_blocks, BATCH * HEADS_Q * min(top_k_blocks, store.n_blocks))
    assert lengths == {slots_handed * 4}


def test_bound_and_gather_buffers_are_reused_while_the_store_grows_within_its_capacity():
    """Decode steps allocate nothing in proportion to the store: the bounds buffer is sized for
    the capacity (not for the blocks held, which grow by one every block_size tokens) and the
    gather buffer for the fixed number of slots."""
    paged = _ring(block_size=4, top_k_blocks=2)
    for q, k, v in _chunks([70]):
        _attend(paged, q, k, v)
    store = paged.middle
    capacity, pointers, blocks = store.capacity, set(), set()
    for q, k, v in _chunks([1] * 20, seed=20):
        _attend(paged, q, k, v)
        pointers.add((store._bounds.data_ptr(), store._gathered.data_ptr()))
        blocks.add(store.n_blocks)
    assert store.capacity == capacity and len(blocks) > 1  # new blocks, no doubling
    assert len(pointers) == 1


def test_low_precision_blocks_keep_float32_summaries_that_bound_every_key():
    """bf16 keys: the summaries are float32 (exact min/max of the bf16 values), the bound still
    holds for every key, and with every block fetched the result is the exact store's."""
    exact, paged = _ring(torch.bfloat16), _ring(torch.bfloat16, block_size=5, top_k_blocks=10_000)
    for q, k, v in _chunks([60, 1, 9]):
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        torch.testing.assert_close(_attend(paged, q, k, v), _attend(exact, q, k, v), atol=0, rtol=0)
    store = paged.middle
    assert store.kmin.dtype == store.kmax.dtype == torch.float32 and store.k.dtype == torch.bfloat16
    n, last = store.n_blocks, store.fill
    keys = store.k[:, :, :n].float()
    filled = torch.arange(5)[None, :] < torch.tensor([5] * (n - 1) + [last])[:, None]  # [n, 5]
    big, small = keys.masked_fill(~filled[..., None], float("-inf")), keys.masked_fill(~filled[..., None], float("inf"))
    torch.testing.assert_close(store.kmax[:, :, :n], big.amax(3), atol=0, rtol=0)
    torch.testing.assert_close(store.kmin[:, :, :n], small.amin(3), atol=0, rtol=0)


@pytest.mark.parametrize("top_k_blocks", [1, 40])
def test_candidates_hide_blocks_no_row_may_read(top_k_blocks):
    """Rows early in the stream see few or no blocks (a block is readable from row i only if
    it starts at or before i - n_local): what candidates() hands over is exactly those of the
    chosen ones, nothing when none is readable."""
    paged = _ring(block_size=4, top_k_blocks=top_k_blocks)
    for q, k, v in _chunks([100]):
        _attend(paged, q, k, v)
    store = paged.middle
    q = next(_chunks([2], seed=30))[0]
    call = dict(top_k_distance=DISTANCE, n_local=N_LOCAL)
    for first in (N_GLOBAL + N_LOCAL - 2, N_GLOBAL + N_LOCAL + 5, N_GLOBAL + N_LOCAL + 40):
        positions = store.candidates(q, first, INV_FREQ, **call)["middle_positions"]
        held = positions[positions >= 0].tolist()
        starts = store.block_start[: store.n_blocks].tolist()
        handed = {s for s in starts if any(0 <= p - s < 4 for p in held)}  # blocks with a key handed
        readable = store.block_start[: store.n_blocks] <= first + 1 - N_LOCAL
        expected = {int(store.block_start[s]) for s in store.select_blocks(q, first, INV_FREQ, **call)}
        assert handed == expected
        assert expected <= set(store.block_start[: store.n_blocks][readable].tolist())
        assert (len(expected) == 0) == (first + 1 - N_LOCAL < N_GLOBAL)
