"""`lminf serve` with 1, 4 and 8 concurrent clients, and a short chat while a long prompt is read.

Starts the server (SmolLM2-135M-Instruct on the CPU by default, continuous batching on, no
conversation kept, so that every request starts fresh) and sends 8 short chats, each a
different question asking for a greedy reply of up to --reply-tokens tokens:
- one at a time (1 client): each reply is the reference for its chat, and the tokens/s;
- 4 and then 8 at once: aggregate decoding tokens/s (the tokens after each reply's first, from
  the first reply's first token to the last reply's end; one client: the sum over its runs) and
  end to end (all tokens over the wall time, prompts included) against one client's, and every
  reply equal to its chat's alone (the batched decode step must not change a greedy token).
Then the time to first token of a short chat, idle and while a --long-tokens prompt is being
read: the server reads a prompt in chunks of 512 tokens between the others' steps, so the short
chat should wait about one chunk, not the whole prompt (bar: within 2x its idle time plus one
chunk's time).

    python bench/server_concurrency.py --json bench/results/server_concurrency.json \\
        --plot bench/results/server_concurrency.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import threading
import time

from lm_infinite.apps.bench_common import Server, concurrently, timed_turn, user_messages
from lm_infinite.apps.eval.report import atomic_write, write_json

SERVER_CHUNK = 512  # lminf serve's --chunk-size default


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a concise assistant."},
             {"role": "user", "content": text}] for text in user_messages(n, 120)]


def concurrent(server: Server, conversations: list[list[dict]], reply_tokens: int) -> dict:
    """All conversations at once, one client (thread) each: replies, tokens, wall time."""
    results = [None] * len(conversations)

    def ask(client, i: int) -> None:
        results[i] = timed_turn(client, conversations[i], reply_tokens)

    wall = concurrently(server, len(conversations), ask)
    tokens = sum(r["completion_tokens"] for r in results)
    # Decoding: the tokens after each reply's first, from the first reply's first token to the
    # last reply's end (the prompts' reading left out, as far as it does not overlap).
    decoded = sum(r["completion_tokens"] - 1 for r in results)
    decoding_s = max(r["end_at"] for r in results) - min(r["first_text_at"] for r in results)
    return dict(replies=[r["reply"] for r in results], completion_tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, decoded_tokens=decoded, decoding_s=decoding_s)


def time_to_first_token(server: Server, messages: list[dict], repeats: int = 3) -> float:
    client = server.client()
    return statistics.median(timed_turn(client, messages, 2)["ttft_s"] for _ in range(repeats))


def long_prompt(n_tokens: int) -> str:
    """About n_tokens tokens of pydoc text (SmolLM2 reads ~4 characters a token)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[key] for key in sorted(topics))
    return (text * (4 * n_tokens // len(text) + 1))[:4 * n_tokens]


def ttft_while_reading(server: Server, messages: list[dict], long_tokens: int) -> dict:
    """The short chat's time to first token while a long prompt is read; the long prompt's
    own reading time, and its chunks' mean time."""
    long = {}

    def read_long() -> None:
        start = time.perf_counter()
        response = server.client().completions.create(model="bench-model", prompt=long_prompt(long_tokens),
                                                      max_tokens=1, temperature=0)
        long.update(seconds=time.perf_counter() - start, prompt_tokens=response.usage.prompt_tokens)

    reader = threading.Thread(target=read_long)
    reader.start()
    time.sleep(10)  # well into the long prompt: its request parsed, some chunks read
    ttft = timed_turn(server.client(), messages, 2)["ttft_s"]
    reader.join()
    chunks = math.ceil(long["prompt_tokens"] / SERVER_CHUNK)
    return dict(ttft_s=ttft, long_prompt_tokens=long["prompt_tokens"], long_prompt_s=long["seconds"],
                chunk_s=long["seconds"] / chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--n-local", type=int, default=2048)
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=65536)
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    conversations = chats(8)
    with Server(args, max_conversations=0, options=("--max-active", "8")) as server:
        alone = [concurrent(server, [c], args.reply_tokens) for c in conversations]
        one = dict(replies=[a["replies"][0] for a in alone])
        for total in ("completion_tokens", "wall_s", "decoded_tokens", "decoding_s"):
            one[total] = sum(a[total] for a in alone)
        one["tokens_per_s"] = one["completion_tokens"] / one["wall_s"]
        rows = {1: one}
        for clients in (4, 8):
            rows[clients] = concurrent(server, conversations[:clients], args.reply_tokens)
        for clients, row in rows.items():
            row["decode_tokens_per_s"] = row["decoded_tokens"] / row["decoding_s"]
            row["speedup"] = row["tokens_per_s"] / one["tokens_per_s"]
            row["decode_speedup"] = row["decode_tokens_per_s"] / (one["decoded_tokens"] / one["decoding_s"])
            row["replies_equal_alone"] = row["replies"] == one["replies"][:len(row["replies"])]
            print(f"{clients} client(s): {row['completion_tokens']:4} tokens in {row['wall_s']:6.1f} s = "
                  f"{row['tokens_per_s']:6.1f} tok/s ({row['speedup']:.2f}x one client); decoding "
                  f"{row['decode_tokens_per_s']:6.1f} tok/s ({row['decode_speedup']:.2f}x); replies equal to "
                  f"each chat alone: {row['replies_equal_alone']}", flush=True)
        idle = time_to_first_token(server, conversations[0])
        busy = ttft_while_reading(server, conversations[0], args.long_tokens)
    bar = 2 * idle + busy["chunk_s"]
    ttft = dict(idle_s=idle, **busy, bar_s=bar, within_bar=busy["ttft_s"] <= bar)
    print(f"time to first token of a short chat: idle {idle:.2f} s; while a {busy['long_prompt_tokens']}-token "
          f"prompt is read ({busy['long_prompt_s']:.0f} s, {busy['chunk_s']:.2f} s a chunk of {SERVER_CHUNK}) "
          f"{busy['ttft_s']:.2f} s; bar 2 x idle + one chunk = {bar:.2f} s: {'met' if ttft['within_bar'] else 'MISSED'}")
    summary = dict(speedup_8=rows[8]["speedup"], decode_speedup_8=rows[8]["decode_speedup"], replies_equal=all(r["replies_equal_alone"] for r in rows.values()),
                   ttft_within_bar=ttft["within_bar"])
    if args.json:
        write_json(args.json, dict(n_local=args.n_local, reply_tokens=args.reply_tokens, **summary,
                                   clients={str(k): {n: v for n, v in r.items() if n != "replies"}
                                            for k, r in rows.items()},
                                   ttft=ttft))
    if args.plot:
        plot(args.plot, rows, ttft)
    return 0


def plot(path: str, rows: dict, ttft: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, wait) = plt.subplots(1, 2, figsize=(9, 3.6))
    clients = list(rows)
    speed.plot(clients, [rows[c]["decode_tokens_per_s"] for c in clients], "o-", label="decoding")
    speed.plot(clients, [rows[c]["tokens_per_s"] for c in clients], "s-", label="end to end (prompts included)")
    speed.set(xlabel="concurrent clients", ylabel="aggregate tokens/s", xticks=clients, ylim=(0, None),
              title="Concurrent chats, SmolLM2 on the CPU")
    speed.legend()
    labels = ["idle", f"while a {ttft['long_prompt_tokens'] // 1024}K\nprompt is read", "bar"]
    wait.bar(labels, [ttft["idle_s"], ttft["ttft_s"], ttft["bar_s"]], color=["C0", "C1", "lightgray"])
    wait.set(ylabel="time to first token (s)", title="A short chat's wait")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
