"""lminf demo: the default model on 16K tokens of pydoc text, stock vs LM-Infinite, in minutes on a CPU."""

from __future__ import annotations

from .common import add_model_options
from .ppl import add_text_options, evaluate


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="stock vs LM-Infinite perplexity on 16K tokens of pydoc text (a few CPU minutes)",
        description="The stock model's perplexity explodes past its training length; LM-Infinite's "
                    "stays flat. Prints a table and writes lminf-demo.json and lminf-demo.png.")
    add_text_options(parser, default_tokens=16384)
    parser.set_defaults(files=[], json="lminf-demo.json", plot="lminf-demo.png", run=run)
    add_model_options(parser)


def run(args) -> int:
    evaluate(args, ["stock", "lm-infinite"], title="stock vs LM-Infinite on pydoc text")
    print(f"wrote {args.json} and {args.plot}")
    return 0
