"""Request bodies of the OpenAI endpoints the server speaks, and its response objects.

Unknown fields are ignored, as OpenAI-compatible servers do: front-ends send fields such as
`user` whatever the server. docs/serving.md lists the fields honoured here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "Usage",
           "chat_chunk", "chat_completion", "completion", "completion_chunk", "new_id",
           "usage_chunk"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list once validated
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n):
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # the newer name of max_tokens

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str = Field(min_length=1)


@dataclass
class Usage:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens a kept conversation already held
    completion_tokens: int = 0

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _envelope(id: str, object: str, model: str, choices: list[dict]) -> dict:
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": choices}


def chat_completion(id: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": finish_reason, "logprobs": None}
    return _envelope(id, "chat.completion", model, [choice]) | {"usage": usage.body()}


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(id, "chat.completion.chunk", model, [choice])


def completion(id: str, model: str, text: str, finish_reason: str, usage: Usage) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(id, "text_completion", model, [choice]) | {"usage": usage.body()}


def completion_chunk(id: str, model: str, text: str, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return _envelope(id, "text_completion", model, [choice])


def usage_chunk(id: str, object: str, model: str, usage: Usage) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return _envelope(id, object, model, []) | {"usage": usage.body()}
