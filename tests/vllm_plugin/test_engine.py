"""The plugin in vLLM's engine, SmolLM2-135M-Instruct in float32 on the CPU, against independent
references: stock vLLM within the window, the project's Hugging Face path (enable +
LambdaStream) beyond it, each request alone for concurrent batches, and vLLM's own KV usage
figures for the memory bound.

Settings: n_global 4, n_local 128, blocks of 32 tokens, prefill chunks of at most 64 tokens
(max_num_batched_tokens), so that prompts several windows long are read in many chunks and
mixed with decode steps. max_model_len is 2^20, far past the model's 8192-token training
length."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("vllm")

from vllm_helpers import long_text, model_dir, set_engine_env  # noqa: E402

set_engine_env()

from vllm import LLM, SamplingParams, TokensPrompt  # noqa: E402

import lm_infinite.vllm as lv  # noqa: E402
from lm_infinite.vllm.kv_cache import max_blocks_per_request  # noqa: E402

N_GLOBAL, N_LOCAL, BLOCK, CHUNK = 4, 128, 32, 64
MAX_MODEL_LEN = 1 << 20
ENGINE = dict(dtype="float32", enforce_eager=True, block_size=BLOCK, max_num_batched_tokens=CHUNK,
              max_num_seqs=8, seed=0)
# fp32 logprobs of two implementations that sum in different orders
LOGPROB_ATOL = 2e-4


@pytest.fixture(scope="module")
def path():
    return str(model_dir())


@pytest.fixture(scope="module")
def lminf(path):
    llm = LLM(model=path, max_model_len=MAX_MODEL_LEN, disable_log_stats=False,
              hf_overrides=lv.hf_overrides(path, n_global=N_GLOBAL, n_local=N_LOCAL), **ENGINE)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def tokens(lminf):
    return lminf.get_tokenizer().encode(long_text())


def _prompt(tokens, start: int, n: int) -> TokensPrompt:
    return TokensPrompt(prompt_token_ids=tokens[start:start + n])


def _check_logprobs(got, want, what: str, atol: float = LOGPROB_ATOL) -> float:
    """got, want: per position {token id: logprob} (vLLM's Logprob objects or floats); the
    tokens both list must agree. Returns the largest difference."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            assert a is None and b is None, f"{what}: position {i}"
            continue
        common = set(a) & set(b)
        assert common, f"{what}: position {i} shares no token"
        for t in common:
            x = getattr(a[t], "logprob", a[t])
            y = getattr(b[t], "logprob", b[t])
            if math.isinf(x) and math.isinf(y):
                continue
            worst = max(worst, abs(x - y))
            assert abs(x - y) <= atol, f"{what}: position {i} token {t}: {x} vs {y}"
    return worst


def test_registered_and_long_max_model_len(lminf):
    config = lminf.llm_engine.model_config
    assert config.hf_config.architectures == ["LMInfiniteLlamaForCausalLM"]
    assert config.max_model_len == MAX_MODEL_LEN > config.hf_config.max_position_embeddings


def test_within_window_equals_stock_vllm(path, lminf, tokens):
    """Up to n_local tokens (prompt and generation), LM-Infinite is the stock model: same tokens,
    same logprobs of the prompt and of every generated token as stock vLLM's."""
    params = SamplingParams(temperature=0, max_tokens=N_LOCAL - 60, logprobs=5, prompt_logprobs=5)
    prompts = [_prompt(tokens, 1000, 60), _prompt(tokens, 5000, 7)]
    ours = lminf.generate(prompts, params)
    stock = LLM(model=path, max_model_len=4096, **ENGINE)
    try:
        theirs = stock.generate(prompts, params)
    finally:
        stock.llm_engine.engine_core.shutdown()
    for a, b in zip(ours, theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        worst = _check_logprobs(a.prompt_logprobs, b.prompt_logprobs, "prompt")
        worst = max(worst, _check_logprobs(a.outputs[0].logprobs, b.outputs[0].logprobs, "generated"))
        print(f"largest logprob difference to stock vLLM: {worst:.2e}")


def test_beyond_window_equals_hf_path(path, lminf, tokens):
    """A prompt 4.7 windows long plus 64 generated tokens: logprobs of the prompt and of the top
    20 tokens at every step equal the project's own Hugging Face path (enable + LambdaStream,
    float32), and the greedy tokens are the same."""
    from transformers import AutoModelForCausalLM

    import lm_infinite
    from lm_infinite.streaming import LambdaStream

    prompt = tokens[20000:20000 + 600]
    params = SamplingParams(temperature=0, max_tokens=64, logprobs=20, prompt_logprobs=1)
    out = lminf.generate([TokensPrompt(prompt_token_ids=prompt)], params)[0]
    generated = list(out.outputs[0].token_ids)

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm_infinite.enable(model, n_global=N_GLOBAL, n_local=N_LOCAL)
    stream = LambdaStream(model, chunk_size=100)
    nll = stream.nll(torch.tensor([prompt]))[0]
    # vLLM's prompt logprobs: position i holds the logprob of prompt[i] (None for the first).
    want = [None] + [{t: -float(x)} for t, x in zip(prompt[1:], nll[1:])]
    worst = _check_logprobs(out.prompt_logprobs, want, "prompt")
    reference = []
    with torch.inference_mode():
        logits = stream.next_logits[0]
        for step, token in enumerate(generated):
            logprobs = torch.log_softmax(logits.double(), -1)
            assert int(logprobs.argmax()) == token, f"greedy token {step} differs"
            reference.append({t: float(logprobs[t]) for t in out.outputs[0].logprobs[step]})
            logits = stream.feed(torch.tensor([[token]]))[0]
    worst = max(worst, _check_logprobs(out.outputs[0].logprobs, reference, "generated"))
    print(f"largest logprob difference to the HF path: {worst:.2e}")


def test_concurrent_requests_equal_each_alone(lminf, tokens):
    """8 requests of different lengths at once (prefill chunks and decode steps mixed in one
    batch): each gets the tokens and logprobs it gets alone."""
    lengths = [5, 40, 130, 200, 300, 450, 600, 90]
    prompts = [_prompt(tokens, 3000 * i, n) for i, n in enumerate(lengths)]
    params = [SamplingParams(temperature=0, max_tokens=12 + 3 * i, logprobs=3) for i in range(len(prompts))]
    together = lminf.generate(prompts, params)
    worst = 0.0
    for prompt, p, both in zip(prompts, params, together):
        alone = lminf.generate([prompt], p)[0]
        assert both.outputs[0].token_ids == alone.outputs[0].token_ids
        worst = max(worst, _check_logprobs(both.outputs[0].logprobs, alone.outputs[0].logprobs, "generated"))
    print(f"largest logprob difference, together vs alone: {worst:.2e}")


def test_kv_blocks_bounded_and_no_prefix_reuse(lminf, tokens):
    """As a request grows to 5.5 windows, its KV blocks (vLLM's kv_cache_usage figure times the
    pool) stay at ceil(G / bs) + ceil(L / bs) + 1 during decode, and within the admission bound
    (the window plus a prefill chunk) while the prompt is read. The same prompt again reuses no
    prefix (prefix caching is off for these layers) and gives the same tokens."""
    engine = lminf.llm_engine
    pool = engine.vllm_config.cache_config.num_gpu_blocks - 1  # less the null block
    prompt = tokens[40000:40000 + 600]
    params = SamplingParams(temperature=0, max_tokens=100)
    decode_bound = max_blocks_per_request(N_GLOBAL, N_LOCAL, BLOCK)
    prefill_bound = max_blocks_per_request(N_GLOBAL, N_LOCAL, BLOCK, in_flight=CHUNK)
    assert decode_bound == math.ceil(N_GLOBAL / BLOCK) + math.ceil(N_LOCAL / BLOCK) + 1
    runs = []
    for run in range(2):
        engine.add_request(f"grow-{run}", TokensPrompt(prompt_token_ids=prompt), params)
        used, finished = [], None
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished = output
            usage = {m.name: m for m in lminf.get_metrics()}["vllm:kv_cache_usage_perc"].value
            used.append(round(usage * pool))
        runs.append(finished)
        prefill_steps = math.ceil(len(prompt) / CHUNK)
        assert max(used) <= prefill_bound, used
        assert max(used[prefill_steps:]) <= decode_bound, used[prefill_steps:]
        print(f"blocks in use: prefill max {max(used[:prefill_steps])} (bound {prefill_bound}), decode max "
              f"{max(used[prefill_steps:])} (bound {decode_bound}); {len(prompt) + 100} tokens = "
              f"{(len(prompt) + 100) / N_LOCAL:.1f} windows would need {math.ceil(700 / BLOCK)} blocks")
    assert runs[1].num_cached_tokens == 0
    assert runs[0].outputs[0].token_ids == runs[1].outputs[0].token_ids
