"""LM-Infinite on a model loaded with transformers' tensor-parallel plan: 2 CPU ranks (gloo,
started by torchrun) against the same model in one process."""

from __future__ import annotations

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
from lm_infinite.hf.tensor_parallel import rank_counts
from lm_infinite.models import load_model

N_RANKS = 2
LAUNCH_TIMEOUT_S = 240  # the whole 2-rank run takes well under a minute on 2 busy cores


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


def launch_ranks(*args: str) -> None:
    """Run tp_worker.py on N_RANKS processes; on failure or timeout, kill the whole process
    group (torchrun and its workers) and fail with their output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={N_RANKS}",
               "--standalone", str(Path(tp_worker.__file__)), *args]
    # One thread per rank: the ranks share the machine's few cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the {N_RANKS} ranks did not finish in {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"torchrun exited {process.returncode}:\n{output[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [results of each rank])."""
    root = tmp_path_factory.mktemp("tensor_parallel")
    model_dir = save_llama(root / "llama-8q-4kv", n_heads=8, n_kv_heads=4)
    unsplittable_dir = save_llama(root / "llama-6q-3kv", n_heads=6, n_kv_heads=3)
    launch_ranks(str(model_dir), str(unsplittable_dir), str(root))
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(N_RANKS)]
    model, _ = load_model(model_dir)
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
