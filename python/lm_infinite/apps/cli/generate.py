"""lminf generate: stream a continuation of a long prompt to stdout; with several prompt files,
continue them as one batch and print each continuation under its file's name."""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from lm_infinite.distributed import is_main_process
from lm_infinite.hf import decoder_of
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
    parser.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to generate at most")
    parser.add_argument("--temperature", type=temperature_option, default=0.0, help="0 for greedy")
    parser.add_argument("--top-p", type=top_p_option, default=1.0,
                        help="with --temperature > 0, sample from the smallest set of tokens whose "
                             "probability reaches this (1: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="of the sampler")
    parser.add_argument("--compile", action="store_true",
                        help="run each decode step through torch.compile (worth it on the CPU; on CUDA "
                             "every step is already a replayed CUDA graph)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                        help="on CUDA, run decode steps eagerly instead of replaying a captured graph")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar while the prompt is read (the speeds are still printed "
                             "on stderr at the end)")
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
    prompt_tokens = sum(len(sequence) for sequence in ids)
    with lm_infinite_enabled(model, settings_from(args)):
        stream = LambdaStream(model, chunk_size=args.chunk_size, cuda_graphs=args.cuda_graphs,
                              compile=args.compile)
        start = time.perf_counter()
        with prompt_progress(model, prompt_tokens, enabled=not args.no_progress and is_main_process()):
            stream.feed(ids if len(ids) > 1 else ids[0])
        prompt_seconds = time.perf_counter() - start
        # On the model's device: the step draws its sampling noise there, with no host copy.
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        steps = counted(stream.generate(args.max_new_tokens, stop_token_ids=stop, temperature=args.temperature,
                                        top_p=args.top_p, generator=generator))
        start = time.perf_counter()
        if len(ids) > 1:
            _print_batch(args.prompts, steps, tokenizer)
        else:
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
            sys.stdout.flush()
        decode_seconds = time.perf_counter() - start
    if is_main_process():
        decoded = f"{steps.count} tokens" if len(ids) == 1 else f"{steps.count} steps of a batch of {len(ids)}"
        print(f"prompt: {prompt_tokens} tokens in {prompt_seconds:.1f} s ({rate(prompt_tokens, prompt_seconds)} "
              f"tokens/s); decode: {decoded} in {decode_seconds:.1f} s ({rate(steps.count, decode_seconds)} "
              f"{'tokens' if len(ids) == 1 else 'steps'}/s)", file=sys.stderr, flush=True)
    return 0


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds > 0 else "-"


class counted:
    """An iterator passed through, counting the items it yields (decode steps)."""

    def __init__(self, items) -> None:
        self.items, self.count = iter(items), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.items)
        self.count += 1
        return item


@contextlib.contextmanager
def prompt_progress(model, total: int, enabled: bool):
    """A tqdm bar on stderr (tokens/s) over the prompt while the stream reads it: each forward
    of the decoder, once done, advances it by the tokens of its chunk (padding of a padded
    batch counted as read once the bar is full)."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc="reading the prompt", unit="tok", file=sys.stderr, dynamic_ncols=True)

    def advance(module, args, kwargs, output):
        chunk = kwargs.get("input_ids", args[0] if args else None)
        if chunk is not None:
            bar.update(min(chunk.numel(), total - bar.n))

    hook = decoder_of(model).register_forward_hook(advance, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        bar.close()


def _print_batch(names: list[str], steps, tokenizer) -> None:
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
