"""Builds lm_infinite._C: the torch glue (lminf_ext/) over the torch-free core (csrc/).

The extension compiles against the torch it will run with, so install torch first and build
without isolation: `pip install --no-build-isolation .` (or `-e .`, or an sdist tarball).

Which build is made is decided when the extension is built (making an sdist needs no torch)
and said in one line starting with "lm-infinite:" (`pip install -v` shows it):
  - CUDA kernels when torch has CUDA and a CUDA toolkit is found whose major version is
    torch's; a toolkit of another major version is an error naming both versions;
  - CPU only otherwise, with the reason.
Environment:
  LMINF_CUDA=0 / 1     CPU only / CUDA or fail (default: CUDA when possible)
  CUDA_HOME            the toolkit to use (default: the one holding the nvcc on PATH, else
                       /usr/local/cuda); a toolkit has bin/nvcc and include/cuda_runtime_api.h
  LMINF_CUDA_ARCHS     GPU architectures, e.g. "90" (the default, H100/H200) or "80;90"
  LMINF_HOPPER_KERNEL  0: leave out the Hopper prefill kernel (csrc/cuda/lambda_attention_hopper.cu,
                       wgmma + TMA), which is otherwise built, for sm_90a alone, whenever the
                       archs include 90 and nvcc is 12.3 or newer; the other kernels are built
                       for every arch of LMINF_CUDA_ARCHS either way
  LMINF_CPU_ARCH       -march for the CPU kernels (default: native, this machine's ISA; e.g.
                       x86-64-v3 for a build that runs elsewhere)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext

try:
    from torch.utils.cpp_extension import BuildExtension
except ImportError as error:  # enough for an sdist or metadata; building needs torch
    BuildExtension, TORCH_IMPORT_ERROR = None, error

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "lm_infinite._C"
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # where the CUDA installers put it; torch looks there too
DEFAULT_CUDA_ARCHS = "90"  # sm_90 (H100/H200), the GPU the kernels are tuned for


class BuildConfigError(RuntimeError):
    """A build that cannot be made as asked; the message says what to change."""


@dataclass(frozen=True)
class CudaToolkit:
    home: str
    nvcc_version: str  # "major.minor", from `nvcc --version`


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def find_cuda_toolkit(environ=os.environ, default_home=DEFAULT_CUDA_HOME):
    """(CudaToolkit, "") for the toolkit to build with, or (None, where it was looked for).

    CUDA_HOME (or CUDA_PATH), when set, is the only candidate. Otherwise: the toolkit holding
    the nvcc on PATH, then default_home. An nvcc that is a wrapper script outside its toolkit
    (/usr/local/bin/nvcc) does not make its parent a toolkit: torch guesses so, and its build
    then fails on a missing cuda_runtime_api.h.
    """
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        candidates, notes = [explicit], []
    else:
        on_path = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
        candidates = []
        if on_path:  # realpath: an nvcc symlinked into /usr/bin is in the toolkit it points into
            candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
        if default_home not in candidates:
            candidates.append(default_home)
        notes = ["CUDA_HOME unset"] + ([] if on_path else ["no nvcc on PATH"])
    for home in candidates:
        nvcc, name = os.path.join(home, "bin", "nvcc"), f"CUDA_HOME={home}" if explicit else home
        if not os.path.isfile(nvcc):
            notes.append(f"{name} has no bin/nvcc")
        elif not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            notes.append(f"{name} has no include/cuda_runtime_api.h")
        elif (version := nvcc_version(nvcc)) is None:
            notes.append(f"{nvcc} --version failed")
        else:
            return CudaToolkit(home, version), ""
    return None, "; ".join(notes)


@dataclass(frozen=True)
class Build:
    cuda: bool
    summary: str  # the one line: which build and why


def decide_build(lminf_cuda, torch_version, torch_cuda, toolkit, toolkit_note, archs) -> Build:
    """The build to make, from what is installed; raises BuildConfigError for a build that
    cannot work. lminf_cuda: LMINF_CUDA ("0", "1" or None); torch_cuda: torch.version.cuda;
    toolkit, toolkit_note: find_cuda_toolkit()'s answer."""
    if lminf_cuda not in (None, "0", "1"):
        raise BuildConfigError(f"LMINF_CUDA must be 0 or 1, not {lminf_cuda!r}")
    if lminf_cuda == "0":
        return Build(False, "CPU only: LMINF_CUDA=0")
    forced = lminf_cuda == "1"
    if torch_cuda is None:
        if forced:
            raise BuildConfigError(f"LMINF_CUDA=1 but torch {torch_version} has no CUDA: "
                                   "install a CUDA build of torch")
        return Build(False, f"CPU only: torch {torch_version} has no CUDA")
    torch_major = torch_cuda.split(".")[0]
    if toolkit is None:
        reason = (f"no CUDA toolkit found ({toolkit_note}); for the CUDA kernels install the "
                  f"CUDA {torch_major}.x toolkit (torch {torch_version} uses CUDA {torch_cuda}) "
                  "and set CUDA_HOME")
        if forced:
            raise BuildConfigError(f"LMINF_CUDA=1 but {reason}")
        return Build(False, f"CPU only: {reason}")
    if toolkit.nvcc_version.split(".")[0] != torch_major:
        raise BuildConfigError(
            f"nvcc {toolkit.nvcc_version} (CUDA_HOME={toolkit.home}) does not match torch "
            f"{torch_version}, built with CUDA {torch_cuda}: point CUDA_HOME at a CUDA "
            f"{torch_major}.x toolkit, or set LMINF_CUDA=0 for the CPU-only build")
    return Build(True, f"CUDA build: archs {archs}, nvcc {toolkit.nvcc_version} at "
                       f"{toolkit.home}, torch {torch_version} (CUDA {torch_cuda})")


