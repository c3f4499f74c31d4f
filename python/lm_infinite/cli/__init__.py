"""The `lminf` command line: ppl, passkey, generate, demo, serve."""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from . import demo, generate, passkey, ppl, serve

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lminf", description="LM-Infinite: RoPE language models on texts far past their training length.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, ppl, passkey, generate, serve):
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lminf` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (OSError, ValueError) as error:  # bad input: files, model, settings, text
        print(f"lminf {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
