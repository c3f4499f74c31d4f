"""End to end on one GPU: prefill tokens/s, decode ms/token and peak memory by context length.

Models: a Llama-3-8B-shaped model (GQA 32/8, random bfloat16 weights built on the device, no
download) and SmolLM2-135M (real weights). Contenders, batch 1, random token ids:
  stock-eager    stock transformers, DynamicCache, SDPA, eager decode steps;
  stock-compiled stock transformers, StaticCache, decode step through torch.compile;
  lm-infinite    LambdaStream: chunked prefill, decode steps replayed as CUDA graphs;
  floor          the bytes one decode step must read (weights + the Λ cache) over the copy
                 bandwidth measured in this run (bytes read + written per second by a large
                 device-to-device copy).
A contender that runs out of memory is reported as OOM; one that fails otherwise, with its
error. Writes a table (stdout), JSON and a PNG plot.

    python bench/e2e.py --json bench/results/e2e.json --plot bench/results/e2e.png            # on the GPU, ~8 minutes
    python bench/e2e.py --smoke                                   # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.eval.report import atomic_write, write_json
from lm_infinite.streaming import LambdaStream

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192),
                 tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def random_llama(config: dict, dtype: torch.dtype, device: torch.device):
    """Random weights made directly in `dtype` on `device` (an 8B model never exists in
    float32 or on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa"))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 5)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / sorted(times[1:])[2]


def floor_ms(model, context: int, bandwidth: float) -> float:
    """Milliseconds one LM-Infinite decode step needs at least: read every weight once and
    every K/V of the Λ window (n_global + n_local tokens, or the context if shorter)."""
    state, config = model._lm_infinite, model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    stored = min(context, state.n_global + state.n_local)
    cache = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * stored * element
    return (weights + cache) / bandwidth * 1e3


def stock_cache_gib(model, context: int) -> float:
    """What a stock cache holding every key and value of `context` tokens takes."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * context * element / 2**30


def lm_infinite_run(model, ids: torch.Tensor, new_tokens: int, chunk_size: int) -> dict:
    device, record = ids.device, {}
    with peak_memory(device, record):
        stream = LambdaStream(model, chunk_size=chunk_size)
        synchronize(device)
        start = time.perf_counter()
        stream.feed(ids)
        synchronize(device)
        record["prefill_tok_s"] = ids.shape[1] / (time.perf_counter() - start)
        next(stream.generate(2))  # builds and captures the step
        synchronize(device)
        start = time.perf_counter()
        for _ in stream.generate(new_tokens):
            pass
        synchronize(device)
        record["decode_ms"] = (time.perf_counter() - start) * 1e3 / new_tokens
    return record


def stock_run(model, ids: torch.Tensor, new_tokens: int, chunk_size: int, compiled: bool) -> dict:
    """The stock model: prefill in chunks into a DynamicCache (eager) or a StaticCache sized for
    the run (compiled), then greedy decode steps."""
    from transformers import DynamicCache, StaticCache

    device, record = ids.device, {}
    context = ids.shape[1]
    keyword = lminf_hf.cache_argument_name(model.model)
    with peak_memory(device, record), torch.inference_mode():
        if compiled:
            cache = StaticCache(config=model.config, max_cache_len=context + new_tokens + 2)
        else:
            cache = DynamicCache(config=model.config)

        def forward(tokens, start):
            positions = torch.arange(start, start + tokens.shape[1], device=device)[None]
            return model(input_ids=tokens, position_ids=positions, logits_to_keep=1, **{keyword: cache}).logits

        synchronize(device)
        begin = time.perf_counter()
        for start in range(0, context, chunk_size):
            logits = forward(ids[:, start:start + chunk_size], start)
        synchronize(device)
        record["prefill_tok_s"] = context / (time.perf_counter() - begin)
        step = torch.compile(forward, mode="reduce-overhead", fullgraph=False) if compiled else forward
        token = logits[:, -1].argmax(-1, keepdim=True)
        for i in range(2):  # warm-up (compilation, graph capture)
            token = step(token, context + i)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        begin = time.perf_counter()
        for i in range(new_tokens):
            token = step(token, context + 2 + i)[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        record["decode_ms"] = (time.perf_counter() - begin) * 1e3 / new_tokens
    return record


def attempt(run, *args) -> dict:
    try:
        return run(*args)
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as error:  # a baseline that fails is reported, not fatal to the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    lines = [f"{'model':<10} {'context':>8} {'contender':<15} {'prefill tok/s':>14} {'decode ms':>10} {'peak GiB':>9}"]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['model']:<10} {row['context']:>8} {row['contender']:<15} {row['error']}")
            continue
        prefill = f"{row['prefill_tok_s']:14.0f}" if "prefill_tok_s" in row else f"{'':>14}"
        peak = f"{row['peak_gib']:9.2f}" if "peak_gib" in row else f"{'':>9}"
        lines.append(f"{row['model']:<10} {row['context']:>8} {row['contender']:<15} {prefill} "
                     f"{row['decode_ms']:10.2f} {peak}")
    return "\n".join(lines)


def plot(path: str, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({row["model"] for row in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for axis, name in zip(axes[0], models):
        for contender in ("stock-eager", "stock-compiled", "lm-infinite", "floor"):
            points = [(r["context"], r["decode_ms"]) for r in rows
                      if r["model"] == name and r["contender"] == contender and "decode_ms" in r]
            if points:
                axis.plot(*zip(*points), marker="o", label=contender)
        axis.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode ms/token", title=name)
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, tiny contexts")
    parser.add_argument("--models", default="llama3-8b,smollm2")
    parser.add_argument("--contexts", default="4096,32768,131072,1048576")
    parser.add_argument("--stock-max-context", type=int, default=131072,
                        help="longest context the stock contenders are tried at (their cache grows with it)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--chunk-sizes", default="1024", help="prefill chunk sizes to measure (lm-infinite)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        builders = {"smoke": lambda: random_llama(SMOKE, dtype, device)}
        contexts, n_local = [16, 100], 32
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        from lm_infinite.models import load_model

        builders = {"llama3-8b": lambda: random_llama(LLAMA3_8B, dtype, device),
                    "smollm2": lambda: load_model(dtype=dtype, device=device)[0]}
        builders = {name: builders[name] for name in args.models.split(",")}
        contexts, n_local = [int(n) for n in args.contexts.split(",")], None
    chunk_sizes = [int(n) for n in args.chunk_sizes.split(",")]
    bandwidth = copy_bandwidth(device, 2**31 if device.type == "cuda" else 2**26)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    for name, build in builders.items():
        model = build()
        vocab = model.config.vocab_size
        for context in contexts:
            ids = torch.randint(0, vocab, (1, context), device=device)
            base = dict(model=name, context=context)
            if context > args.stock_max_context:
                note = f"not run: its KV cache alone would be {stock_cache_gib(model, context):.0f} GiB"
                rows += [{**base, "contender": c, "error": note} for c in ("stock-eager", "stock-compiled")]
            else:
                rows.append({**base, "contender": "stock-eager",
                             **attempt(stock_run, model, ids, args.new_tokens, chunk_sizes[0], False)})
                rows.append({**base, "contender": "stock-compiled",
                             **attempt(stock_run, model, ids, args.new_tokens, chunk_sizes[0], True)})
            lminf_hf.enable(model, n_local=n_local)
            for chunk_size in chunk_sizes:
                label = "lm-infinite" if len(chunk_sizes) == 1 else f"lm-inf/c{chunk_size}"
                rows.append({**base, "contender": label,
                             **attempt(lm_infinite_run, model, ids, args.new_tokens, chunk_size)})
            rows.append({**base, "contender": "floor", "decode_ms": floor_ms(model, context, bandwidth)})
            lminf_hf.disable(model)
            for row in rows[-(3 + len(chunk_sizes)):]:
                print(table([row]).splitlines()[1], flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))
    if args.json:
        write_json(args.json, dict(device=str(device), bandwidth_bytes_per_s=bandwidth, rows=rows))
    if args.plot:
        plot(args.plot, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
