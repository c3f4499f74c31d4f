"""What the benchmark scripts under bench/ share: dtype names, a process's RSS, and `lminf
serve` in a subprocess (with the synthetic user turns the server benchmarks send it).

httpx and openai (the `test` extra) are imported only by the server helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from .cli.common import DTYPES

__all__ = ["DTYPES", "MODEL_NAME", "Server", "rss_mib", "user_messages"]

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
    model (or None) and threads (or None)."""

    def __init__(self, args, max_conversations: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "lm_infinite.apps.cli", "serve", "--port", str(self.port),
                   "--model-name", MODEL_NAME, "--n-local", str(args.n_local),
                   "--max-conversations", str(max_conversations)] + (["--model", args.model] if args.model else [])
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
