"""Fuzz LambdaStream's public calls (feed, nll, generate) with valid, edge and hostile
arguments, in random sequences. After every call the stream must either have taken it, and then
agree with a fresh stream fed its whole history at once (the independent reference: chunking
and decode steps must not change the logits), or have refused it with a TypeError/ValueError
and be exactly as before. LMINF_FUZZ_EXAMPLES scales the number of sequences."""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lm_infinite as li
from hf_tiny_models import VOCAB, build
from lm_infinite.streaming import LambdaStream

EXAMPLES = int(os.environ.get("LMINF_FUZZ_EXAMPLES", "200")) // 2
HUGE = [2**31, 2**63 - 1, -(2**63), 2**64, 10**30]

_ID = st.one_of(st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1), st.integers(0, VOCAB - 1),
                st.integers(-3, -1), st.integers(VOCAB, VOCAB + 2), st.sampled_from(HUGE))
_FLOATISH = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1.5, 2.0, -0.0]))
_VALID_TOKENS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
_TOKENS = st.one_of(
    _VALID_TOKENS, _VALID_TOKENS, _VALID_TOKENS,
    st.lists(_ID, min_size=1, max_size=12),
    st.lists(st.one_of(_ID, _FLOATISH, st.booleans(), st.text(max_size=2), st.lists(_ID, max_size=2)), max_size=4),
)
_FEED = st.one_of(
    _TOKENS.map(lambda ids: ("list1", ids)),  # one sequence, as a [tokens] tensor when it can be
    st.tuples(_TOKENS, _TOKENS).map(lambda pair: ("ragged", list(pair))),
    st.sampled_from(["int32", "float32", "bool", "0-d", "3-d", "empty", "string", "none"]).map(lambda k: (k, None)),
)
_NUMBER = st.one_of(st.floats(0, 3), st.sampled_from([0.0, 1e-45, 1e-300, 1e300, -1.0, float("nan"), float("inf")]),
                    st.integers(-2, 3), st.booleans(), st.none(), st.text(max_size=2))
_STOP = st.one_of(st.just(()), st.lists(_ID, max_size=3), st.none(), st.integers(0, 5), st.lists(_FLOATISH, max_size=2),
                  st.text(max_size=2))
_GENERATE = st.fixed_dictionaries({"n": st.one_of(st.integers(0, 4), st.integers(0, 4), _NUMBER),
                                   "temperature": st.one_of(st.floats(0, 3), st.floats(0, 3), _NUMBER),
                                   "top_p": st.one_of(st.floats(0.01, 1), st.floats(0.01, 1), _NUMBER),
                                   "stop": st.one_of(_STOP, st.lists(st.integers(0, VOCAB - 1), max_size=3))})
_CALL = st.one_of(_FEED.map(lambda f: ("feed",) + f), _FEED.map(lambda f: ("nll",) + f),
                  _GENERATE.map(lambda g: ("generate", g)), _GENERATE.map(lambda g: ("generate", g)))


def _tensor(kind: str, ids):
    if kind == "list1":
        try:
            return torch.tensor(ids)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            return ids  # not a tensor: passed as it is (a list of one "sequence" of odd items)
    if kind == "ragged":
        return ids
    return {"int32": torch.tensor([[5, 6, 7]], dtype=torch.int32), "float32": torch.tensor([[5.0, 6.0]]),
            "bool": torch.tensor([[True, False]]), "0-d": torch.tensor(5), "3-d": torch.ones(1, 1, 2, dtype=torch.int64),
            "empty": torch.zeros(1, 0, dtype=torch.int64), "string": "hello", "none": None}[kind]


@pytest.fixture(scope="module")
def model():
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    return model


def _rows_fed(kind, value, batch) -> list[list[int]] | None:
    """The token ids each sequence gets from a feed that the stream accepted."""
    if isinstance(value, torch.Tensor):
        value = value.reshape(batch, -1).tolist()
    elif kind == "list1" and value and not isinstance(value[0], list):
        value = [value]
    return [[int(t) for t in row] for row in value]


def test_fuzz_streams_take_or_refuse_every_call_and_agree_with_a_fresh_stream(model):
    counts = {"calls": 0, "refused": 0, "checked": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(calls=st.lists(_CALL, min_size=1, max_size=5))
    def run(calls):
        stream = LambdaStream(model, chunk_size=3)
        history: list[list[int]] | None = None  # per sequence, every token the stream holds
        for call in calls:
            before = (stream.position, None if stream.next_logits is None else stream.next_logits.clone())
            counts["calls"] += 1
            try:
                if call[0] == "generate":
                    g = call[1]
                    produced = list(stream.generate(g["n"], temperature=g["temperature"], top_p=g["top_p"],
                                                    stop_token_ids=g["stop"], generator=torch.Generator().manual_seed(0)))
                    if len(history) == 1:
                        history[0] += produced
                    else:
                        for step in produced:
                            for row, token in zip(history, step):
                                if token is not None:
                                    row.append(token)
                else:
                    value = _tensor(call[1], call[2])
                    method = stream.feed if call[0] == "feed" else stream.nll
                    out = method(value)
                    batch = stream.next_logits.shape[0]
                    rows = _rows_fed(call[1], value, batch)
                    history = rows if history is None else [h + r for h, r in zip(history, rows)]
                    if call[0] == "nll":
                        for row, nll in zip(rows, out if isinstance(out, list) else list(out)):
                            assert nll.shape[-1] == len(row)
                            assert all(math.isfinite(x) or math.isnan(x) for x in nll.tolist())
            except (TypeError, ValueError) as error:
                counts["refused"] += 1
                assert str(error)
                assert stream.position == before[0], f"refused {call!r} but the stream moved"
                if before[1] is not None:
                    assert torch.equal(stream.next_logits, before[1])
                continue
            counts["checked"] += 1
            fresh = LambdaStream(model, chunk_size=64)
            expected = fresh.feed([torch.tensor(row) for row in history] if len(history) > 1 else torch.tensor(history))
            torch.testing.assert_close(stream.next_logits, expected, rtol=1e-4, atol=1e-4)

    run()
    assert counts["checked"] > 0 and counts["refused"] > 0
    print(f"stream fuzz: {counts['calls']} calls, {counts['refused']} refused, {counts['checked']} checked")
