"""Builds lm_infinite._C: the torch glue (lminf_ext/) over the torch-free core (csrc/).

CUDA kernels are compiled when torch has CUDA and nvcc is found (or LMINF_CUDA=1 forces it,
LMINF_CUDA=0 turns it off). CPU kernels are compiled for this machine's instruction set
(-march=native); set LMINF_CPU_ARCH (e.g. x86-64-v3) for a build that runs elsewhere.
Install with `pip install --no-build-isolation -e .` so that the installed torch is used.
"""

import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = re.search(
    r'__version__ = "(.+)"', open(os.path.join(ROOT, "python/lm_infinite/_version.py")).read()
).group(1)


def want_cuda() -> bool:
    forced = os.environ.get("LMINF_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# libstdc++ as a shared library, named before anything can pull in a static copy: with a
# second copy of its locale code inside _C.so (what -static-libstdc++ gives, wherever the flag
# comes from), number formatting in error messages breaks (csrc/cuda/NOTES.md).
LINK_ARGS = ["-fopenmp", "-Wl,--push-state,--no-as-needed", "-lstdc++", "-Wl,--pop-state"]


def extension():
    with_cuda = want_cuda()
    cpu_arch = os.environ.get("LMINF_CPU_ARCH", "native")
    cxx_flags = ["-O3", f"-march={cpu_arch}", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # The kernels only; the C++ library's own API (csrc/kv_cache.cpp ...) is not needed here.
    sources = rel("lminf_ext/*.cpp") + ["csrc/validate.cpp"] + rel("csrc/cpu/*.cpp")
    if with_cuda:
        sources += rel("csrc/cuda/*.cu")
        archs = os.environ.get("LMINF_CUDA_ARCHS", "90")
        cxx_flags += [
            "-DLMINF_WITH_CUDA",
            f"-DLMINF_CUDA_VERSION={torch.version.cuda}",
            f"-DLMINF_CUDA_ARCHS={archs}",
        ]
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")
        ]
        return CUDAExtension(
            "lm_infinite._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=LINK_ARGS,
        )
    sources = [s for s in sources if s != "lminf_ext/ops_cuda.cpp"] + ["csrc/no_cuda.cpp"]
    return CppExtension(
        "lm_infinite._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc/include"), os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=LINK_ARGS,
    )


setup(
    version=VERSION,
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
