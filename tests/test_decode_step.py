"""StaticDecodeStep (eager, compiled, CUDA graph) against the eager stream fed token by token."""

import pytest
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.hf import LambdaSettings, TopK
from hf_tiny_models import VOCAB, build
from lm_infinite.decode_step import StaticDecodeStep, choose_tokens, draw_noise
from lm_infinite.streaming import LambdaStream

N_GLOBAL, N_LOCAL = 2, 10
NEW_TOKENS = 64  # well past the window: the ring wraps several times during decoding


def _prompt(length=2 * N_LOCAL + 3, seed=5):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _eager_reference(model, prompt, new_tokens, temperature=0.0, generator=None):
    """(tokens, logits after each) from LambdaStream.feed one token at a time: the chunked
    forward path, which the decode step must reproduce."""
    stream = LambdaStream(model)
    logits = stream.feed(prompt)
    tokens, after = [], []
    for _ in range(new_tokens):
        noise = draw_noise(torch.empty_like(logits), generator) if temperature > 0 else None
        token = choose_tokens(logits, temperature if temperature > 0 else None, noise)
        logits = stream.feed(token.view(1, 1)).clone()
        tokens.append(int(token))
        after.append(logits)
    return tokens, torch.cat(after)


def _step_run(model, prompt, new_tokens, **options):
    stream = LambdaStream(model, **options)
    stream.feed(prompt)
    tokens, after = [], []
    for token in stream.generate(new_tokens):
        tokens.append(token)
        after.append(stream.next_logits.clone())
    return stream, tokens, torch.cat(after)


@pytest.mark.parametrize("family", ["llama3-scaled", "qwen2-yarn", "phi3-partial", "qwen3"])
def test_greedy_step_equals_the_eager_stream(family):
    model = lminf_hf.enable(build(family), n_global=N_GLOBAL, n_local=N_LOCAL)
    prompt = _prompt()
    tokens, logits = _eager_reference(model, prompt, NEW_TOKENS)
    stream, step_tokens, step_logits = _step_run(model, prompt, NEW_TOKENS)
    assert step_tokens == tokens
    torch.testing.assert_close(step_logits, logits, atol=1e-5, rtol=1e-5)
    assert stream.position == prompt.shape[1] + NEW_TOKENS
    # The stream continues from the step's state: feeding more agrees with the reference
    # (which reads all at once, through PyTorch's linears; the step's tokens went through the
    # decode kernel's: float32 sums in another order).
    more = _prompt(7, seed=9)
    reference = LambdaStream(model)
    reference.feed(torch.cat([prompt, torch.tensor([tokens]), more], dim=1))
    torch.testing.assert_close(stream.feed(more), reference.next_logits, atol=1e-4, rtol=1e-4)


def test_decode_linears_give_pytorchs_tokens_and_logits():
    """cpu_linears (the default on the CPU) against PyTorch's linears: the same greedy tokens,
    logits equal up to float32 summation order."""
    model = lminf_hf.enable(build("llama3-scaled"), n_global=N_GLOBAL, n_local=N_LOCAL)
    prompt = _prompt()
    _, tokens, logits = _step_run(model, prompt, NEW_TOKENS, cpu_linears=False)
    stream, routed_tokens, routed_logits = _step_run(model, prompt, NEW_TOKENS)
    assert stream.cpu_linears
    assert routed_tokens == tokens
    torch.testing.assert_close(routed_logits, logits, atol=1e-4, rtol=1e-4)
    assert not torch.equal(routed_logits, logits)  # the kernel really ran


def test_sampled_step_draws_what_the_eager_stream_draws():
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    prompt = _prompt()
    tokens, _ = _eager_reference(model, prompt, NEW_TOKENS, temperature=1.5,
                                 generator=torch.Generator().manual_seed(11))
    stream = LambdaStream(model)
    stream.feed(prompt)
    sampled = list(stream.generate(NEW_TOKENS, temperature=1.5, generator=torch.Generator().manual_seed(11)))
    assert sampled == tokens
    assert len(set(sampled)) > 8  # really sampled, not greedy


def test_compiled_step_has_no_graph_break_and_no_recompilation():
    torch._dynamo.reset()
    model = lminf_hf.enable(build("llama3-scaled"), n_global=N_GLOBAL, n_local=N_LOCAL)
    prompt = _prompt()
    tokens, logits = _eager_reference(model, prompt, NEW_TOKENS)
    torch._dynamo.utils.counters.clear()
    # fullgraph=True inside the step: a graph break would raise here.
    _, step_tokens, step_logits = _step_run(model, prompt, NEW_TOKENS, compile=True)
    assert step_tokens == tokens
    torch.testing.assert_close(step_logits, logits, atol=1e-4, rtol=1e-4)
    # One graph for all 64 steps: nothing in the step specialises on the position.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_bad_options_are_reported():
    model = lminf_hf.enable(build("llama"), n_global=N_GLOBAL, n_local=N_LOCAL)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a model on CUDA"):
        LambdaStream(model, cuda_graphs=True)
    with pytest.raises(ValueError, match="feed a prompt first"):
        StaticDecodeStep(model, lminf_hf.LambdaCache(model))
    top_k = lminf_hf.enable(build("llama"), LambdaSettings(N_GLOBAL, N_LOCAL, top_k=TopK(k=2)))
    stream = LambdaStream(top_k, compile=True)
    stream.feed(_prompt())
    with pytest.raises(ValueError, match="top-k"):
        next(stream.generate(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_equals_the_cpu_stream():
    model = lminf_hf.enable(build("llama3-scaled"), n_global=N_GLOBAL, n_local=N_LOCAL)
    prompt = _prompt()
    tokens, logits = _eager_reference(model, prompt, NEW_TOKENS)
    model.cuda()
    stream, step_tokens, step_logits = _step_run(model, prompt, NEW_TOKENS)
    assert stream.cuda_graphs and stream._step._graphs  # replayed, not run eagerly
    assert step_tokens == tokens
    torch.testing.assert_close(step_logits.cpu(), logits, atol=1e-3, rtol=1e-3)
    model.cpu()


@pytest.mark.slow
def test_smollm2_step_equals_the_eager_stream():
    from lm_infinite.apps.eval.corpus import default_corpus_tokens
    from lm_infinite.models import load_model

    model, tokenizer = load_model()
    lminf_hf.enable(model, n_local=256)  # a small window, so that 64 tokens of decoding wrap it
    prompt = default_corpus_tokens(tokenizer, 300)[None]
    tokens, logits = _eager_reference(model, prompt, NEW_TOKENS)
    _, step_tokens, step_logits = _step_run(model, prompt, NEW_TOKENS)
    assert step_tokens == tokens
    torch.testing.assert_close(step_logits, logits, atol=1e-4, rtol=1e-4)
    _, compiled_tokens, compiled_logits = _step_run(model, prompt, NEW_TOKENS, compile=True)
    assert compiled_tokens == tokens
    torch.testing.assert_close(compiled_logits, logits, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smollm2_cuda_graph_stream_generates_the_cpu_stream_tokens():
    from lm_infinite.apps.eval.corpus import default_corpus_tokens
    from lm_infinite.models import load_model

    model, tokenizer = load_model()
    lminf_hf.enable(model)
    prompt = default_corpus_tokens(tokenizer, 200)[None]
    cpu = LambdaStream(model)
    cpu.feed(prompt)
    expected = list(cpu.generate(32))
    model.cuda()
    stream = LambdaStream(model)
    stream.feed(prompt)
    assert list(stream.generate(32)) == expected
    assert stream._step._graphs
