"""Streams of any length through an LM-Infinite-enabled model, in chunks, in constant memory.

`generate()` re-creates position and mask tensors that grow with the text at every step; this
loop passes each chunk with its own positions (position_ids of the chunk's length) and no mask,
so that nothing it holds grows with the stream: the LambdaCache (G + L tokens per layer), one
chunk of activations, and the last position's logits.

Batches of different lengths: a list of prompts is left-padded into one [batch, tokens] block
(or a padded block comes with its attention_mask). Each chunk tells the attention how many of
its leading rows are padding per sequence; those rows are neither attended to nor stored nor
counted as positions, so every sequence computes what it would alone, and its prompt ends at
the block's last column.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .decode_linears import decode_linears_if
from .decode_step import StaticDecodeStep, choose_tokens, draw_noise, positive_float32
from .distributed import broadcast_from_first_rank, tensor_parallel_size
from .hf import ForwardContext, LambdaCache, cache_argument_name, decoder_of, state_of
from .hf.cache import RowCaches
from .hf.padding import padding_from_mask

__all__ = ["DEFAULT_CHUNK_SIZE", "LambdaStream", "decode_rows"]

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

# Tokens per prefill forward. Memory is constant in the stream's length (one chunk of
# activations plus the rings) and grows with this; the value is not yet chosen by measurement
# on a GPU (bench/e2e.py --chunk-sizes sweeps it): 1024 is what the CPU runs have used.
DEFAULT_CHUNK_SIZE = 1024

# A ragged batch is prefilled one sequence at a time (each into its own row of the cache, no
# padding rows computed) when left-padding it would compute more than this many times its
# real tokens; below that, one padded forward per chunk serves the whole batch. Top-k middle
# stores (columns shared by the batch) and tensor parallelism always take the padded path.
PADDED_PREFILL_WASTE = 1.25


class LambdaStream:
    """One stream (a batch of sequences, of equal or different lengths) through an enabled model.

    feed(ids) -> next-token logits; nll(ids) -> per-token negative log-likelihood;
    generate(n) -> continuation tokens. Calls continue the same stream. ids: a [batch, tokens]
    (or [tokens]) tensor, the same with attention_mask= for a left-padded block, or a list of
    1-D token sequences of different lengths; every sequence stays at its own position.

    generate() runs a StaticDecodeStep (fixed buffers, no host synchronisation inside a step):
    replayed as a CUDA graph when cuda_graphs is on (the default for a model on CUDA without
    top-k middle attention), and through torch.compile when compile=True (e.g. on the CPU).
    On the CPU, cpu_linears=True (the default) computes the linear layers of decode steps and
    of feeds of a few tokens with lminf's matrix-vector kernel (lm_infinite.decode_linears),
    which reads the weights at memory speed; False keeps PyTorch's.

    pinned_tokens: the stream's first pinned_tokens tokens stay visible for its whole life as
    global tokens (LambdaCache): feed a system prompt first and pin its length, and no query
    ever loses sight of it, however long the conversation grows.
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int = DEFAULT_CHUNK_SIZE, cuda_graphs: bool | None = None,
                 compile: bool = False, cpu_linears: bool = True, pinned_tokens: int = 0) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"LambdaStream: chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.chunk_size = model, chunk_size
        # Raises unless lm_infinite.enable(model) was called.
        self.cache = LambdaCache(model, pinned_tokens=pinned_tokens)
        self._decoder = decoder_of(model)
        self._head = model.get_output_embeddings()
        self._cache_keyword = cache_argument_name(self._decoder)
        self._device = next(model.parameters()).device
        if cuda_graphs is None:
            cuda_graphs = self._device.type == "cuda" and state_of(model).top_k == 0
        if cuda_graphs and self._device.type != "cuda":
            raise ValueError(f"LambdaStream: cuda_graphs=True needs a model on CUDA, not {self._device}")
        self.cuda_graphs, self.compile = cuda_graphs, compile
        self.cpu_linears = cpu_linears and self._device.type == "cpu"
        self._linears = decode_linears_if(self.cpu_linears, model, [self._decoder, self._head])
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

    def save(self, path) -> None:
        """Write the stream (its cache, next-token logits and settings, with a fingerprint of
        the model) to `path`, atomically: a crash leaves the old file or the new one. The file
        holds tensors and plain values only (lm_infinite.saved_stream describes it)."""
        from .saved_stream import save_stream
        save_stream(self, path)

    @classmethod
    def load(cls, path, model: torch.nn.Module, **options) -> "LambdaStream":
        """The stream saved at `path`, continued on `model` (enabled with the same settings):
        what it feeds and generates is bit-identical to what the saved stream would have.
        ValueError naming what differs for another model or other settings. options: the
        constructor's (chunk_size: the saved stream's by default)."""
        from .saved_stream import load_stream
        return load_stream(cls, path, model, **options)

    @property
    def pinned_tokens(self) -> int:
        return self.cache.pinned_tokens

    @property
    def position(self) -> int:
        """Tokens fed so far, i.e. the position of the next token. In a batch of different
        lengths: columns fed, padding included (each sequence's own next position is
        `cache.layers[0].ring.next_position[b]`)."""
        return self.cache.get_seq_length()

    def _padded(self, input_ids, attention_mask) -> tuple[torch.Tensor, list[int] | None]:
        """(ids [batch, tokens], leading padding per sequence or None) of a feed: a tensor with
        an optional left-padding mask, or a list of 1-D sequences, left-padded here."""
        if isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
            if attention_mask is not None:
                raise ValueError("attention_mask goes with a padded input_ids tensor, not with a "
                                 "list of sequences (which the stream pads itself)")
            return _left_pad(input_ids)
        if attention_mask is None:
            return input_ids, None
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("attention_mask needs input_ids as a [batch, tokens] tensor")
        padding = padding_from_mask(attention_mask, input_ids.shape[0], input_ids.shape[1], 0)
        if padding is None:
            return input_ids, None
        padding = padding.sequence.tolist()
        if max(padding) >= input_ids.shape[1]:
            raise ValueError(f"attention_mask: row {padding.index(max(padding))} is all padding; "
                             "every sequence of a feed needs at least one token")
        return input_ids, padding

    def _hidden_states(self, chunk: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        positions = torch.arange(self.position, self.position + chunk.shape[1], device=self._device)
        output = self._decoder(
            input_ids=chunk.to(self._device), position_ids=positions.unsqueeze(0), use_cache=True,
            lminf_context=context, **{self._cache_keyword: self.cache},
        )
        return output.last_hidden_state

    def _checked_ids(self, input_ids) -> torch.Tensor:
        """input_ids as [batch, tokens], checked whole before the first chunk runs: a bad id in
        a later chunk must not leave the stream half-fed."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids (or a list of 1-D token "
                            f"sequences), got {type(input_ids).__name__}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, tokens] or [tokens] tensor, "
                             f"got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in _ID_DTYPES:
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

    def _forward_chunks(self, input_ids, padding: list[int] | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """(chunk, its padding rows per sequence (int64 [batch] or None), its last hidden
        states) for each chunk of input_ids ([batch, tokens] or [tokens]; `padding`: leading
        pad tokens per sequence), in order, each appended to the stream. Top-k middle attention
        (if enabled) serves the last top_k_rows tokens of input_ids, whatever the chunk size
        (left padding keeps every sequence's last token in the last column)."""
        input_ids = self._checked_ids(input_ids)
        state = state_of(self.model)
        after = input_ids.shape[1]  # tokens after the current chunk
        column = 0
        for chunk in input_ids.split(self.chunk_size, dim=1):
            chunk = chunk.to(self._device)
            after -= chunk.shape[1]
            rows = chunk.shape[1] if state.top_k_rows is None else state.top_k_rows - after
            chunk_padding = None
            if padding is not None and max(padding) > column:
                chunk_padding = torch.tensor([min(max(0, p - column), chunk.shape[1]) for p in padding],
                                             dtype=torch.int64, device=self._device)
            context = ForwardContext(padding_rows=chunk_padding, top_k_rows=min(chunk.shape[1], max(0, rows)))
            hidden = self._hidden_states(chunk, context)
            column += chunk.shape[1]
            yield chunk, chunk_padding, hidden

    @torch.inference_mode()
    def feed(self, input_ids, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append tokens to the stream; returns the logits that predict the next token,
        float32 [batch, vocab] (only the last row is projected: a long prompt costs no
        [tokens, vocab] tensor). input_ids: [batch, tokens] or [tokens]; with attention_mask
        (2-D, zeros a prefix of each row) a left-padded block; or a list of 1-D sequences
        (lists or tensors of token ids) of different lengths, one per sequence of the batch."""
        input_ids, padding = self._padded(input_ids, attention_mask)
        with self._linears:
            if padding is not None and self._prefill_by_sequence(input_ids, padding):
                return self._feed_by_sequence(input_ids, padding)
            for _, _, hidden in self._forward_chunks(input_ids, padding):
                self.next_logits = self._head(hidden[:, -1]).float()
        return self.next_logits

    def _prefill_by_sequence(self, input_ids: torch.Tensor, padding: list[int]) -> bool:
        """Whether to feed this ragged batch one sequence at a time (PADDED_PREFILL_WASTE)."""
        batch, width = input_ids.shape
        real = batch * width - sum(padding)
        return (state_of(self.model).top_k == 0 and tensor_parallel_size(self.model) == 1
                and batch * width > PADDED_PREFILL_WASTE * real)

    def _feed_by_sequence(self, input_ids: torch.Tensor, padding: list[int]) -> torch.Tensor:
        """Feed each sequence's real tokens alone, chunk by chunk, into its row of the cache
        (LambdaCache.row: views, no copies), then count the block's columns as the padded
        path would: the stream ends up as if it had been fed left-padded."""
        input_ids = self._checked_ids(input_ids)
        batch, width = input_ids.shape
        if self.cache.layers[0].ring is None:
            config = self._decoder.config
            heads = config.num_attention_heads
            self.cache.allocate(batch, getattr(config, "num_key_value_heads", None) or heads,
                                getattr(config, "head_dim", None) or config.hidden_size // heads,
                                self._head.weight.dtype, self._device)
        logits = []
        for b in range(batch):
            row = self.cache.row(b)
            for chunk in input_ids[b:b + 1, padding[b]:].split(self.chunk_size, dim=1):
                chunk = chunk.to(self._device)
                start = int(row.layers[0].ring.next_position[0])
                positions = torch.arange(start, start + chunk.shape[1], device=self._device)
                hidden = self._decoder(input_ids=chunk, position_ids=positions.unsqueeze(0),
                                       use_cache=True, **{self._cache_keyword: row}).last_hidden_state
            logits.append(self._head(hidden[:, -1]).float())
        for layer in self.cache.layers:
            layer.ring.n_seen += width
            layer.ring.padded = True
        self.next_logits = torch.cat(logits)
        return self.next_logits

    @torch.inference_mode()
    def nll(self, input_ids, progress=None, attention_mask: torch.Tensor | None = None):
        """Append tokens and return each one's negative log-likelihood given everything before
        it in the stream: float32 [batch, tokens]; NaN for the stream's very first token, which
        nothing predicts, and for padding. A list of sequences (see feed) gives a list of 1-D
        tensors, one per sequence, of its own length. Logits are never held for more than one
        chunk. `progress`, if given, is called with the number of tokens of each chunk done
        (e.g. a tqdm's update)."""
        as_list = isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes))
        input_ids, padding = self._padded(input_ids, attention_mask)
        # The logits that predict each sequence's next real token (the stream's, at first).
        carried = self.next_logits
        with self._linears:
            pieces, carried = self._chunk_nll(input_ids, padding, carried, progress)
        self.next_logits = carried
        nll = torch.cat(pieces, dim=1).cpu()
        if as_list:
            return [row[p:] for row, p in zip(nll, padding or [0] * nll.shape[0])]
        return nll

    def _chunk_nll(self, input_ids, padding, carried, progress):
        """(per-chunk NLL tensors, the logits carried past the last chunk) of nll()."""
        pieces = []
        for chunk, chunk_padding, hidden in self._forward_chunks(input_ids, padding):
            logits = self._head(hidden).float()
            if carried is None:
                carried = torch.full_like(logits[:, 0], float("nan"))
            # Token t is predicted by the logits at t - 1, or by the carried ones when t - 1 is
            # before the sequence's first real row of this chunk.
            predictors = torch.cat([carried.unsqueeze(1), logits[:, :-1]], dim=1)
            if chunk_padding is not None:
                rows = torch.arange(chunk.shape[1], device=logits.device)
                first = rows[None, :] <= chunk_padding[:, None]  # [batch, rows]: no real row before
                predictors = torch.where(first[..., None], carried[:, None], predictors)
            log_probs = F.log_softmax(predictors, dim=-1)
            nll = -log_probs.gather(-1, chunk.unsqueeze(-1)).squeeze(-1)
            if chunk_padding is not None:
                nll = nll.masked_fill(rows[None, :] < chunk_padding[:, None], float("nan"))
                real = (chunk_padding < chunk.shape[1])[:, None]
                carried = torch.where(real, logits[:, -1], carried)
            else:
                carried = logits[:, -1]
            pieces.append(nll)
            if progress is not None:
                progress(chunk.shape[1])
        return pieces, carried

    @torch.inference_mode()
    def generate(self, max_new_tokens: int, *, stop_token_ids: Iterable[int] = (),
                 temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
                 ) -> Iterator[int] | Iterator[list[int | None]]:
        """Continue the stream: up to max_new_tokens steps, greedy when temperature is 0, else
        sampled (from the top_p nucleus when top_p < 1). Each token is fed back before it is yielded, so the stream always holds
        everything produced.

        Batch 1: yields token ids (ints); a stop token ends the continuation.
        Batch > 1: yields one list per step, `batch` entries: sequence b's token id, or None
        once b has met a stop token (its stop token is the last int it yields). Finished
        sequences no longer change: from then on they are fed as padding, so their cache,
        position and next_logits row stay as they were after the stop token. The loop ends
        when every sequence has stopped or after max_new_tokens steps."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"LambdaStream.generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
            raise ValueError(f"LambdaStream.generate: temperature must be a finite number >= 0, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise ValueError(f"LambdaStream.generate: top_p must be a number in (0, 1], got {top_p!r}")
        if self.next_logits is None:
            raise ValueError("LambdaStream.generate: feed a prompt first")
        stop = _stop_set(stop_token_ids)
        if self._step is None:
            self._step = StaticDecodeStep(self.model, self.cache, compile=self.compile,
                                          cuda_graph=self.cuda_graphs, cpu_linears=self.cpu_linears)
        step, sample = self._step, temperature > 0
        noise = draw_noise(torch.empty_like(self.next_logits), generator) if sample else None
        nucleus = top_p if sample and top_p < 1 else None
        step.start(choose_tokens(self.next_logits, positive_float32(temperature) if sample else None,
                                 noise, nucleus),
                   temperature, top_p)
        if self.next_logits.shape[0] > 1:
            return self._generate_batch(step, max_new_tokens, stop, sample, generator)
        return self._generate_one(step, max_new_tokens, stop, sample, generator)

    @torch.inference_mode()
    def _generate_one(self, step, max_new_tokens, stop, sample, generator) -> Iterator[int]:
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

    @torch.inference_mode()
    def _generate_batch(self, step, max_new_tokens, stop, sample, generator) -> Iterator[list[int | None]]:
        if sample and tensor_parallel_size(self.model) > 1:
            raise ValueError("LambdaStream.generate: sampling a batch under tensor parallelism is "
                             "not supported (greedy is)")
        batch = self.next_logits.shape[0]
        running = [True] * batch
        step.padding.zero_()
        for _ in range(max_new_tokens):
            tokens = step.next_token_ids.tolist()  # the one host synchronisation per step
            fed = torch.tensor(running, device=step.logits.device)
            step(sample=sample, generator=generator)  # feeds the running ones, chooses the next
            # A finished sequence's row of the step is padding: keep its logits.
            self.next_logits = torch.where(fed[:, None], step.logits, self.next_logits)
            out = [token if alive else None for token, alive in zip(tokens, running)]
            for b, token in enumerate(out):
                if token is not None and token in stop:
                    running[b] = False
                    step.padding[b] = 1
            yield out
            if not any(running):
                return


@torch.inference_mode()
def decode_rows(streams: Sequence[LambdaStream], tokens: Sequence[int]) -> torch.Tensor:
    """Feed tokens[b] to streams[b] (independent batch-1 streams of one model) in one forward:
    each stream's own ring serves its row's attention (RowCaches), the linear layers run once
    for all rows. Sets each stream's next_logits and returns them, float32 [len(streams), vocab].
    One row computes exactly what the stream's own decode step computes; several rows may
    differ from it in the last bits, as any batched matrix product does."""
    first = streams[0]
    if any(stream.model is not first.model for stream in streams):
        raise ValueError("decode_rows: every stream must be of one model")
    ids = torch.tensor(list(tokens), dtype=torch.int64, device=first._device).view(-1, 1)
    positions = torch.cat([stream.cache.layers[0].ring.next_position for stream in streams]).view(-1, 1)
    cache = RowCaches([stream.cache for stream in streams])
    with first._linears:
        hidden = first._decoder(input_ids=ids, position_ids=positions, use_cache=True,
                                lminf_context=ForwardContext(), **{first._cache_keyword: cache}).last_hidden_state
        logits = first._head(hidden[:, -1]).float()
    for b, stream in enumerate(streams):
        stream.next_logits = logits[b:b + 1]
    return logits


def _stop_set(stop_token_ids) -> set[int]:
    """stop_token_ids (an iterable of int token ids; None: none) as a set."""
    if stop_token_ids is None:
        return set()
    if isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, Iterable):
        raise TypeError(f"LambdaStream.generate: stop_token_ids must be an iterable of int token ids, "
                        f"got {type(stop_token_ids).__name__} {stop_token_ids!r}")
    stop = set()
    for token in stop_token_ids:
        if isinstance(token, torch.Tensor) and token.dim() == 0 and not token.is_floating_point():
            token = token.item()
        if not isinstance(token, numbers.Integral) or isinstance(token, bool):
            raise TypeError(f"LambdaStream.generate: stop_token_ids must hold int token ids, got "
                            f"{type(token).__name__} {token!r}")
        stop.add(int(token))
    return stop


def _left_pad(sequences) -> tuple[torch.Tensor, list[int] | None]:
    """A list of 1-D token sequences of different lengths as one left-padded [batch, tokens]
    block (pad id 0: padding rows are never read) and each sequence's padding."""
    rows = []
    for index, sequence in enumerate(sequences):
        try:
            row = sequence if isinstance(sequence, torch.Tensor) else torch.as_tensor(sequence)
        except (TypeError, ValueError, RuntimeError) as error:  # ragged, non-numeric, too large
            raise ValueError(f"input_ids[{index}] must be a 1-D sequence of int token ids: {error}") from None
        if row.dim() != 1 or row.numel() == 0:
            raise ValueError(f"input_ids[{index}] must be a non-empty 1-D sequence of token ids, got "
                             f"shape {tuple(row.shape)}")
        if row.dtype not in _ID_DTYPES:
            # torch.as_tensor(..., dtype=int64) would truncate 1.5 to 1 and feed it.
            raise TypeError(f"input_ids[{index}] must hold integer token ids, got {row.dtype}")
        rows.append(row.to(torch.int64))
    if not rows:
        raise ValueError("input_ids: an empty list of sequences")
    width = max(row.numel() for row in rows)
    ids = rows[0].new_zeros(len(rows), width)
    padding = [width - row.numel() for row in rows]
    for b, row in enumerate(rows):
        ids[b, padding[b]:] = row
    return ids, (padding if any(padding) else None)
