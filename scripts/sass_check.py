"""Static checks of the CUDA kernels' machine code, without a GPU (scripts/sass_check.sh).

Each csrc/cuda/*.cu is compiled for sm_90 with `-Xptxas -v` (registers, stack frame, spills per
kernel) and its SASS dumped with cuobjdump. Every kernel must have no spills, no stack frame and
no local memory (LDL/STL). Kernels matched by RULES get more checks, mostly about their key
loop. Prints one PASS/FAIL line per (kernel, rule); exits 1 if any fails.

Finding "the key loop" in SASS. The dump is cut into basic blocks (a block ends at a branch,
EXIT or RET, and starts at a branch target), with edges for fall-through and branch targets;
the loops are the strongly connected components of that graph. The key loop is the largest
component holding the loop's marker opcode (HMMA for the tensor-core kernels). Taking the
component rather than the address range [branch target, backward branch] also catches cold
blocks the compiler moves out of line (a rarely taken path placed after the loop that jumps
back into it). Calls are followed to their subroutine, whose blocks join the loop if called
from it.

To add a kernel: append (name pattern, marker, [rule names]) to RULES; a rule is a function
(kernel) -> (ok, detail) registered in CHECKS.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90", "-cubin",
              f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]
FP64 = re.compile(r"^(DADD|DMUL|DFMA|DSETP|DMNMX|F2F\.F64|F2F\.F32\.F64|I2F\.F64|F2I\.F64|"
                  r"I2F\.S64|MUFU\.RCP64H|MUFU\.RSQ64H)")
WIDE_LOAD = re.compile(r"^(LDG\.E\.128|LDG\.E\.ENL2\.128|LDGSTS\.E\.BYPASS\.128|"
                       r"LDGSTS\.E\.BYPASS\.LTC128B\.128|UTMALDG|UBLKCP)")
LOCAL = re.compile(r"^(LDL|STL)\b")

# (kernel name pattern (demangled), marker opcode of its key loop or None, rules)
RULES = [
    (r"lambda_attention_decode_kernel", "HMMA",
     ["no_int64_division", "key_loop_found", "no_fp64_in_key_loop", "wide_loads_in_key_loop",
      "one_barrier_per_chunk"]),
    (r"decode_merge_kernel", None, ["no_int64_division", "no_fp64"]),
]
ALWAYS = ["no_spills", "no_stack_frame", "no_local_memory"]


class Instr:
    """One SASS instruction: address, opcode with operands (guard dropped), whether guarded."""

    def __init__(self, address: int, text: str):
        text = text.strip().rstrip(";").strip()
        self.address = address
        self.guarded = bool(re.match(r"@!?U?P[T0-9]+\s", text))
        self.op = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
        m = re.match(r"(?:BRA|CALL\.REL(?:\.NOINC)?|JMP)(?:\.\w+)*\s+(?:`\()?0x([0-9a-f]+)", self.op)
        self.target = int(m.group(1), 16) if m else None

    @property
    def ends_block(self) -> bool:
        return self.target is not None or bool(re.match(r"(EXIT|RET|BRX|JMX|BRA)\b", self.op))

    @property
    def falls_through(self) -> bool:
        """Whether control can reach the next instruction (calls return; guarded ops may not
        fire)."""
        if self.guarded or self.op.startswith("CALL"):
            return True
        return not re.match(r"(EXIT|RET|BRX|JMX|BRA)\b", self.op)


class Kernel:
    def __init__(self, mangled: str, name: str, stats: dict, sass: list[Instr]):
        self.mangled, self.name, self.stats, self.sass = mangled, name, stats, sass
        self.marker = None
        self._loop = None

    def ops(self, addresses=None) -> list[str]:
        return [i.op for i in self.sass if addresses is None or i.address in addresses]

    @property
    def key_loop(self) -> set[int]:
        """Addresses of the key loop's instructions (empty if no loop holds the marker)."""
        if self._loop is None:
            self._loop = find_key_loop(self.sass, self.marker) if self.marker else set()
        return self._loop


