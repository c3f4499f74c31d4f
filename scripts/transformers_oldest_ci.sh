#!/usr/bin/env bash
# CI: the Hugging Face integration against the oldest transformers the project supports (the
# suite of .ci/run checks the newest, whatever `pip install` chose). In a venv of its own
# (cached under build/, rebuilt when this script's pins change), with torch==2.13.0 like CI:
# transformers pinned to TRANSFORMERS_OLDEST, the extension built in place when the checkout
# has none (an editable install leaves python/lm_infinite/_C*.so there), then the HF test files
# run against the checkout. Keep TRANSFORMERS_OLDEST in step with pyproject.toml's
# `transformers>=` and docs/install.md ("Supported versions").
#
#   bash scripts/transformers_oldest_ci.sh            # about 1 minute with the venv cached
#   TRANSFORMERS_OLDEST=5.0.0 bash scripts/transformers_oldest_ci.sh   # try another version
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"

TRANSFORMERS_OLDEST="${TRANSFORMERS_OLDEST:-5.17.0}"
TORCH="torch==2.13.0"
TESTS=(tests/test_hf_*.py tests/test_streaming.py tests/test_batching.py)

# The venv's packages: the project's runtime dependencies (pyproject.toml) with transformers
# pinned, and the test tools.
pins=("$TORCH" "transformers==$TRANSFORMERS_OLDEST" numpy "gguf>=0.10" accelerate tqdm matplotlib
      pytest expecttest hypothesis "setuptools>=77" wheel ninja)
venv="build/transformers-oldest-venv"
stamp="$venv/.pins"
if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "${pins[*]}" ]]; then
  echo "== transformers-oldest: a venv with transformers $TRANSFORMERS_OLDEST ($venv)"
  rm -rf "$venv"
  python -m venv "$venv"
  "$venv/bin/python" -m pip install -q "${pins[@]}" >"$venv.log" 2>&1 || { tail -n 30 "$venv.log"; exit 1; }
  echo "${pins[*]}" >"$stamp"
fi
py="$venv/bin/python"
"$py" -c "import torch, transformers; print('== transformers-oldest: torch', torch.__version__, '/ transformers', transformers.__version__)"

# The extension, built against this torch: reuse the checkout's in-place build when it loads.
if ! PYTHONPATH=python "$py" -c "import lm_infinite, lm_infinite.ops" 2>/dev/null; then
  echo "== transformers-oldest: building the extension in place"
  "$py" setup.py -q build_ext --inplace >"$venv.build.log" 2>&1 || { tail -n 40 "$venv.build.log"; exit 1; }
fi

PYTHONPATH=python "$py" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
