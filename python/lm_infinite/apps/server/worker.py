"""The generation worker: one thread runs every model call, requests interleave token by token.

There is one model, so its compute is serialised; a scheduler over the requests in progress
runs rounds: in each, every request advances by one step (its start, one generated token or
one chunk of its prompt), the long prompts' chunks last, so that a short chat's first token
never waits for a long prompt to be read, only for the chunk in progress. With batch_decode (continuous
batching), the generated tokens of one round are one forward for all generating requests
(streaming.decode_rows), each reading its own conversation's cache. The worker
thread is the only user of the model, the tokenizer and the conversation store: they need
no lock. Requests talk to it through a Job: events come back on the job's asyncio queue.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from lm_infinite.decode_step import choose_tokens, draw_noise, positive_float32
from lm_infinite.hf import state_of
from lm_infinite.streaming import LambdaStream, decode_rows

from .conversations import Conversation, ConversationStore
from .saved import SavedConversations
from .errors import APIError
from .pinning import system_prefix_length
from .schemas import Usage
from .text import CompletionText

__all__ = ["ClientGone", "Engine", "Failed", "Finished", "Job", "Sampling", "Started", "TextDelta", "plan_malloc"]

log = logging.getLogger("lm_infinite.server")


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling; 1: off
    seed: int | None = None  # None: a fresh random seed
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Started:
    """The prompt is accepted: generation follows."""
    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of turn or stop string) or "length" (max_tokens)
    usage: Usage


@dataclass(frozen=True)
class Failed:
    error: APIError


@dataclass(frozen=True)
class ClientGone:
    """The request's client disconnected (sent by the HTTP side, not the worker)."""