def parse_sass(dump: str) -> dict[str, list[Instr]]:
    functions, current = {}, None
    for line in dump.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*/\*", line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), m.group(2)))
    return functions


def parse_ptxas(log: str) -> dict[str, dict]:
    stats, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = stats.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return stats


def find_key_loop(sass: list[Instr], marker: str) -> set[int]:
    """The largest strongly connected component of the control-flow graph that holds an
    instruction starting with `marker`, plus the subroutines it calls."""
    at = {i.address: n for n, i in enumerate(sass)}
    leaders = {sass[0].address}
    for n, i in enumerate(sass):
        if i.target is not None and i.target in at and not i.op.startswith("CALL"):
            leaders.add(i.target)
        if i.ends_block and n + 1 < len(sass):
            leaders.add(sass[n + 1].address)
    starts = sorted(leaders)
    blocks = {}
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else None
        blocks[start] = [i for i in sass[at[start]:] if end is None or i.address < end]
    block_of = {i.address: start for start, members in blocks.items() for i in members}
    succ = {}
    for start, members in blocks.items():
        last = members[-1]
        nxt = at[last.address] + 1
        succ[start] = set()
        if last.target is not None and last.target in at and not last.op.startswith("CALL"):
            succ[start].add(block_of[last.target])
        if last.falls_through and nxt < len(sass):
            succ[start].add(block_of[sass[nxt].address])
    best = set()
    for comp in strongly_connected(starts, succ):
        if len(comp) == 1 and next(iter(comp)) not in succ[next(iter(comp))]:
            continue  # one block that is not a self-loop
        addresses = {i.address for s in comp for i in blocks[s]}
        if any(sass[at[a]].op.startswith(marker) for a in addresses) and len(addresses) > len(best):
            best = addresses
    for a in list(best):  # subroutines called from the loop run as part of it
        i = sass[at[a]]
        if i.op.startswith("CALL") and i.target in at:
            for j in sass[at[i.target]:]:
                best.add(j.address)
                if j.op.startswith("RET"):
                    break
    return best


