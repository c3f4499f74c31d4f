"""The conversations a server keeps: LambdaStreams found again by the tokens they hold.

The OpenAI API is stateless: each request carries the whole history. A stream whose fed
tokens are a prefix of a new prompt holds that prefix already (its ring cache and its
next-token logits), so the request only feeds the rest. A ring cache cannot rewind, hence
only an exact prefix can be continued; anything else starts a fresh stream.

Each stream is identified by (number of tokens fed, digest of those tokens), kept up to date
as tokens are fed, so a conversation costs its fixed LambdaCache and a few bytes whatever its
length; no token list grows with it.

With a state directory (SavedConversations), every conversation checked in is also written to
disk, and a prompt whose prefix no idle conversation holds is looked up there: conversations
outlive their eviction from memory and the server's restarts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from lm_infinite.streaming import LambdaStream

from .saved import SavedConversations

__all__ = ["Conversation", "ConversationStore", "PrefixKey"]


def _token_bytes(ids: Sequence[int]) -> bytes:
    return array("q", ids).tobytes()


class PrefixKey(NamedTuple):
    length: int
    digest: bytes


class Conversation:
    """A stream and the key of the tokens it holds. Feed it through here only, so that the
    key always says exactly what the stream holds."""

    def __init__(self, stream: LambdaStream, tokens: Sequence[int] = ()) -> None:
        """tokens: what the stream holds already (a stream loaded from disk)."""
        self.stream = stream
        self._hash = hashlib.blake2b(digest_size=16)
        self._length = 0
        # The key of this conversation's file in the state directory, if it has one.
        self.saved_key: PrefixKey | None = None
        if tokens:
            self.record(tokens)

    @property
    def key(self) -> PrefixKey:
        return PrefixKey(self._length, self._hash.digest())

    @property
    def consistent(self) -> bool:
        """Whether the stream holds exactly the tokens recorded: false after a failure in the
        middle of a feed, when nothing can say what the cache holds."""
        return self.stream.position == self._length

    def feed(self, ids: Sequence[int]) -> None:
        self.stream.feed(torch.tensor([list(ids)]))
        self.record(ids)

    def record(self, ids: Sequence[int]) -> None:
        """Note tokens the stream took in by itself (LambdaStream.generate feeds each token
        it yields)."""
        self._hash.update(_token_bytes(ids))
        self._length += len(ids)


class ConversationStore:
    """Idle conversations, least recently used first, at most `capacity` of them.

    A conversation is checked out for the duration of a request and checked in after it, so
    no two requests ever touch one stream. Not thread-safe: the generation worker, the only
    thread that runs the model, is its only user.
    """

    def __init__(self, capacity: int, new_stream: Callable[..., LambdaStream],
                 saved: SavedConversations | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"ConversationStore: capacity must be >= 0, got {capacity}")
        self.capacity, self._new_stream, self.saved = capacity, new_stream, saved
        self._idle: OrderedDict[PrefixKey, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._idle)

    def checkout(self, prompt: Sequence[int], max_live: int | None = None,
                 in_flight: int = 0, pinned_tokens: int = 0) -> tuple[Conversation, int]:
        """The idle conversation holding the longest prefix of `prompt` (removed from the
        store) and that prefix's length; with a state directory, the longest of those and of
        the saved ones; a fresh conversation, pinning its first pinned_tokens tokens, and 0 if
        none does. A conversation that is not taken from the idle ones adds one to those alive:
        with max_live, the least recently used idle ones go first, so that idle plus in_flight
        plus the new one stay within it."""
        saved = self.saved.keys() if self.saved is not None else {}
        for key in sorted(self._prefix_keys(prompt, saved) & (self._idle.keys() | saved), reverse=True):
            if key in self._idle:
                return self._idle.pop(key), key.length
            self._make_room(max_live, in_flight)
            stream = self.saved.load(key)
            if stream is not None:
                conversation = Conversation(stream, prompt[:key.length])
                conversation.saved_key = key
                return conversation, key.length
        self._make_room(max_live, in_flight)
        return Conversation(self._new_stream(pinned_tokens=pinned_tokens)), 0

    def _make_room(self, max_live: int | None, in_flight: int) -> None:
        while max_live is not None and self._idle and len(self._idle) + in_flight + 1 > max_live:
            self._idle.popitem(last=False)  # a dropped stream frees its cache at once

    def checkin(self, conversation: Conversation) -> None:
        """Keep a conversation for later requests (as the most recently used), evicting the
        least recently used beyond capacity. An inconsistent one is dropped, and so is an
        empty one (nothing to reuse). A conversation with the same tokens as an idle one
        replaces it: one copy is enough. With a state directory the conversation is written
        there (replacing the file it came from) before it is kept: a crash later loses
        nothing of it."""
        if not conversation.consistent or conversation.stream.position == 0:
            return
        key = conversation.key
        if self.saved is not None and key != conversation.saved_key:
            if self.saved.save(key, conversation.stream):
                if conversation.saved_key is not None:
                    self.saved.remove(conversation.saved_key)
                conversation.saved_key = key
        self._idle.pop(key, None)
        self._idle[key] = conversation
        while len(self._idle) > self.capacity:
            self._idle.popitem(last=False)

    def _prefix_keys(self, prompt: Sequence[int], saved=()) -> set[PrefixKey]:
        """The keys of prompt[:n] for every length n that an idle (or saved) conversation
        has: one pass over the prompt."""
        lengths = sorted({key.length for key in (*self._idle, *saved) if key.length <= len(prompt)})
        running, done, keys = hashlib.blake2b(digest_size=16), 0, set()
        for length in lengths:
            running.update(_token_bytes(prompt[done:length]))
            done = length
            keys.add(PrefixKey(length, running.digest()))
        return keys
