#!/usr/bin/env bash
# CI for the source distribution, installed as a user outside this repository installs it
# (called by .ci/run):
#   1. `python -m build --sdist`, isolated: making the sdist needs no torch and compiles nothing;
#   2. every tracked file a build needs is in it (against `git ls-files`), so a file that
#      MANIFEST.in misses fails here, not on a user's machine;
#   3. a fresh venv with the torch CPU wheel, `pip install --no-build-isolation` of the sdist;
#   4. from the unpacked sdist (no checkout on sys.path), a few of its tests against the
#      installed package, `lminf --version`, and a CMake configure of its C++ library.
# Work goes under $LMINF_SDIST_DIR (default build/sdist).
set -euo pipefail

cd "$(dirname "$0")/.."
work=${LMINF_SDIST_DIR:-$PWD/build/sdist}
torch_spec=${LMINF_SDIST_TORCH:-torch==2.13.0}  # the CPU wheel CI has on disk

step() { printf '\n== %s\n' "$*"; }

rm -rf "$work" && mkdir -p "$work"

step "build the sdist"
python -m build --sdist --outdir "$work/dist" . >"$work/sdist.log" 2>&1 \
  || { cat "$work/sdist.log"; exit 1; }
sdist=$(echo "$work"/dist/lm_infinite-*.tar.gz)
echo "$sdist: $(tar -tzf "$sdist" | grep -vc '/$') files"

step "the sdist holds every tracked file the builds and tests need"
tracked=(csrc lminf_ext cmake examples python tests
         CMakeLists.txt LICENSE README.md pyproject.toml setup.py)
missing=$(comm -23 <(git ls-files -- "${tracked[@]}" | sort) \
                   <(tar -tzf "$sdist" | cut -d/ -f2- | sort))
if [[ -n $missing ]]; then
  printf 'missing from the sdist (add them to MANIFEST.in):\n%s\n' "$missing"
  exit 1
fi

step "install the sdist into a fresh venv"
python -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip install "$torch_spec" "setuptools>=77" wheel ninja pytest expecttest hypothesis \
  >"$work/venv.log" 2>&1 || { tail -n 30 "$work/venv.log"; exit 1; }
# -v: pip shows the build's output, of which setup.py's one line says which build it made.
PATH=$work/venv/bin:$PATH "$venv_python" -m pip install -v --no-build-isolation "$sdist" \
  >"$work/install.log" 2>&1 || { tail -n 60 "$work/install.log"; exit 1; }
grep -oE 'lm-infinite: (CPU only|CUDA build): .*' "$work/install.log"

step "the installed package passes the sdist's own tests"
mkdir "$work/src" && tar -xzf "$sdist" -C "$work/src" --strip-components=1
cd "$work/src"  # holds python/, not lm_infinite/: the import below is the venv's
"$venv_python" - "$work/venv" <<'EOF'
import pathlib, sys
import lm_infinite
where = pathlib.Path(lm_infinite.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sys.argv[1]).resolve()), f"imported from {where}"
print(f"lm_infinite {lm_infinite.__version__} from {where.parent}: {lm_infinite.build_info()}")
EOF
version=$("$venv_python" -c "import lm_infinite; print(lm_infinite.__version__)")
said=$("$work/venv/bin/lminf" --version)
[[ $said == "lminf $version" ]] || { echo "lminf --version: '$said', not 'lminf $version'"; exit 1; }
"$venv_python" -m pytest -q -p no:cacheprovider \
  tests/test_registration.py tests/test_lambda_attention.py tests/test_setup_build.py

step "the sdist's C++ library configures with CMake (every listed source present)"
cmake -S . -B "$work/cmake" -DCMAKE_BUILD_TYPE=Release >"$work/cmake.log" 2>&1 \
  || { cat "$work/cmake.log"; exit 1; }

step "sdist: all checks passed"
