"""OpenAI request schemas, error bodies and response objects (field names as in the OpenAI
API reference and vLLM's ``entrypoints/openai/protocol.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SYSTEM_FINGERPRINT = "fp_epd_serve_0_1"


class ApiError(Exception):
    """An error the client sees as an OpenAI-style JSON body with an HTTP status (the HTTP layer,
    :func:`services.gateway.http.error_response`, writes it; ``headers`` such as ``Retry-After``
    go with it)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions. Unknown fields are ignored, as OpenAI
    clients send many; ``null`` means the default, as in the OpenAI API."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: token ids in the response

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def stop_strings(self) -> list[str]:
        """Non-empty stop sequences."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` body: one prompt, as a string or a list of token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: dict) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape:
    """Builds the response objects of one endpoint (chat or text completion).

    Args:
        chat: chat completion (``message``/``delta``) vs text completion (``text``).
        rid, model, created: the response's ``id``, ``model`` and ``created`` fields.
        include_usage: streaming chunks carry ``usage: null`` and a final usage chunk follows.
    """

    def __init__(self, chat: bool, rid: str, model: str, include_usage: bool = False) -> None:
        self.chat, self.rid, self.model, self.created = chat, rid, model, int(time.time())
        self.include_usage = include_usage
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}

    def chunk(self, text: str | None, finish_reason: str | None, token_ids: list[int] | None = None,
              role: bool = False) -> bytes:
        """One streaming chunk; ``role`` makes it the chat stream's opening chunk."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else {"content": text}
        else:
            choice["text"] = text or ""
        if token_ids is not None:
            choice["token_ids"] = token_ids
        obj = self._envelope(self.chunk_object, [choice])
        if self.include_usage:
            obj["usage"] = None
        return sse(obj)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        obj = self._envelope(self.chunk_object, [])
        obj["usage"] = usage(prompt_tokens, completion_tokens)
        return sse(obj)

    def full(self, text: str, finish_reason: str, prompt_ids: list[int], token_ids: list[int],
             return_token_ids: bool) -> dict[str, Any]:
        """The non-streaming response body."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = self._envelope(self.object, [choice])
        obj["usage"] = usage(len(prompt_ids), len(token_ids))
        if return_token_ids:
            choice["token_ids"] = token_ids
            obj["prompt_token_ids"] = prompt_ids
        return obj
