"""Decode tokens/s of vLLM with the LM-Infinite plugin against stock vLLM, same run, same engine
settings (SmolLM2-135M-Instruct, float32, CPU by default):

- at a context inside the window (n_local / 2 tokens): the plugin's overhead over stock vLLM's
  own CPU attention (goal: >= 0.8x);
- at 4 x n_local tokens: the plugin attends to n_global + n_local keys whatever the context; stock
  vLLM first refuses a max_model_len past the model's training length (its error is recorded),
  then, allowed with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, attends to every key (and runs its rotary
  table past the training length, where the model degrades).

Each measurement: `batch` requests of the same context length, greedy, `new` tokens each; the
engine is stepped by hand and decode tokens/s is the tokens generated after each request's
first, over the time from the first decode step to the last (prefill excluded, reported apart).
Median of `repeats` runs.

  python bench/vllm_throughput.py                      # n_local 2048: contexts 1024 and 8192
  python bench/vllm_throughput.py --n-local 512 --new 32 --repeats 1   # a quick look
Writes --out/vllm_throughput.json, .md (the table) and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vllm_plugin"))
from vllm_helpers import ENGINE_ENV, long_text, model_dir  # noqa: E402


def measure(llm, prompts, new: int, repeats: int) -> dict:
    from vllm import SamplingParams, TokensPrompt

    engine = llm.llm_engine
    decode_rates, prefill_s = [], []
    for run in range(repeats):
        params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{run}-{i}", TokensPrompt(prompt_token_ids=p), params)
        first_decode, prefill, step_times = None, None, []
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            if first_decode is None and outputs and all(len(o.outputs[0].token_ids) >= 1 for o in outputs) \
                    and len(outputs) == len(prompts):
                first_decode, prefill = now, now - start
            elif first_decode is not None:
                step_times.append(now)
        decode_rates.append(len(prompts) * (new - 1) / (step_times[-1] - first_decode))
        prefill_s.append(prefill)
    return dict(decode_tokens_per_s=statistics.median(decode_rates), prefill_s=statistics.median(prefill_s),
                runs=decode_rates)


def engine(path, lminf: bool, args, max_model_len: int):
    from vllm import LLM

    import lm_infinite.vllm as lv

    kw = dict(model=path, dtype="float32", enforce_eager=not args.compile, block_size=args.block_size,
              max_model_len=max_model_len, max_num_seqs=max(args.batches), seed=0,
              max_num_batched_tokens=args.chunk,
              # Off for both: each repeat reads its prompt again (the plugin never reuses a prefix)
              enable_prefix_caching=False)
    if lminf:
        kw["hf_overrides"] = lv.hf_overrides(path, n_global=args.n_global, n_local=args.n_local)
    return LLM(**kw)


def stock_refusal(path, args, max_model_len: int) -> str | None:
    """Stock vLLM's answer to a max_model_len past the training length, without the override."""
    import subprocess

    code = ("from vllm import LLM\n"
            f"LLM(model={path!r}, dtype='float32', enforce_eager=True, max_model_len={max_model_len})\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ALLOW_LONG_MAX_MODEL_LEN"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode == 0:
        return None
    lines = [line for line in result.stderr.splitlines() if "max_model_len" in line or "Error" in line]
    return lines[0].strip()[:400] if lines else result.stderr[-400:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-global", type=int, default=10)
    parser.add_argument("--n-local", type=int, default=2048)
    parser.add_argument("--new", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4],
                        help="concurrent requests (the 4 x n_local context runs the first only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens")
    parser.add_argument("--compile", action="store_true", help="torch.compile (default: eager)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    for name, value in ENGINE_ENV.items():
        os.environ.setdefault(name, value)
    path = str(model_dir())
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(path).encode(long_text())
    inside, far = args.n_local // 2, 4 * args.n_local
    rows = []

    def prompts(n: int, batch: int):
        return [tokens[7919 * i: 7919 * i + n] for i in range(batch)]

    max_len = far + args.new + 16
    for lminf in (True, False):
        llm = engine(path, lminf, args, max_len)
        try:
            measure(llm, prompts(64, max(args.batches)), 8, 1)  # warm up (first steps are slow)
            for context, batches in ((inside, args.batches), (far, args.batches[:1])):
                for batch in batches:
                    r = measure(llm, prompts(context, batch), args.new, args.repeats)
                    rows.append(dict(engine="lm-infinite" if lminf else "stock", context=context, batch=batch, **r))
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            llm.llm_engine.engine_core.shutdown()
    training = json.loads((Path(path) / "config.json").read_text())["max_position_embeddings"]
    refusal = stock_refusal(path, args, max_len) if max_len > training else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(settings=vars(args), model="SmolLM2-135M-Instruct float32", training_length=training,
                  stock_refusal=refusal, rows=rows, env={k: os.environ.get(k) for k in ENGINE_ENV})
    (out / "vllm_throughput.json").write_text(json.dumps(result, indent=1))
    stock = {(r["context"], r["batch"]): r for r in rows if r["engine"] == "stock"}
    lines = ["| context (tokens) | batch | stock vLLM tok/s | LM-Infinite plugin tok/s | plugin / stock | "
             "prefill s (stock / plugin) |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["engine"] != "lm-infinite":
            continue
        s = stock[r["context"], r["batch"]]
        lines.append(f"| {r['context']} ({r['context'] / args.n_local:g} x n_local) | {r['batch']} | "
                     f"{s['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s'] / s['decode_tokens_per_s']:.2f}x | "
                     f"{s['prefill_s']:.1f} / {r['prefill_s']:.1f} |")
    table = "\n".join(lines)
    if refusal:
        table += f"\n\nStock vLLM at max_model_len {max_len} without VLLM_ALLOW_LONG_MAX_MODEL_LEN: `{refusal}`"
    (out / "vllm_throughput.md").write_text(table + "\n")
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [(r["context"], r["batch"]) for r in rows if r["engine"] == "lm-infinite"]
        labels = [f"ctx {c}\nbatch {b}" for c, b in keys]
        x = range(len(keys))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([i - 0.2 for i in x], [stock[k]["decode_tokens_per_s"] for k in keys], 0.4, label="stock vLLM")
        mine = {(r["context"], r["batch"]): r for r in rows if r["engine"] == "lm-infinite"}
        ax.bar([i + 0.2 for i in x], [mine[k]["decode_tokens_per_s"] for k in keys], 0.4, label="LM-Infinite plugin")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"vLLM on CPU, SmolLM2-135M fp32, n_local {args.n_local}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "vllm_throughput.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
