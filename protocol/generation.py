"""Generation wire types: a chat or a prompt for an LLM, its sampling settings, and the bound
on what it can cost before it runs. Tokens are the price unit (prompt + completion)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_GENERATION_TOKENS = 4096
"""The most completion tokens one job may ask for (``max_tokens``)."""
MAX_PROMPT_CHARS = 100_000
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
TEMPLATE_OVERHEAD_TOKENS = 64
"""Tokens a chat template may add around the messages (a default system prompt, say)."""
TOKENS_PER_MESSAGE_OVERHEAD = 8
"""Tokens a chat template adds per message (role markers, separators)."""
MAX_CHECK_TOKENS = MAX_GENERATION_TOKENS


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    STOP = "stop"  # the model ended, or a stop string was met
    LENGTH = "length"  # max_tokens or the context ran out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ChatMessage(_Strict):
    role: Role
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class GenerationInput(_Strict):
    """What an LLM job generates from: ``messages`` (a chat, formatted with the model's chat
    template) or a raw ``prompt``, and how it samples. ``temperature`` 0 is greedy decoding;
    otherwise tokens are sampled from the top-p set with a generator seeded by ``seed``.

    ``check_tokens`` is for verification jobs only: the completion token ids another worker
    claimed, which this worker checks by teacher forcing instead of generating."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(default=256, ge=1, le=MAX_GENERATION_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP_STRINGS)
    check_tokens: list[int] | None = Field(default=None, max_length=MAX_CHECK_TOKENS)

    @model_validator(mode="after")
    def _exactly_one(self) -> GenerationInput:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages (a chat) or prompt (raw text)")
        if self.messages is not None:
            if not any(m.content.strip() for m in self.messages):
                raise ValueError("messages are all empty; give at least one message some text")
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(f"messages hold {total} characters; at most {MAX_PROMPT_CHARS}")
        elif self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt is empty; give it some text")
        for stop in self.stop or []:
            if not stop:
                raise ValueError("stop strings must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def prompt_token_bound(self) -> int:
        """An upper bound on the prompt's tokens with any byte-level tokenizer: one token per
        UTF-8 byte at most, plus what a chat template adds. Known before any model is loaded."""
        if self.prompt is not None:
            return len(self.prompt.encode()) + TEMPLATE_OVERHEAD_TOKENS
        assert self.messages is not None
        return TEMPLATE_OVERHEAD_TOKENS + sum(
            len(m.content.encode()) + TOKENS_PER_MESSAGE_OVERHEAD for m in self.messages
        )

    def units_bound(self) -> int:
        """The most tokens (prompt + completion) this job can bill: its ``max_units``."""
        return self.prompt_token_bound() + self.max_tokens


class GenerationUsage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class StreamChunk(_Strict):
    """Text a worker produced since its last chunk, for one attempt of a job. ``seq`` counts
    chunks from 0 so a resent chunk is taken once; ``tokens`` is how many tokens it holds."""

    attempt: int = Field(ge=1)
    seq: int = Field(ge=0)
    text: str = Field(max_length=MAX_PROMPT_CHARS)
    tokens: int = Field(ge=0, le=MAX_GENERATION_TOKENS)


def generation_output_usage(output: dict[str, Any] | None) -> GenerationUsage | None:
    """The usage a generation result reports, or None when it holds none."""
    if not isinstance(output, dict) or not isinstance(output.get("usage"), dict):
        return None
    try:
        return GenerationUsage.model_validate(output["usage"])
    except ValueError:
        return None