# The one source compiled for sm_90a alone (wgmma, TMA and setmaxnreg exist nowhere else), in
# its own nvcc run: torch's build gives every .cu file the same flags.
HOPPER_SOURCE = "csrc/cuda/lambda_attention_hopper.cu"


def hopper_kernel_wanted(archs: str, nvcc_version: str, environ=os.environ) -> bool:
    """Whether to build the Hopper prefill kernel: sm_90 targeted, nvcc >= 12.3 (the first to
    take inline-PTX wgmma from this code), and LMINF_HOPPER_KERNEL not 0."""
    if environ.get("LMINF_HOPPER_KERNEL", "1") == "0":
        return False
    major, minor = (int(x) for x in nvcc_version.split(".")[:2])
    return (major, minor) >= (12, 3) and any(a.strip().startswith("90") for a in archs.split(";"))


def hopper_nvcc_command(nvcc: str, output: str, cxx11_abi: bool) -> list[str]:
    """The nvcc line for HOPPER_SOURCE: torch-free, so only the core's include paths, the
    kernels' own flags, position-independent code, and torch's C++ ABI (Status holds a
    std::string)."""
    return [nvcc, "-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
            "-gencode=arch=compute_90a,code=sm_90a", "-DLMINF_WITH_HOPPER_KERNEL",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}", "-Xcompiler", "-fPIC",
            f"-I{os.path.join(ROOT, 'csrc/include')}", f"-I{os.path.join(ROOT, 'csrc')}",
            "-c", os.path.join(ROOT, HOPPER_SOURCE), "-o", output]


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# libstdc++ as a shared library, named before anything can pull in a static copy: with a
# second copy of its locale code inside _C.so (what -static-libstdc++ gives, wherever the flag
# comes from), number formatting in error messages breaks (csrc/cuda/NOTES.md).
LINK_ARGS = ["-fopenmp", "-Wl,--push-state,--no-as-needed", "-lstdc++", "-Wl,--pop-state"]


