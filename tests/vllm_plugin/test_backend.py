"""The LM-Infinite attention backend alone (no engine) against the float64 reference of
docs/design.md section 1: a batch of requests with prefill chunks and decode rows mixed, GQA, a paged
cache whose freed and unattended slots hold NaN (so a read of one shows), and the new tokens'
keys and values written to their slots."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from lm_infinite.reference import lambda_attention_reference  # noqa: E402
from lm_infinite.vllm.backend import LambdaAttentionImpl, LambdaMetadataBuilder, live_positions  # noqa: E402
from lm_infinite.vllm.kv_cache import LambdaSpec, max_blocks_per_request  # noqa: E402


def _inv_freq(rotary_dim: int) -> torch.Tensor:
    return 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def _setup(requests, *, heads_q, heads_kv, head_dim, block_size, n_global, n_local, distance_cap,
           rotary_dim=None, seed=0):
    """requests: (context, new tokens) pairs. Returns everything a forward and its check need."""
    g = torch.Generator().manual_seed(seed)
    rotary_dim = rotary_dim or head_dim
    inv_freq = _inv_freq(rotary_dim)
    n_blocks_max = max(-(-(c + n) // block_size) for c, n in requests)
    num_blocks = 2 + len(requests) * n_blocks_max
    # Physical layout LBNHC: [blocks, tokens, heads, 2 * head_dim]; the logical view is
    # [blocks, heads, tokens, 2 * head_dim]. Every slot starts as NaN: only what is written
    # below is a number.
    physical = torch.full((num_blocks, block_size, heads_kv, 2 * head_dim), float("nan"))
    kv_cache = physical.permute(0, 2, 1, 3)
    poison_block = 1  # what a freed block's id points to: another request's data, here NaN
    free = list(range(2, num_blocks))
    free = [free[i] for i in torch.randperm(len(free), generator=g).tolist()]
    block_table = torch.zeros(len(requests), n_blocks_max, dtype=torch.int32)
    full = []  # per request: q (new rows), k, v (all positions), float32
    query, key, value, slot_mapping, query_start = [], [], [], [], [0]
    for r, (c, n) in enumerate(requests):
        q = torch.randn(n, heads_q, head_dim, generator=g)
        k = torch.randn(c + n, heads_kv, head_dim, generator=g)
        v = torch.randn(c + n, heads_kv, head_dim, generator=g)
        full.append((q, k, v))
        heads, count = (int(x) for x in live_positions(torch.tensor([c]), n_global, n_local))
        live = set(range(heads)) | set(range(c - (count - heads), c))
        for b in range(-(-(c + n) // block_size)):
            positions = range(b * block_size, min((b + 1) * block_size, c + n))
            keep = any(p in live or p >= c for p in positions) or b < -(-n_global // block_size)
            block_table[r, b] = free.pop() if keep else poison_block
            for p in positions:
                if p in live:  # only what the backend may read holds numbers
                    physical[block_table[r, b], p % block_size] = torch.cat([k[p], v[p]], -1)
        for p in range(c, c + n):
            slot_mapping.append(int(block_table[r, p // block_size]) * block_size + p % block_size)
        query.append(q), key.append(k[c:]), value.append(v[c:])
        query_start.append(query_start[-1] + n)
    spec = LambdaSpec(block_size=block_size, num_kv_heads=heads_kv, head_size=head_dim,
                      dtype=torch.float32, sliding_window=n_local, n_global=n_global)
    common = SimpleNamespace(
        num_reqs=len(requests), num_actual_tokens=query_start[-1],
        query_start_loc_cpu=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in requests], dtype=torch.int32),
        block_table_tensor=block_table, slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64))
    metadata = LambdaMetadataBuilder(spec, [], None, torch.device("cpu")).build(0, common)
    impl = LambdaAttentionImpl(heads_q, head_dim, head_dim**-0.5, heads_kv, None, None, "auto",
                               n_global=n_global, n_local=n_local, distance_cap=distance_cap)
    impl.set_rotary(inv_freq)
    return SimpleNamespace(impl=impl, metadata=metadata, kv_cache=kv_cache, physical=physical,
                           query=torch.cat(query), key=torch.cat(key), value=torch.cat(value),
                           full=full, inv_freq=inv_freq, slot_mapping=common.slot_mapping,
                           query_start=query_start)


@pytest.mark.parametrize("case", [
    dict(heads_q=6, heads_kv=2, head_dim=32, block_size=4, n_global=3, n_local=10, distance_cap=7,
         requests=[(0, 7), (25, 1), (13, 5), (40, 1), (9, 1), (31, 12), (0, 1), (3, 19)]),
    dict(heads_q=4, heads_kv=4, head_dim=64, block_size=16, n_global=0, n_local=19, distance_cap=19,
         requests=[(70, 1), (1, 1), (50, 33), (0, 40)]),
    dict(heads_q=9, heads_kv=3, head_dim=64, block_size=32, n_global=10, n_local=37, distance_cap=37,
         rotary_dim=32, requests=[(300, 1), (129, 64), (36, 1), (37, 1), (38, 2)]),
], ids=["gqa-cap-mixed", "mha-no-globals", "smollm-shape-partial-rotary"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_backend_matches_reference(case, device):
    case = dict(case)
    requests = case.pop("requests")
    s = _setup(requests, **case)
    if device != "cpu":  # the same batch on the GPU: the project's CUDA kernels under the backend
        s.physical = s.physical.to(device)
        s.kv_cache = s.physical.permute(0, 2, 1, 3)
        s.query, s.key, s.value = (t.to(device) for t in (s.query, s.key, s.value))
        for group in s.metadata.groups:
            for name in ("slots", "positions", "starts"):
                setattr(group, name, getattr(group, name).to(device))
            if not isinstance(group.rows, tuple):
                group.rows = group.rows.to(device)
        s.metadata.slot_mapping = s.metadata.slot_mapping.to(device)
    output = torch.full_like(s.query, float("nan"))
    s.impl.forward(None, s.query, s.key, s.value, s.kv_cache, s.metadata, output)
    output, s.physical = output.cpu(), s.physical.cpu()
    s.key, s.value = s.key.cpu(), s.value.cpu()
    for r, (c, n) in enumerate(requests):
        q, k, v = (t.double() for t in s.full[r])
        ref = lambda_attention_reference(
            q.permute(1, 0, 2)[None], k.permute(1, 0, 2)[None], v.permute(1, 0, 2)[None],
            s.inv_freq, n_global=case["n_global"], n_local=case["n_local"],
            distance_cap=case["distance_cap"], query_positions=torch.arange(c, c + n))
        got = output[s.query_start[r]: s.query_start[r + 1]].double().permute(1, 0, 2)[None]
        assert torch.isfinite(got).all(), f"request {r} read a slot it must not (NaN)"
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"request {r} (context {c}, {n} new)")
    # The new tokens' keys and values landed in their slots.
    slots = s.physical.view(-1, *s.physical.shape[2:])
    written = slots[s.slot_mapping]
    torch.testing.assert_close(written, torch.cat([s.key, s.value], -1))


def test_live_positions_are_what_the_lambda_mask_reads():
    """The slots gathered for a request are exactly the cached keys its first new query sees
    (later queries of the chunk see a subset of them plus the chunk's own keys)."""
    G, L = 4, 9
    for c in range(0, 40):
        heads, count = (int(x) for x in live_positions(torch.tensor([c]), G, L))
        gathered = set(range(heads)) | set(range(c - (count - heads), c))
        seen = {j for j in range(c) if c - j < L or j < G}
        assert gathered == seen, c


def test_block_bound():
    # ceil(G / bs) head blocks + a window of L - 1 tokens and the new one, which may straddle.
    assert max_blocks_per_request(10, 128, 32) == 1 + 4 + 1
    assert max_blocks_per_request(4, 100, 16) == 1 + 7 + 1
