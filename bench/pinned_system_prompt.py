"""Does pinning the system prompt keep a fact it states, and what does it cost the chat?

20 conversations (SmolLM2-135M-Instruct on the CPU by default): a system message states a fact
(a name or a number), 4 x n_local tokens of chat follow (user turns and assistant replies of
pydoc text, different for each conversation), then the user asks for the fact. Each is read
three ways: the question right after the system message (the control: can the model answer at
all), and after the chat with the system message pinned (LambdaStream pinned_tokens, as
`lminf serve --pin-system-prompt` does) and without. Reported: correct greedy answers of each,
and the perplexity of the chat text with and without pinning. Pinning is worth being on by
default if it answers more questions and costs under 2% perplexity.

    python bench/pinned_system_prompt.py --json bench/results/pinned_system_prompt.json
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.bench_common import DTYPES
from lm_infinite.apps.eval.report import write_json
from lm_infinite.apps.server.pinning import system_prefix_length
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream

NAMES = ["Zephyrine", "Bartholomew", "Ingrid", "Oswaldo", "Marisol", "Thaddeus", "Lucinda", "Evander",
         "Philippa", "Casimir"]
FACTS = [  # (statement, question), with {} the fact
    ("The user's name is {}.", "What is my name?"),
    ("The password for the user's account is {}.", "What is the password for my account?"),
]


def conversations(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (system message, question, answer): names and four-digit numbers, alternately."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        answer = NAMES[i // 2 % len(NAMES)] if i % 2 == 0 else str(rng.randrange(1000, 10000))
        statement, question = FACTS[i % 2]
        system = f"You are a helpful assistant. Remember this fact: {statement.format(answer)}"
        out.append((system, question, answer))
    return out


def chat_turns(tokenizer, offset: int, n_tokens: int, words_per_message: int = 60) -> list[dict]:
    """User and assistant messages of pydoc text from word `offset` on, about n_tokens tokens."""
    from pydoc_data.topics import topics

    words = " ".join(topics[key] for key in sorted(topics)).split()
    turns, used, start = [], 0, offset
    while used < n_tokens:
        for role in ("user", "assistant"):
            text = " ".join(words[start % len(words):start % len(words) + words_per_message])
            start += words_per_message
            turns.append({"role": role, "content": text})
            used += len(tokenizer(text, add_special_tokens=False).input_ids) + 5  # the template's tokens
    return turns


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def answer(stream: LambdaStream, ids: list[int], tokenizer, chat: slice | None = None):
    """(greedy answer text, mean NLL over ids[chat] or None) of a stream reading ids."""
    nll = stream.nll(torch.tensor([ids]))[0]
    tokens = list(stream.generate(24, stop_token_ids=[tokenizer.eos_token_id]))
    mean = None if chat is None else nll[chat].double().mean().item()
    return tokenizer.decode(tokens, skip_special_tokens=True), mean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=20)
    parser.add_argument("--n-local", type=int, default=1024)
    parser.add_argument("--chat-windows", type=float, default=4.0, help="chat length in units of n_local")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--model", help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--json")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    lminf_hf.enable(model, n_local=args.n_local)
    rows, start = [], time.perf_counter()
    for index, (system, question, expected) in enumerate(conversations(args.conversations)):
        head = [{"role": "system", "content": system}]
        control_ids = prompt_ids(tokenizer, head + [{"role": "user", "content": question}])
        turns = chat_turns(tokenizer, offset=index * 5000, n_tokens=int(args.chat_windows * args.n_local))
        ids = prompt_ids(tokenizer, head + turns + [{"role": "user", "content": question}])
        pinned = system_prefix_length(tokenizer, head, ids, limit=10**6)
        # The chat text: after the system message, before the question's turn.
        rendered_chat = tokenizer.apply_chat_template(head + turns, tokenize=False)
        chat = slice(pinned, len(tokenizer(rendered_chat, add_special_tokens=False).input_ids))
        control, _ = answer(LambdaStream(model), control_ids, tokenizer)
        with_pin, nll_pinned = answer(LambdaStream(model, pinned_tokens=pinned), ids, tokenizer, chat)
        without, nll_plain = answer(LambdaStream(model), ids, tokenizer, chat)
        row = dict(expected=expected, prompt_tokens=len(ids), pinned_tokens=pinned,
                   chat_tokens=chat.stop - chat.start,
                   control=control, control_correct=expected.lower() in control.lower(),
                   pinned=with_pin, pinned_correct=expected.lower() in with_pin.lower(),
                   unpinned=without, unpinned_correct=expected.lower() in without.lower(),
                   chat_nll_pinned=nll_pinned, chat_nll_unpinned=nll_plain)
        rows.append(row)
        print(f"{index + 1:2}/{args.conversations}  {expected:>11}  control "
              f"{row['control_correct']!s:5}  pinned {row['pinned_correct']!s:5}  unpinned "
              f"{row['unpinned_correct']!s:5}  chat ppl {math.exp(nll_pinned):7.3f} / {math.exp(nll_plain):7.3f}"
              f"  {time.perf_counter() - start:6.0f} s", file=sys.stderr, flush=True)
    weights = [r["chat_tokens"] for r in rows]
    ppl = {mode: math.exp(sum(r[f"chat_nll_{mode}"] * w for r, w in zip(rows, weights)) / sum(weights))
           for mode in ("pinned", "unpinned")}
    correct = {mode: sum(r[f"{mode}_correct"] for r in rows) for mode in ("control", "pinned", "unpinned")}
    summary = dict(correct=correct, chat_ppl=ppl, ppl_cost=ppl["pinned"] / ppl["unpinned"] - 1,
                   pin_by_default=correct["pinned"] > correct["unpinned"]
                   and ppl["pinned"] / ppl["unpinned"] - 1 < 0.02)
    print(f"{'':>28} {'control':>8} {'pinned':>8} {'unpinned':>9}")
    print(f"{'correct answers of ' + str(len(rows)):>28} {correct['control']:>8} {correct['pinned']:>8} "
          f"{correct['unpinned']:>9}")
    print(f"{'chat perplexity':>28} {'':>8} {ppl['pinned']:8.3f} {ppl['unpinned']:9.3f}")
    print(f"pinning costs {100 * summary['ppl_cost']:+.2f}% chat perplexity; on by default: "
          f"{summary['pin_by_default']}")
    if args.json:
        write_json(args.json, dict(model=args.model or "SmolLM2-135M-Instruct", n_local=args.n_local,
                                   dtype=args.dtype, chat_windows=args.chat_windows,
                                   threads=torch.get_num_threads(), **summary, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
