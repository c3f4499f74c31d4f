"""The vLLM plugin's tests: collected only where vLLM is installed (scripts/vllm_ci.sh runs them in
a venv of their own); the main suite, which has no vLLM, does not collect them at all."""

import importlib.util

# (This folder is not named `vllm`: with tests/ on sys.path it would shadow the real package.)
spec = importlib.util.find_spec("vllm")
if spec is None or spec.origin is None:  # absent, or only a namespace folder of that name
    collect_ignore_glob = ["test_*.py"]
