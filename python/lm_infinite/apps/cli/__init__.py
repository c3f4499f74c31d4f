"""The `lminf` command line: ppl, passkey, generate, demo, serve."""

from __future__ import annotations

import argparse
import sys

from lm_infinite import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    # Imported here, inside main's handlers: they load transformers (seconds), and a Ctrl-C
    # during that must exit quietly like one during a run.
    from . import demo, generate, passkey, ppl, serve
    from .common import DefaultsHelpFormatter

    parser = argparse.ArgumentParser(
        prog="lminf", description="LM-Infinite: RoPE language models on texts far past their training length.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (demo, ppl, passkey, generate, serve):
        command.register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.formatter_class = DefaultsHelpFormatter  # every option's help shows its default
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lminf` console script; returns the exit status: 0, 1 for bad input
    (one line `lminf COMMAND: error: ...` on stderr, never a traceback), 2 for a usage error
    (argparse), 130 for Ctrl-C."""
    command = "?"
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as error:  # bad input: files, model, settings, text
        print(f"lminf {command}: error: {error}", file=sys.stderr)
        return 1
    except MemoryError as error:
        print(f"lminf {command}: error: out of memory: {error}", file=sys.stderr)
        return 1
