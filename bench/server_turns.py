"""A 200-turn chat with `lminf serve` on the CPU: time to first token, tokens/s and RSS per turn.

Starts the server (SmolLM2-135M-Instruct by default) on a free local port and holds a
synthetic conversation with it through the official openai client: each turn sends the whole
history (the API is stateless) plus a new user message of pydoc text, and streams a greedy
reply. The server continues the conversation's stream, feeding only the new tokens, so time
to first token and tokens/s should stay flat however long the history, and so should its RSS.

The baseline is the same server with --max-conversations 0: it re-reads the whole history
every turn, as a server without reuse does. It replays the very requests of the first run
(same histories, replies included) at every --baseline-every'th turn.

The default --n-local 512 (SmolLM2 was trained at 8192) makes the history pass 3 x n_local
within ~50 turns and keeps the run near 10 minutes on 2 idle cores; the window's size changes the
cost of each token, not the shape of the curves.

    python bench/server_turns.py --json bench/results/server_turns.json --plot bench/results/server_turns.png
"""

from __future__ import annotations

import argparse
import statistics
import sys

from lm_infinite.apps.bench_common import Server, rss_mib, timed_turn, user_messages
from lm_infinite.apps.eval.report import atomic_write, write_json


def window_median(rows: list[dict], key: str, first: int, last: int) -> float:
    values = [r[key] for r in rows if first <= r["turn"] <= last and r[key] is not None]
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--n-local", type=int, default=512)
    parser.add_argument("--user-chars", type=int, default=60, help="characters of pydoc text per user turn")
    parser.add_argument("--reply-tokens", type=int, default=8, help="max_tokens of each reply")
    parser.add_argument("--baseline-every", type=int, default=20, help="stateless baseline on every k-th turn")
    parser.add_argument("--tolerance", type=float, default=0.20, help="allowed change, turns 10-19 to the last 10")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's); on a "
                        "shared machine, 1 thread pinned to an otherwise idle core (taskset) times steadiest")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    print(f"n_local = {args.n_local} (reduced from SmolLM2's 8192 to fit ~10 min on the CPU); "
          f"{args.turns} turns, replies of up to {args.reply_tokens} tokens", flush=True)

    rows, histories = [], []
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    with Server(args, max_conversations=4) as server:
        client = server.client()
        for turn, text in enumerate(user_messages(args.turns, args.user_chars), start=1):
            messages.append({"role": "user", "content": text})
            histories.append(list(messages))
            result = timed_turn(client, messages, args.reply_tokens)
            messages.append({"role": "assistant", "content": result.pop("reply")})
            rows.append({"turn": turn, **result, "rss_mib": round(rss_mib(server.process.pid), 1)})
            if turn % 10 == 0 or turn == 1:
                r = rows[-1]
                print(f"turn {turn:>4}  history {r['prompt_tokens']:>6} tokens  cached {r['cached_tokens']:>6}  "
                      f"TTFT {r['ttft_s']:6.3f} s  {r['tokens_per_s'] or float('nan'):6.1f} tok/s  "
                      f"RSS {r['rss_mib']:7.1f} MiB", flush=True)

    baseline_turns = [1] + list(range(args.baseline_every, args.turns + 1, args.baseline_every))
    baseline = {}
    with Server(args, max_conversations=0) as server:
        client = server.client()
        for turn in baseline_turns:
            result = timed_turn(client, histories[turn - 1], args.reply_tokens)
            baseline[turn] = {"ttft_s": result["ttft_s"], "tokens_per_s": result["tokens_per_s"],
                              "rss_mib": round(rss_mib(server.process.pid), 1)}
            print(f"stateless turn {turn:>4}  TTFT {result['ttft_s']:7.3f} s", flush=True)

    last = args.turns
    summary = {key: {"turns_10_19": window_median(rows, key, 10, 19),
                     f"turns_{last - 9}_{last}": window_median(rows, key, last - 9, last)}
               for key in ("ttft_s", "tokens_per_s", "rss_mib")}
    for key, medians in summary.items():
        early, late = medians.values()
        medians["change"] = late / early - 1
    flat = all(abs(m["change"]) <= args.tolerance for m in summary.values())
    reused = sum(r["cached_tokens"] for r in rows[1:]) / sum(r["prompt_tokens"] for r in rows[1:])

    print()
    print(table(rows, baseline, baseline_turns))
    print()
    for key, m in summary.items():
        early, late, change = m.values()
        print(f"{key:>13}: median turns 10-19 {early:8.3f}, turns {last - 9}-{last} {late:8.3f} ({change:+.1%})")
    print(f"prompt tokens reused after turn 1: {reused:.1%}; history at the last turn: "
          f"{rows[-1]['prompt_tokens']} tokens = {rows[-1]['prompt_tokens'] / args.n_local:.1f} x n_local")
    print(f"flat within {args.tolerance:.0%} from turn 10 to turn {last}: {'yes' if flat else 'NO'}")

    result = {"n_local": args.n_local, "turns": args.turns, "reply_tokens": args.reply_tokens,
              "user_chars": args.user_chars, "summary": summary, "flat": flat, "reused_fraction": reused,
              "rows": rows, "stateless_baseline": [{"turn": t, **baseline[t]} for t in baseline_turns]}
    if args.json:
        write_json(args.json, result)
    if args.plot:
        plot(args.plot, rows, baseline, args.n_local)
    return 0 if flat else 1


def table(rows: list[dict], baseline: dict, turns: list[int]) -> str:
    header = (f"{'turn':>5} {'history':>8} {'cached':>7} {'TTFT s':>7} {'stateless':>10} "
              f"{'tok/s':>6} {'stateless':>10} {'RSS MiB':>8}")
    lines = [header, "-" * len(header)]
    for turn in turns:
        r, b = rows[turn - 1], baseline[turn]
        lines.append(f"{turn:>5} {r['prompt_tokens']:>8} {r['cached_tokens']:>7} {r['ttft_s']:>7.3f} "
                     f"{b['ttft_s']:>10.3f} {r['tokens_per_s'] or float('nan'):>6.1f} "
                     f"{b['tokens_per_s'] or float('nan'):>10.1f} {r['rss_mib']:>8.1f}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict], baseline: dict, n_local: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [r["turn"] for r in rows]
    figure, (ttft, speed, memory) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ttft.plot(turns, [r["ttft_s"] for r in rows], ".", markersize=3, label="lminf serve (conversation kept)")
    ttft.plot(list(baseline), [b["ttft_s"] for b in baseline.values()], "o-", label="stateless (re-reads the history)")
    ttft.set(ylabel="time to first token (s)", yscale="log",
             title=f"A {len(rows)}-turn chat, SmolLM2 on the CPU, n_local = {n_local}")
    ttft.legend()
    speed.plot(turns, [r["tokens_per_s"] for r in rows], ".", markersize=3, label="lminf serve")
    speed.plot(list(baseline), [b["tokens_per_s"] for b in baseline.values()], "o-", label="stateless")
    speed.set(ylabel="decode tokens/s", ylim=(0, None))
    memory.plot(turns, [r["rss_mib"] for r in rows], ".-", markersize=3, label="lminf serve")
    memory.set(xlabel="turn", ylabel="server RSS (MiB)", ylim=(0, None))
    window_turn = next((r["turn"] for r in rows if r["prompt_tokens"] > 3 * n_local), None)
    for axes in (ttft, speed, memory):
        if window_turn:
            axes.axvline(window_turn, color="gray", linestyle="--", linewidth=1)
    memory.text(window_turn or 0, 0, " history > 3 x n_local", color="gray", va="bottom")
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