class Job:
    """One request as the worker sees it. `prompt` is a text (completions) or a list of
    {"role", "content"} messages (chat), rendered and tokenized by the worker."""

    def __init__(self, prompt: str | list[dict], sampling: Sampling) -> None:
        self.prompt, self.sampling = prompt, sampling
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def emit(self, event) -> None:
        """From the worker thread: hand an event to the request's event loop."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def next_event(self):
        return await self._events.get()

    def cancel(self) -> None:
        """The client is gone: the worker stops the job at its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Engine:
    """The model, its tokenizer, the conversation store and the worker thread that uses them."""

    def __init__(self, model, tokenizer, *, chunk_size: int, max_conversations: int,
                 max_prompt_tokens: int | None = None, max_active: int = 8, max_queued: int = 64,
                 state_dir=None, max_state_bytes: int = 4 * 2**30, batch_decode: bool | None = None,
                 max_pinned_tokens: int = 0) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"Engine: max_active must be >= 1 and max_queued >= 0, got {max_active}, {max_queued}")
        self.tokenizer, self.chunk_size, self.max_prompt_tokens = tokenizer, chunk_size, max_prompt_tokens
        self._device = next(model.parameters()).device
        # Live conversations, idle (kept for reuse) and in flight, each one fixed LambdaCache:
        # at most max_live_conversations. Requests beyond max_active wait, up to max_queued of
        # them, and further ones are refused.
        self.max_active, self.max_queued = max_active, max_queued
        plan_malloc()  # lminf serve calls it before loading the model, when it takes full effect
        # Decode steps of all generating requests as one forward (continuous batching). None:
        # on the CPU; off on a GPU, where each request's own step replays a CUDA graph (not yet
        # measured against one batched eager step).
        self.batch_decode = self._device.type == "cpu" if batch_decode is None else batch_decode
        self.queued_requests = 0  # submitted, not yet started by the worker
        # A new chat conversation pins (LambdaStream pinned_tokens) the tokens of its system
        # message, up to this many, so that it stays visible however long the chat; 0: off.
        self.max_pinned_tokens = max_pinned_tokens
        # With a state directory every conversation is also written to disk after each request
        # (and found there again after a restart), in at most max_state_bytes.
        saved = None if state_dir is None else SavedConversations(
            state_dir, max_state_bytes, functools.partial(LambdaStream.load, model=model, chunk_size=chunk_size))
        self.store = ConversationStore(max_conversations, functools.partial(LambdaStream, model, chunk_size=chunk_size),
                                       saved)
        self.stop_token_ids = _end_of_turn_ids(model, tokenizer)
        self.active_requests = 0
        self.cancelled_requests = 0  # stopped early because their client went away
        # The most one conversation's cache holds (its rings, fixed; a pinned system prompt
        # adds slots), known once a conversation has run: every ring slot costs the same bytes.
        self.conversation_bytes: int | None = None
        state = state_of(model)
        self._widest_slots = sum(rule.n_local + (rule.n_global if rule.sliding else max(rule.n_global, max_pinned_tokens))
                                 for rule in state.layers)
        self._incoming: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Made here, not in __init__: a thread holding the bound self._run would make an engine
        # that never started a reference cycle (a running thread drops its target when done).
        self._thread = threading.Thread(target=self._run, name="lminf-generation", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._incoming.put(None)
        self._thread.join()
        self._thread = None

    @property
    def max_live_conversations(self) -> int:
        """The most conversations (idle and in flight) this engine ever holds: the kept ones'
        bound, or the requests in flight if more may run at once. A request that needs a new
        conversation first evicts idle ones beyond it, so memory is the model plus this many
        fixed caches however many clients call."""
        return max(self.store.capacity, self.max_active)

    def submit(self, prompt: str | list[dict], sampling: Sampling) -> Job:
        """Queue a request; APIError 429 when max_queued requests already wait for a slot."""
        if self.queued_requests >= self.max_queued + self.max_active - self.active_requests:
            raise APIError(429, f"the server is busy: {self.active_requests} requests in flight and "
                                f"{self.queued_requests} waiting (--max-active {self.max_active}, "
                                f"--max-queued {self.max_queued}); retry later",
                           type="server_error", code="server_busy")
        job = Job(prompt, sampling)
        self.queued_requests += 1  # under the GIL; the worker only ever decrements it
        self._incoming.put(job)
        return job

    def _run(self) -> None:
        active: deque[_Slot] = deque()
        waiting: deque[Job] = deque()
        while True:
            while not (active or waiting) or not self._incoming.empty():  # block only when idle
                job = self._incoming.get()
                if job is None:
                    for slot in active:
                        slot.steps.close()
                    for job in [slot.job for slot in active] + list(waiting):
                        job.emit(Failed(APIError(503, "the server is shutting down", type="server_error")))
                    return
                waiting.append(job)
            while waiting and len(active) < self.max_active:
                job = waiting.popleft()
                self.queued_requests -= 1
                active.append(_Slot(job, self._steps(job)))
            # A round: every job advances by one step. First the short ones: a job's start, the
            # start of its generation, a token of its own decode step, and the last chunk of a
            # prompt (after which its generation starts) ...
            for slot in [slot for slot in active if slot.pending is None
                         and (slot.prompt_left is None or slot.prompt_left <= self.chunk_size)]:
                self._advance(active, slot)
            # ... then one decode step of every generating job, batched into one forward ...
            decoding = [slot for slot in active if slot.pending is not None]
            if decoding:
                self._decode(active, decoding)
            # ... and last one chunk of each longer prompt: a short chat's first token never
            # waits for a long prompt's chunk of this round, only for the one in progress.
            for slot in [slot for slot in active if slot.pending is None and slot.prompt_left is not None
                         and slot.prompt_left > self.chunk_size]:
                self._advance(active, slot)

    def _advance(self, active: deque[_Slot], slot: _Slot) -> None:
        """Run the slot's job to its next step; drop the slot when the job is done or failed."""
        try:
            step = next(slot.steps)
            slot.pending = step if isinstance(step, _Decode) else None
            slot.prompt_left = step.tokens if isinstance(step, _PromptLeft) else None
        except StopIteration:
            active.remove(slot)
        except Exception:  # a bug or a device failure: this request fails, the server lives
            log.exception("generation failed")
            slot.job.emit(Failed(APIError(500, "generation failed", type="server_error")))
            active.remove(slot)

    def _decode(self, active: deque[_Slot], decoding: list[_Slot]) -> None:
        """Feed each decoding job its token, one forward for all of them (decode_rows; only
        batch_decode's _generate waits on one); then resume them."""
        try:
            decode_rows([slot.pending.stream for slot in decoding], [slot.pending.token for slot in decoding])
        except Exception:
            log.exception("generation failed")
            for slot in decoding:
                slot.steps.close()  # the conversation is checked in (or dropped if inconsistent)
                slot.job.emit(Failed(APIError(500, "generation failed", type="server_error")))
                active.remove(slot)
            return
        for slot in decoding:
            self._advance(active, slot)

    def _steps(self, job: Job) -> Iterator[_Decode | _PromptLeft | None]:
        """The job's work, one step per `yield` (a _Decode: a token for the engine's batched
        decode step; a _PromptLeft: its next step reads a prompt chunk, so many tokens are
        left; None: a step done here); every event it sends, in order."""
        try:
            prompt = self._prompt_ids(job.prompt)
        except APIError as error:
            job.emit(Failed(error))
            return
        pinned = 0
        if isinstance(job.prompt, list):
            pinned = system_prefix_length(self.tokenizer, job.prompt, prompt, self.max_pinned_tokens)
        conversation, cached = self.store.checkout(prompt, self.max_live_conversations, self.active_requests,
                                                   pinned_tokens=pinned)
        self.active_requests += 1
        finished = None
        try:
            job.emit(Started(len(prompt), cached))
            new = prompt[cached:]
            for start in range(0, len(new), self.chunk_size):
                if start or len(new) > self.chunk_size:  # a prompt of one chunk is read at the start
                    yield _PromptLeft(len(new) - start)
                if job.cancelled:
                    self.cancelled_requests += 1
                    return
                conversation.feed(new[start:start + self.chunk_size])
            generate = self._generate if self.batch_decode else self._generate_alone
            finished = yield from generate(job, conversation, Usage(len(prompt), cached))
        finally:
            self.active_requests -= 1
            self._note_cache_size(conversation.stream.cache)
            self.store.checkin(conversation)
        # After the checkin: once a client has its answer, a saved conversation holds it.
        if finished is not None:
            job.emit(finished)

    def _note_cache_size(self, cache) -> None:
        if self.conversation_bytes is None:
            rings = [layer.ring for layer in cache.layers if layer.ring is not None]
            slots = sum(ring.n_global + ring.n_local for ring in rings)
            if slots:
                self.conversation_bytes = cache.nbytes() * self._widest_slots // slots

    def _generate(self, job: Job, conversation: Conversation, usage: Usage):
        """Steps of the job's generation: each yields a _Decode (the token to feed), which the
        engine feeds, batched with the other jobs' (see _run); returns the job's Finished event
        (None if the job was cancelled), which the caller sends. Tokens are chosen as
        LambdaStream.generate chooses them (the same draws from the same generator)."""
        sampling = job.sampling
        generator = self._generator(sampling.seed)
        text = CompletionText(self.tokenizer, sampling.stop)
        stream = conversation.stream
        sample = sampling.temperature > 0
        temperature = positive_float32(sampling.temperature) if sample else None
        nucleus = sampling.top_p if sample and sampling.top_p < 1 else None
        noise = draw_noise(torch.empty_like(stream.next_logits), generator) if sample else None
        token = int(choose_tokens(stream.next_logits, temperature, noise, nucleus)[0])
        if sample:  # the decode step's float32 [1] settings, as StaticDecodeStep holds them
            temperature = torch.full((1,), temperature, dtype=torch.float32, device=self._device)
            if nucleus is not None:
                nucleus = torch.full((1,), nucleus, dtype=torch.float32, device=self._device)
        finish_reason = "length"
        for _ in range(sampling.max_tokens):
            if sample:  # drawn before the step, as the decode step does
                noise = draw_noise(torch.empty_like(stream.next_logits), generator)
            yield _Decode(stream, token)
            outcome = self._took(job, conversation, usage, text, token)  # fed by the engine's step
            if outcome == "cancelled":
                return None
            if outcome == "stop":
                finish_reason = "stop"
                break
            token = int(choose_tokens(stream.next_logits, temperature, noise, nucleus)[0])
        if rest := text.flush():
            job.emit(TextDelta(rest))
        return Finished(finish_reason, usage)

    def _generator(self, seed: int | None) -> torch.Generator:
        """The request's random generator: seeded by the request, or freshly."""
        generator = torch.Generator(device=self._device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        return generator

    def _took(self, job: Job, conversation: Conversation, usage: Usage, text: CompletionText,
              token: int) -> str | None:
        """Account for a token the stream has just been fed (both generation paths): recorded,
        counted, its text sent. "stop" when it ends the reply (end of turn or a stop string),
        "cancelled" when the client is gone, else None."""
        conversation.record([token])
        usage.completion_tokens += 1
        if token in self.stop_token_ids:
            return "stop"
        delta = text.push(token)
        if delta:
            job.emit(TextDelta(delta))
        if text.stopped:
            return "stop"
        if job.cancelled:
            self.cancelled_requests += 1
            return "cancelled"
        return None

    def _generate_alone(self, job: Job, conversation: Conversation, usage: Usage):
        """_generate with batch_decode off: the stream's own generate() (its StaticDecodeStep,
        a CUDA graph on a GPU), one `yield` per token."""
        sampling = job.sampling
        generator = self._generator(sampling.seed)
        text = CompletionText(self.tokenizer, sampling.stop)
        tokens = conversation.stream.generate(sampling.max_tokens, stop_token_ids=self.stop_token_ids,
                                              temperature=sampling.temperature, top_p=sampling.top_p,
                                              generator=generator)
        finish_reason = "length"
        try:
            for token in tokens:
                # The stream fed the token before yielding it: record it whatever happens next.
                outcome = self._took(job, conversation, usage, text, token)
                if outcome == "cancelled":
                    return None
                if outcome == "stop":
                    finish_reason = "stop"
                    break
                yield
        finally:
            tokens.close()
        if rest := text.flush():
            job.emit(TextDelta(rest))
        return Finished(finish_reason, usage)

    def _prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        else:
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
            try:
                rendered = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            except TemplateError as error:
                raise APIError(400, f"the model's chat template rejects these messages: {error}",
                               param="messages") from None
            # The template writes the special tokens (BOS included) itself.
            ids = self.tokenizer(rendered, add_special_tokens=False).input_ids
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if isinstance(prompt, str) else "messages")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than this server's limit of "
                                f"{self.max_prompt_tokens} (--max-prompt-tokens)",
                           param="messages" if isinstance(prompt, list) else "prompt",
                           code="context_length_exceeded")
        return ids


