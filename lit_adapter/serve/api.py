"""The OpenAI API as this server speaks it: the request bodies (checked by pydantic), the error shape, and the
objects and stream chunks it answers with. Only what the server can honour is accepted; anything else is refused
with a 400 that names it, never silently ignored."""

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls and the like carry nothing for these models
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    user: Optional[str] = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="penalties are not supported")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="penalties are not supported")

    @field_validator("stop")
    @classmethod
    def at_most_four_stop_strings(cls, stop: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Literal[False, None] = None

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Common):
    prompt: str
    echo: Literal[False] = False
    logprobs: Literal[None] = None
    max_tokens: Optional[int] = Field(16, ge=1)

    def limit(self) -> Optional[int]:
        return self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A whole chat answer: a ``chat.completion`` object."""
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def text_completion(id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """A whole text answer: a ``text_completion`` object."""
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(chat: bool, id: str, model: str, text: Optional[str], finish_reason: Optional[str] = None,
          role: bool = False) -> dict[str, Any]:
    """One streamed piece: a ``chat.completion.chunk`` (its delta) or a ``text_completion`` (its text)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(chat: bool, id: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last streamed piece where ``stream_options.include_usage`` asks for it: no choices, the usage."""
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
