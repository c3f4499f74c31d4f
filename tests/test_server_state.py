"""lminf serve --state-dir: conversations written to disk after each request, found again after
a crash (kill -9) and a restart, or after their eviction from memory; the disk bound."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

import lm_infinite.hf as lminf_hf
from lm_infinite.models import load_model
from lm_infinite.apps.server import Engine, create_app
from lm_infinite.streaming import LambdaStream
from tiny_chat_model import save_tiny_chat_model, system_message_tokens

N_GLOBAL, N_LOCAL = 2, 16
MODEL_NAME = "tiny-chat-model"
START_TIMEOUT_S, REQUEST_TIMEOUT_S = 120, 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    lminf_hf.enable(model, n_global=N_GLOBAL, n_local=N_LOCAL)
    return model, tokenizer


def _start_server(model_dir, state_dir, log_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(log_path, "a")
    process = subprocess.Popen(
        [sys.executable, "-m", "lm_infinite.apps.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--n-global", str(N_GLOBAL), "--n-local", str(N_LOCAL), "--model-name", MODEL_NAME,
         "--chunk-size", "8", "--state-dir", str(state_dir)],
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the server did not start: {open(log_path).read()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.5)


def _ask(url, messages, max_tokens):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                              temperature=0)
    return response.choices[0].message.content, response.usage


def _reference_answer(model_and_tokenizer, messages, max_tokens):
    """A fresh stream over the whole prompt (its system message pinned, as the server does by
    default): what the server answers without any restart."""
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False).input_ids
    stream = LambdaStream(model, pinned_tokens=system_message_tokens(messages))
    stream.feed(torch.tensor([ids]))
    tokens = list(stream.generate(max_tokens, stop_token_ids=[tokenizer.eos_token_id]))
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])


def test_a_conversation_survives_kill_9_and_a_restart(model_dir, model_and_tokenizer, tmp_path):
    state_dir, log = tmp_path / "state", tmp_path / "server.log"
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me about the long history of rivers and stones."}]
    process, url = _start_server(model_dir, state_dir, log)
    try:
        answer, usage = _ask(url, messages, 24)
        history = usage.prompt_tokens + usage.completion_tokens
        assert history >= 4 * N_LOCAL
        print(f"history {history} tokens = {history / N_LOCAL:.1f} x n_local")
        assert len(list(state_dir.glob("*.lminf"))) == 1  # written before the answer was sent
        process.send_signal(signal.SIGKILL)
        process.wait()
        process, url = _start_server(model_dir, state_dir, log)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        again, usage = _ask(url, messages, 24)
        print(f"after kill -9 and restart: cached_tokens {usage.prompt_tokens_details.cached_tokens}")
        assert usage.prompt_tokens_details.cached_tokens == history
        assert again == _reference_answer(model_and_tokenizer, messages, 24)
        # The conversation's previous file is replaced by the new turn's: one per conversation.
        assert len(list(state_dir.glob("*.lminf"))) == 1
        health = httpx.get(f"{url}/health").json()
        assert health["saved_conversations"] == 1 and health["saved_conversation_bytes"] > 0
    finally:
        process.kill()
        process.wait()


def _client(model_and_tokenizer, state_dir, **options):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, chunk_size=8, state_dir=state_dir, **({"max_conversations": 0} | options))
    return TestClient(create_app(engine, model_name=MODEL_NAME, max_tokens_limit=32)), engine


def _chat(client, messages, max_tokens=6):
    response = client.post("/v1/chat/completions", json=dict(model=MODEL_NAME, messages=messages,
                                                             max_tokens=max_tokens, temperature=0))
    assert response.status_code == 200, response.text
    body = response.json()
    return body["choices"][0]["message"]["content"], body["usage"]


@pytest.mark.parametrize("batch_decode", [True, False])
def test_a_conversation_evicted_from_memory_is_continued_from_disk(model_and_tokenizer, tmp_path, batch_decode):
    # max_conversations=0: nothing idle stays in memory, every reuse comes from the disk.
    client, engine = _client(model_and_tokenizer, tmp_path, batch_decode=batch_decode)
    with client:
        messages = [{"role": "user", "content": "Count the waves of the sea, one by one."}]
        answer, usage = _chat(client, messages)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "More."}]
        again, next_usage = _chat(client, messages)
        assert next_usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert again == _reference_answer(model_and_tokenizer, messages, 6)
        assert len(engine.store) == 0 and len(engine.store.saved) == 1


def test_the_state_dir_stays_within_its_bound_oldest_removed_first(model_and_tokenizer, tmp_path):
    client, engine = _client(model_and_tokenizer, tmp_path)
    answers = {}
    with client:
        answers["first"], _ = _chat(client, [{"role": "user", "content": "first"}])
        size = engine.store.saved.bytes
    # Room for two files: the third conversation removes the first, the oldest.
    bound = 2 * size + size // 2
    client, engine = _client(model_and_tokenizer, tmp_path, max_state_bytes=bound)
    with client:
        for content in ("second", "third"):
            answers[content], _ = _chat(client, [{"role": "user", "content": content}])
        assert len(os.listdir(tmp_path)) == 2 and engine.store.saved.bytes <= bound
        for content, cached in (("first", False), ("third", True)):
            _, usage = _chat(client, [{"role": "user", "content": content},
                                      {"role": "assistant", "content": answers[content]},
                                      {"role": "user", "content": "go on"}])
            assert (usage["prompt_tokens_details"]["cached_tokens"] > 0) == cached, content


def test_files_of_another_model_are_skipped_not_fatal(model_and_tokenizer, model_dir, tmp_path):
    client, engine = _client(model_and_tokenizer, tmp_path)
    messages = [{"role": "user", "content": "hello there"}]
    with client:
        answer, _ = _chat(client, messages)
    # The same model with another window: the saved file does not fit it.
    other, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    lminf_hf.enable(other, n_global=N_GLOBAL, n_local=2 * N_LOCAL)
    client, engine = _client((other, tokenizer), tmp_path)
    with client:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "again"}]
        _, usage = _chat(client, messages)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
