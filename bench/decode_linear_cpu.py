"""CPU benchmark: lminf::decode_linear against F.linear on the weights of a decode step.

A model's worth of weight matrices (SmolLM2-135M's by default: 30 layers of q, k, v, o, gate,
up and down projections, then the tied head), more than the caches hold, multiplied by a few
rows of activations, as one decode step of a batch does. Same weights, same inputs, same
threads, interleaved; median of --repeats passes. Reports the weight bytes read per second and
the ratio; the rows where the kernel stops winning set decode_linears.MAX_ROWS (per dtype).

    python bench/decode_linear_cpu.py --threads 2
    python bench/decode_linear_cpu.py --dtype float32 --rows 1,4,8,16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from lm_infinite import ops

# (out_features, in_features) of one SmolLM2-135M layer: q, k, v, o, gate, up, down.
SMOLLM2_LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_HEAD = (49152, 576)


def pass_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--rows", default="1,2,4,8,16", help="rows of x (sequences decoded at once)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    shapes = SMOLLM2_LAYER * args.layers + [SMOLLM2_HEAD]
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)

    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=generator).to(dtype) for w in weights}
        ours = lambda: [ops.decode_linear(inputs[w.shape[1]], w) for w in weights]  # noqa: E731
        torchs = lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]  # noqa: E731
        ours(), torchs()  # warm-up
        samples = {"decode_linear": [], "F.linear": []}
        for _ in range(args.repeats):
            samples["decode_linear"].append(pass_seconds(ours))
            samples["F.linear"].append(pass_seconds(torchs))
        mine, theirs = statistics.median(samples["decode_linear"]), statistics.median(samples["F.linear"])
        results.append({"rows": rows, "decode_linear_ms": mine * 1e3, "f_linear_ms": theirs * 1e3,
                        "decode_linear_gb_per_s": weight_bytes / mine / 1e9,
                        "f_linear_gb_per_s": weight_bytes / theirs / 1e9, "speedup": theirs / mine})
        print(f"{args.dtype}, {weight_bytes / 1e6:.0f} MB of weights, {rows:>3} row(s), {args.threads} thread(s): "
              f"decode_linear {mine * 1e3:7.2f} ms ({weight_bytes / mine / 1e9:5.1f} GB/s), "
              f"F.linear {theirs * 1e3:7.2f} ms ({weight_bytes / theirs / 1e9:5.1f} GB/s), "
              f"speedup {theirs / mine:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"dtype": args.dtype, "threads": args.threads, "weight_bytes": weight_bytes,
                       "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
