"""StaticDecodeStep: one decode step of an LM-Infinite model over buffers allocated once.

A decode step of a small batch is mostly launch and Python overhead on a GPU: 30-100 layers of
small kernels per token. Replaying the step as one captured CUDA graph (or one compiled graph
on the CPU) removes that, but only if nothing in the step depends on a host value that changes
per token. Here: the input token and its position live in device tensors updated in place, the
LambdaCache rings find their slots from their device-side `next_position`, and the next token
is chosen inside the step and written back into the input buffer, so that the step feeds
itself. The host keeps one piece of bookkeeping outside the graph: each ring's `n_seen`.
"""

from __future__ import annotations

import gc

import torch

from .decode_linears import decode_linears_if
from .hf import ForwardContext, LambdaCache, cache_argument_name, decoder_of, state_of

__all__ = ["StaticDecodeStep", "choose_tokens", "draw_noise", "outside_nucleus", "positive_float32"]


def choose_tokens(logits: torch.Tensor, temperature: float | torch.Tensor | None,
                  noise: torch.Tensor | None = None,
                  top_p: float | torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row of logits ([batch, vocab] -> int64 [batch]): greedy when temperature
    is None, else a draw from softmax(logits / temperature) by the Gumbel-max trick,
    argmax(logits / T - log E) with E ~ Exp(1) in `noise`. Unlike torch.multinomial it has no
    data-dependent control flow, so it can live inside a captured graph; the stream's eager
    path uses it too, so that both paths draw the same tokens from the same generator.

    top_p (nucleus sampling, in (0, 1]; None: off): the draw is restricted to the smallest set
    of most probable tokens whose probability reaches top_p, renormalised."""
    if temperature is None:
        return logits.argmax(dim=-1)
    # Shifted so that the largest is 0: a tiny temperature then sends every other logit to
    # -inf, never the largest to inf or NaN, and the draw becomes greedy, its limit.
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_p is not None:
        scaled = scaled.masked_fill(outside_nucleus(scaled, top_p), float("-inf"))
    return (scaled - noise.log()).argmax(dim=-1)


def outside_nucleus(scaled: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """True for the tokens of each row ([batch, vocab] logits) outside the nucleus: those whose
    more probable tokens already hold top_p of the probability. The most probable token is
    always inside, so a tiny top_p is greedy. One sort of the vocabulary, no host sync."""
    ordered, order = scaled.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    outside = (probs.cumsum(dim=-1) - probs) >= top_p  # mass strictly before each token
    # The most probable token stays in even when top_p underflowed to 0 in float32.
    outside[..., 0] = False
    return outside.scatter(-1, order, outside)


def draw_noise(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill `out` with Exp(1) draws from `generator` (which may live on another device)."""
    if generator is None or generator.device == out.device:
        return out.exponential_(generator=generator)
    return out.copy_(torch.empty(out.shape, device=generator.device).exponential_(generator=generator))


class StaticDecodeStep:
    """Feeds one token per call to `cache`'s stream and chooses the next one.

    Buffers (all on the model's device, allocated once): `input_ids` [batch, 1] int64, the
    token the next call feeds, overwritten by the call with the token it chooses;
    `position_ids` [batch, 1] int64, that token's position; `logits` [batch, vocab] float32,
    the logits after the token fed last; `noise` [batch, vocab], Exp(1) draws for sampling,
    filled before each sampled step; `temperature` and `top_p` [1]. Batches of several sequences also get
    `padding` [batch] int64 (0 or 1): a sequence set to 1 is fed as padding (nothing stored,
    its position stays), which is how a finished sequence stops changing; `position_ids` then
    holds each sequence's own next position.

    compile=True runs the step through torch.compile (fullgraph: a graph break is an error);
    cuda_graph=True captures it once per mode (greedy, sampled) and replays the graph. Top-k
    middle attention grows its store on the host, so it runs eagerly only. cpu_linears=True
    (the default) runs a CPU model's linear layers on lminf's decode matrix-vector kernel
    during the step (lm_infinite.decode_linears); False keeps PyTorch's.
    """

    def __init__(self, model: torch.nn.Module, cache: LambdaCache, *, compile: bool = False,
                 cuda_graph: bool = False, cpu_linears: bool = True) -> None:
        state = state_of(model)
        self.rings = [layer.ring for layer in cache.layers]
        if any(ring is None for ring in self.rings):
            raise ValueError("StaticDecodeStep: the cache is empty; feed a prompt first")
        if (compile or cuda_graph) and state.top_k > 0:
            raise ValueError("StaticDecodeStep: top-k middle attention grows its store on the host; "
                             "it cannot be compiled or captured (use compile=False, cuda_graph=False)")
        device = self.rings[0].k.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"StaticDecodeStep: cuda_graph=True needs a model on CUDA, not {device}")
        self.cache = cache
        self._decoder = decoder_of(model)
        self._head = model.get_output_embeddings()
        self._cache_keyword = cache_argument_name(self._decoder)
        batch, vocab = self.rings[0].k.shape[0], self._head.out_features
        self.input_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.logits = torch.zeros(batch, vocab, dtype=torch.float32, device=device)
        self.noise = torch.ones(batch, vocab, dtype=torch.float32, device=device)
        self.temperature = torch.ones(1, dtype=torch.float32, device=device)
        self.top_p = torch.ones(1, dtype=torch.float32, device=device)
        self._nucleus = False  # top_p < 1: sampled steps also restrict the draw to the nucleus
        # Batch 1 never pads a step (its stream just ends), and keeps the unpadded op path.
        self.padding = torch.zeros(batch, dtype=torch.int64, device=device) if batch > 1 else None
        self._context = ForwardContext(padding_rows=self.padding)
        # reorder_for_locality would move each layer's attention (a reader of the ring) after
        # the ring's append (in the functional graph nothing orders them), and then inductor
        # can no longer append in place: it copies every ring twice per step (2 x 6 MB per
        # layer for SmolLM2 at 8K, most of a compiled step's time).
        # A plain function of the step, not a bound method: `self._forward = self._step` would
        # make every step a reference cycle, holding its cache until the cyclic collector runs.
        self._forward = (torch.compile(_decode_step, fullgraph=True, dynamic=False,
                                       options={"reorder_for_locality": False})
                         if compile else _decode_step)
        self._compiled, self._traced = compile, set()
        self._linears = decode_linears_if(cpu_linears and device.type == "cpu", model,
                                          [self._decoder, self._head])
        self._cuda_graph = cuda_graph
        self._graphs: dict[tuple[bool, bool], torch.cuda.CUDAGraph] = {}

    def start(self, token_ids: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0) -> None:
        """Set the token the next call feeds ([batch] or [batch, 1]), at the stream's next
        position, and the sampling temperature (0: greedy) and top_p of the calls that follow."""
        self.input_ids.copy_(token_ids.view(-1, 1))
        self.position_ids.copy_(self.rings[0].next_position.view(-1, 1))
        if temperature > 0:
            self.temperature.fill_(positive_float32(temperature))
        self.top_p.fill_(top_p)
        self._nucleus = top_p < 1.0

    @property
    def next_token_ids(self) -> torch.Tensor:
        return self.input_ids[:, 0]

    def __call__(self, *, sample: bool = False, generator: torch.Generator | None = None) -> None:
        """Feed `input_ids` at `position_ids`; afterwards `logits` holds the logits it yields
        and `input_ids` the token chosen from them (sampled with `generator` if sample)."""
        if sample:
            draw_noise(self.noise, generator)  # outside the graph: the generator stays the caller's
        for ring in self.rings:
            ring.counts_on_append = False
        mode = (sample, sample and self._nucleus)
        try:
            if not self._cuda_graph:
                with self._linears:
                    self._run(mode)
            elif mode in self._graphs:
                self._graphs[mode].replay()
            else:
                self._graphs[mode] = self._capture(*mode)
        finally:
            for ring in self.rings:
                ring.counts_on_append = True
        for ring in self.rings:
            ring.count(1)

    def _run(self, mode: tuple[bool, bool]) -> None:
        if not self._compiled or mode in self._traced:
            return self._forward(self, *mode)
        graphs = _compiled_graphs()
        self._forward(self, *mode)
        self._traced.add(mode)
        if _compiled_graphs() != graphs:
            # Tracing leaves reference cycles (the frames it walked) that reach this step's
            # tensors: collect them once now, or a dropped stream would keep its cache until
            # the cyclic collector happened to run.
            gc.collect()

    def _capture(self, sample: bool, nucleus: bool) -> torch.cuda.CUDAGraph:
        """Run this call's step for real on a side stream (which also warms up the allocator and
        the libraries' workspaces, as capture requires), then record it: recording runs no
        kernel, so the stream's state advances once."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(self, sample, nucleus)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward(self, sample, nucleus)
        return graph


def _decode_step(step: StaticDecodeStep, sample: bool, nucleus: bool = False) -> None:
    """One step of `step`: feed its input_ids, keep the logits, choose the next tokens."""
    output = step._decoder(input_ids=step.input_ids, position_ids=step.position_ids, use_cache=True,
                           lminf_context=step._context, **{step._cache_keyword: step.cache})
    logits = step._head(output.last_hidden_state[:, -1]).float()
    step.logits.copy_(logits)
    chosen = choose_tokens(logits, step.temperature if sample else None, step.noise,
                           step.top_p if nucleus else None)
    step.input_ids.copy_(chosen.unsqueeze(-1))
    if step.padding is None:
        step.position_ids.add_(1)
    else:
        step.position_ids.add_(1 - step.padding.unsqueeze(-1))


def positive_float32(value: float) -> float:
    """value, raised to the smallest normal float32 if it would round to 0 (or a subnormal)
    there: a temperature of 1e-50 means greedy, not a division by zero."""
    return max(value, torch.finfo(torch.float32).tiny)


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]
