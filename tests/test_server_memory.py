"""`lminf serve`'s memory is the model plus the conversations it keeps: RSS after 50
conversations and 50 concurrent requests stays within 10% of its RSS after its first 8.

The tiny model gets a large window (n_local 32768: about 9 MB of cache per conversation), so
that conversations the server failed to free (a reference cycle, no bound on those in flight)
would show: 100 of them would double the RSS."""

import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from lm_infinite.apps.bench_common import rss_mib
from tiny_chat_model import save_tiny_chat_model

MODEL_NAME = "tiny-chat-model"
N_LOCAL = 32768
START_TIMEOUT_S, REQUEST_TIMEOUT_S = 120, 120


@pytest.fixture
def server(tmp_path):
    model_dir = save_tiny_chat_model(tmp_path / "model")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "lm_infinite.apps.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--n-local", str(N_LOCAL), "--model-name", MODEL_NAME, "--max-conversations", "8", "--max-active", "8"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not start: {log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield process, url
    finally:
        process.kill()
        process.wait()
        log.close()


def _chat(url: str, i: int) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
    answer = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": f"Conversation {i}: tell me about the rivers."}])
    assert answer.choices[0].message.content is not None


def _concurrently(url: str, conversations: range) -> None:
    errors = []

    def ask(i):
        try:
            _chat(url, i)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(i,)) for i in conversations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


def test_rss_after_50_conversations_and_50_concurrent_requests_stays_within_10_percent(server):
    process, url = server
    _concurrently(url, range(8))  # the first 8 conversations, as 8 clients at once
    after_8 = rss_mib(process.pid)
    for i in range(8, 50):
        _chat(url, i)
    after_50 = rss_mib(process.pid)
    _concurrently(url, range(100, 150))
    after_100 = rss_mib(process.pid)
    health = httpx.get(f"{url}/health").json()
    print(f"RSS after 8 conversations {after_8:.0f} MiB, after 50 {after_50:.0f} MiB, after 50 more at once "
          f"{after_100:.0f} MiB "
          f"({after_100 / after_8:.3f}); a conversation's cache {health['conversation_bytes'] / 2**20:.1f} MiB")
    assert health["conversation_bytes"] > 8 * 2**20  # each leaked conversation would show
    assert health["conversations"] <= health["max_live_conversations"] == 8
    assert after_100 <= 1.10 * after_8
