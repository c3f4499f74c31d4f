"""What the benchmark scripts under bench/ share: dtype names, a process's RSS, and `lminf
serve` in a subprocess (with the synthetic user turns the server benchmarks send it).

httpx and openai (the `test` extra) are imported only by the server helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from .cli.common import DTYPES

__all__ = ["DTYPES", "MODEL_NAME", "Server", "concurrently", "rss_mib", "timed_turn", "user_messages"]

MODEL_NAME = "bench-model"


def rss_mib(pid: int | str = "self") -> float:
    """Current (not peak) resident memory of process `pid` (default: this one) in MiB, from
    Linux's /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def user_messages(n: int, chars: int) -> list[str]:
    """Successive pieces of the pydoc topics (text every Python has), one per turn."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[key].split()) for key in sorted(topics))
    return [f"Explain briefly: {text[i * chars:(i + 1) * chars]}" for i in range(n)]


class Server:
    """`lminf serve` in a subprocess on a free port, stopped on exit. `args` carries n_local,
    model (or None) and threads (or None); `options`: more of serve's options."""

    def __init__(self, args, max_conversations: int, options: tuple[str, ...] = ()) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "lm_infinite.apps.cli", "serve", "--port", str(self.port),
                   "--model-name", MODEL_NAME, "--n-local", str(args.n_local),
                   "--max-conversations", str(max_conversations), *options] + (["--model", args.model] if args.model else [])
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        import httpx

        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited during startup")
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in 300 s")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def client(self):
        """An openai.OpenAI client for this server."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", timeout=600, max_retries=0)


def timed_turn(client, messages: list[dict], reply_tokens: int) -> dict:
    """One streamed greedy chat turn (client: an openai.OpenAI, e.g. Server.client()): the reply,
    time to first text, decode tokens/s, usage."""
    start = time.perf_counter()
    first = None
    parts, usage = [], None
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=reply_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        elif chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
    end = time.perf_counter()
    decoded = usage.completion_tokens - 1  # tokens after the first
    return {"reply": "".join(parts), "ttft_s": (first or end) - start, "first_text_at": first, "end_at": end,
            "tokens_per_s": decoded / (end - first) if first and decoded > 0 and end > first else None,
            "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.prompt_tokens_details.cached_tokens,
            "completion_tokens": usage.completion_tokens}


def concurrently(server, count: int, work) -> float:
    """Run work(client, i) on `count` threads at once, each with its own client of `server`; the
    seconds it took. The first error of any thread is raised."""
    errors = []

    def run(i):
        try:
            work(server.client(), i)
        except Exception as error:  # raised below, in the main thread
            errors.append(error)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start
