"""LM-Infinite on a model loaded with transformers' tensor-parallel plan: 2 CPU ranks (gloo,
started by torchrun) against the same model in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tp_worker
from tiny_model_dir import tiny_tokenizer
from lm_infinite.apps.cli import main
from lm_infinite.hf.tensor_parallel import rank_counts
from lm_infinite.models import load_model

N_RANKS = 2
LAUNCH_TIMEOUT_S = 240  # one launch takes 5-10 s on 2 idle cores, a minute or two on busy ones


def save_llama(directory: Path, n_heads: int, n_kv_heads: int) -> Path:
    """A random Llama folder with head_dim 8 and a byte-level BPE tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8 * n_heads, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=n_heads,
                         num_key_value_heads=n_kv_heads, max_position_embeddings=tp_worker.N_LOCAL)
    model = LlamaForCausalLM(config)
    # Random init is small; sharpen attention so that the window's edges change the logits and
    # greedy choices are clear-cut.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def launch_ranks(*args: str) -> tuple[str, str]:
    """(stdout, stderr) of `torchrun --nproc-per-node N_RANKS ARGS`; on failure or timeout,
    kill the whole process group (torchrun and its workers) and fail with their output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={N_RANKS}",
               "--standalone", *args]
    # One thread per rank: the ranks share the machine's few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the {N_RANKS} ranks did not finish in {LAUNCH_TIMEOUT_S} s:\n{stderr[-6000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"torchrun exited {process.returncode}:\n{stderr[-6000:]}"
    return stdout, stderr


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(a model the ranks can split, one whose 3 KV heads 2 ranks cannot)."""
    root = tmp_path_factory.mktemp("tensor_parallel_models")
    return (save_llama(root / "llama-8q-4kv", n_heads=8, n_kv_heads=4),
            save_llama(root / "llama-6q-3kv", n_heads=6, n_kv_heads=3))


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    """(single-process results, [results of each rank])."""
    out = tmp_path_factory.mktemp("tensor_parallel_runs")
    launch_ranks(str(Path(tp_worker.__file__)), *map(str, model_dirs), str(out))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(N_RANKS)]
    model, _ = load_model(model_dirs[0])
    return tp_worker.scenarios(model, sampling_seed=1000), ranks


def test_the_weights_were_sharded(runs):
    _, ranks = runs
    assert [rank["tp_size"] for rank in ranks] == [N_RANKS] * N_RANKS


@pytest.mark.parametrize("setting", list(tp_worker.SETTINGS))
def test_every_rank_computes_what_one_process_does(runs, setting):
    single, ranks = runs
    expected = single[setting]
    for rank in ranks:
        got = rank[setting]
        # The ranks sum their heads' contributions in another order: float32 rounding apart.
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["nll"], expected["nll"], rtol=1e-5, atol=1e-5, equal_nan=True)
        torch.testing.assert_close(got["last_logits"], expected["last_logits"], rtol=1e-5, atol=1e-5)
        for tokens in ("greedy", "fork_greedy", "hf_generate"):
            assert got[tokens] == expected[tokens], tokens
        assert len(got["greedy"]) == tp_worker.NEW_TOKENS


@pytest.mark.parametrize("setting", list(tp_worker.SETTINGS))
def test_sampled_tokens_are_rank_zeros_on_every_rank(runs, setting):
    """Rank r seeds its sampler with 1000 + r; every rank feeds (and yields) rank 0's tokens,
    which are the one-process run's with seed 1000."""
    single, ranks = runs
    for rank in ranks:
        assert rank[setting]["sampled"] == single[setting]["sampled"]


@pytest.mark.parametrize("setting", list(tp_worker.SETTINGS))
def test_each_rank_caches_its_own_heads_only(runs, setting):
    single, ranks = runs
    for rank in ranks:
        assert rank[setting]["kv_bytes"] * N_RANKS == single[setting]["kv_bytes"]


def test_heads_the_ranks_cannot_split_are_refused(runs):
    _, ranks = runs
    for rank in ranks:
        message = rank["unsplittable_error"]
        assert message is not None and "6 query / 3 KV heads" in message and "1, 3" in message


def test_rank_counts_divide_both_head_counts():
    assert rank_counts(9, 3) == [1, 3]  # SmolLM2
    assert rank_counts(8, 4) == [1, 2, 4]
    assert rank_counts(32, 8) == [1, 2, 4, 8]


def test_cli_ppl_under_torchrun_reports_once_what_one_process_does(model_dirs, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The grass is green. def f(x):\n    return x + 1\n" * 12)
    options = [str(text), "--model", str(model_dirs[0]), "--methods", "lm-infinite,truncated",
               "--tokens", "120", "--n-global", "2", "--n-local", "16", "--stride", "8",
               "--chunk-size", "25"]
    assert main(["ppl", *options, "--json", str(tmp_path / "one.json"), "--no-progress"]) == 0
    single_table = capsys.readouterr().out
    stdout, stderr = launch_ranks("-m", "lm_infinite.apps.cli", "ppl", *options,
                                  "--json", str(tmp_path / "ranks.json"))
    assert stdout == single_table  # rank 0's table, once
    assert stderr.count("loading model") == 1
    for method in ("lm-infinite", "truncated"):  # one progress bar each, which starts at 0% once
        assert stderr.count(f"{method}:   0%") == 1, stderr
    single = json.loads((tmp_path / "one.json").read_text())["nll"]
    ranks = json.loads((tmp_path / "ranks.json").read_text())["nll"]
    for method in single:
        # The JSON rounds NLL to 4 decimals: float32 rounding apart may round either way.
        torch.testing.assert_close(nll_tensor(ranks[method]), nll_tensor(single[method]),
                                   atol=1.5e-4, rtol=0, equal_nan=True)


def test_cli_generate_under_torchrun_prints_the_one_process_continuation(model_dirs, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The grass is green. The sky is blue. " * 8)
    options = [str(prompt), "--model", str(model_dirs[0]), "--max-new-tokens", "24",
               "--n-global", "2", "--n-local", "16", "--chunk-size", "25"]
    assert main(["generate", *options]) == 0
    stdout, _ = launch_ranks("-m", "lm_infinite.apps.cli", "generate", *options)
    assert stdout == capsys.readouterr().out


def nll_tensor(values: list) -> torch.Tensor:
    return torch.tensor([float("nan") if x is None else x for x in values])