def configured_extension(build: Build, archs: str, hopper: bool = False) -> Extension:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_arch = os.environ.get("LMINF_CPU_ARCH", "native")
    cxx_flags = ["-O3", f"-march={cpu_arch}", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # The kernels only; the C++ library's own API (csrc/kv_cache.cpp ...) is not needed here.
    sources = rel("lminf_ext/*.cpp") + ["csrc/validate.cpp"] + rel("csrc/cpu/*.cpp")
    common = dict(include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")],
                  extra_link_args=LINK_ARGS)
    if not build.cuda:
        sources = [s for s in sources if s != "lminf_ext/ops_cuda.cpp"] + ["csrc/no_cuda.cpp"]
        return CppExtension(EXTENSION, sources, extra_compile_args={"cxx": cxx_flags}, **common)
    import torch

    cxx_flags += [
        "-DLMINF_WITH_CUDA",
        f"-DLMINF_CUDA_VERSION={torch.version.cuda}",
        f"-DLMINF_CUDA_ARCHS={archs}",
    ]
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + [
        f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")
    ]
    if hopper:  # the planner's dispatch (lambda_attention.cu) and build_info see it
        cxx_flags.append("-DLMINF_WITH_HOPPER_KERNEL")
        nvcc_flags.append("-DLMINF_WITH_HOPPER_KERNEL")
    cuda_sources = [s for s in rel("csrc/cuda/*.cu") if s != HOPPER_SOURCE]
    return CUDAExtension(EXTENSION, sources + cuda_sources,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, **common)


if BuildExtension is not None:

    class build_ext(BuildExtension):
        """torch's BuildExtension, with the extension configured when the build runs."""

        def run(self):
            import torch
            import torch.utils.cpp_extension as cpp_extension

            toolkit, note = find_cuda_toolkit()
            archs = os.environ.get("LMINF_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            try:
                build = decide_build(os.environ.get("LMINF_CUDA") or None, torch.__version__,
                                     torch.version.cuda, toolkit, note, archs)
            except BuildConfigError as error:
                raise SystemExit(f"lm-infinite: error: {error}") from None
            print(f"lm-infinite: {build.summary}", flush=True)
            if getattr(self, "editable_mode", False):
                # pip install -e compiles in a throwaway folder, so a second install (README
                # command 2 after command 1) would recompile everything. Keep the objects where
                # `setup.py build_ext --inplace` does; ninja then recompiles only what changed
                # (its dependencies include torch's headers), and `force` makes the link run
                # rather than trust timestamps (a new torch or new flags leave sources unchanged).
                platform = f"{self.plat_name}-{sys.implementation.cache_tag}"
                self.build_temp = os.path.join(ROOT, "build", f"temp.{platform}")
                self.force = True
            self.hopper_command = None
            hopper = build.cuda and hopper_kernel_wanted(archs, toolkit.nvcc_version)
            if build.cuda:  # torch compiles with its own guess of CUDA_HOME: make it ours
                cpp_extension.CUDA_HOME = toolkit.home
                print(f"lm-infinite: Hopper prefill kernel (sm_90a): "
                      f"{'built' if hopper else 'not built'}", flush=True)
            (ext,) = self.extensions
            # setuptools has finalized `ext` (file name, stub flags): keep the object, give it
            # the configured sources and flags.
            vars(ext).update(vars(configured_extension(build, archs, hopper)))
            if hopper:
                obj = os.path.join(os.path.abspath(self.build_temp), "lambda_attention_hopper.o")
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                self.hopper_command = hopper_nvcc_command(
                    os.path.join(toolkit.home, "bin", "nvcc"), obj, torch._C._GLIBCXX_USE_CXX11_ABI)
                ext.extra_objects = [*ext.extra_objects, obj]
            super().run()

        def build_extension(self, ext):
            """torch's build, with the Hopper object compiled beside it by its own nvcc run
            and waited for just before the link."""
            if self.hopper_command is None:
                return super().build_extension(ext)
            print("lm-infinite: " + " ".join(self.hopper_command), flush=True)
            hopper = subprocess.Popen(self.hopper_command)
            link = self.compiler.link_shared_object

            def link_after_hopper(*args, **kwargs):
                if hopper.wait() != 0:
                    raise SystemExit(f"lm-infinite: error: nvcc failed on {HOPPER_SOURCE}")
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_after_hopper
            try:
                return super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                if hopper.poll() is None:  # the build failed before the link
                    hopper.kill()
                    hopper.wait()

else:

    class build_ext(setuptools_build_ext):
        def run(self):
            raise SystemExit(
                f"lm-infinite: error: torch is not importable here ({TORCH_IMPORT_ERROR}). The "
                "extension compiles against the torch it runs with: install torch first, then "
                "`pip install --no-build-isolation lm-infinite` (or the sdist); an isolated "
                "build does not see the installed torch.")


if __name__ == "__main__":  # tests import this file for find_cuda_toolkit and decide_build
    # --no-build-isolation skips pyproject's build requirements: name the one most often missing
    # (a Python 3.11 venv starts with setuptools 65, which rejects pyproject's SPDX license).
    if int(setuptools.__version__.split(".")[0]) < 77:
        raise SystemExit(f"lm-infinite: error: setuptools {setuptools.__version__} is too old; "
                         "pip install -U 'setuptools>=77'")
    setup(
        # Sources and flags are filled in by build_ext, once torch and CUDA are looked at.
        ext_modules=[Extension(EXTENSION, sources=[])],
        cmdclass={"build_ext": build_ext},
    )
