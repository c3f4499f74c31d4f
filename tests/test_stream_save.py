"""LambdaStream.save / LambdaStream.load: an exact restore, refused for another model or settings."""

import gc
import os
import weakref

import pytest
import torch

import lm_infinite.hf as lminf_hf
from hf_tiny_models import VOCAB, build
from lm_infinite.hf import LambdaSettings, TopK
from lm_infinite.saved_stream import FORMAT_VERSION
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL = 2, 16
TOP_K = TopK(k=3, first_layer=1, distance=5)


def _model(seed=0, **settings):
    return lminf_hf.enable(build("llama", seed), **(dict(n_global=N_GLOBAL, n_local=N_LOCAL) | settings))


@pytest.fixture(scope="module")
def model():
    return _model()


def _rings(stream):
    return [layer.ring for layer in stream.cache.layers]


def _assert_same_state(a: LambdaStream, b: LambdaStream):
    assert torch.equal(a.next_logits, b.next_logits)
    for x, y in zip(_rings(a), _rings(b)):
        for name in ("k", "v", "positions", "next_position"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
        assert (x.n_seen, x.padded) == (y.n_seen, y.padded)
        if x.middle is not None:
            n = x.middle.length
            assert n == y.middle.length
            for name in ("k", "v"):
                assert torch.equal(getattr(x.middle, name)[:, :, :n], getattr(y.middle, name)[:, :, :n])
            assert torch.equal(x.middle.positions[:, :n], y.middle.positions[:, :n])


def _continue(stream, ids, n_tokens):
    """What a stream does next: a feed, a greedy continuation, the logits along the way."""
    logits = [stream.feed(ids).clone()]
    tokens = list(stream.generate(n_tokens))
    logits.append(stream.next_logits.clone())
    return logits, tokens


def _check_exact_restore(model, tmp_path, first, more, n_tokens=12):
    kept = LambdaStream(model, chunk_size=7)
    kept.feed(first)
    list(kept.generate(5))
    kept.save(tmp_path / "s.lminf")
    loaded = LambdaStream.load(tmp_path / "s.lminf", model)
    assert loaded.chunk_size == 7
    _assert_same_state(kept, loaded)
    a, b = _continue(kept, more, n_tokens), _continue(loaded, more, n_tokens)
    assert a[1] == b[1]
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))  # bit-identical, not close
    _assert_same_state(kept, loaded)


def test_a_loaded_stream_continues_bit_identically(model, tmp_path):
    # 4x the window: the rings have wrapped several times before the save.
    _check_exact_restore(model, tmp_path, torch.randint(0, VOCAB, (1, 4 * N_LOCAL + 3)),
                         torch.randint(0, VOCAB, (1, 9)))


def test_a_ragged_batch_restores_exactly(model, tmp_path):
    first = [torch.randint(0, VOCAB, (n,)) for n in (70, 5, 33)]
    _check_exact_restore(model, tmp_path, first, torch.randint(0, VOCAB, (3, 4)))


def test_top_k_exact_middle_stores_restore_exactly(tmp_path):
    model = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TOP_K))
    _check_exact_restore(model, tmp_path, torch.randint(0, VOCAB, (1, 60)), torch.randint(0, VOCAB, (1, 6)))


def test_paged_middle_stores_are_refused_clearly(tmp_path):
    model = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TopK(
        k=3, first_layer=1, distance=5, store="paged", block_size=4, blocks=2)))
    stream = LambdaStream(model)
    stream.feed(torch.randint(0, VOCAB, (1, 40)))
    with pytest.raises(ValueError, match="paged top-k store"):
        stream.save(tmp_path / "s.lminf")
    assert os.listdir(tmp_path) == []


def _saved(model, path, length=40):
    stream = LambdaStream(model)
    stream.feed(torch.randint(0, VOCAB, (1, length)))
    stream.save(path)
    return stream


def test_loading_into_another_model_or_settings_names_what_differs(model, tmp_path):
    path = tmp_path / "s.lminf"
    _saved(model, path)
    with pytest.raises(ValueError, match="weights_blake2b"):
        LambdaStream.load(path, _model(seed=1))
    with pytest.raises(ValueError, match=r"settings\.n_local: saved 16, this one 32"):
        LambdaStream.load(path, _model(n_local=32))
    with pytest.raises(ValueError, match=r"model\.dtype: saved 'float32', this one 'float64'"):
        LambdaStream.load(path, _model().double())


def test_other_format_versions_and_foreign_files_are_refused(model, tmp_path):
    path = tmp_path / "s.lminf"
    _saved(model, path)
    state = torch.load(path, weights_only=True)  # tensors and plain values only
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, tmp_path / "future.lminf")
    with pytest.raises(ValueError, match="format version"):
        LambdaStream.load(tmp_path / "future.lminf", model)
    torch.save({"code": weakref.ref}, tmp_path / "unsafe.lminf")  # a global weights_only refuses
    with pytest.raises(ValueError, match="not a readable saved stream"):
        LambdaStream.load(tmp_path / "unsafe.lminf", model)
    (tmp_path / "cut.lminf").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable saved stream"):
        LambdaStream.load(tmp_path / "cut.lminf", model)


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(model, tmp_path, monkeypatch):
    path = tmp_path / "s.lminf"
    stream = _saved(model, path)
    before = path.read_bytes()
    stream.feed(torch.randint(0, VOCAB, (1, 3)))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        stream.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["s.lminf"]


def test_a_loaded_stream_is_freed_when_dropped(model, tmp_path):
    path = tmp_path / "s.lminf"
    _saved(model, path)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        stream = LambdaStream.load(path, model)
        list(stream.generate(3))
        refs = [weakref.ref(stream), weakref.ref(stream.cache)] + [weakref.ref(r.k) for r in _rings(stream)]
        del stream
        assert [ref() for ref in refs if ref() is not None] == []
    finally:
        if was_enabled:
            gc.enable()
