"""One batch of the ops' fuzz test (tests/test_fuzz_ops.py runs it in a subprocess, so that a
crash fails the test instead of killing the suite).

    python fuzz_ops_child.py SEED N_EXAMPLES

Each example draws an op and its arguments from the whole argument space: valid, edge and
hostile values (negative, 0, 2^62, 2^63 - 1 sizes and positions; NaN and Inf in tensors and
the scale; aliased and expanded caches; wrong ranks, dtypes and Python types; ragged batches:
padding, per-sequence starts and slot positions, in range or not). An example
passes when the op either returns what the float64 reference computes (NaN rows included) or
raises RuntimeError/ValueError/TypeError/MemoryError naming the op. Before each call the
example is written to stderr, so a crash shows the input that caused it. Prints
`fuzz: N examples, M refused` at the end.
"""

from __future__ import annotations

import sys

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import lm_infinite as li

BIG = [2**62 - 1, 2**62, 2**62 + 1, 2**63 - 1]
HOSTILE_SIZES = [-1, -(2**63)] + BIG


def rarely(draw, usual, hostile, one_in=16):
    """Mostly a usual value; one time in `one_in` a hostile one, so that most examples reach
    the kernels (and the comparison with the reference) while every field gets attacked."""
    return draw(hostile) if draw(st.integers(1, one_in)) == 1 else draw(usual)


def rarely_position():
    return st.one_of(st.integers(-1, 40), st.integers(-1, 40), st.integers(-1, 40), st.sampled_from(BIG))


def size(draw, low):
    return rarely(draw, st.integers(low, 12), st.sampled_from(HOSTILE_SIZES))


def position(draw):
    return rarely(draw, st.integers(0, 40), st.sampled_from([-3, -1, 2**62 - 3] + BIG))


ERRORS = (RuntimeError, ValueError, TypeError, MemoryError)
counts = {"examples": 0, "refused": 0}


def tensor(draw, shape, dtype=torch.float32, poison=True):
    t = torch.randn(shape).to(dtype)
    if poison and t.numel() and draw(st.integers(0, 9)) == 0:  # one in ten: a NaN or an Inf
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    return t


def padding_of(draw, batch, seq):
    """None (half the time) or leading padding rows per sequence: mostly in [0, seq], rarely
    out of range or of the wrong shape or dtype."""
    if draw(st.booleans()):
        return None
    values = [draw(st.integers(0, seq)) for _ in range(batch)]
    hostile = draw(st.integers(1, 12))
    if hostile == 1 and batch:
        values[draw(st.integers(0, batch - 1))] = draw(st.sampled_from([-1, seq + 1, 2**62, 2**63 - 1]))
    padding = torch.tensor(values, dtype=torch.int64).reshape(batch)
    if hostile == 2:
        padding = torch.cat([padding, torch.zeros(1, dtype=torch.int64)])
    elif hostile == 3:
        padding = padding.int()
    return padding


def per_sequence_starts(draw, batch, start):
    """query_start / start_position as one shared value (an int or [1]) or [batch] values."""
    if draw(st.integers(0, 2)) == 0:
        return [start] + [position(draw) for _ in range(max(batch - 1, 0))] if batch else []
    return start


