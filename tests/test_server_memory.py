"""`lminf serve`'s memory is the model plus the conversations it keeps: RSS after 50
conversations and 50 concurrent requests stays within 10% of its RSS after its first 8.

The tiny model gets a large window (n_local 32768: about 9 MB of cache per conversation), so
that conversations the server failed to free (a reference cycle, no bound on those in flight)
would show: 100 of them would double the RSS."""

from types import SimpleNamespace

import httpx
import pytest

from lm_infinite.apps.bench_common import MODEL_NAME, Server, concurrently, rss_mib
from tiny_chat_model import save_tiny_chat_model

N_LOCAL = 32768


@pytest.fixture
def server(tmp_path):
    model_dir = save_tiny_chat_model(tmp_path / "model")
    with Server(SimpleNamespace(n_local=N_LOCAL, model=str(model_dir), threads=None), max_conversations=8,
                options=("--max-active", "8")) as server:
        yield server


def _chat(client, i: int) -> None:
    answer = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": f"Conversation {i}: tell me about the rivers."}])
    assert answer.choices[0].message.content is not None


def test_rss_after_50_conversations_and_50_concurrent_requests_stays_within_10_percent(server):
    pid = server.process.pid
    concurrently(server, 8, _chat)  # the first 8 conversations, as 8 clients at once
    after_8 = rss_mib(pid)
    client = server.client()
    for i in range(8, 50):
        _chat(client, i)
    after_50 = rss_mib(pid)
    concurrently(server, 50, lambda client, i: _chat(client, 100 + i))
    after_100 = rss_mib(pid)
    health = httpx.get(f"{server.url}/health").json()
    print(f"RSS after 8 conversations {after_8:.0f} MiB, after 50 {after_50:.0f} MiB, after 50 more at once "
          f"{after_100:.0f} MiB ({after_100 / after_8:.3f}); a conversation's cache "
          f"{health['conversation_bytes'] / 2**20:.1f} MiB")
    assert health["conversation_bytes"] > 8 * 2**20  # each leaked conversation would show
    assert health["conversations"] <= health["max_live_conversations"] == 8
    assert after_100 <= 1.10 * after_8
