"""The vLLM plugin's tests: collected only where vLLM is installed (scripts/vllm_ci.sh runs them in
a venv of their own); the main suite, which has no vLLM, does not collect them at all."""

import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
