"""lminf serve's bounds, in process: live conversations (and so memory), queued requests,
request bodies; and a fuzz of the request schema that never gets a 500 or a hang."""

import asyncio
import functools
import gc
import json
import weakref

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lm_infinite.hf as lminf_hf
from lm_infinite.models import load_model
from lm_infinite.apps.server import Engine, create_app
from lm_infinite.apps.server.conversations import ConversationStore
from lm_infinite.apps.server.errors import APIError
from lm_infinite.apps.server.worker import Sampling
from lm_infinite.streaming import LambdaStream
from tiny_chat_model import save_tiny_chat_model

MODEL_NAME = "tiny-chat-model"


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    directory = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))
    model, tokenizer = load_model(str(directory), dtype=torch.float32)
    lminf_hf.enable(model, n_global=2, n_local=16)
    return model, tokenizer


def make_client(model_and_tokenizer, **engine_options) -> tuple[TestClient, Engine]:
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, chunk_size=8, **({"max_conversations": 2} | engine_options))
    app = create_app(engine, model_name=MODEL_NAME, max_tokens_limit=32, max_request_bytes=64 * 1024)
    return TestClient(app), engine


def chat(client, content: str, max_tokens: int = 4):
    return client.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0})


def test_live_conversations_are_bounded_and_evicted_ones_freed(model_and_tokenizer):
    client, engine = make_client(model_and_tokenizer, max_conversations=2, max_active=2)
    evicted = []
    with client:
        for i in range(6):
            assert chat(client, f"conversation {i}").status_code == 200
            evicted += [weakref.ref(c.stream) for c in list(engine.store._idle.values())]
        health = client.get("/health").json()
        assert health["conversations"] == 2 and health["max_live_conversations"] == 2
        assert health["max_conversation_bytes"] == 2 * health["conversation_bytes"] > 0
        gc.disable()  # freed by reference counting, not by a collector run
        try:
            kept = {id(c.stream) for c in engine.store._idle.values()}
            gone = [ref for ref in evicted if ref() is not None and id(ref()) not in kept]
            assert not gone, f"{len(gone)} evicted conversations still alive"
        finally:
            gc.enable()


def test_a_new_conversation_evicts_idle_ones_to_stay_within_the_live_bound(model_and_tokenizer):
    model, _ = model_and_tokenizer
    store = ConversationStore(3, functools.partial(LambdaStream, model, chunk_size=8))
    for first in range(3):
        conversation, _ = store.checkout([first + 1, 7, 7])
        conversation.feed([first + 1, 7, 7])
        store.checkin(conversation)
    assert len(store) == 3
    store.checkout([50, 51], max_live=3, in_flight=1)  # 3 idle + 1 in flight + the new one > 3
    assert len(store) == 1
    kept, cached = store.checkout([3, 7, 7, 9], max_live=3, in_flight=2)  # the newest stayed
    assert cached == 3 and len(store) == 0


def test_requests_beyond_the_queue_are_refused_with_429(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, chunk_size=8, max_conversations=1, max_active=2, max_queued=3)

    async def submit_all():  # the worker is not started: every job stays queued
        jobs = [engine.submit("hello", Sampling(max_tokens=1)) for _ in range(5)]
        with pytest.raises(APIError) as refused:
            engine.submit("hello", Sampling(max_tokens=1))
        return jobs, refused.value

    jobs, error = asyncio.run(submit_all())
    assert len(jobs) == 5 and error.status == 429 and error.code == "server_busy"
    assert "--max-queued 3" in error.message


def test_a_body_over_the_limit_is_refused_with_413(model_and_tokenizer):
    client, _ = make_client(model_and_tokenizer)
    with client:
        response = chat(client, "x" * (70 * 1024))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        # Chunked (no Content-Length): counted as it arrives.
        body = json.dumps({"model": MODEL_NAME, "prompt": "y" * (70 * 1024)}).encode()
        response = client.post("/v1/completions", content=iter([body[:1000], body[1000:]]),
                               headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert chat(client, "still serving").status_code == 200


_TEXT = st.text(max_size=40)
_HOSTILE = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     _TEXT, st.lists(st.integers(-5, 5), max_size=3), st.dictionaries(_TEXT, st.integers(), max_size=2))
_MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer"]), _HOSTILE),
     "content": st.one_of(_TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
                                          max_size=2), _HOSTILE)})
_FIELDS = {
    "model": st.one_of(st.just(MODEL_NAME), _HOSTILE),
    "messages": st.one_of(st.lists(_MESSAGE, max_size=3), _HOSTILE),
    "prompt": st.one_of(_TEXT, _HOSTILE),
    "max_tokens": st.one_of(st.integers(-3, 40), _HOSTILE),
    "max_completion_tokens": st.one_of(st.integers(-3, 40), _HOSTILE),
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([1e-45, 1e-300, 2.0]), _HOSTILE),
    "top_p": st.one_of(st.floats(0, 1), st.sampled_from([1e-50, 1e-45]), _HOSTILE),
    "seed": st.one_of(st.integers(-2**70, 2**70), _HOSTILE),
    "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=5), _HOSTILE),
    "stream": st.one_of(st.booleans(), _HOSTILE),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _HOSTILE),
    "n": st.one_of(st.integers(-2, 3), _HOSTILE),
}
# A valid body of either route (each ignores the other's field), with 0 to 4 fields replaced.
_VALID = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 3}
_BODY = st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: _FIELDS[key] for key in keys})).map(lambda changes: _VALID | changes)


def test_fuzz_the_request_schema_never_fails_the_server(model_and_tokenizer):
    """Every body is answered 200 or a 4xx in the OpenAI error shape, never a 500, a traceback
    or a hang; the server keeps serving."""
    client, _ = make_client(model_and_tokenizer, max_conversations=2)
    answered = {}

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=_BODY,
           raw=st.one_of(st.none(), st.binary(max_size=30)))
    def one_request(route, body, raw):
        if raw is not None:
            response = client.post(route, content=raw, headers={"content-type": "application/json"})
        else:  # NaN and Infinity go out as Python writes them, which is not strict JSON
            response = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})
        answered[response.status_code] = answered.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 404, 413, 429), response.text
        if response.status_code != 200:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    with client:
        one_request()
        assert chat(client, "after the fuzz").status_code == 200
        for regression in ({"seed": 2**70}, {"seed": -(2**63) - 1}):  # a 500: the generator refused it
            response = client.post("/v1/chat/completions", json=_VALID | regression)
            assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    assert answered.get(200, 0) > 0 and sum(answered.values()) >= 150
    print(f"server fuzz: {sum(answered.values())} requests, by status {answered}")
