"""Tables, JSON and PNG plots of evaluation results, written atomically."""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from .perplexity import bucket_perplexity

__all__ = ["atomic_write", "check_regular_output", "passkey_table", "perplexity_table", "plot_passkey", "plot_perplexity",
           "write_json"]


def check_regular_output(path: str | Path, name: str = "output") -> None:
    """Refuse to write `path` unless it is absent or a regular file: writing over a symbolic
    link would replace the link (and leave its target as it was), and a device node, a pipe or
    a socket would be replaced by a file (as root, /dev/null itself)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a device, pipe or socket, not a regular file")
    raise ValueError(f"{name} {path}: is {kind}; expected the path of a regular file (or of none yet)")


def atomic_write(path: str | Path, write, name: str = "output") -> None:
    """Call write(temporary_path), then rename it to `path`: a reader (or a crash) never sees a
    half-written file. Only regular files are written (check_regular_output)."""
    path = Path(path)
    check_regular_output(path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_json(path: str | Path, data) -> None:
    def write(temporary):
        with open(temporary, "w") as file:
            json.dump(data, file, indent=1, allow_nan=True)
            file.write("\n")

    atomic_write(path, write)


def _format_ppl(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _column_widths(methods: list[str]) -> list[int]:
    """One column per method, at least 14 characters, never narrower than its name."""
    return [max(14, len(m) + 2) for m in methods]


def perplexity_table(nll: dict[str, torch.Tensor], bucket_size: int) -> str:
    """Perplexity per position bucket, one column per method."""
    methods = list(nll)
    columns = {m: bucket_perplexity(nll[m], bucket_size) for m in methods}
    widths = _column_widths(methods)
    lines = ["tokens          " + "".join(f"{m:>{w}}" for m, w in zip(methods, widths))]
    for i, (start, end, _) in enumerate(columns[methods[0]]):
        cells = "".join(f"{_format_ppl(columns[m][i][2]):>{w}}" for m, w in zip(methods, widths))
        lines.append(f"{start:>6}-{end:<8} {cells}")
    return "\n".join(lines)


def _moving_average(values: torch.Tensor, width: int) -> torch.Tensor:
    kernel = torch.ones(1, 1, width) / width
    return torch.nn.functional.conv1d(values.double()[None, None], kernel.double())[0, 0]


def plot_perplexity(path: str | Path, nll: dict[str, torch.Tensor], *, n_local: int, title: str,
                    smoothing: int = 256) -> None:
    """NLL against position (moving average), as in figure 1 of the LM-Infinite paper."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for method, values in nll.items():
        positions = torch.arange(values.numel())
        scored = ~torch.isnan(values)
        values, positions = values[scored], positions[scored]
        width = min(smoothing, values.numel())
        axes.plot(positions[width - 1 :].numpy(), _moving_average(values, width).numpy(), label=method)
    axes.axvline(n_local, color="gray", linestyle="--", linewidth=1, label=f"n_local = {n_local}")
    axes.set(xlabel="token position", ylabel=f"NLL (moving average of {smoothing})", title=title)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def _accuracy_by(records, key: str | tuple[str, ...]) -> dict:
    """{(method, value of key): fraction correct}; a tuple key groups by several fields."""
    hits = defaultdict(list)
    for record in records:
        value = tuple(record[k] for k in key) if isinstance(key, tuple) else record[key]
        hits[(record["method"], value)].append(record["correct"])
    return {group: sum(values) / len(values) for group, values in hits.items()}


def passkey_table(records: list[dict]) -> str:
    """Accuracy per prompt length, then per length and needle depth; one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    widths = _column_widths(methods)
    header = "".join(f"{m:>{w}}" for m, w in zip(methods, widths))

    def row(label: str, accuracy: dict, group) -> str:
        return label + "".join(f"{accuracy[(m, group)]:>{w}.0%}" for m, w in zip(methods, widths))

    by_length = _accuracy_by(records, "length")
    lines = ["length        " + header]
    lines += [row(f"{n:>6}        ", by_length, n) for n in dict.fromkeys(r["length"] for r in records)]
    by_both = _accuracy_by(records, ("length", "depth"))
    lines += ["", "length depth  " + header]
    lines += [row(f"{n:>6} {d:>5.2f}  ", by_both, (n, d))
              for n, d in dict.fromkeys((r["length"], r["depth"]) for r in records)]
    return "\n".join(lines)


def plot_passkey(path: str | Path, records: list[dict], *, title: str) -> None:
    """Accuracy against prompt length and against needle depth, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(12, 4))
    for axes, key, label in ((panels[0], "length", "prompt length (tokens)"),
                             (panels[1], "depth", "needle depth (all lengths)")):
        accuracy = _accuracy_by(records, key)
        for method in dict.fromkeys(r["method"] for r in records):
            xs = sorted({x for (m, x) in accuracy if m == method})
            axes.plot(xs, [accuracy[(method, x)] for x in xs], marker="o", label=method)
        axes.set(xlabel=label, ylabel="passkey accuracy", ylim=(-0.05, 1.05))
    panels[0].set_xscale("log", base=2)
    panels[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)
