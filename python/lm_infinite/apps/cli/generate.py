"""lminf generate: stream a continuation of a long prompt to stdout; with several prompt files,
continue them as one batch and print each continuation under its file's name."""

from __future__ import annotations

import sys

import torch

from lm_infinite.streaming import LambdaStream

from ..eval.corpus import read_text_file, read_text_stream
from ..eval.methods import lm_infinite_enabled
from .common import (add_input_limit_option, add_model_options, load, max_input_bytes, non_negative_int,
                     number_where, positive_int, settings_from)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="continue a long prompt with LM-Infinite, streaming to stdout",
        description="Feed the prompt in chunks (constant memory whatever its length) and print "
                    "the continuation as it is generated. Several prompt files (of any lengths) "
                    "run as one batch: each continuation is printed, labelled with its file, "
                    "once every sequence has stopped.")
    parser.add_argument("prompts", metavar="PROMPT_FILE", nargs="+",
                        help="text file with a prompt ('-' for stdin, at most once)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=temperature_option, default=0.0, help="0 for greedy (default)")
    parser.add_argument("--top-p", type=top_p_option, default=1.0,
                        help="with --temperature > 0, sample from the smallest set of tokens whose "
                             "probability reaches this (default 1: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="run each decode step through torch.compile (worth it on the CPU; on CUDA "
                             "every step is already a replayed CUDA graph)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                        help="on CUDA, run decode steps eagerly instead of replaying a captured graph")
    add_input_limit_option(parser)
    add_model_options(parser)
    parser.set_defaults(run=run)


temperature_option = number_where(lambda x: 0.0 <= x < float("inf"), "a finite number >= 0")
top_p_option = number_where(lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")


def read_prompt(name: str, max_bytes: int) -> str:
    if name == "-":
        text = read_text_stream(sys.stdin.buffer, "the prompt on stdin", max_bytes)
    else:
        text = read_text_file(name, "prompt file", max_bytes)
    if not text.strip():
        raise ValueError(f"the prompt in {name!r} is empty")
    return text


def run(args) -> int:
    if args.prompts.count("-") > 1:
        raise ValueError("'-' (stdin) can be given as a prompt file only once")
    texts = [read_prompt(name, max_input_bytes(args)) for name in args.prompts]
    model, tokenizer, _ = load(args)
    ids = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    with lm_infinite_enabled(model, settings_from(args)):
        stream = LambdaStream(model, chunk_size=args.chunk_size, cuda_graphs=args.cuda_graphs,
                              compile=args.compile)
        stream.feed(ids if len(ids) > 1 else ids[0])
        # On the model's device: the step draws its sampling noise there, with no host copy.
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        steps = stream.generate(args.max_new_tokens, stop_token_ids=stop,
                                temperature=args.temperature, top_p=args.top_p, generator=generator)
        if len(ids) > 1:
            return _print_batch(args.prompts, steps, tokenizer)
        tokens, printed = [], ""
        for token in steps:
            tokens.append(token)
            # Decode the whole continuation: a character may span several tokens.
            decoded = tokenizer.decode(tokens, skip_special_tokens=True)
            if decoded.startswith(printed):
                sys.stdout.write(decoded[len(printed):])
                sys.stdout.flush()
                printed = decoded
    sys.stdout.write("\n")
    return 0


def _print_batch(names: list[str], steps, tokenizer) -> int:
    """Collect each sequence's tokens (None once it has stopped) and print every continuation
    under a header naming its prompt file, in the order given."""
    tokens = [[] for _ in names]
    for step in steps:
        for sequence, token in zip(tokens, step):
            if token is not None:
                sequence.append(token)
    for index, (name, sequence) in enumerate(zip(names, tokens)):
        label = "stdin" if name == "-" else name
        sys.stdout.write(f"{'' if index == 0 else chr(10)}=== {label} ===\n")
        sys.stdout.write(tokenizer.decode(sequence, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    return 0