@st.composite
def attention_case(draw):
    batch, seq, head_dim = draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.sampled_from([1, 2, 8, 16]))
    heads_kv = draw(st.integers(1, 2))
    heads_q = heads_kv * draw(st.integers(1, 3)) + rarely(draw, st.just(0), st.just(1))
    dtype = rarely(draw, st.sampled_from([torch.float32] * 3 + [torch.bfloat16]), st.just(torch.float64))
    half = draw(st.integers(0, head_dim // 2 + rarely(draw, st.just(0), st.just(1))))
    case = dict(
        q=tensor(draw, (batch, heads_q, seq, head_dim), dtype),
        k=tensor(draw, (batch, heads_kv, seq, head_dim + rarely(draw, st.just(0), st.just(1))), dtype),
        v=tensor(draw, (batch, heads_kv, seq, head_dim), dtype),
        inv_freq=tensor(draw, (half,), poison=draw(st.booleans())).abs(),
        n_global=size(draw, 0), n_local=size(draw, 1),
        distance_cap=None if draw(st.booleans()) else size(draw, 0),
        scale=rarely(draw, st.one_of(st.none(), st.floats(-2, 2)),
                     st.sampled_from([float("nan"), float("inf"), 1e300]), one_in=12))
    case["padding"] = padding_of(draw, batch, seq)
    if draw(st.integers(0, 19)) == 0:  # a Python type the op does not take
        name = draw(st.sampled_from(["n_local", "n_global", "scale", "q"]))
        case[name] = draw(st.sampled_from([True, 2.0, "3", case["q"].numpy() if dtype != torch.bfloat16 else None]))
    return case


@st.composite
def chunk_case(draw):
    case = draw(attention_case())
    q = case["q"]
    slots = draw(st.integers(0, 10))
    shape = (q.shape[0], case["k"].shape[1], slots, q.shape[3]) if isinstance(q, torch.Tensor) else (1, 1, slots, 1)
    dtype = q.dtype if isinstance(q, torch.Tensor) else torch.float32
    # Slot positions shared by the batch ([slots]) or one row per sequence ([batch, slots]).
    rows = shape[0] if draw(st.booleans()) else None
    count = slots * (1 if rows is None else rows)
    positions = draw(st.lists(rarely_position(), min_size=count, max_size=count))
    case.update(cache_k=tensor(draw, shape, dtype), cache_v=tensor(draw, shape, dtype),
                cache_positions=torch.tensor(positions, dtype=torch.int64).reshape(
                    (slots,) if rows is None else (rows, slots)),
                query_start=position(draw))
    starts = per_sequence_starts(draw, shape[0], case["query_start"])
    if isinstance(starts, list):
        case["query_start"] = torch.tensor([min(s, 2**63 - 1) for s in starts], dtype=torch.int64)
    elif draw(st.booleans()):
        case["query_start"] = torch.tensor([case["query_start"]]) if case["query_start"] < 2**63 else 0
    if draw(st.booleans()):  # top-k middle attention
        middle = draw(st.integers(0, 12))
        middle_positions = torch.arange(middle) + draw(st.integers(-2, 5))
        if draw(st.booleans()):  # one row per sequence
            middle_positions = middle_positions + torch.randint(0, 30, (shape[0], 1))
        case.update(middle_k=tensor(draw, shape[:2] + (middle,) + shape[3:], dtype),
                    middle_v=tensor(draw, shape[:2] + (middle,) + shape[3:], dtype),
                    middle_positions=middle_positions,
                    top_k=rarely(draw, st.integers(0, 6), st.sampled_from(BIG + [-1])),
                    top_k_distance=None if draw(st.booleans()) else size(draw, 0),
                    top_k_first_row=rarely(draw, st.integers(0, 9), st.sampled_from([-1, 2**63 - 1])))
    return case


@st.composite
def append_case(draw):
    batch, heads, head_dim = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 4]))
    n_global, n_local = size(draw, 0), size(draw, 1)
    n_global, n_local = min(n_global, 12) if n_global >= 0 else n_global, min(n_local, 12) if n_local >= 0 else n_local
    if draw(st.integers(1, 4)) == 1:  # an overflow of the sum, which the glue computes
        n_global, n_local = draw(st.sampled_from([(2**62, 2**62), (2**63 - 1, 1), (1, 2**63 - 1)]))
    slots = n_global + n_local if 0 <= n_global + n_local <= 24 else 6
    slots = rarely(draw, st.just(slots), st.integers(0, 10))
    cache_k = torch.zeros(batch, heads, slots, head_dim)
    aliasing = draw(st.sampled_from(["none"] * 6 + ["same", "expanded", "k_view"]))
    cache_v = cache_k if aliasing == "same" else torch.zeros_like(cache_k)
    if aliasing == "expanded" and slots:
        cache_k = torch.zeros(batch, heads, 1, head_dim).expand(batch, heads, slots, head_dim)
    n_new = draw(st.integers(0, 12))
    k = tensor(draw, (batch, heads, n_new, head_dim))
    if aliasing == "k_view" and slots:
        k = cache_k[:, :, : min(n_new, slots)]
    start = position(draw)
    start = per_sequence_starts(draw, batch, start)
    if isinstance(start, list):
        start = torch.tensor([min(s, 2**63 - 1) for s in start], dtype=torch.int64)
    elif start < 2**63 and draw(st.booleans()):
        start = torch.tensor([start])
    per_sequence = draw(st.booleans())
    positions = torch.full((batch, slots) if per_sequence else (slots,), -1)
    return dict(cache_k=cache_k, cache_v=cache_v, cache_positions=positions,
                k=k, v=k.clone(), start_position=start, n_global=n_global, n_local=n_local,
                padding=padding_of(draw, batch, n_new))


