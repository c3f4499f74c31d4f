"""Streams of any length through an LM-Infinite-enabled model, in chunks, in constant memory.

`generate()` re-creates position and mask tensors that grow with the text at every step; this
loop passes each chunk with its own positions (position_ids of the chunk's length) and no mask,
so that nothing it holds grows with the stream: the LambdaCache (G + L tokens per layer), one
chunk of activations, and the last position's logits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from .decode_step import StaticDecodeStep, choose_tokens, draw_noise
from .distributed import broadcast_from_first_rank
from .hf import LambdaCache, cache_argument_name
from .hf.families import decoder_of
from .hf.state import state_of

__all__ = ["DEFAULT_CHUNK_SIZE", "LambdaStream"]

# Tokens per prefill forward. Memory is constant in the stream's length (one chunk of
# activations plus the rings) and grows with this; the value is not yet chosen by measurement
# on a GPU (bench/e2e.py --chunk-sizes sweeps it): 1024 is what the CPU runs have used.
DEFAULT_CHUNK_SIZE = 1024


class LambdaStream:
    """One stream (batch of equal-length sequences) through an enabled model.

    feed(ids) -> next-token logits; nll(ids) -> per-token negative log-likelihood;
    generate(n) -> continuation tokens. Calls continue the same stream.

    generate() runs a StaticDecodeStep (fixed buffers, no host synchronisation inside a step):
    replayed as a CUDA graph when cuda_graphs is on (the default for a model on CUDA without
    top-k middle attention), and through torch.compile when compile=True (e.g. on the CPU).
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE, cuda_graphs: bool | None = None,
                 compile: bool = False) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"LambdaStream: chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.chunk_size = model, chunk_size
        self.cache = LambdaCache(model)  # raises unless lm_infinite.enable(model) was called
        self._decoder = decoder_of(model)
        self._head = model.get_output_embeddings()
        self._cache_keyword = cache_argument_name(self._decoder)
        self._device = next(model.parameters()).device
        if cuda_graphs is None:
            cuda_graphs = self._device.type == "cuda" and state_of(model).top_k == 0
        if cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"LambdaStream: cuda_graphs=True needs a model on CUDA, not {self._device}")
        self.cuda_graphs, self.compile = cuda_graphs, compile
        # Built at the first generate(): it binds this stream's cache tensors.
        self._step: StaticDecodeStep | None = None
        # Logits at the last fed position: they predict the next token. [batch, vocab] or None.
        self.next_logits: torch.Tensor | None = None

    def fork(self) -> "LambdaStream":
        """An independent copy of the stream (same model, copied cache): read a long prefix
        once, then continue it several ways, e.g. several questions about one document."""
        twin = copy.copy(self)
        twin.cache = copy.deepcopy(self.cache)
        twin._step = None
        twin.next_logits = None if self.next_logits is None else self.next_logits.clone()
        return twin

    @property
    def position(self) -> int:
        """Tokens fed so far, i.e. the position of the next token."""
        return self.cache.get_seq_length()

    def _hidden_states(self, chunk: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.position, self.position + chunk.shape[1], device=self._device)
        output = self._decoder(
            input_ids=chunk.to(self._device), position_ids=positions.unsqueeze(0), use_cache=True,
            **{self._cache_keyword: self.cache},
        )
        return output.last_hidden_state

    def _checked_ids(self, input_ids) -> torch.Tensor:
        """input_ids as [batch, tokens], checked whole before the first chunk runs: a bad id in
        a later chunk must not leave the stream half-fed."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] or [tokens] tensor, "
                             f"got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        batch = self.next_logits.shape[0] if self.next_logits is not None else input_ids.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"input_ids must continue the stream's batch of {batch}, got shape "
                             f"{tuple(input_ids.shape)}")
        vocab = self._decoder.get_input_embeddings().num_embeddings
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), "
                             f"got {low if low < 0 else high}")
        return input_ids

    def _forward_chunks(self, input_ids: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(chunk, its last hidden states) for each chunk of input_ids ([batch, tokens] or
        [tokens]), in order, each appended to the stream. Top-k middle attention (if enabled)
        serves the last top_k_rows tokens of input_ids, whatever the chunk size."""
        input_ids = self._checked_ids(input_ids)
        state = state_of(self.model)
        after = input_ids.shape[1]  # tokens after the current chunk
        for chunk in input_ids.split(self.chunk_size, dim=1):
            chunk = chunk.to(self._device)
            after -= chunk.shape[1]
            rows = chunk.shape[1] if state.top_k_rows is None else state.top_k_rows - after
            state.chunk_top_k_rows = min(chunk.shape[1], max(0, rows))
            try:
                hidden = self._hidden_states(chunk)
            finally:
                state.chunk_top_k_rows = None
            yield chunk, hidden

    @torch.inference_mode()
    def feed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Append tokens to the stream; returns the logits that predict the next token,
        float32 [batch, vocab] (only the last row is projected: a long prompt costs no
        [tokens, vocab] tensor)."""
        for _, hidden in self._forward_chunks(input_ids):
            self.next_logits = self._head(hidden[:, -1]).float()
        return self.next_logits

    @torch.inference_mode()
    def nll(self, input_ids: torch.Tensor, progress=None) -> torch.Tensor:
        """Append tokens and return each one's negative log-likelihood given everything before
        it in the stream: float32 [batch, tokens]; NaN for the stream's very first token, which
        nothing predicts. Logits are never held for more than one chunk. `progress`, if given,
        is called with the number of tokens of each chunk done (e.g. a tqdm's update)."""
        pieces = []
        for chunk, hidden in self._forward_chunks(input_ids):
            logits = self._head(hidden).float()
            # Token t is predicted by the logits at t - 1: the previous chunk's last row first.
            previous = self.next_logits
            if previous is None:
                previous = torch.full_like(logits[:, :1], float("nan"))
            else:
                previous = previous.unsqueeze(1)
            predictors = torch.cat([previous, logits[:, :-1]], dim=1)
            log_probs = F.log_softmax(predictors, dim=-1)
            pieces.append(-log_probs.gather(-1, chunk.unsqueeze(-1)).squeeze(-1))
            self.next_logits = logits[:, -1]
            if progress is not None:
                progress(chunk.shape[1])
        return torch.cat(pieces, dim=1).cpu()

    @torch.inference_mode()
    def generate(self, max_new_tokens: int, *, stop_token_ids: Iterable[int] = (),
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> Iterator[int]:
        """Continue the stream (batch 1): yields up to max_new_tokens token ids, greedy when
        temperature is 0, else sampled. Each token is fed back before it is yielded, so the
        stream always holds everything produced; a stop token ends the continuation."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"LambdaStream.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
            raise ValueError(f"LambdaStream.generate: temperature must be a finite number >= 0, got {temperature!r}")
        if self.next_logits is None:
            raise ValueError("LambdaStream.generate: feed a prompt first")
        if self.next_logits.shape[0] != 1:
            raise ValueError("LambdaStream.generate: needs a stream of batch 1")
        stop = set(stop_token_ids)
        if self._step is None:
            self._step = StaticDecodeStep(self.model, self.cache, compile=self.compile,
                                          cuda_graph=self.cuda_graphs)
        step, sample = self._step, temperature > 0
        noise = draw_noise(torch.empty_like(self.next_logits), generator) if sample else None
        step.start(choose_tokens(self.next_logits, temperature if sample else None, noise), temperature)
        for _ in range(max_new_tokens):
            token = int(step.next_token_ids[0])  # the one host synchronisation per token
            if sample:
                # Under tensor parallelism every rank samples with its own generator; all must
                # feed the same token. (Greedy needs no such step: every rank holds the same
                # gathered logits, so they take the same argmax.)
                token = broadcast_from_first_rank(self.model, token)
                step.next_token_ids.fill_(token)
            step(sample=sample, generator=generator)  # feeds it and chooses the next
            self.next_logits = step.logits
            yield token
            if token in stop:
                return
