"""The OpenAI dialect: request bodies in OpenAI's shape translated onto job specs, and job
results translated back (chat.completion, text_completion, embeddings, SSE chunks, errors).

One job path, two dialects: nothing here runs work or touches the store. Market fields the
OpenAI schema lacks ride as extra body fields (``max_price_wei_per_token``,
``max_prompt_price_wei_per_token``, ``preference``) or headers (``X-Max-Price-Wei``,
``X-Max-Prompt-Price-Wei``, ``X-Preference``); each response carries a ``gpumarket`` object
(job id, cost in wei and its prompt and completion parts, energy, worker) so a caller can audit
what it paid for.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any, Literal, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol import JobSpec, JobType, Preference, ResultView
from protocol.generation import (
    MAX_GENERATION_TOKENS,
    MAX_STOP_STRINGS,
    GenerationInput,
)
from protocol.jobs import MAX_TEXTS_PER_JOB
from protocol.units import Wei

_M = TypeVar("_M", bound=BaseModel)

DEFAULT_MAX_TOKENS = 256
"""Completion tokens a request that names no ``max_tokens`` may use (and pay for) at most."""
OPENAI_DEADLINE_S = 600.0
"""How long an OpenAI-style job may wait and run before it expires (the request waits too)."""

_ROLE_ALIASES = {"developer": "system"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class MaxPrices(NamedTuple):
    """A request's max prices in wei: per token (None: the market's), and per prompt token
    when capped apart (None: ``price`` caps prompt tokens too)."""

    price: int | None
    prompt_price: int | None = None


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, self.message, self.param)


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Market(BaseModel):
    """Market extras, beside OpenAI's own fields (unknown OpenAI fields are ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=128)
    max_price_wei_per_token: Wei | None = Field(default=None, gt=0)
    max_prompt_price_wei_per_token: Wei | None = Field(default=None, gt=0)
    preference: Preference | None = None
    user: str | None = None


class _Sampling(_Market):
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_GENERATION_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_GENERATION_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def generation(self, **prompt: Any) -> GenerationInput:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return GenerationInput(
            **prompt,
            max_tokens=self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed or 0,
            stop=stop or None,
        )


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)

    def chat(self) -> list[dict[str, str]]:
        """The messages as ``{role, content}`` with text content (parts of type text joined)."""
        out = []
        for i, message in enumerate(self.messages):
            role = _ROLE_ALIASES.get(str(message.get("role")), message.get("role"))
            if role not in ("system", "user", "assistant"):
                raise OpenAIError(
                    400,
                    "invalid_role",
                    f"messages[{i}].role is {message.get('role')!r}; use system, user or assistant",
                    f"messages[{i}].role",
                )
            out.append({"role": str(role), "content": _text_content(message.get("content"), i)})
        return out


MAX_PROMPTS_PER_REQUEST = 64
"""Prompts one /v1/completions request may carry: one generate job each, submitted together."""


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def texts(self) -> list[str]:
        """The prompts: one job each (a list submits them as one batch)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not 1 <= len(prompts) <= MAX_PROMPTS_PER_REQUEST:
            raise OpenAIError(
                400,
                "invalid_prompt",
                f"prompt needs 1 to {MAX_PROMPTS_PER_REQUEST} prompts; split larger lists "
                "across requests",
                "prompt",
            )
        if len(prompts) > 1 and self.stream:
            raise OpenAIError(
                400,
                "invalid_prompt",
                f"stream one prompt per request ({len(prompts)} given); send the list without "
                "stream, or one streamed request per prompt",
                "prompt",
            )
        return prompts


class EmbeddingRequest(_Market):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts or len(texts) > MAX_TEXTS_PER_JOB:
            raise OpenAIError(
                400, "invalid_input", f"input needs 1 to {MAX_TEXTS_PER_JOB} texts", "input"
            )
        return texts


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "".join(str(p) for p in parts)
    raise OpenAIError(
        400,
        "invalid_content",
        f"messages[{index}].content must be text (a string, or parts of type text)",
        f"messages[{index}].content",
    )


def parse(model: type[_M], body: Any) -> _M:
    """``body`` as ``model``, or a 400 naming the first wrong field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


