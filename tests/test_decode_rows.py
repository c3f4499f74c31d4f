"""decode_rows: the decode steps of independent streams as one forward (the server's continuous
batching): each row reads its own ring, and gives what its stream's own step gives."""

import torch

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build
from lm_infinite.streaming import LambdaStream, decode_rows


def _streams(model, lengths):
    streams = []
    for length in lengths:
        stream = LambdaStream(model, chunk_size=7)
        stream.feed(torch.randint(0, VOCAB, (1, length)))
        streams.append(stream)
    return streams


def test_one_row_is_bit_identical_to_the_streams_own_decode_step():
    model = lminf_hf.enable(build("llama"), n_global=2, n_local=16)
    alone, batched = _streams(model, [50]), None
    batched = [alone[0].fork()]
    expected = list(alone[0].generate(12))
    token, got = int(batched[0].next_logits.argmax()), []
    for _ in range(12):
        got.append(token)
        decode_rows(batched, [token])
        token = int(batched[0].next_logits.argmax())
    assert got == expected
    assert torch.equal(batched[0].next_logits, alone[0].next_logits)
    ring, other = batched[0].cache.layers[1].ring, alone[0].cache.layers[1].ring
    assert torch.equal(ring.k, other.k) and torch.equal(ring.positions, other.positions)
    assert ring.n_seen == other.n_seen


def test_rows_of_different_streams_each_continue_their_own():
    model = lminf_hf.enable(build("llama"), n_global=2, n_local=16)
    lengths = [5, 40, 73, 17, 30, 9, 22, 61, 12, 48]  # more rows than the CPU decode kernel takes (MAX_ROWS)
    alone, batched = _streams(model, lengths), None
    batched = [stream.fork() for stream in alone]
    expected = [list(stream.generate(10)) for stream in alone]
    tokens = [int(stream.next_logits.argmax()) for stream in batched]
    got = [[] for _ in lengths]
    for _ in range(10):
        for row, token in zip(got, tokens):
            row.append(token)
        logits = decode_rows(batched, tokens)
        tokens = logits.argmax(dim=-1).tolist()
    assert got == expected
    for stream, reference in zip(batched, alone):
        torch.testing.assert_close(stream.next_logits, reference.next_logits, rtol=1e-5, atol=1e-5)
        assert stream.position == reference.position