class _Slot:
    """A job in progress: its steps, the _Decode it waits on (None: its next step is its own)
    and the prompt tokens its next step starts reading (None: its next step reads none).
    Compared by identity."""
    __slots__ = ("job", "steps", "pending", "prompt_left")

    def __init__(self, job: Job, steps: Iterator) -> None:
        self.job, self.steps, self.pending, self.prompt_left = job, steps, None, None


@dataclass(frozen=True)
class _PromptLeft:
    """A job's next step reads a chunk of its prompt, of which `tokens` are left."""
    tokens: int


@dataclass(frozen=True, eq=False)
class _Decode:
    """A generating job's request to the engine: feed `token` to `stream`."""
    stream: LambdaStream
    token: int


def plan_malloc() -> None:
    """Make glibc's malloc give memory back: map every allocation of 1 MiB or more on its own
    (each layer's ring is one), so that a dropped conversation's memory goes back to the system
    at once, and keep two heaps (arenas), not one per thread that ever allocated.
    Left to its dynamic threshold (up to 32 MiB), glibc keeps freed ring-sized blocks in its
    heaps, and a server that evicts and creates conversations holds its high-water mark: RSS
    after 50 concurrent requests was 1.44x that after the first 8 conversations, with the same
    8 alive (bench/server_memory.py; 1.00x with this). With an arena per thread, the small
    objects of requests allocated on one thread and freed on another left RSS after 50
    concurrent requests anywhere from 1.04x to 1.13x (tests/test_server_memory.py, tiny model);
    two arenas: 1.04x to 1.08x, with no growth over rounds. The arena bound binds only heaps
    made after it, so a process calls this first thing (lminf serve: before loading the
    model). Elsewhere than glibc, nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's malloc.h


def _end_of_turn_ids(model, tokenizer) -> frozenset[int]:
    """The tokens that end a reply: the tokenizer's EOS and the generation config's (often
    a list that adds the chat template's end-of-turn token)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return frozenset(ids)
