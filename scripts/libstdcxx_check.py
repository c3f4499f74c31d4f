"""Diagnoses the GPU build's crash on bad input (csrc/cuda/NOTES.md): is there a second copy of
libstdc++'s stream and locale code inside the extension?

    python3 scripts/libstdcxx_check.py toolchain        # compilers, flags, torch's build config
    python3 scripts/libstdcxx_check.py repro DIR        # a one-check extension, linked 3 ways
    python3 scripts/libstdcxx_check.py inspect SO       # one built extension, and a bad call

`repro` builds a tiny extension whose only op fails a TORCH_CHECK that formats a number (compiled
once), linked (a) the way torch.utils.cpp_extension links on this machine, (b) with -static-libstdc++ (a
known-bad reference: a private copy of the locale code whose facet ids do not match the
process's locale, so formatting a number either drops it or crashes), and (c) with (b)'s flag
plus setup.py's LINK_ARGS (the fix: libstdc++.so named first, so the static archive is never
searched). Each variant reports whether libstdc++.so is NEEDED, how many std::locale symbols the
.so defines itself, and what the failing call returns, run in a subprocess so a crash is
reported, not suffered. Every link is run with -v, so the log holds the real ld command line.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
REPRO = textwrap.dedent("""
    #include <torch/extension.h>
    void check(int64_t n) { TORCH_CHECK(n == 0, "n must be 0, got ", n); }
    PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("check", &check); }
""")


def sh(cmd: list[str] | str, **kw) -> str:
    run = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    return (run.stdout + run.stderr).strip()


def toolchain() -> None:
    import torch

    print("== compilers")
    for tool in ("c++", "g++", "gcc", "nvcc"):
        path = shutil.which(tool)
        print(f"{tool}: {path} :: {sh([path, '--version']).splitlines()[0] if path else '-'}")
    print(sh("g++ -v 2>&1 | tail -3"))
    shared = pathlib.Path(sh("g++ -print-file-name=libstdc++.so"))
    print("libstdc++ the toolchain links:", shared, "| static:",
          sh("g++ -print-file-name=libstdc++.a"))
    if shared.is_file() and shared.stat().st_size < 4096:  # a linker script (gcc-toolset)
        print("  it is a linker script:", shared.read_text().strip())
    print("== environment")
    for var in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS", "LDSHARED", "CUDA_HOME",
                "LD_LIBRARY_PATH", "LD_PRELOAD"):
        print(f"{var}={os.environ.get(var, '')}")
    print("== python sysconfig (setuptools links with these)")
    for var in ("CC", "CXX", "LDSHARED", "LDCXXSHARED", "LDFLAGS", "CFLAGS", "BLDSHARED"):
        print(f"{var}={sysconfig.get_config_var(var)}")
    print("== torch")
    print(torch.__version__, "cuda", torch.version.cuda, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI)
    print(torch.__config__.show())
    lib = pathlib.Path(torch.__file__).parent / "lib"
    for name in ("libc10.so", "libtorch_cpu.so", "libtorch_python.so"):
        print(name, "NEEDED:", sh(f"readelf -d {lib / name} | grep NEEDED | grep -o '\\[.*\\]' "
                                  "| tr '\\n' ' '"))
        print(name, "defines std::locale symbols:",
              sh(f"nm -C -D --defined-only {lib / name} | grep -c 'std::locale::' || true"))
    print("libstdc++ loaded by `import torch`:",
          sh([sys.executable, "-c", "import torch, re; print(sorted(set(l.split()[-1] for l in "
              "open('/proc/self/maps') if 'libstdc++' in l)))"]))


def inspect(so: pathlib.Path, call: str | None = None) -> dict:
    """NEEDED libstdc++, the std::locale / _M_insert symbols it defines, and a failing call."""
    needed = "libstdc++" in sh(f"readelf -d {so} | grep NEEDED")
    defined = sh(f"nm -C --defined-only {so} | grep -cE 'std::locale::|std::num_put<' || true")
    m_insert = sh(f"nm -C {so} | grep -E 'ostream::_M_insert<long>' || true")
    print(f"{so}:\n  NEEDED libstdc++: {needed}\n  std::locale/num_put symbols defined "
          f"inside: {defined}\n  _M_insert<long>: {m_insert or '-'} (U = from libstdc++.so)")
    print("  ldd:", sh(f"ldd {so} | grep -E 'stdc|gcc_s|not found' || true"))
    result = {"needed_libstdcxx": needed, "locale_symbols_defined": int(defined or 0)}
    if call:
        run = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True,
                             cwd=so.parent, timeout=120)
        out = (run.stdout + run.stderr).strip().splitlines()
        print(f"  bad call: rc={run.returncode} ({'SEGFAULT' if run.returncode == -11 else 'ok'})"
              f" :: {out[-1] if out else ''}")
        result.update(rc=run.returncode, message=out[-1] if out else "")
    return result


def repro(workdir: pathlib.Path) -> None:
    """Compiles the one-check extension once (torch.utils.cpp_extension, this machine's
    defaults), then links its object three ways with the link command cpp_extension used."""
    import re
    import shlex

    from torch.utils import cpp_extension

    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "repro.cpp"
    source.write_text(REPRO)
    build = workdir / "build"
    build.mkdir(exist_ok=True)
    print("== variant default: extra link flags [] (cpp_extension.load)")
    cpp_extension.load("repro", [str(source)], extra_ldflags=["-v"], build_directory=str(build),
                       verbose=True)
    ninja = (build / "build.ninja").read_text()
    cxx = re.search(r"^cxx = (.*)$", ninja, re.M).group(1)
    ldflags = re.search(r"^ldflags = (.*)$", ninja, re.M).group(1)
    variants = {"default": [], "static_libstdcxx": ["-static-libstdc++"],
                "static_plus_fix": ["-static-libstdc++", *_setup_link_args()]}
    for name, flags in variants.items():
        so = workdir / f"repro_{name}.so"
        if name != "default":
            print(f"== variant {name}: extra link flags {flags}")
        link = [*shlex.split(cxx), str(build / "repro.o"), *shlex.split(ldflags), *flags,
                "-o", str(so)]
        print("  link:", " ".join(link))
        print(sh(link))
        call = ("import importlib.util, torch\n"
                f"spec = importlib.util.spec_from_file_location('repro', '{so}')\n"
                "m = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(m)\n"
                "try:\n    m.check(5)\nexcept RuntimeError as e:\n"
                "    print('message:', str(e).splitlines()[0])")
        result = inspect(so, call)
        print(f"  number formatted: {result.get('message', '').endswith('got 5')}")


def _setup_link_args() -> list[str]:
    """setup.py's LINK_ARGS without running setup() (minus -fopenmp)."""
    text = (ROOT / "setup.py").read_text()
    start = text.index("LINK_ARGS = ")
    value = eval(text[start + len("LINK_ARGS = "):text.index("\n", start)])  # a list literal
    return [a for a in value if a != "-fopenmp"]


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "toolchain"
    if mode == "toolchain":
        toolchain()
    elif mode == "repro":
        repro(pathlib.Path(sys.argv[2]))
    elif mode == "inspect":
        inspect(pathlib.Path(sys.argv[2]).resolve(), sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        sys.exit(__doc__)