def describe(case) -> str:
    def short(x):
        return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else repr(x)[:40]
    return ", ".join(f"{k}={short(v)}" for k, v in case.items())


def reference_of(op, case):
    """The float64 reference for a call that succeeded, or None where it has no counterpart."""
    c = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v)
         for k, v in case.items()}
    options = dict(n_global=c["n_global"], n_local=c["n_local"], distance_cap=c["distance_cap"], scale=c["scale"])
    batch, n = c["q"].shape[0], c["q"].shape[2]
    if op == "lambda_attention":
        rows = row_positions(0, c["padding"], batch, n)
        return li.lambda_attention_reference(c["q"], c["k"], c["v"], c["inv_freq"], query_positions=rows,
                                             key_positions=rows, **options)
    rows = row_positions(c["query_start"], c.get("padding"), batch, n)
    top_k = c.get("top_k", 0)
    if top_k:
        options.update(middle_k=c["middle_k"], middle_v=c["middle_v"], middle_positions=c["middle_positions"],
                       top_k=top_k, top_k_first_row=c["top_k_first_row"],
                       top_k_distance=c["n_local"] // 2 if c["top_k_distance"] is None else c["top_k_distance"])
    return li.lambda_attention_reference(
        c["q"], torch.cat([c["cache_k"], c["k"]], 2), torch.cat([c["cache_v"], c["v"]], 2), c["inv_freq"],
        query_positions=rows, key_positions=torch.cat([c["cache_positions"].expand(batch, -1), rows], 1),
        **options)


def row_positions(start, padding, batch, n):
    """[batch, n] positions of a chunk's rows (the reference's convention): start_b + t -
    padding_b for real rows, -1 for padding rows."""
    starts = torch.as_tensor(start, dtype=torch.int64).reshape(-1).expand(batch)
    pad = torch.zeros(batch, dtype=torch.int64) if padding is None else padding
    t = torch.arange(n)[None, :]
    return torch.where(t >= pad[:, None], starts[:, None] + t - pad[:, None], -1)


def run(op, case):
    if op == "lambda_attention_chunk" and "top_k" in case:
        op = "lambda_attention_chunk_top_k"  # the chunk with a middle store
    print(f"example {counts['examples']}: {op}({describe(case)})", file=sys.stderr, flush=True)
    counts["examples"] += 1
    try:
        out = getattr(li, op)(**case)
    except ERRORS as error:
        counts["refused"] += 1
        assert op in str(error) or "must" in str(error), f"an error that names nothing: {error!r}"
        return
    if op == "ring_cache_append" or case["q"].dtype != torch.float32:
        return
    expected = reference_of(op, case)
    assert out.shape == case["q"].shape
    if op != "lambda_attention" and case["cache_positions"].numel() and out.shape[0]:
        starts = torch.as_tensor(case["query_start"]).reshape(-1, 1)
        if (case["cache_positions"] >= starts).any():
            return  # a cache slot from the future breaks the op's contract; only no-crash is asserted
    torch.testing.assert_close(out.double(), expected, rtol=2e-4, atol=2e-4, equal_nan=True)


def main(seed_value: int, n_examples: int) -> None:
    @seed(seed_value)
    @settings(max_examples=n_examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(st.data())
    def fuzz(data):
        op = data.draw(st.sampled_from(["lambda_attention", "lambda_attention_chunk", "ring_cache_append"]))
        case = data.draw({"lambda_attention": attention_case(), "lambda_attention_chunk": chunk_case(),
                          "ring_cache_append": append_case()}[op])
        run(op, case)

    fuzz()
    print(f"fuzz: {counts['examples']} examples, {counts['refused']} refused")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), int(sys.argv[2]))
