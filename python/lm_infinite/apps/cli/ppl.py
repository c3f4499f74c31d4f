"""lminf ppl: perplexity over a long text for stock, truncated-window and LM-Infinite."""

from __future__ import annotations

import argparse
import math

from ..eval.corpus import check_text_file, default_corpus_tokens, file_tokens
from ..eval.methods import METHODS, TOP_K_METHOD
from ..eval.perplexity import bucket_perplexity, perplexity, perplexity_run
from ..eval.report import perplexity_table, plot_perplexity, write_json
from .common import (add_input_limit_option, add_model_options, add_top_k_options, check_output_paths,
                     load, max_input_bytes, positive_int, progress_bars, settings_from)


def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(METHODS)}, got {text!r}")
    return methods


def add_text_options(parser: argparse.ArgumentParser, default_tokens: int) -> None:
    parser.add_argument("--tokens", type=positive_int, default=default_tokens,
                        help="read the first TOKENS tokens of the text")
    parser.add_argument("--bucket", type=positive_int, default=2048, help="tokens per table row")
    parser.add_argument("--stock-max-tokens", type=positive_int, default=32768,
                        help="skip the stock model beyond this length (its cache grows with the text)")
    parser.add_argument("--json", metavar="PATH", help="write settings, per-token NLL and the table as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of NLL against position")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_input_limit_option(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ppl", help="perplexity over a long text: stock vs truncated window vs LM-Infinite",
        description="Per-token NLL over a long text (default: pydoc's topics, then the standard "
                    "library's sources; or the FILES given) for each method, as a table of "
                    "perplexity per position bucket, JSON and a plot.")
    parser.add_argument("files", nargs="*", metavar="FILE", help="text files to read instead of the default text")
    parser.add_argument("--methods", type=method_list, default=[m for m in METHODS if m != TOP_K_METHOD],
                        help=f"comma-separated subset of {','.join(METHODS)} ")
    parser.add_argument("--stride", type=positive_int, default=2048,
                        help="tokens scored per re-run of the truncated-window baseline")
    add_text_options(parser, default_tokens=16384)
    add_model_options(parser)
    add_top_k_options(parser)
    parser.set_defaults(run=run)


def text_tokens(args, tokenizer):
    if args.files:
        return file_tokens(args.files, tokenizer, max_input_bytes(args))[: args.tokens]
    return default_corpus_tokens(tokenizer, args.tokens)


def bucket_rows(nll, bucket_size: int) -> list[dict]:
    columns = {m: bucket_perplexity(values, bucket_size) for m, values in nll.items()}
    rows = []
    for i, (start, end, _) in enumerate(next(iter(columns.values()))):
        cells = {m: None if math.isnan(column[i][2]) else column[i][2] for m, column in columns.items()}
        rows.append({"start": start, "end": end, "perplexity": cells})
    return rows


def evaluate(args, methods, title: str) -> dict:
    """Shared by `ppl` and `demo`: run, print the table, write the JSON and the plot."""
    check_output_paths(args)
    for path in args.files:
        check_text_file(path, max_bytes=max_input_bytes(args))
    model, tokenizer, model_name = load(args)
    ids = text_tokens(args, tokenizer)
    settings = settings_from(args).resolved(model)
    if settings.n_local >= ids.numel():
        raise ValueError(f"--n-local ({settings.n_local}) must be smaller than the text "
                         f"({ids.numel()} tokens): nothing lies beyond the window")
    if "stock" in methods and ids.numel() > args.stock_max_tokens:
        print(f"skipping stock: {ids.numel()} tokens > --stock-max-tokens {args.stock_max_tokens}")
        methods = [m for m in methods if m != "stock"]
    result = perplexity_run(model, ids, methods=methods, settings=settings,
                            stride=getattr(args, "stride", 2048), chunk_size=args.chunk_size,
                            progress=progress_bars(not args.no_progress))
    nll = result["nll"]
    beyond = {m: perplexity(nll[m], settings.n_local) for m in methods}
    print(perplexity_table(nll, args.bucket))
    print(f"perplexity on tokens {settings.n_local}-{ids.numel()}: "
          + ", ".join(f"{m} {value:.2f}" for m, value in beyond.items()))
    summary = {"model": model_name, "n_tokens": ids.numel(), "settings": result["settings"],
               "perplexity_beyond_n_local": beyond,
               "buckets": bucket_rows(nll, args.bucket),
               # Strict JSON has no NaN: unscored tokens are null.
               "nll": {m: [None if math.isnan(x) else round(x, 4) for x in values.tolist()]
                       for m, values in nll.items()}}
    if args.json:
        write_json(args.json, summary)
    if args.plot:
        plot_perplexity(args.plot, nll, n_local=settings.n_local, title=title)
    return summary


def run(args) -> int:
    evaluate(args, args.methods, title=f"NLL by position ({args.model or 'SmolLM2-135M-Instruct'})")
    return 0
