"""OpenAI's wire format: the request bodies the server accepts, its error JSON, and the shapes of
completions, chat completions and their streamed chunks.

Field names, defaults and limits are OpenAI's API reference (`/v1/completions`,
`/v1/chat/completions`): `max_tokens` defaults to 16 for completions and to the rest of the context
for chat; at most 4 stop strings; `logprobs` at most 5 alternatives for completions, `top_logprobs`
at most 20 for chat. `top_k` and `ignore_eos` are extensions vLLM accepts too. Unknown fields are
ignored (clients send many); known ones this server cannot honour (`n` > 1, penalties,
`logit_bias`, `echo`, `suffix`, tools) are refused rather than silently dropped.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llama_jax.generate.sampling import MAX_TEMPERATURE

MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


class InvalidRequest(ValueError):
  """A request the server refuses, reported as OpenAI's error JSON."""

  def __init__(self, message: str, param: str | None = None, code: str | None = None,
               status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
  """A part of a request body: unknown fields ignored, and an explicit null in an optional field
  taken as that field's default, as OpenAI takes it (clients send `"temperature": null` and the
  like for what they leave unset)."""
  model_config = ConfigDict(extra="ignore")

  @model_validator(mode="before")
  @classmethod
  def _null_is_default(cls, data: Any) -> Any:
    if not isinstance(data, dict):
      return data
    optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
    return {k: v for k, v in data.items() if v is not None or k not in optional}


class StreamOptions(_Body):
  include_usage: bool = False


class GenerationRequest(_Body):
  """The fields completions and chat share."""
  model: str
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0 (or -1, vLLM's spelling), or the vocabulary's size or more: no cut
  stop: Union[str, list[str], None] = None
  seed: int | None = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None
  user: str | None = None
  ignore_eos: bool = False  # vLLM's extension: answers of exactly max_tokens (benchmarks)

  def stop_strings(self) -> list[str]:
    stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
      raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
      raise InvalidRequest("stop strings must not be empty", "stop")
    return stops

  def check_sampling(self) -> None:
    if not math.isfinite(self.temperature) or self.temperature < 0:
      raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
    if self.temperature > MAX_TEMPERATURE:  # the engine keeps it in float32: inf would make NaNs
      raise InvalidRequest(f"temperature must be at most {MAX_TEMPERATURE:.3g}, got {self.temperature}",
                           "temperature")
    if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
      raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
    if self.top_k < -1:
      raise InvalidRequest(f"top_k must be >= 0 (0 or -1: no cut), got {self.top_k}", "top_k")
    if self.n != 1:
      raise InvalidRequest(f"n must be 1, got {self.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(self, name):
        raise InvalidRequest(f"{name} is not supported (must be 0)", name)
    if self.logit_bias:
      raise InvalidRequest("logit_bias is not supported", "logit_bias")

  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: int | None = 16
  logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
  echo: bool = False
  suffix: str | None = None
  best_of: int | None = None

  def check(self) -> None:
    self.check_sampling()
    if self.echo:
      raise InvalidRequest("echo is not supported", "echo")
    if self.suffix:
      raise InvalidRequest("suffix is not supported", "suffix")
    if self.best_of not in (None, 1):
      raise InvalidRequest("best_of must be 1", "best_of")

  def prompts(self) -> list[str | list[int]]:
    """Each prompt, as text or token ids."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if not p:
      raise InvalidRequest("prompt must not be empty", "prompt")
    if all(isinstance(x, int) for x in p):
      return [list(p)]
    return list(p)


class TextPart(_Body):
  type: Literal["text"]
  text: str


class ChatMessage(_Body):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[TextPart], None] = None

  def as_dict(self) -> dict:
    content = self.content
    if isinstance(content, list):
      content = "".join(part.text for part in content)
    # OpenAI's "developer" role is its newer name for "system".
    return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(GenerationRequest):
  messages: list[ChatMessage]
  max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
  logprobs: bool = False
  top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
  tools: list[Any] | None = None
  response_format: dict | None = None

  def check(self) -> None:
    self.check_sampling()
    if not self.messages:
      raise InvalidRequest("messages must not be empty", "messages")
    if self.tools:
      raise InvalidRequest("tools are not supported", "tools")
    if self.response_format and self.response_format.get("type", "text") != "text":
      raise InvalidRequest("response_format other than text is not supported", "response_format")
    if self.top_logprobs and not self.logprobs:
      raise InvalidRequest("top_logprobs needs logprobs: true", "top_logprobs")

  def token_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int) -> dict:
  return {"id": name, "object": "model", "created": created, "owned_by": "llama_jax"}


def completion(id_: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict:
  """A /v1/completions answer, or one of its streamed chunks (the same object, new text only)."""
  return {"id": id_, "object": "text_completion", "created": created, "model": model,
          "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
  return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_completion(id_: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
  return {"id": id_, "object": "chat.completion", "created": created, "model": model,
          "choices": choices, "usage": usage_}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
  return {"index": index, "message": {"role": "assistant", "content": text},
          "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(id_: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
  return {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
          "choices": choices, "usage": usage_}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
  return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
