"""Per-tile SASS instruction count of the tensor-core prefill kernel's key loop, and the rules
it must keep, without a GPU.

    python scripts/sass_prefill_count.py                      # prints the report
    python scripts/sass_prefill_count.py --out csrc/cuda/sass_prefill_after.txt --check

It compiles csrc/cuda/lambda_attention_mma.cu for sm_90 (-lineinfo, so every instruction names
its source line) and reads ptxas's registers, spills and stack frame per kernel instance. Then,
per instance, it finds the key loop in nvdisasm's listing:

  * it builds the control-flow graph and its natural loops (back edges to a dominating block;
    see natural_loops), so that blocks nvcc moves past a loop's latch still count as the loop;
  * the key loop is the smallest loop that holds every HMMA of the kernel (Q K^T and P V run
    only inside it: Q's fragments are loaded by ldmatrix before it);
  * loops nested in it (a row loop over a key tile, say) are listed with their own counts.

The counts are static: each instruction of the body once, i.e. the instructions a warp issues
per key tile if it walks every block of the body once and every nested loop once. For a loop
without nested loops, and with the rare paths (mixed tiles, global tile) counted in, that is
an upper bound of the dynamic count per tile.

Classes: HMMA; LDSM (ldmatrix); LDGSTS (cp.async); FP64 (any D* op or .F64 conversion); INT64
(IMAD.WIDE, and adds, compares and shifts with a carry or .EX operand: 64-bit arithmetic);
BAR; MUFU (exp2, sin/cos); FMUL/FFMA/FADD; rotation: instructions whose source line lies in
rope_sincos (common.cuh) or on a line holding the rotate_half formula (`x1.x * c`-style
products of a pair with cos/sin); other. The rotation class overlaps the opcode classes.

Rules checked with --check (exit status 1 if one fails): no DMUL, DFMA, DADD or I2F.F64 and no
rotation instruction in the key loop, no call to the int64 division or remainder routines
inside it, and no spill stores or loads in any instance.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc/cuda/lambda_attention_mma.cu"
COMMON = ROOT / "csrc/cuda/common.cuh"
NVCC = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
# nvdisasm: $NVDISASM, else the CUDA toolkit's, else the copy in triton's wheel (this machine's
# toolkit ships none).
NVDISASM = os.environ.get("NVDISASM") or shutil.which("nvdisasm") or next(
    (str(p) for p in [pathlib.Path("/usr/local/cuda/bin/nvdisasm"), pathlib.Path(
        "/work/.venv-sass/lib/python3.11/site-packages/triton/backends/nvidia/bin/nvdisasm")]
     if p.exists()), "nvdisasm")
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-gencode=arch=compute_90,code=sm_90",
         "-lineinfo", f"-I{ROOT}/csrc/include", f"-I{ROOT}/csrc"]

CLASSES = ["HMMA", "LDSM", "LDGSTS", "FP64", "INT64", "BAR", "MUFU", "FMUL/FFMA/FADD", "other"]
# The rotate_half formula, as the kernels write it: a feature of a pair times cos or sin.
ROTATION_LINE = re.compile(r"\bx[12]\.[xy]\s*\*\s*\w*(c|s|cos|sin)\b")

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+):")
LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def compile_kernel(source: pathlib.Path, workdir: pathlib.Path) -> tuple[str, str]:
    """(ptxas -v report, nvdisasm listing with line info) of the source for sm_90."""
    cubin = workdir / "kernel.cubin"
    report = subprocess.run([NVCC, *FLAGS, "--resource-usage", "-cubin", str(source), "-o",
                             str(cubin)], capture_output=True, text=True)
    if report.returncode != 0:
        sys.exit(f"nvcc failed:\n{report.stderr}")
    listing = subprocess.run([NVDISASM, "-g", "-c", str(cubin)], check=True,
                             capture_output=True, text=True)
    return report.stdout + report.stderr, listing.stdout


def ptxas_usage(report: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spill store/load bytes, stack frame bytes."""
    usage, name = {}, None
    for line in report.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
            usage[name] = {}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                      r"(\d+) bytes spill loads", line)):
            usage[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            usage[name]["registers"] = int(m[1])
    return usage


def split_functions(listing: str) -> dict[str, list[str]]:
    functions, name = {}, None
    for line in listing.splitlines():
        if m := re.match(r"^\.text\.(\S+):$", line):
            name = m.group(1)
            functions[name] = []
        elif name:
            functions[name].append(line)
    return functions


def parse(lines: list[str]) -> tuple[list[dict], dict[str, int]]:
    """Instructions (address, opcode, operands, source file and line) and label addresses."""
    instructions, labels, pending, where = [], {}, [], (None, 0)
    for line in lines:
        if m := LINE_INFO.search(line):
            where = (m[1], int(m[2]))
        elif m := LABEL.match(line):
            pending.append(m[1])
        elif m := INSTRUCTION.search(line):
            address = int(m[1], 16)
            for label in pending:
                labels[label] = address
            pending = []
            instructions.append(dict(address=address, guard=bool(m[2]), opcode=m[3],
                                     operands=m[4].strip(),
                                     file=where[0], line=where[1]))
    return instructions, labels


def natural_loops(instructions, labels) -> list[set[int]]:
    """The natural loops of the control-flow graph, as sets of instruction indices.

    Basic blocks start at labels and after branches; a predicated BRA (or BRA.DIV) has two
    successors, an unguarded one a single one, EXIT and RET none (CALL falls through: the
    int64 division routines are entered only by CALL, so they stay outside every loop). A back
    edge u -> h is one whose target h dominates u; its loop is h plus every block that reaches
    u without passing h. Loops sharing a header are merged. Branches into the middle of a loop
    (an irreducible region, which nvcc produces when it moves cold blocks past the latch) give
    no back edge, so they never pose as loops."""
    index = {ins["address"]: n for n, ins in enumerate(instructions)}
    starts = {0} | {index[a] for a in labels.values() if a in index}
    for n, ins in enumerate(instructions):
        if ins["opcode"].startswith(("BRA", "EXIT", "RET")) and n + 1 < len(instructions):
            starts.add(n + 1)
    starts = sorted(starts)
    block_of = {}
    for b, start in enumerate(starts):
        end = starts[b + 1] if b + 1 < len(starts) else len(instructions)
        for n in range(start, end):
            block_of[n] = b
    succ = collections.defaultdict(set)
    for b, start in enumerate(starts):
        last = (starts[b + 1] if b + 1 < len(starts) else len(instructions)) - 1
        ins = instructions[last]
        op = ins["opcode"]
        if op.startswith("BRA") and (m := BRANCH_TARGET.search(ins["operands"])):
            if m[1] in labels and labels[m[1]] in index:
                succ[b].add(block_of[index[labels[m[1]]]])
            guarded = ins["guard"] or op.startswith("BRA.DIV") or \
                re.match(r"!?U?P\w+\s*,", ins["operands"])
            if guarded and last + 1 < len(instructions):
                succ[b].add(block_of[last + 1])
        elif not op.startswith(("EXIT", "RET")) and last + 1 < len(instructions):
            succ[b].add(block_of[last + 1])
    # Dominators of the blocks reachable from the entry (iterative data flow).
    reachable, stack = {0}, [0]
    while stack:
        for s in succ[stack.pop()]:
            if s not in reachable:
                reachable.add(s)
                stack.append(s)
    pred = collections.defaultdict(set)
    for b in reachable:
        for s in succ[b]:
            pred[s].add(b)
    dom = {b: set(reachable) for b in reachable}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in sorted(reachable - {0}):
            new = {b} | set.intersection(*(dom[p] for p in pred[b] if p in reachable))
            if new != dom[b]:
                dom[b], changed = new, True
    by_header = collections.defaultdict(set)
    for u in reachable:
        for h in succ[u]:
            if h in dom[u]:
                body, stack = {h, u}, ([u] if u != h else [])
                while stack:
                    for p in pred[stack.pop()]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                by_header[h] |= body
    blocks_to_instructions = collections.defaultdict(list)
    for n, b in block_of.items():
        blocks_to_instructions[b].append(n)
    return [{n for b in body for n in blocks_to_instructions[b]} for body in by_header.values()]


def classify(ins) -> str:
    op, operands = ins["opcode"], ins["operands"]
    if op.startswith("HMMA"):
        return "HMMA"
    if op.startswith("LDSM"):
        return "LDSM"
    if op.startswith("LDGSTS"):
        return "LDGSTS"
    if op[0] == "D" and op[:4] in ("DADD", "DMUL", "DFMA", "DSET", "DMNM", "DMMA") or ".F64" in op:
        return "FP64"
    modifiers = op.split(".")[1:]
    if op.startswith("IMAD.WIDE") or "X" in modifiers or "EX" in modifiers or \
            (op.startswith("SHF") and ({"U64", "S64"} & set(modifiers))):
        return "INT64"
    if op.startswith("BAR"):
        return "BAR"
    if op.startswith("MUFU"):
        return "MUFU"
    if op.startswith(("FMUL", "FFMA", "FADD")):
        return "FMUL/FFMA/FADD"
    return "other"


class RotationLines:
    """Source lines whose instructions count as rotation work (see the module docstring)."""

    def __init__(self):
        self.lines: set[tuple[str, int]] = set()
        text = COMMON.read_text().splitlines()
        start = next(n for n, line in enumerate(text, 1) if "void rope_sincos(" in line)
        end = next(n for n, line in enumerate(text[start:], start + 1) if line.startswith("}"))
        self.lines |= {(str(COMMON), n) for n in range(start, end + 1)}
        for path in (ROOT / "csrc/cuda").glob("*.cu*"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if ROTATION_LINE.search(line):
                    self.lines.add((str(path), n))

    def __contains__(self, ins) -> bool:
        return (ins["file"], ins["line"]) in self.lines


def counts(body, rotation: RotationLines) -> dict[str, int]:
    c = collections.Counter(classify(ins) for ins in body)
    c["total"] = len(body)
    c["rotation"] = sum(ins in rotation for ins in body)
    return c


def describe(name: str) -> str:
    m = re.search(r"kernelI(6__half|13__nv_bfloat16)Li(\d+)E", name)
    return f"{'fp16' if m[1] == '6__half' else 'bf16'} head_dim {m[2]}" if m else name


def line_span(body) -> str:
    lines = sorted({ins["line"] for ins in body if ins["file"] == str(KERNEL)})
    return f"{KERNEL.name} lines {lines[0]}-{lines[-1]}" if lines else "no kernel-file lines"


def by_line(body) -> list[str]:
    """Instructions of the body per source line (file:line), most first."""
    per = collections.Counter(f"{pathlib.Path(i['file']).name}:{i['line']}" if i["file"] else "?"
                              for i in body)
    return [f"      {where:<32} {n}" for where, n in per.most_common()]


def analyse(source: pathlib.Path, lines_too: bool = False) -> tuple[list[str], list[str]]:
    """Report lines and rule violations for every kernel instance of the source."""
    with tempfile.TemporaryDirectory() as tmp:
        report, listing = compile_kernel(source, pathlib.Path(tmp))
    usage = ptxas_usage(report)
    rotation = RotationLines()
    out, failures = [], []
    fmt = lambda c: "  ".join(f"{k}={c.get(k, 0)}" for k in ["total", *CLASSES, "rotation"])
    for name, lines in split_functions(listing).items():
        if "lambda_attention_mma_kernel" not in name:
            continue
        label = describe(name)
        u = usage.get(name, {})
        out.append(f"[{label}] ptxas: {u.get('registers')} registers, {u.get('stack')} bytes "
                   f"stack, {u.get('spill_stores')}/{u.get('spill_loads')} bytes spill "
                   f"stores/loads")
        if u.get("spill_stores") or u.get("spill_loads"):
            failures.append(f"{label}: spills")
        instructions, labels = parse(lines)
        hmma = {n for n, ins in enumerate(instructions) if ins["opcode"].startswith("HMMA")}
        found = natural_loops(instructions, labels)
        holding = [loop for loop in found if hmma and hmma <= loop]
        if not holding:
            failures.append(f"{label}: no loop holds every HMMA")
            continue
        key_loop = min(holding, key=len)
        body = [instructions[n] for n in sorted(key_loop)]
        c = counts(body, rotation)
        out.append(f"  key loop ({line_span(body)}), per tile: {fmt(c)}")
        if lines_too:
            out += by_line(body)
        for loop in sorted((l for l in found if l < key_loop), key=min):
            inner = [instructions[n] for n in sorted(loop)]
            out.append(f"    nested loop at 0x{inner[0]['address']:x} ({line_span(inner)}): "
                       f"{fmt(counts(inner, rotation))}")
        fp64 = [i for i in body if i["opcode"].startswith(("DMUL", "DFMA", "DADD", "I2F.F64"))]
        calls = [i for i in body if i["opcode"].startswith("CALL") and
                 re.search(r"(div|rem)_[su]64", i["operands"])]
        if fp64:
            failures.append(f"{label}: {len(fp64)} FP64 instructions in the key loop")
        if calls:
            failures.append(f"{label}: {len(calls)} int64 division calls in the key loop")
        if c["rotation"]:
            failures.append(f"{label}: {c['rotation']} rotation instructions in the key loop")
    return out, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=pathlib.Path, default=KERNEL)
    parser.add_argument("--out", type=pathlib.Path, help="also write the report here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a rule fails")
    parser.add_argument("--by-line", action="store_true",
                        help="also list the key loop's instructions per source line")
    args = parser.parse_args()
    version = subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    lines, failures = analyse(args.source, args.by_line)
    header = [f"# scripts/sass_prefill_count.py: {args.source.relative_to(ROOT)}, sm_90, nvcc "
              f"{release[1] if release else '?'}; static counts of the key loop body (see the "
              f"script's docstring)"]
    rules = ["rules: " + ("all pass" if not failures else "FAIL: " + "; ".join(failures))]
    text = "\n".join(header + lines + rules) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
