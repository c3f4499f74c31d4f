"""Static checks of the CUDA kernels' machine code, and the prefill key loop's per-tile
instruction counts, without a GPU (run through scripts/sass_check.sh).

    python3 scripts/sass_check.py                    # rules for every kernel, and the count report
    python3 scripts/sass_check.py csrc/cuda/x.cu     # rules for one file (a temp copy works too)
    python3 scripts/sass_check.py --count [--by-line] [--source F] [--out FILE]

Compilation. Each source is compiled once to a cubin with -lineinfo and `-Xptxas -v`
(registers, stack frame, spills per kernel), for sm_90, or sm_90a if it includes hopper.cuh
(wgmma and TMA exist only there). Cubins and ptxas reports are cached under build/sass/, keyed
by the flags, the nvcc version, the source and every header under csrc/, so a second run only
disassembles. The listing is nvdisasm's (-g: each instruction names its source line, which the
rotation class needs; labels for the branch targets).

The key loop, one definition for every kernel: the smallest natural loop of the control-flow
graph that holds every HMMA of the kernel, plus the subroutines it CALLs. Why this is right for
both tensor-core kernels: the decode kernel (per 64-key chunk) and the prefill kernel (per
64-key tile) issue their tensor-core work (Q K^T, the global keys' (R_D q) K^T, P V) only per
key tile, and nothing before or after the loop does (Q's fragments come from ldmatrix, the
epilogues combine with float FMAs). So the key loop holds every HMMA, every loop holding them
all is the key loop or encloses it, and the smallest is the key loop itself: loops nested in it
(a rotation row loop, a load-issue loop) count as part of it; a loop around it (over row tiles
or work items) does not. Natural loops (a back edge to a dominating header, plus every block
that reaches that edge without passing the header) include the cold blocks nvcc moves past the
latch that branch back into the body, whatever their addresses; loops sharing a header are
merged. If some HMMA ever runs outside every loop, no loop holds them all and key_loop_found
fails: the definition's premise broke, so it must be revisited, not silently widened.

Rules: every kernel has no spills, no stack frame and no local memory (LDL/STL); RULES adds
per-kernel rules. Prints one PASS/FAIL line per (kernel, rule) and exits 1 if one fails.

The count report (lambda_attention_mma.cu; its format is that of csrc/cuda/sass_prefill_*.txt)
counts the key loop's instructions by class, static: each instruction of the body once, i.e.
what a warp issues per key tile if it walks every block once and every nested loop once; with
the rare paths (mixed tiles, global tile) counted in, an upper bound per tile for a loop with no
nested loops. Classes: HMMA; LDSM (ldmatrix); LDGSTS (cp.async); FP64 (any D* op or .F64
conversion); INT64 (IMAD.WIDE, and adds, compares and shifts with a carry or .EX operand);
BAR; MUFU; FMUL/FFMA/FADD; other; and rotation (overlapping the others): instructions whose
source line lies in rope_sincos (common.cuh) or holds the rotate_half formula. The full run
rewrites csrc/cuda/sass_prefill_after.txt when the counts change, and says so.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / "build/sass"
PREFILL = ROOT / "csrc/cuda/lambda_attention_mma.cu"
PREFILL_AFTER = ROOT / "csrc/cuda/sass_prefill_after.txt"
COMMON = ROOT / "csrc/cuda/common.cuh"
SOURCES = sorted((ROOT / "csrc/cuda").glob("*.cu")) + [ROOT / "csrc/tests/test_wgmma_tile.cu"]
# -Icsrc/cuda lets a copy of a kernel compiled from elsewhere find its sibling headers.
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "-cubin", "-Xptxas", "-v",
         f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc/cuda'}"]

FP64 = re.compile(r"^(DADD|DMUL|DFMA|DSETP|DMNMX|F2F\.F64|F2F\.F32\.F64|I2F\.F64|F2I\.F64|"
                  r"I2F\.S64|MUFU\.RCP64H|MUFU\.RSQ64H)")
WIDE_LOAD = re.compile(r"^(LDG\.E\.128|LDG\.E\.ENL2\.128|LDGSTS\.E\.BYPASS\.128|"
                       r"LDGSTS\.E\.BYPASS\.LTC128B\.128|UTMALDG|UBLKCP)")
# The rotate_half formula, as the kernels write it: a feature of a pair times cos or sin.
ROTATION_LINE = re.compile(r"\bx[12]\.[xy]\s*\*\s*\w*(c|s|cos|sin)\b")
COUNT_CLASSES = ["HMMA", "LDSM", "LDGSTS", "FP64", "INT64", "BAR", "MUFU", "FMUL/FFMA/FADD",
                 "other"]

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LABEL = re.compile(r"^(\.L_x_\d+|\$[\w$.]+):")
LINE_INFO = re.compile(r'//## File "([^"]+)", line (\d+)')
TARGET = re.compile(r"`\(([.$][\w$.]+)\)")


@dataclasses.dataclass
class Instr:
    address: int
    guarded: bool
    opcode: str
    operands: str
    file: str | None
    line: int
    target: str | None  # the label a BRA or CALL names


class Kernel:
    """One kernel instance: ptxas numbers, its instructions and labels, and its key loop."""

    def __init__(self, mangled: str, name: str, source: pathlib.Path, stats: dict,
                 instructions: list[Instr], labels: dict[str, int], report: str = ""):
        self.mangled, self.name, self.source, self.stats = mangled, name, source, stats
        self.report = report  # the source's whole ptxas output
        self.sass, self.labels = instructions, labels
        self.index = {i.address: n for n, i in enumerate(instructions)}

    @functools.cached_property
    def loops(self) -> list[set[int]]:
        return natural_loops(self.sass, self.labels)

    @functools.cached_property
    def key_loop(self) -> list[Instr]:
        """The key loop's instructions in address order (empty if no loop holds every HMMA),
        with the subroutines it calls."""
        return self.smallest_loop_holding(
            {n for n, i in enumerate(self.sass) if i.opcode.startswith("HMMA")})

    def smallest_loop_holding(self, wanted: set[int]) -> list[Instr]:
        """The smallest natural loop holding every instruction index in `wanted`, with the
        subroutines it calls (empty if none holds them all, or `wanted` is empty)."""
        holding = [loop for loop in self.loops if wanted and wanted <= loop]
        if not holding:
            return []
        body = set(min(holding, key=len))
        for n in list(body):
            body |= set(self.subroutine(self.sass[n]))
        return [self.sass[n] for n in sorted(body)]

    @functools.cached_property
    def nested_loops(self) -> list[list[Instr]]:
        key = {self.index[i.address] for i in self.key_loop}
        return [[self.sass[n] for n in sorted(loop)]
                for loop in sorted((l for l in self.loops if l < key), key=min)]

    def subroutine(self, call: Instr) -> list[int]:
        """Indices of the subroutine a CALL enters, up to its RET (empty for other opcodes)."""
        if not call.opcode.startswith("CALL") or self.labels.get(call.target) not in self.index:
            return []
        out = []
        for n in range(self.index[self.labels[call.target]], len(self.sass)):
            out.append(n)
            if self.sass[n].opcode.startswith("RET"):
                break
        return out

    def int64_divisions(self, instructions) -> list[Instr]:
        """The calls among `instructions` into nvcc's 64-bit division or remainder routines:
        named __cuda_sm20_{div,rem}_{s,u}64, their bodies start from a float reciprocal of
        the 64-bit divisor (I2F.U64.RP)."""
        return [i for i in instructions if i.opcode.startswith("CALL") and (
            re.search(r"(div|rem)_[su]64", i.operands) or
            any(self.sass[n].opcode.startswith("I2F.U64") for n in self.subroutine(i)))]


# ---------------------------------------------------------------------------------------------
# Compilation and parsing.

def find_tool(name: str) -> str:
    """$NVCC / $NVDISASM, PATH, the CUDA toolkit, else the copy in NVIDIA's nvdisasm wheel or
    triton's (the toolkit on the development machine ships no nvdisasm)."""
    candidates = [os.environ.get(name.upper()), shutil.which(name), f"/usr/local/cuda/bin/{name}",
                  f"/work/.venv-sass/lib/python3.11/site-packages/triton/backends/nvidia/bin/{name}"]
    try:  # pip install nvidia-cuda-nvdisasm: site-packages/nvidia/cu13/bin (cu12: cuda_nvdisasm/bin)
        import nvidia

        for root in nvidia.__path__:
            candidates += [str(p) for p in pathlib.Path(root).glob(f"*/bin/{name}")]
    except ImportError:
        pass
    try:
        import triton

        candidates.append(str(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin" / name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"sass_check: {name} not found (CUDA toolkit, `pip install nvidia-cuda-nvdisasm`, "
             f"or set ${name.upper()})")


@functools.cache
def nvcc_version() -> str:
    return subprocess.run([find_tool("nvcc"), "--version"], capture_output=True, text=True).stdout


def arch_of(source: pathlib.Path) -> str:
    return "sm_90a" if "hopper.cuh" in source.read_text() else "sm_90"


def compile_cached(source: pathlib.Path) -> tuple[str, pathlib.Path]:
    """(ptxas report, cubin) of the source, compiled unless the cache holds this exact input."""
    arch = arch_of(source)
    flags = [*FLAGS, f"-gencode=arch=compute_{arch[3:]},code={arch}"]
    key = hashlib.sha256("\0".join([*flags, nvcc_version(), source.read_text()]).encode())
    for header in sorted(p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh")):
        key.update(header.read_bytes())
    # One cache entry per source path and arch (a temp copy does not evict the original's).
    stem = f"{source.stem}.{arch}.{hashlib.sha256(str(source).encode()).hexdigest()[:8]}"
    cubin = CACHE / f"{stem}.{key.hexdigest()[:16]}.cubin"
    report = cubin.with_suffix(".ptxas")
    if not (cubin.exists() and report.exists()):
        CACHE.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([find_tool("nvcc"), *flags, str(source), "-o", str(cubin)], capture_output=True,
                             text=True)
        if run.returncode != 0:
            sys.exit(f"sass_check: nvcc failed on {source}:\n{run.stderr}")
        for stale in CACHE.glob(f"{stem}.*"):
            if stale.stem != cubin.stem:
                stale.unlink()
        report.write_text(run.stdout + run.stderr)
    return report.read_text(), cubin


def parse_ptxas(report: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spill store/load bytes, stack frame bytes."""
    stats, current = {}, None
    for line in report.splitlines():
        if m := re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?",
                          line):
            current = stats.setdefault(m[1], {})
        elif current is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                            r"(\d+) bytes spill loads", line):
            current.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m[1])
    return stats


def parse_listing(listing: str) -> dict[str, tuple[list[Instr], dict[str, int]]]:
    """Per mangled function (nvdisasm's .text.<name> sections): instructions and labels."""
    functions, current, pending, where = {}, None, [], (None, 0)
    for line in listing.splitlines():
        if m := re.match(r"^\.text\.(\S+):$", line):
            current, pending = functions.setdefault(m[1], ([], {})), []
        elif current is None:
            continue
        elif m := LINE_INFO.search(line):
            where = (m[1], int(m[2]))
        elif m := LABEL.match(line):
            pending.append(m[1])
        elif m := INSTRUCTION.search(line):
            address = int(m[1], 16)
            for label in pending:
                current[1][label] = address
            pending = []
            target = TARGET.search(m[4])
            current[0].append(Instr(address, bool(m[2]), m[3], m[4].strip(), where[0], where[1],
                                    target[1] if target else None))
    return functions


def natural_loops(sass: list[Instr], labels: dict[str, int]) -> list[set[int]]:
    """The natural loops of the control-flow graph, as sets of instruction indices, loops that
    share a header merged.

    Basic blocks start at labels and after branches; a guarded BRA (or BRA.DIV, or one with a
    predicate operand) has two successors, an unguarded one a single one, EXIT and RET none
    (a guarded one falls through: warp-specialised kernels exit the idle lanes of a role so);
    CALL falls through (subroutines are entered only by CALL, so they lie outside every loop;
    Kernel.key_loop adds the ones a loop calls). A back edge u -> h is one whose target h
    dominates u. Branches into the middle of a loop (an irreducible region) give no back edge,
    so they never pose as loops."""
    index = {i.address: n for n, i in enumerate(sass)}
    starts = {0} | {index[a] for a in labels.values() if a in index}
    for n, i in enumerate(sass):
        if i.opcode.startswith(("BRA", "EXIT", "RET")) and n + 1 < len(sass):
            starts.add(n + 1)
    starts = sorted(starts)
    ends = starts[1:] + [len(sass)]
    block_of = {n: b for b, (s, e) in enumerate(zip(starts, ends)) for n in range(s, e)}
    succ = collections.defaultdict(set)
    for b, end in enumerate(ends):
        i = sass[end - 1]
        if i.opcode.startswith("BRA") and labels.get(i.target) in index:
            succ[b].add(block_of[index[labels[i.target]]])
            conditional = i.guarded or i.opcode.startswith("BRA.DIV") or \
                re.match(r"!?U?P\w+\s*,", i.operands)
            if conditional and end < len(sass):
                succ[b].add(block_of[end])
        elif (not i.opcode.startswith(("BRA", "EXIT", "RET")) or i.guarded) and end < len(sass):
            succ[b].add(block_of[end])  # a guarded EXIT or RET (`@P0 EXIT`) falls through
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
    dom = {b: set(reachable) for b in reachable}  # dominators, iterative data flow
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
    members = collections.defaultdict(list)
    for n, b in block_of.items():
        members[b].append(n)
    return [{n for b in body for n in members[b]} for body in by_header.values()]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or "/usr/local/cuda/bin/cu++filt"
    tool = tool if os.access(tool, os.X_OK) else shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def short(name: str) -> str:
    """'void lminf::cuda::(anonymous namespace)::decode_kernel<__half, 64>(...)' ->
    'decode_kernel<__half, 64>'."""
    name = re.sub(r"\(anonymous namespace\)::", "", name)
    name = re.sub(r"^void ", "", name).split("(")[0]
    return name.split("::")[-1] if "<" not in name else name[name.rfind("::", 0, name.find("<")) + 2:]


def load_kernels(sources: list[pathlib.Path]) -> list[Kernel]:
    """Every kernel instance of the sources, in listing order."""
    nvdisasm = find_tool("nvdisasm")
    kernels = []
    for source in sources:
        report, cubin = compile_cached(source.resolve())
        stats = parse_ptxas(report)
        listing = subprocess.run([nvdisasm, "-g", "-c", str(cubin)], check=True,
                                 capture_output=True, text=True).stdout
        functions = parse_listing(listing)
        names = demangle(list(functions))
        kernels += [Kernel(m, names[m], source.resolve(), stats.get(m, {}), *functions[m], report)
                    for m in functions]
    return kernels


# ---------------------------------------------------------------------------------------------
# Rules: kernel -> (ok, detail).

def no_spills(k):
    st, ld = k.stats.get("spill_stores", 0), k.stats.get("spill_loads", 0)
    return st == 0 and ld == 0, f"{st} B stored, {ld} B loaded"


def no_stack_frame(k):
    return k.stats.get("stack", 0) == 0, f"{k.stats.get('stack', 0)} B"


def no_local_memory(k):
    n = sum(bool(re.match(r"(LDL|STL)\b", i.opcode)) for i in k.sass)
    return n == 0, f"{n} LDL/STL"


def no_int64_division(k):
    calls = [i for i in k.sass if i.opcode.startswith("CALL")]
    n = len(k.int64_divisions(calls))
    return n == 0, f"{n} of {len(calls)} calls divide 64-bit integers"


def no_int64_division_in_key_loop(k):
    n = len(k.int64_divisions(k.key_loop))
    return bool(k.key_loop) and n == 0, f"{n} calls in the loop"


def key_loop_found(k):
    loop = k.key_loop
    hmma = sum(i.opcode.startswith("HMMA") for i in loop)
    return bool(loop), f"{len(loop)} instructions, {hmma} HMMA, {len(k.nested_loops)} nested loops"


def fp64_ops(instructions) -> str:
    return ", ".join(sorted({i.opcode for i in instructions if FP64.match(i.opcode)}))


def no_fp64_in_key_loop(k):
    bad = fp64_ops(k.key_loop)
    return bool(k.key_loop) and not bad, bad or "none"


def no_fp64(k):
    bad = fp64_ops(k.sass)
    return not bad, bad or "none"


def no_rotation_in_key_loop(k):
    n = sum(rotation(i) for i in k.key_loop)
    return bool(k.key_loop) and n == 0, f"{n} instructions on rotation lines"


def wide_loads_in_key_loop(k):
    loads = [i.opcode for i in k.key_loop if re.match(r"(LDG|LDGSTS)\.", i.opcode)]
    wide = sorted({op for op in loads if WIDE_LOAD.match(op)})
    narrow = sorted({op for op in loads if not WIDE_LOAD.match(op)})
    return bool(wide), f"16-byte: {', '.join(wide) or 'none'}; narrower: {', '.join(narrow) or 'none'}"


def one_barrier_per_chunk(k):
    n = sum(i.opcode.startswith("BAR.SYNC") for i in k.key_loop)
    return n == 1, f"{n} BAR.SYNC in the loop"


def hgmma_present(k):
    n = sum(i.opcode.startswith("HGMMA") for i in k.sass)
    return n > 0, f"{n} HGMMA"


def utmaldg_present(k):
    n = sum(i.opcode.startswith("UTMALDG") for i in k.sass)
    return n > 0, f"{n} UTMALDG"


# ---------------------------------------------------------------------------------------------
# The Hopper prefill kernel (lambda_attention_hopper.cu). It is warp-specialised, so it has
# two key loops, one per role, each found as the smallest natural loop holding all of one kind
# of instruction: the consumers' loop holds every HGMMA (Q K^T and P V per 128-key tile;
# nothing before or after the loop issues a wgmma), the producer's holds the most UTMALDG
# (the K and V loads per tile; Q's loads run once, before it). Both loops must
# be free of rotation, FP64 and 64-bit division, as the mma.sync kernel's is; the kernel must
# have no mma.sync left, move registers between roles (USETMAXREG), and compile without a
# ptxas warning (a serialised wgmma or an ignored setmaxnreg is one).

def hopper_consumer_loop(k) -> list[Instr]:
    return k.smallest_loop_holding({n for n, i in enumerate(k.sass) if i.opcode.startswith("HGMMA")})


def hopper_producer_loop(k) -> list[Instr]:
    """The natural loop holding the most UTMALDG (the smallest such): nvcc wraps each TMA
    issue in a one-load retry loop (ELECT ... BRA.U.ANY), so "every UTMALDG in a loop" would
    also take in Q's loads before the tile loop; the tile loop encloses all its own."""
    utmaldg = {n for n, i in enumerate(k.sass) if i.opcode.startswith("UTMALDG")}
    best = max((len(loop & utmaldg) for loop in k.loops), default=0)
    if best == 0:
        return []
    loop = min((l for l in k.loops if len(l & utmaldg) == best), key=len)
    return k.smallest_loop_holding(loop & utmaldg)


def hopper_loops(k) -> list[tuple[str, list[Instr]]]:
    return [("consumer", hopper_consumer_loop(k)), ("producer", hopper_producer_loop(k))]


def hopper_consumer_loop_has_hgmma(k):
    loop = hopper_consumer_loop(k)
    n = sum(i.opcode.startswith("HGMMA") for i in loop)
    shapes = sorted({i.opcode for i in loop if i.opcode.startswith("HGMMA")})
    return n > 0, f"{len(loop)} instructions, {n} HGMMA ({', '.join(shapes) or 'none'})"


def hopper_producer_loop_has_utmaldg(k):
    loop, consumer = hopper_producer_loop(k), hopper_consumer_loop(k)
    n = sum(i.opcode.startswith("UTMALDG") for i in loop)
    overlap = {i.address for i in loop} & {i.address for i in consumer}
    ok = n > 0 and not overlap and not any(i.opcode.startswith("HGMMA") for i in loop)
    return ok, (f"{len(loop)} instructions, {n} UTMALDG, "
                f"{'disjoint from' if not overlap else 'OVERLAPS'} the consumer loop")


def hopper_loops_no_fp64(k):
    bad = {role: fp64_ops(loop) for role, loop in hopper_loops(k)}
    ok = all(loop for _, loop in hopper_loops(k)) and not any(bad.values())
    return ok, "; ".join(f"{role}: {ops or 'none'}" for role, ops in bad.items())


def hopper_loops_no_rotation(k):
    counts = {role: sum(rotation(i) for i in loop) for role, loop in hopper_loops(k)}
    ok = all(loop for _, loop in hopper_loops(k)) and not any(counts.values())
    return ok, "; ".join(f"{role}: {n} on rotation lines" for role, n in counts.items())


def hopper_loops_no_int64_division(k):
    counts = {role: len(k.int64_divisions(loop)) for role, loop in hopper_loops(k)}
    ok = all(loop for _, loop in hopper_loops(k)) and not any(counts.values())
    return ok, "; ".join(f"{role}: {n} calls" for role, n in counts.items())


HOPPER_REGISTERS = {"producer": 24, "consumer": 240}  # setmaxnreg in lambda_attention_hopper.cu


def hopper_roles_fit_their_registers(k):
    """Each role's loop names only registers below its setmaxnreg budget (a register past it
    would belong to another warpgroup)."""
    top = {}
    for role, loop in hopper_loops(k):
        regs = [int(r) for i in loop for r in re.findall(r"\bR(\d+)\b", i.operands)]
        top[role] = max(regs, default=-1)
    ok = all(loop for _, loop in hopper_loops(k)) and \
        all(top[role] < HOPPER_REGISTERS[role] for role in top)
    return ok, "; ".join(f"{role}: R{top[role]} (budget {HOPPER_REGISTERS[role]})" for role in top)


def no_mma_sync(k):
    n = sum(i.opcode.startswith("HMMA") for i in k.sass)
    return n == 0, f"{n} HMMA"


def registers_moved_between_roles(k):
    ops = sorted(i.opcode for i in k.sass if i.opcode.startswith("USETMAXREG"))
    ok = any("DEALLOC" in op for op in ops) and any("ALLOC" in op and "DEALLOC" not in op
                                                   for op in ops)
    return ok, ", ".join(ops) or "none"


def no_ptxas_warnings(k):
    """ptxas lines that warn (or report a performance loss) about this kernel, or about no
    function in particular."""
    bad = [line.strip() for line in k.report.splitlines()
           if re.search(r"warning|Performance Loss", line, re.I)
           and (k.mangled in line or not re.search(r"'_Z\w+'", line))]
    return not bad, "; ".join(bad)[:200] or "none"


HOPPER_RULES = [hopper_consumer_loop_has_hgmma, hopper_producer_loop_has_utmaldg,
                hopper_loops_no_fp64, hopper_loops_no_rotation, hopper_loops_no_int64_division,
                no_mma_sync, registers_moved_between_roles, hopper_roles_fit_their_registers,
                no_ptxas_warnings, no_int64_division]


ALWAYS = [no_spills, no_stack_frame, no_local_memory]
# (kernel name pattern (demangled), extra rules)
RULES = [
    (r"lambda_attention_decode_kernel",
     [no_int64_division, key_loop_found, no_fp64_in_key_loop, wide_loads_in_key_loop,
      one_barrier_per_chunk]),
    (r"decode_merge_kernel", [no_int64_division, no_fp64]),
    (r"lambda_attention_mma_kernel",
     [key_loop_found, no_fp64_in_key_loop, no_rotation_in_key_loop,
      no_int64_division_in_key_loop]),
    (r"wgmma_tile_kernel", [hgmma_present, utmaldg_present, no_ptxas_warnings]),
    (r"lambda_attention_hopper_kernel", HOPPER_RULES),
]


def check(kernel: Kernel) -> list[tuple[str, bool, str]]:
    rules = ALWAYS + [r for pattern, extra in RULES if re.search(pattern, kernel.name)
                      for r in extra]
    return [(rule.__name__, *rule(kernel)) for rule in rules]


# ---------------------------------------------------------------------------------------------
# The prefill count report.

@functools.cache
def rotation_lines(path: str) -> frozenset[int]:
    """Lines of a CUDA source whose instructions count as rotation work: rope_sincos's body in
    common.cuh, and every line holding the rotate_half formula (in csrc/ or any .cu/.cuh, so a
    copy of a kernel compiled from elsewhere is judged like the original)."""
    file = pathlib.Path(path)
    if not (file.suffix in (".cu", ".cuh") and file.exists()):
        return frozenset()
    text = file.read_text().splitlines()
    lines = {n for n, line in enumerate(text, 1) if ROTATION_LINE.search(line)}
    if file == COMMON:
        start = next(n for n, line in enumerate(text, 1) if "void rope_sincos(" in line)
        end = next(n for n, line in enumerate(text[start:], start + 1) if line.startswith("}"))
        lines |= set(range(start, end + 1))
    return frozenset(lines)


def rotation(i: Instr) -> bool:
    return bool(i.file) and i.line in rotation_lines(i.file)


def classify(i: Instr) -> str:
    op = i.opcode
    if op.startswith(("HMMA", "LDSM", "LDGSTS")):
        return op.split(".")[0]
    if op[:4] in ("DADD", "DMUL", "DFMA", "DSET", "DMNM", "DMMA") or ".F64" in op:
        return "FP64"
    modifiers = op.split(".")[1:]
    if op.startswith("IMAD.WIDE") or "X" in modifiers or "EX" in modifiers or \
            (op.startswith("SHF") and {"U64", "S64"} & set(modifiers)):
        return "INT64"
    if op.startswith(("BAR", "MUFU")):
        return op.split(".")[0]
    if op.startswith(("FMUL", "FFMA", "FADD")):
        return "FMUL/FFMA/FADD"
    return "other"


def class_counts(body: list[Instr]) -> str:
    c = collections.Counter(classify(i) for i in body)
    c["total"] = len(body)
    c["rotation"] = sum(rotation(i) for i in body)
    return "  ".join(f"{k}={c.get(k, 0)}" for k in ["total", *COUNT_CLASSES, "rotation"])


def line_span(k: Kernel, body: list[Instr]) -> str:
    lines = sorted({i.line for i in body if i.file == str(k.source)})
    return f"{k.source.name} lines {lines[0]}-{lines[-1]}" if lines else "no kernel-file lines"


def count_report(kernels: list[Kernel], source: pathlib.Path, by_line: bool = False) -> str:
    """The per-tile count report of the prefill kernel's instances (sass_prefill_*.txt)."""
    release = re.search(r"release ([\d.]+)", nvcc_version())
    out = [f"# scripts/sass_check.py --count: {source.resolve().relative_to(ROOT)}, sm_90, nvcc "
           f"{release[1] if release else '?'}; static counts of the key loop body (see the script's docstring)"]
    failures = []
    for k in kernels:
        if k.source != source.resolve() or "lambda_attention_mma_kernel" not in k.name:
            continue
        m = re.search(r"kernelI(6__half|13__nv_bfloat16)Li(\d+)E", k.mangled)
        label = f"{'fp16' if m[1] == '6__half' else 'bf16'} head_dim {m[2]}" if m else k.name
        u = k.stats
        out.append(f"[{label}] ptxas: {u.get('registers')} registers, {u.get('stack')} bytes "
                   f"stack, {u.get('spill_stores')}/{u.get('spill_loads')} bytes spill "
                   f"stores/loads")
        failures += [f"{label}: {rule} ({detail})" for rule, ok, detail in check(k) if not ok]
        body = k.key_loop
        if not body:
            continue
        out.append(f"  key loop ({line_span(k, body)}), per tile: {class_counts(body)}")
        if by_line:
            per = collections.Counter(f"{pathlib.Path(i.file).name}:{i.line}" if i.file else "?"
                                      for i in body)
            out += [f"      {where:<32} {n}" for where, n in per.most_common()]
        for inner in k.nested_loops:
            out.append(f"    nested loop at 0x{inner[0].address:x} ({line_span(k, inner)}): "
                       f"{class_counts(inner)}")
    out.append("rules: " + ("all pass" if not failures else "FAIL: " + "; ".join(failures)))
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=pathlib.Path,
                        help="CUDA sources (default: csrc/cuda/*.cu and the wgmma tile test)")
    parser.add_argument("--count", action="store_true",
                        help="print the prefill kernel's count report only")
    parser.add_argument("--source", type=pathlib.Path, default=PREFILL,
                        help="the prefill kernel source for --count")
    parser.add_argument("--by-line", action="store_true",
                        help="--count: list the key loop's instructions per source line")
    parser.add_argument("--out", type=pathlib.Path, help="--count: also write the report here")
    args = parser.parse_args()

    if args.count:
        report = count_report(load_kernels([args.source]), args.source, args.by_line)
        print(report, end="")
        if args.out:
            args.out.write_text(report)
        return 0

    sources = [s.resolve() for s in args.sources] or SOURCES
    kernels = load_kernels(sources)
    failures = 0
    print(f"{'kernel':<56} {'regs':>4}  {'rule':<30} {'':<4} detail")
    for k in sorted(kernels, key=lambda k: (str(k.source), short(k.name))):
        for rule, ok, detail in check(k):
            failures += not ok
            print(f"{short(k.name)[:56]:<56} {k.stats.get('registers', '?'):>4}  {rule:<30} "
                  f"{'PASS' if ok else 'FAIL'} {detail}")
    if PREFILL in sources:
        report = count_report(kernels, PREFILL)
        committed = PREFILL_AFTER.read_text() if PREFILL_AFTER.exists() else ""
        if report != committed:
            PREFILL_AFTER.write_text(report)
            print(f"\nsass_check: the prefill counts changed: rewrote "
                  f"{PREFILL_AFTER.relative_to(ROOT)} (git diff shows how; commit it with the "
                  f"kernel change)")
        else:
            print(f"\nsass_check: prefill counts as in {PREFILL_AFTER.relative_to(ROOT)}")
    print(f"sass_check: {'all rules pass' if failures == 0 else f'{failures} rule(s) FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