def from_validation(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return OpenAIError(400, "invalid_request", f"{where}: {first.get('msg')}", where)


def _header_wei(value: str | None, name: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise OpenAIError(
            400, "invalid_max_price", f"{name} must be a positive whole number of wei"
        )
    return int(value)


def market_fields(
    req: _Market,
    header_price: str | None,
    header_preference: str | None,
    header_prompt_price: str | None = None,
) -> tuple[MaxPrices, Preference]:
    """The client's max prices (wei per token, and per prompt token) and preference, from the
    body or the headers."""
    price = req.max_price_wei_per_token or _header_wei(header_price, "X-Max-Price-Wei")
    prompt_price = req.max_prompt_price_wei_per_token or _header_wei(
        header_prompt_price, "X-Max-Prompt-Price-Wei"
    )
    preference = req.preference or Preference.BALANCED
    if req.preference is None and header_preference is not None:
        try:
            preference = Preference(header_preference)
        except ValueError:
            choices = ", ".join(p.value for p in Preference)
            raise OpenAIError(
                400, "invalid_preference", f"X-Preference must be one of {choices}"
            ) from None
    return MaxPrices(price, prompt_price), preference


def generate_spec(
    req: _Sampling, generation: GenerationInput, prices: MaxPrices, preference: Preference
) -> JobSpec:
    assert prices.price is not None
    return JobSpec(
        type=JobType.GENERATE,
        model=req.model,
        generation=generation,
        max_price_wei_per_unit=prices.price,
        max_prompt_price_wei_per_unit=prices.prompt_price,
        preference=preference,
        deadline_s=OPENAI_DEADLINE_S,
        max_attempts=2,
    )


def embedding_spec(req: EmbeddingRequest, price: int, preference: Preference) -> JobSpec:
    return JobSpec.model_validate(
        {
            "type": JobType.INFERENCE,
            "model": req.model,
            "input": {"texts": req.texts()},
            "max_price_wei_per_unit": price,
            "preference": preference,
            "deadline_s": OPENAI_DEADLINE_S,
        }
    )


def market_extras(result: ResultView) -> dict[str, Any]:
    """What the market adds to a response: the job, what it cost and used, who ran it."""
    return {
        "job_id": result.job_id,
        "cost_wei": str(result.cost_wei),
        "price_wei_per_unit": str(result.price_wei_per_unit),
        "units": result.units,
        "energy_j": result.energy_j,
        # Per unit: per token for generation, per text for embeddings.
        "energy_j_per_unit": result.energy_j / result.units if result.units else None,
        "energy_source": result.energy_source,
        "duration_s": result.duration_s,
        "worker_address": result.worker_address,
    }


def generation_extras(result: ResultView) -> dict[str, Any]:
    """``market_extras`` and, for generation, the cost's prompt and completion parts (wei: each
    token count at its price) and the energy per output (completion) token."""
    extras = market_extras(result)
    completion = usage_of(result)["completion_tokens"]
    extras["prompt_price_wei_per_unit"] = str(result.prompt_price_wei_per_unit)
    extras["prompt_cost_wei"] = str(result.prompt_units * result.prompt_price_wei_per_unit)
    extras["completion_cost_wei"] = str(
        (result.units - result.prompt_units) * result.price_wei_per_unit
    )
    extras["energy_j_per_output_token"] = result.energy_j / completion if completion else None
    return extras


def usage_of(result: ResultView) -> dict[str, int]:
    raw = (result.output or {}).get("usage") or {}
    prompt, completion = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_body(result: ResultView, model: str, *, chat: bool) -> dict[str, Any]:
    output = result.output or {}
    text, finish = str(output.get("text", "")), output.get("finish_reason", "stop")
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": completion_id(result.job_id, chat=chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage_of(result),
        "gpumarket": generation_extras(result),
    }


def completions_body(results: list[ResultView], model: str) -> dict[str, Any]:
    """One text completion answer for several prompts (one job each): the choices in the
    prompts' order, the usage summed, and each job's market fields with their total cost."""
    bodies = [completion_body(result, model, chat=False) for result in results]
    choices = []
    for index, body in enumerate(bodies):
        [choice] = body["choices"]
        choices.append({**choice, "index": index})
    usage = {
        key: sum(body["usage"][key] for body in bodies)
        for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    jobs = [body["gpumarket"] for body in bodies]
    return {
        **bodies[0],
        "choices": choices,
        "usage": usage,
        "gpumarket": {"cost_wei": str(sum(r.cost_wei for r in results)), "jobs": jobs},
    }


def completion_id(job_id: str, *, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"


def chunk_body(
    job_id: str,
    model: str,
    *,
    chat: bool,
    text: str | None = None,
    role: bool = False,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    extras: dict[str, Any] | None = None,
    no_choices: bool = False,
) -> dict[str, Any]:
    """One SSE chunk in OpenAI's shape (``chat.completion.chunk`` or ``text_completion``)."""
    body: dict[str, Any] = {
        "id": completion_id(job_id, chat=chat),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
    }
    if not no_choices:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        body["choices"] = [choice]
    if usage is not None:
        body["usage"] = usage
    if extras is not None:
        body["gpumarket"] = extras
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def embeddings_body(result: ResultView, model: str, encoding: str) -> dict[str, Any]:
    rows = (result.output or {}).get("embeddings") or []
    data = []
    for i, row in enumerate(rows):
        vector: Any = row
        if encoding == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(row)}f", *row)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": result.units, "total_tokens": result.units},
        "gpumarket": market_extras(result),
    }
