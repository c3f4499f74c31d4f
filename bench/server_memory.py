"""`lminf serve` memory over many users: RSS after its first 8 conversations, after 50
concurrent requests, and after 30 five-turn conversations (issue 25's bar: the last two
within 10% of the first). Before the fix, each conversation the server had dropped stayed in
memory (a reference cycle) and nothing bounded the conversations in flight: 23 GB after 50
concurrent requests.

    python bench/server_memory.py --json bench/results/server_memory.json
"""

from __future__ import annotations

import argparse
import sys

from lm_infinite.apps.bench_common import MODEL_NAME, Server, concurrently, rss_mib, user_messages
from lm_infinite.apps.eval.report import write_json


def conversation(client, turns: int, messages_text: list[str], reply_tokens: int) -> None:
    messages = []
    for text in messages_text[:turns]:
        messages.append({"role": "user", "content": text})
        answer = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=reply_tokens,
                                                temperature=0)
        messages.append({"role": "assistant", "content": answer.choices[0].message.content})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--n-local", type=int, default=2048)
    parser.add_argument("--user-chars", type=int, default=200)
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json")
    args = parser.parse_args()
    texts = user_messages(400, args.user_chars)
    phases = []
    with Server(args, max_conversations=8) as server:
        pid = server.process.pid

        def record(name: str, seconds: float) -> None:
            phases.append({"phase": name, "rss_mib": round(rss_mib(pid), 1), "seconds": round(seconds, 1)})
            print(f"{name}: RSS {phases[-1]['rss_mib']:.0f} MiB ({seconds:.0f} s)", flush=True)

        record("started", 0.0)
        record("8 conversations of 1 turn", concurrently(
            server, 1, lambda c, _: [conversation(c, 1, texts[k:], args.reply_tokens) for k in range(8)]))
        record("50 concurrent requests", concurrently(
            server, 50, lambda c, i: conversation(c, 1, texts[100 + i:], args.reply_tokens)))
        record("30 five-turn conversations", concurrently(
            server, 6, lambda c, i: [conversation(c, 5, texts[200 + 5 * (i * 5 + k):], args.reply_tokens)
                                     for k in range(5)]))
        health = server.client()._client.get(f"{server.url}/health").json()
    base = phases[1]["rss_mib"]
    ratios = {p["phase"]: p["rss_mib"] / base for p in phases[2:]}
    ok = all(r <= 1 + args.tolerance for r in ratios.values())
    for name, ratio in ratios.items():
        print(f"{name}: RSS / RSS after the first 8 conversations = {ratio:.3f}")
    if args.json:
        write_json(args.json, {"n_local": args.n_local, "phases": phases, "ratios": ratios, "health": health,
                               "tolerance": args.tolerance, "passed": ok})
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
