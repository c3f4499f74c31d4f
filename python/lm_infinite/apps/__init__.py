"""Applications built on the lm_infinite library: the `lminf` command line (cli), its
OpenAI-compatible server (server), the perplexity and passkey evaluation (eval) and what the
benchmark scripts under bench/ share (bench_common).

They use the library only through its public names (lm_infinite, lm_infinite.hf,
lm_infinite.ops, lm_infinite.streaming, lm_infinite.models, ...), and the library never
imports them (tests/test_layout.py checks both)."""
