"""lminf serve, started for real on 127.0.0.1 and driven with the official openai client.

Every answer is checked against an independent reference: a fresh LambdaStream, in this
process, over the whole prompt the server should have built (chat template included).
"""

import functools
import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.models import load_model
from lm_infinite.apps.server.conversations import ConversationStore
from lm_infinite.apps.server.text import CompletionText
from lm_infinite.streaming import LambdaStream
from tiny_chat_model import save_tiny_chat_model, system_message_tokens

SETTINGS = dict(n_global=2, n_local=16)  # a window the conversations outgrow many times
MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT = 600, 512
START_TIMEOUT_S, REQUEST_TIMEOUT_S = 120, 60


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The base URL of a running `lminf serve`; stopped after the module's tests."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "lm_infinite.apps.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--n-global", str(SETTINGS["n_global"]), "--n-local", str(SETTINGS["n_local"]),
         "--model-name", "tiny-chat-model", "--chunk-size", "8", "--max-conversations", "16", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
         "--max-tokens-limit", str(MAX_TOKENS_LIMIT)],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"the server exited: {_log_text(log)}"
            assert time.monotonic() < deadline, f"the server did not start: {_log_text(log)}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
        assert process.poll() is None, f"the server died: {_log_text(log)}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """reference(prompt, max_tokens, ...) -> (text, completion tokens, finish reason, prompt
    tokens): what a fresh stream over the whole prompt gives. prompt: a text or messages."""
    model, tokenizer = load_model(model_dir)
    lminf_hf.enable(model, **SETTINGS)
    eos = tokenizer.eos_token_id

    def run(prompt, max_tokens, *, temperature=0.0, seed=0, stop=()):
        pinned = 0
        if isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        else:
            ids = tokenizer(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False).input_ids
            pinned = system_message_tokens(prompt)
        stream = LambdaStream(model, pinned_tokens=pinned)
        stream.feed(torch.tensor([ids]))
        tokens = list(stream.generate(max_tokens, stop_token_ids=[eos], temperature=temperature,
                                      generator=torch.Generator().manual_seed(seed)))
        text = tokenizer.decode([t for t in tokens if t != eos])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return text[:min(hits)], None, "stop", len(ids)  # where generation stopped is the server's
        return text, len(tokens), "stop" if tokens[-1] == eos else "length", len(ids)

    return run


def _chat(content):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def _streamed_chat(client, messages, **options):
    chunks = list(client.chat.completions.create(model="tiny-chat-model", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    *content, usage_chunk = chunks
    assert content[0].choices[0].delta.role == "assistant" and not usage_chunk.choices
    text = "".join(c.choices[0].delta.content or "" for c in content)
    return text, content[-1].choices[0].finish_reason, usage_chunk.usage


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat-model"]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["max_conversations"] == 16
    assert health["max_pinned_tokens"] == 1024  # --pin-system-prompt is on by default


def test_chat_streamed_and_not_give_the_fresh_stream_answer(client, reference):
    messages = _chat("Name a color.")
    text, n_tokens, finish, n_prompt = reference(messages, 20)
    whole = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=20,
                                           temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, finish)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n_prompt, n_tokens)
    assert whole.usage.total_tokens == n_prompt + n_tokens
    streamed, streamed_finish, usage = _streamed_chat(client, messages, max_tokens=20, temperature=0)
    assert (streamed, streamed_finish, usage.completion_tokens) == (text, finish, n_tokens)


def test_completions_streamed_and_not_give_the_fresh_stream_answer(client, reference):
    prompt = "Once upon a time"
    text, n_tokens, finish, n_prompt = reference(prompt, 12)
    whole = client.completions.create(model="tiny-chat-model", prompt=prompt, max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert (whole.choices[0].text, whole.choices[0].finish_reason) == (text, finish)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n_prompt, n_tokens)
    chunks = list(client.completions.create(model="tiny-chat-model", prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_a_five_turn_conversation_feeds_only_its_new_tokens(client, reference):
    messages, previous = [{"role": "system", "content": "You answer in one word."}], None
    for turn in range(5):
        messages.append({"role": "user", "content": f"Question number {turn}: why?"})
        text, n_tokens, finish, n_prompt = reference(messages, 24)
        options = dict(max_tokens=24, temperature=0)
        if turn % 2:
            answer, answer_finish, usage = _streamed_chat(client, messages, **options)
        else:
            response = client.chat.completions.create(model="tiny-chat-model", messages=messages, **options)
            answer, answer_finish, usage = (response.choices[0].message.content,
                                            response.choices[0].finish_reason, response.usage)
        assert (answer, answer_finish) == (text, finish), f"turn {turn}"
        assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, n_tokens)
        # The stream kept from the last turn holds its prompt and its reply: all reused.
        expected_cached = 0 if previous is None else previous.prompt_tokens + previous.completion_tokens
        assert usage.prompt_tokens_details.cached_tokens == expected_cached, f"turn {turn}"
        messages.append({"role": "assistant", "content": answer})
        previous = usage
    assert previous.prompt_tokens > 6 * SETTINGS["n_local"]  # the window wrapped many times


def test_stop_strings_end_the_text_before_them(client, reference):
    messages = _chat("Count to ten.")
    free_text, *_ = reference(messages, 30)
    stop = free_text[5:7]  # a string the greedy reply is known to contain
    text, _, finish, _ = reference(messages, 30, stop=[stop])
    assert finish == "stop" and text == free_text[:free_text.find(stop)]
    whole = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=30,
                                           temperature=0, stop=[stop, "never there"])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, "stop")
    streamed, streamed_finish, _ = _streamed_chat(client, messages, max_tokens=30, temperature=0, stop=stop)
    assert (streamed, streamed_finish) == (text, "stop")


def test_a_seed_makes_sampling_reproducible(client, reference):
    messages = _chat("Tell me a story.")
    text, *_ = reference(messages, 16, temperature=1.0, seed=1234)
    answers = [client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=16,
                                              temperature=1.0, seed=1234).choices[0].message.content
               for _ in range(2)]
    assert answers == [text, text]


def test_eight_concurrent_clients_each_get_their_own_answer(server, reference):
    questions = [_chat(f"Client {i} asks question {i * 7}.") for i in range(8)]
    expected = [reference(q, 16)[0] for q in questions]
    clients = [openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                             max_retries=0) for _ in questions]
    answers, first_text_at, finished_at, errors = [None] * 8, [None] * 8, [None] * 8, []
    barrier = threading.Barrier(8)

    def ask(i):
        try:
            barrier.wait()
            parts = []
            for chunk in clients[i].chat.completions.create(model="tiny-chat-model", messages=questions[i],
                                                            max_tokens=16, temperature=0, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    first_text_at[i] = first_text_at[i] or time.monotonic()
            finished_at[i] = time.monotonic()
            answers[i] = "".join(parts)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S)
    assert not errors and answers == expected
    # Served together, token by token: every client had text before any client was done.
    assert max(t for t in first_text_at if t is not None) < min(finished_at)


def test_a_client_that_disconnects_mid_stream_leaves_the_server_consistent(server, client, reference):
    messages = _chat("Write a long poem.")
    body = dict(model="tiny-chat-model", messages=messages, max_tokens=MAX_TOKENS_LIMIT, temperature=0,
                stream=True)
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # the role chunk, blank separators, some text
    assert any(line.startswith("data: ") for line in received)
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while httpx.get(f"{server}/health").json()["active_requests"]:
        assert time.monotonic() < deadline, "the abandoned request never ended"
        time.sleep(0.1)
    # The stream the abandoned request left must not pass for the bare prompt, and whatever
    # is reused for the next turn must give the fresh-stream answer.
    text, *_ = reference(messages, 20)
    again = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == text
    follow_up = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    text, *_ = reference(follow_up, 20)
    answer = client.chat.completions.create(model="tiny-chat-model", messages=follow_up, max_tokens=20,
                                            temperature=0)
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens + again.usage.completion_tokens


def test_a_client_that_leaves_before_a_json_answer_stops_its_request(server, client, reference):
    messages = _chat("Write a long poem.")  # hundreds of tokens: far longer than the client stays
    body = json.dumps(dict(model="tiny-chat-model", messages=messages, max_tokens=MAX_TOKENS_LIMIT,
                           temperature=0)).encode()
    cancelled = httpx.get(f"{server}/health").json()["cancelled_requests"]
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
        time.sleep(0.05)  # the server has read the request; then the client hangs up
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while (health := httpx.get(f"{server}/health").json())["active_requests"]:
        assert time.monotonic() < deadline, "the abandoned request never ended"
        time.sleep(0.05)
    assert health["cancelled_requests"] == cancelled + 1
    text, *_ = reference(messages, 20)
    again = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == text


def _error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"model": "tiny-chat-model"}, 400, "messages"),
    ({"model": "tiny-chat-model", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny-chat-model", "messages": []}, 400, "messages"),
    ({"model": "tiny-chat-model", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}],
      "max_tokens": MAX_TOKENS_LIMIT + 1}, 400, "max_tokens"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
     400, "stop"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ({"model": "tiny-chat-model", "messages": [{"role": "user", "content": "x" * MAX_PROMPT_TOKENS}],
      "stream": True}, 400, "messages"),
])
def test_bad_chat_requests_get_the_openai_error(server, body, status, param):
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == status
    assert _error_of(response)["param"] == param


def test_bad_requests_of_every_kind_get_the_openai_error_and_the_server_lives(server, client, reference):
    raw = [("POST", "/v1/chat/completions", b"{not json", 400),
           ("POST", "/v1/chat/completions", b"[1, 2]", 400),
           ("POST", "/v1/completions", b'{"model": "tiny-chat-model", "prompt": ""}', 400),
           ("POST", "/v1/completions", b'{"model": "tiny-chat-model", "prompt": {"text": 1}}', 400),
           ("GET", "/v1/no-such-route", None, 404),
           ("DELETE", "/v1/models", None, 405)]
    for method, path, content, status in raw:
        response = httpx.request(method, f"{server}{path}", content=content, timeout=REQUEST_TIMEOUT_S,
                                 headers={"content-type": "application/json"})
        assert response.status_code == status, (path, content)
        _error_of(response)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="tiny-chat-model", prompt="y" * (MAX_PROMPT_TOKENS + 1), max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=_chat("hi"), max_tokens=4)
    messages = _chat("Still there?")
    assert client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=8,
                                          temperature=0).choices[0].message.content == reference(messages, 8)[0]


# In-process units: the store's reuse rule and the text's stop strings.

def test_the_store_continues_only_an_exact_prefix_and_evicts_the_least_recent(model_dir):
    model, _ = load_model(model_dir)
    lminf_hf.enable(model, **SETTINGS)
    store = ConversationStore(2, functools.partial(LambdaStream, model))
    first, cached = store.checkout([5, 6, 7])
    assert cached == 0
    first.feed([5, 6, 7])
    store.checkin(first)
    assert store.checkout([5, 6, 8])[1] == 0  # a different token: the kept stream cannot rewind
    assert store.checkout([5, 6])[1] == 0  # shorter than the stream: not a prefix of the prompt
    again, cached = store.checkout([5, 6, 7, 9])
    assert (again, cached) == (first, 3) and len(store) == 0  # checked out: no one else gets it
    again.feed([9])
    store.checkin(again)
    for ids in ([1], [2]):  # two newer conversations push the first out
        other, _ = store.checkout(ids)
        other.feed(ids)
        store.checkin(other)
    assert len(store) == 2 and store.checkout([5, 6, 7, 9, 1])[1] == 0
    assert store.checkout([2, 3])[1] == 1


def test_completion_text_holds_back_what_may_start_a_stop_string(model_dir):
    _, tokenizer = load_model(model_dir)
    text = CompletionText(tokenizer, stop=["STOP"])
    deltas = []
    for token in tokenizer("ab STxSTOP cd").input_ids:
        deltas.append(text.push(token))
        if text.stopped:
            break
    # "S", "ST" may begin "STOP": held; "STx" cannot; the text ends before "STOP".
    assert deltas == ["a", "b", " ", "", "", "STx", "", "", "", ""]
    assert text.text == "ab STx" and text.flush() == ""


def test_top_p_restricts_the_draw_to_the_nucleus(client, reference):
    # A nucleus of one token (tiny top_p) makes any temperature greedy; top_p 1 changes nothing.
    messages = _chat("Name an animal.")
    greedy, *_ = reference(messages, 16)
    nucleus = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=16,
                                             temperature=1.5, top_p=1e-6, seed=4)
    assert nucleus.choices[0].message.content == greedy
    sampled, *_ = reference(messages, 16, temperature=1.5, seed=4)
    whole = client.chat.completions.create(model="tiny-chat-model", messages=messages, max_tokens=16,
                                           temperature=1.5, top_p=1.0, seed=4)
    assert whole.choices[0].message.content == sampled