def strongly_connected(nodes, succ) -> list[set]:
    """Tarjan's algorithm, iterative (SASS graphs are deep enough to exhaust the recursion
    limit)."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.add(top)
                    if top == node:
                        break
                result.append(comp)
    return result


# ---------------------------------------------------------------------------------------------
# Rules: kernel -> (ok, detail).

def no_spills(k):
    st, ld = k.stats.get("spill_stores", 0), k.stats.get("spill_loads", 0)
    return st == 0 and ld == 0, f"{st} B stored, {ld} B loaded"


def no_stack_frame(k):
    return k.stats.get("stack", 0) == 0, f"{k.stats.get('stack', 0)} B"


def no_local_memory(k):
    n = sum(bool(LOCAL.match(op)) for op in k.ops())
    return n == 0, f"{n} LDL/STL"


def subroutine_ops(k, call):
    at = {i.address: n for n, i in enumerate(k.sass)}
    out = []
    for j in k.sass[at.get(call.target, len(k.sass)):]:
        out.append(j.op)
        if j.op.startswith("RET"):
            break
    return out


def no_int64_division(k):
    """nvcc calls a subroutine for 64-bit division and remainder; its body starts from a
    float reciprocal of the 64-bit divisor (I2F.U64.RP)."""
    calls = [i for i in k.sass if i.op.startswith("CALL") and i.target is not None]
    divisions = [c for c in calls if any(op.startswith(("I2F.U64.RP", "I2F.U64"))
                                         for op in subroutine_ops(k, c))]
    return not divisions, f"{len(divisions)} of {len(calls)} calls divide 64-bit integers"


def key_loop_found(k):
    n = len(k.key_loop)
    return n > 0, f"{n} instructions"


def no_fp64_in_key_loop(k):
    bad = sorted({op.split()[0] for op in k.ops(k.key_loop) if FP64.match(op)})
    return bool(k.key_loop) and not bad, ", ".join(bad) or "none"


def no_fp64(k):
    bad = sorted({op.split()[0] for op in k.ops() if FP64.match(op)})
    return not bad, ", ".join(bad) or "none"


def wide_loads_in_key_loop(k):
    ops = k.ops(k.key_loop)
    wide = sorted({op.split()[0] for op in ops if WIDE_LOAD.match(op)})
    narrow = sorted({op.split()[0] for op in ops
                     if re.match(r"(LDG|LDGSTS)\.", op) and not WIDE_LOAD.match(op)})
    return bool(wide), f"16-byte: {', '.join(wide) or 'none'}; narrower: {', '.join(narrow) or 'none'}"


def one_barrier_per_chunk(k):
    n = sum(op.startswith("BAR.SYNC") for op in k.ops(k.key_loop))
    return n == 1, f"{n} BAR.SYNC in the loop"


CHECKS = {f.__name__: f for f in (no_spills, no_stack_frame, no_local_memory, no_int64_division,
                                   key_loop_found, no_fp64_in_key_loop, no_fp64,
                                   wide_loads_in_key_loop, one_barrier_per_chunk)}


# ---------------------------------------------------------------------------------------------

def find_tool(name: str) -> str:
    candidates = [shutil.which(name), f"/usr/local/cuda/bin/{name}",
                  f"/work/.venv-sass/lib/python3.11/site-packages/triton/backends/nvidia/bin/{name}"]
    try:
        import triton  # noqa: F401  (its wheel ships cuobjdump)

        candidates.append(str(pathlib.Path(triton.__file__).parent / "backends/nvidia/bin" / name))
    except ImportError:
        pass
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    sys.exit(f"sass_check: {name} not found (CUDA toolkit, or `pip install triton`)")


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
    name = re.sub(r"^void ", "", name)
    name = name.split("(")[0]
    return name.split("::")[-1] if "<" not in name else name[name.rfind("::", 0, name.find("<")) + 2:]


def compile_file(source: pathlib.Path, workdir: pathlib.Path, nvcc: str, cuobjdump: str):
    cubin = workdir / (source.stem + ".cubin")
    run = subprocess.run([nvcc, *NVCC_FLAGS, str(source), "-o", str(cubin)], capture_output=True,
                         text=True)
    if run.returncode != 0:
        sys.exit(f"sass_check: nvcc failed on {source}:\n{run.stderr}")
    stats = parse_ptxas(run.stdout + run.stderr)
    dump = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return stats, parse_sass(dump)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", type=pathlib.Path,
                        help="CUDA sources (default: csrc/cuda/*.cu)")
    args = parser.parse_args()
    sources = args.sources or sorted((ROOT / "csrc/cuda").glob("*.cu"))
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    failures = 0
    print(f"{'kernel':<56} {'regs':>4}  {'rule':<24} {'':<4} detail")
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            stats, functions = compile_file(source, pathlib.Path(tmp), nvcc, cuobjdump)
            names = demangle(sorted(functions))
            for mangled in sorted(functions, key=lambda m: short(names[m])):
                kernel = Kernel(mangled, names[mangled], stats.get(mangled, {}), functions[mangled])
                rules = list(ALWAYS)
                for pattern, marker, extra in RULES:
                    if re.search(pattern, kernel.name):
                        kernel.marker = marker
                        rules += extra
                for rule in rules:
                    ok, detail = CHECKS[rule](kernel)
                    failures += not ok
                    print(f"{short(kernel.name)[:56]:<56} {kernel.stats.get('registers', '?'):>4}  "
                          f"{rule:<24} {'PASS' if ok else 'FAIL'} {detail}")
    print(f"\nsass_check: {'all rules pass' if failures == 0 else f'{failures} rule(s) FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
