"""lminf serve: an OpenAI-compatible server whose conversations never run out of context."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_options, int_at_least, load, non_negative_int, positive_int, settings_from

_DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Whether --pin-system-prompt is on by default: chosen by bench/pinned_system_prompt.py
# (docs/serving.md, "A system prompt that is never forgotten").
PIN_BY_DEFAULT = True


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the model over the OpenAI API; conversations continue in constant memory",
        description="An OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health). Each conversation's LambdaStream is kept, so a request "
                    "that repeats the history feeds only its new tokens, however long the chat.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int_at_least(1), default=8000, help="TCP port")
    parser.add_argument("--max-conversations", type=non_negative_int, default=8,
                        help="conversations kept in memory for reuse, idle and in flight together (at "
                             "most the larger of this and --max-active), least recently used idle ones "
                             "evicted (each holds one fixed LambdaCache; 0: none; with --state-dir an "
                             "evicted one is still found on disk) (default: %(default)s)")
    parser.add_argument("--max-tokens-limit", type=positive_int, default=2048,
                        help="the largest max_tokens a request may ask for, and the default "
                             "(default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=positive_int,
                        help="refuse longer prompts (default: no limit; a kept conversation "
                             "only feeds its new tokens)")
    parser.add_argument("--max-active", type=positive_int, default=8,
                        help="requests computed at once; more wait in a queue")
    parser.add_argument("--max-queued", type=non_negative_int, default=64,
                        help="requests waiting for a slot before more are refused with 429")
    parser.add_argument("--max-request-mb", type=positive_int, default=4,
                        help="refuse request bodies over this many MiB with 413 (default: %(default)s)")
    parser.add_argument("--batch-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps of all requests in progress as one forward (continuous "
                             "batching); --no-batch-decode steps each request alone (default: on for a "
                             "model on the CPU, off on a GPU, where each request's step replays a CUDA graph)")
    parser.add_argument("--state-dir", type=Path,
                        help="keep conversations in this directory too: each is written after every "
                             "request (a crash loses at most the turn in progress) and found again "
                             "after a restart or once evicted from memory (default: none, memory only)")
    parser.add_argument("--max-state-mb", type=positive_int, default=4096,
                        help="disk the --state-dir files may take, in MiB; the least recently written "
                             "are removed first (default: %(default)s)")
    parser.add_argument("--pin-system-prompt", action=argparse.BooleanOptionalAction, default=PIN_BY_DEFAULT,
                        help="keep each chat's system message visible for the conversation's whole life, "
                             "as global tokens (up to --max-pinned-tokens of it); --no-pin-system-prompt: "
                             "only the first --n-global tokens of a conversation stay visible past the window")
    parser.add_argument("--max-pinned-tokens", type=positive_int, default=1024,
                        help="the most tokens of a system message pinned; each adds one key and value "
                             "per layer to the conversation's cache (default: %(default)s)")
    parser.add_argument("--model-name", help="the model id clients use (default: the model's "
                                             "directory or file name)")
    add_model_options(parser)
    # A prompt is fed one chunk per scheduling step: smaller chunks than the batch commands'
    # let the other clients' tokens through sooner.
    parser.set_defaults(run=run, chunk_size=512)


def run(args) -> int:
    try:
        import uvicorn

        from ..server import Engine, create_app
        from ..server.worker import plan_malloc
    except ImportError as error:
        # --no-build-isolation: without it pip would rebuild the extension in an isolated
        # environment that has no torch, and fail (a checkout: pip install --no-build-isolation -e '.[serve]').
        print(f"lminf serve: error: {error.name} is missing: pip install --no-build-isolation 'lm-infinite[serve]'",
              file=sys.stderr)
        return 1
    from lm_infinite.hf import enable

    plan_malloc()  # before any thread allocates: the model's load starts torch's threads
    model, tokenizer, _ = load(args)
    settings = settings_from(args)
    enable(model, n_global=settings.n_global, n_local=settings.n_local, distance_cap=settings.distance_cap)
    engine = Engine(model, tokenizer, chunk_size=args.chunk_size, max_conversations=args.max_conversations,
                    max_prompt_tokens=args.max_prompt_tokens, max_active=args.max_active,
                    max_queued=args.max_queued, state_dir=args.state_dir,
                    max_state_bytes=args.max_state_mb * 2**20, batch_decode=args.batch_decode,
                    max_pinned_tokens=args.max_pinned_tokens if args.pin_system_prompt else 0)
    name = args.model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else _DEFAULT_MODEL_NAME)
    uvicorn.run(create_app(engine, model_name=name, max_tokens_limit=args.max_tokens_limit,
                           max_request_bytes=args.max_request_mb * 2**20),
                host=args.host, port=args.port, log_level="info")
    return 0
