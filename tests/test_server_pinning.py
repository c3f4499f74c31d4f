"""lminf serve --pin-system-prompt: a new chat conversation pins its system message's tokens."""

import copy

import pytest
import torch
from fastapi.testclient import TestClient

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.server import Engine, create_app
from lm_infinite.apps.server.pinning import system_prefix_length
from lm_infinite.models import load_model
from tiny_chat_model import save_tiny_chat_model, system_message_tokens

MODEL_NAME = "tiny-chat-model"
N_GLOBAL, N_LOCAL = 2, 16
SYSTEM = {"role": "system", "content": "You are a lighthouse keeper named Ada."}


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    directory = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))
    model, tokenizer = load_model(str(directory), dtype=torch.float32)
    lminf_hf.enable(model, n_global=N_GLOBAL, n_local=N_LOCAL)
    return model, tokenizer


def _ids(tokenizer, messages):
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def test_the_system_prefix_is_the_system_message_as_the_template_renders_it(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    messages = [SYSTEM, {"role": "user", "content": "Where is the light?"}]
    ids = _ids(tokenizer, messages)
    expected = system_message_tokens(messages)
    assert system_prefix_length(tokenizer, messages, ids, limit=1024) == expected
    assert system_prefix_length(tokenizer, messages, ids, limit=5) == 5
    assert system_prefix_length(tokenizer, messages, ids, limit=0) == 0
    assert system_prefix_length(tokenizer, messages[1:], _ids(tokenizer, messages[1:]), limit=1024) == 0


@pytest.mark.parametrize("limit", [0, 7, 1024])
def test_a_new_chat_conversation_pins_its_system_message(model_and_tokenizer, limit):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, chunk_size=8, max_conversations=4, max_pinned_tokens=limit)
    messages = [SYSTEM, {"role": "user", "content": "Tell me about the sea, the rocks and the long nights."}]
    with TestClient(create_app(engine, model_name=MODEL_NAME, max_tokens_limit=32)) as client:
        response = client.post("/v1/chat/completions", json=dict(model=MODEL_NAME, messages=messages,
                                                                 max_tokens=4, temperature=0))
        assert response.status_code == 200, response.text
        completion = client.post("/v1/completions", json=dict(model=MODEL_NAME, prompt="[system]plain text",
                                                              max_tokens=4, temperature=0))
        assert completion.status_code == 200, completion.text
        health = client.get("/health").json()
    pins = sorted(conversation.stream.pinned_tokens for conversation in engine.store._idle.values())
    # The chat pins its system message (up to the limit); a completion prompt pins nothing.
    assert pins == sorted([0, min(limit, system_message_tokens(messages))])
    assert health["max_pinned_tokens"] == limit
    # The bound per conversation counts the slots a pin of `limit` tokens adds to each layer.
    layers = model.config.num_hidden_layers
    kv_bytes_per_slot = 2 * model.config.num_key_value_heads * model.config.head_dim * 4 + 8
    assert health["conversation_bytes"] == layers * (max(N_GLOBAL, limit) + N_LOCAL) * kv_bytes_per_slot


def test_a_template_that_will_not_render_a_lone_system_message_pins_nothing(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    strict = copy.copy(tokenizer)
    strict.chat_template = ("{% if messages|length < 2 %}{{ raise_exception('a user turn is needed') }}{% endif %}"
                            + tokenizer.chat_template)
    messages = [SYSTEM, {"role": "user", "content": "Where is the light?"}]
    assert system_prefix_length(strict, messages, _ids(strict, messages), limit=1024) == 0
