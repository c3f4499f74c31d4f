"""Long-lived objects free what they hold when dropped, without the cyclic collector.

Each test runs with the collector switched off: an object kept alive by a reference cycle
then stays alive, as it does in a long-lived process between the collector's rare full runs
(large tensor allocations do not trigger it), so a cycle fails the test instead of depending
on when the collector last ran.
"""

import contextlib
import gc
import weakref

import pytest
import torch

import lm_infinite as li
import lm_infinite.hf as lminf_hf
from hf_tiny_models import build
from lm_infinite.decode_step import StaticDecodeStep
from lm_infinite.streaming import LambdaStream

VOCAB = 96


@contextlib.contextmanager
def collector_off():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def held_objects(stream: LambdaStream) -> list:
    """Weak references to the stream and to everything big it holds."""
    refs = [weakref.ref(stream), weakref.ref(stream.cache)]
    for layer in stream.cache.layers:
        ring = layer.ring
        refs += [weakref.ref(ring), weakref.ref(ring.k), weakref.ref(ring.v)]
        if ring.middle is not None:
            refs.append(weakref.ref(ring.middle))
    if stream._step is not None:
        refs += [weakref.ref(stream._step), weakref.ref(stream._step.logits)]
    return refs


def alive(refs) -> list:
    return [ref() for ref in refs if ref() is not None]


def used_stream(model, *, compile=False, batch=1, sample=False) -> LambdaStream:
    stream = LambdaStream(model, chunk_size=7, compile=compile)
    stream.feed(torch.randint(0, VOCAB, (batch, 40)))
    generator = torch.Generator().manual_seed(0)
    for _ in stream.generate(4, temperature=0.7 if sample else 0.0, generator=generator):
        pass
    return stream


@pytest.mark.parametrize("settings,compile,batch", [
    (dict(), False, 1),
    (dict(), True, 1),  # the compiled decode step
    (dict(), False, 3),
    (dict(settings=li.LambdaSettings(2, 8, top_k=li.TopK(k=2, first_layer=1))), False, 1),  # top-k, exact store
    (dict(preset="retrieval"), False, 1),  # top-k, paged middle store
], ids=["eager", "compiled", "batch", "top-k-exact", "top-k-paged"])
def test_a_dropped_stream_is_freed_at_once(settings, compile, batch):
    model = build("llama")
    li.enable(model, **(dict(n_global=2, n_local=8) | settings))
    with collector_off():
        stream = used_stream(model, compile=compile, batch=batch, sample=True)
        refs = held_objects(stream)
        del stream
        assert not alive(refs), f"still alive after del: {[type(o).__name__ for o in alive(refs)]}"


def test_forked_streams_and_their_steps_are_freed():
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    with collector_off():
        stream = used_stream(model)
        twin = stream.fork()
        for _ in twin.generate(3):
            pass
        refs = held_objects(stream) + held_objects(twin)
        del stream, twin
        assert not alive(refs)


def test_a_dropped_decode_step_is_freed():
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    stream = used_stream(model)
    with collector_off(), torch.inference_mode():
        step = StaticDecodeStep(model, stream.cache, compile=False)
        step.start(torch.tensor([1]))
        step()
        ref = weakref.ref(step)
        del step
        assert ref() is None


def test_hf_generate_with_a_lambda_cache_frees_it():
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    with collector_off():
        cache = li.LambdaCache(model)
        model.generate(torch.randint(0, VOCAB, (1, 30)), max_new_tokens=4, do_sample=False,
                       pad_token_id=0, **{lminf_hf.cache_argument_name(model): cache})
        refs = [weakref.ref(cache), weakref.ref(cache.layers[0].ring.k)]
        del cache
        assert not alive(refs)


def test_the_compiled_step_is_compiled_once_per_model():
    """Each stream's step used to compile again (it guarded on per-stream forward objects),
    and the old compiled code kept the old stream's cache."""
    model = build("llama")
    li.enable(model, n_global=2, n_local=8)
    used_stream(model, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with collector_off():
        refs = held_objects(used_stream(model, compile=True))
        assert not alive(refs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_an_enabled_model_is_freed_when_dropped():
    """The forward hooks of `enable` once closed over the decoder: a cycle in every enabled
    model, which then outlived its last reference."""
    with collector_off():
        model = build("llama")
        li.enable(model, n_global=2, n_local=8)
        with torch.inference_mode():
            model(torch.randint(0, VOCAB, (1, 12)))
        stream = used_stream(model)
        refs = [weakref.ref(model), weakref.ref(model.lm_head.weight)] + held_objects(stream)
        del model, stream
        assert not alive(refs), f"still alive: {[type(o).__name__ for o in alive(refs)]}"
