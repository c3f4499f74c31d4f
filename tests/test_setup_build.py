"""setup.py's choice of build (CPU or CUDA) and of CUDA toolkit, without building anything."""

import importlib.util
import os
import pathlib
import stat
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("lminf_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # defines the functions; setup() runs only as __main__
        yield module
    finally:
        del sys.modules[spec.name]


def fake_toolkit(home: pathlib.Path, release: str, headers: bool = True) -> pathlib.Path:
    """A directory with an nvcc that prints `release` as nvcc does, and the runtime header."""
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f'#!/bin/sh\necho "Cuda compilation tools, release {release}, V{release}.1"\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime_api.h").write_text("")
    return home


def decide(setup_py, *, lminf_cuda=None, torch_cuda="13.0", toolkit="13.0"):
    found = setup_py.CudaToolkit("/opt/cuda", toolkit) if toolkit else None
    note = "" if toolkit else "CUDA_HOME unset; no nvcc on PATH"
    torch_version = f"2.14.1+cu{torch_cuda.replace('.', '')}" if torch_cuda else "2.13.0+cpu"
    return setup_py.decide_build(lminf_cuda, torch_version, torch_cuda, found, note, "90")


def test_cuda_when_torch_and_nvcc_agree(setup_py):
    build = decide(setup_py)
    assert build.cuda
    assert build.summary == ("CUDA build: archs 90, nvcc 13.0 at /opt/cuda, torch 2.14.1+cu130 "
                             "(CUDA 13.0)")
    assert decide(setup_py, toolkit="13.2").cuda  # minor versions may differ


@pytest.mark.parametrize("kwargs,reason", [
    (dict(lminf_cuda="0"), "LMINF_CUDA=0"),
    (dict(torch_cuda=None), "torch 2.13.0+cpu has no CUDA"),
    (dict(toolkit=None), "no CUDA toolkit found (CUDA_HOME unset; no nvcc on PATH)"),
])
def test_cpu_only_says_why(setup_py, kwargs, reason):
    build = decide(setup_py, **kwargs)
    assert not build.cuda
    assert build.summary.startswith(f"CPU only: {reason}")
    assert "\n" not in build.summary


def test_missing_toolkit_says_what_to_install(setup_py):
    summary = decide(setup_py, toolkit=None).summary
    assert "install the CUDA 13.x toolkit" in summary and "CUDA_HOME" in summary


def test_nvcc_of_another_major_version_is_an_error_naming_both(setup_py):
    with pytest.raises(setup_py.BuildConfigError, match=r"nvcc 12\.4 .* CUDA 13\.0"):
        decide(setup_py, toolkit="12.4")


@pytest.mark.parametrize("kwargs,message", [
    (dict(torch_cuda=None), "LMINF_CUDA=1 but torch 2.13.0\\+cpu has no CUDA"),
    (dict(toolkit=None), "LMINF_CUDA=1 but no CUDA toolkit found"),
])
def test_forced_cuda_that_cannot_be_built_is_an_error(setup_py, kwargs, message):
    with pytest.raises(setup_py.BuildConfigError, match=message):
        decide(setup_py, lminf_cuda="1", **kwargs)


def test_lminf_cuda_takes_0_or_1(setup_py):
    with pytest.raises(setup_py.BuildConfigError, match="LMINF_CUDA must be 0 or 1"):
        decide(setup_py, lminf_cuda="yes")


def test_cuda_home_is_the_only_candidate_when_set(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-12.8", "12.8")
    default = fake_toolkit(tmp_path / "default", "13.0")
    found, note = setup_py.find_cuda_toolkit({"CUDA_HOME": str(home), "PATH": ""}, str(default))
    assert found == setup_py.CudaToolkit(str(home), "12.8") and note == ""
    found, note = setup_py.find_cuda_toolkit({"CUDA_HOME": str(tmp_path / "none"), "PATH": ""},
                                             str(default))
    assert found is None and note == f"CUDA_HOME={tmp_path / 'none'} has no bin/nvcc"


def test_toolkit_of_the_nvcc_on_path_through_symlinks(setup_py, tmp_path):
    home = fake_toolkit(tmp_path / "cuda-13.0", "13.0")
    (tmp_path / "bin").mkdir()
    os.symlink(home / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    found, _ = setup_py.find_cuda_toolkit({"PATH": str(tmp_path / "bin")}, str(tmp_path / "none"))
    assert found == setup_py.CudaToolkit(str(home), "13.0")


def test_nvcc_wrapper_outside_its_toolkit_falls_back_to_the_default(setup_py, tmp_path):
    # /usr/local/bin/nvcc as a script that execs the real one: /usr/local is no toolkit.
    wrapper_home = fake_toolkit(tmp_path / "usr-local", "13.0", headers=False)
    default = fake_toolkit(tmp_path / "cuda", "13.0")
    environ = {"PATH": str(wrapper_home / "bin")}
    found, _ = setup_py.find_cuda_toolkit(environ, str(default))
    assert found == setup_py.CudaToolkit(str(default), "13.0")
    found, note = setup_py.find_cuda_toolkit(environ, str(tmp_path / "none"))
    assert found is None
    assert note == (f"CUDA_HOME unset; {wrapper_home} has no include/cuda_runtime_api.h; "
                    f"{tmp_path / 'none'} has no bin/nvcc")


def test_nothing_found_says_where_it_looked(setup_py, tmp_path):
    found, note = setup_py.find_cuda_toolkit({"PATH": str(tmp_path)}, str(tmp_path / "cuda"))
    assert found is None
    assert note == f"CUDA_HOME unset; no nvcc on PATH; {tmp_path / 'cuda'} has no bin/nvcc"


# The Hopper prefill kernel: one source compiled for sm_90a alone, beside torch's build.

@pytest.mark.parametrize("archs,nvcc,environ,wanted", [
    ("90", "13.0", {}, True),
    ("80;90", "12.3", {}, True),
    ("90a", "12.4", {}, True),
    ("80", "13.0", {}, False),            # no Hopper arch targeted
    ("90", "12.2", {}, False),            # nvcc too old for this wgmma code
    ("90", "13.0", {"LMINF_HOPPER_KERNEL": "0"}, False),
])
def test_hopper_kernel_is_built_where_sm90_is_targeted(setup_py, archs, nvcc, environ, wanted):
    assert setup_py.hopper_kernel_wanted(archs, nvcc, environ) is wanted


def test_hopper_source_is_left_to_its_own_nvcc_run(setup_py, monkeypatch, tmp_path):
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # as build_ext sets it
    build = setup_py.Build(True, "CUDA build")
    for hopper in (False, True):
        ext = setup_py.configured_extension(build, "80;90", hopper)
        assert setup_py.HOPPER_SOURCE not in ext.sources
        assert any(s.endswith("lambda_attention.cu") for s in ext.sources)
        assert ("-DLMINF_WITH_HOPPER_KERNEL" in ext.extra_compile_args["nvcc"]) is hopper
        assert ("-DLMINF_WITH_HOPPER_KERNEL" in ext.extra_compile_args["cxx"]) is hopper
        assert not any("90a" in flag for flag in ext.extra_compile_args["nvcc"])


def test_hopper_nvcc_command_compiles_the_kernel(setup_py, tmp_path):
    """The exact command build_ext runs: sm_90a code for the kernel and the launcher symbol
    the planner links against (compiles only; needs nvcc, no GPU)."""
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc")
    obj = tmp_path / "hopper.o"
    command = setup_py.hopper_nvcc_command(nvcc, str(obj), True)
    assert "-gencode=arch=compute_90a,code=sm_90a" in command
    subprocess.run(command, check=True, capture_output=True)
    symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
    assert "lminf::cuda::launch_lambda_attention_hopper(" in symbols
    assert "lminf::cuda::plan_hopper_prefill(" in symbols
