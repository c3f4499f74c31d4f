"""lminf passkey: the paper's passkey retrieval for stock, truncated-window and LM-Infinite."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from ..eval.methods import METHODS
from ..eval.passkey import passkey_run
from ..eval.report import passkey_table, plot_passkey, write_json
from .common import (add_input_limit_option, add_model_options, add_top_k_options, check_output_paths,
                     int_list, load, max_input_bytes, positive_int, settings_from)
from .ppl import method_list


def depth_list(text: str) -> list[float]:
    try:
        depths = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return depths


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "passkey", help="passkey retrieval by prompt length and depth",
        description="A pass key hidden at a given depth of filler text; greedy decoding, scored "
                    "on the first integer of the answer.")
    parser.add_argument("--lengths", type=int_list, default=[4096, 8192, 16384],
                        help="prompt lengths in tokens")
    parser.add_argument("--depths", type=depth_list, default=[0.0, 0.5, 1.0],
                        help="needle depths in [0, 1]")
    parser.add_argument("--trials", type=positive_int, default=1, help="random keys per length and depth")
    parser.add_argument("--methods", type=method_list, default=list(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} ")
    parser.add_argument("--max-new-tokens", type=positive_int, default=8, help="answer tokens generated")
    parser.add_argument("--seed", type=int, default=0, help="of the random keys")
    parser.add_argument("--json", metavar="PATH", help="write every trial as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of accuracy against length")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_input_limit_option(parser)
    add_model_options(parser)
    add_top_k_options(parser)
    parser.set_defaults(run=run)


# Bytes of input text a prompt token stands for, against --max-input-mb.
_TEXT_BYTES_PER_TOKEN = 4


def check_lengths_fit(lengths: list[int], max_bytes: int) -> None:
    """Refuse, before the model loads, a prompt longer than the input limit allows: the
    prompt's text and token ids are held whole while it is built."""
    longest = max(lengths)
    if longest * _TEXT_BYTES_PER_TOKEN > max_bytes:
        raise ValueError(f"--lengths: a {longest}-token prompt is over the input limit of "
                         f"{max_bytes // _TEXT_BYTES_PER_TOKEN} tokens (--max-input-mb "
                         f"{max_bytes // 2**20}, {_TEXT_BYTES_PER_TOKEN} bytes a token)")


def run(args) -> int:
    check_output_paths(args)
    check_lengths_fit(args.lengths, max_input_bytes(args))
    model, tokenizer, model_name = load(args)
    total = len(args.lengths) * len(args.depths) * args.trials * len(args.methods)
    with tqdm(total=total, desc="passkey", unit="trial", disable=args.no_progress) as bar:
        records = passkey_run(model, tokenizer, lengths=args.lengths, depths=args.depths,
                              trials=args.trials, methods=args.methods, settings=settings_from(args),
                              max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
                              seed=args.seed, progress=lambda: bar.update(1))
    print(passkey_table(records))
    settings = vars(settings_from(args).resolved(model))
    if args.json:
        write_json(args.json, {"model": model_name, "settings": settings, "trials": records})
    if args.plot:
        plot_passkey(args.plot, records, title=f"passkey retrieval ({model_name})")
    return 0
