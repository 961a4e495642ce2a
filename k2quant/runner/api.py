"""The OpenAI API shapes k2quant serve speaks, as pydantic models: requests in, responses out.

Requests are validated here and nowhere else: a wrong type, an empty `messages`, an
unknown role, a bad tool schema is a pydantic error the server turns into a 400 naming the
field. Unknown fields are kept (`extra="allow"`) so the server can log and ignore them, as
SDKs and agent frameworks send fields this server has no use for. Standard fields that are
accepted only at their default value (`n`, penalties, `logprobs`, `response_format`, ...) are
checked by `unsupported()`, which names the first one set to anything else. Response models
mirror OpenAI's `chat.completion`, `chat.completion.chunk`, `text_completion` and `list`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FUNCTION_NAME = r"^[A-Za-z0-9_\-]{1,64}$"  # OpenAI's rule for tool names (no dots: K2's ids are functions.NAME:IDX)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---------------------------------------------------------------------------- tools and messages
class FunctionDef(_Request):
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and "type" in v and not isinstance(v["type"], str | list):
            raise ValueError("a JSON schema's 'type' must be a string or a list")
        return v


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template sees it (transformers' convention: plain dicts)."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            m["reasoning_content"] = self.reasoning_content
        return m


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: str


# ---------------------------------------------------------------------------- requests
class _Sampling(_Request):
    model: str
    stream: bool | None = False  # None (JSON null) is the default, as OpenAI's schema allows for every optional field
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM's extra field; -1 or 0: off
    min_p: Annotated[float, Field(ge=0, lt=1)] | None = None  # vLLM's extra field
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch.Generator.manual_seed takes
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first standard field set to a value this server does not support."""
        if self.n not in (None, 1):
            return "n", "only n=1 is supported"
        if self.presence_penalty:
            return "presence_penalty", "penalties are not supported (only 0)"
        if self.frequency_penalty:
            return "frequency_penalty", "penalties are not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension (e.g. {"thinking": false})

    def unsupported(self) -> tuple[str, str] | None:
        base = super().unsupported()
        if base:
            return base
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.top_logprobs:
            return "top_logprobs", "logprobs are not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", f"response_format {self.response_format.type!r} is not supported (only 'text')"
        if isinstance(self.tool_choice, NamedToolChoice | str) and self.tool_choice not in ("none", "auto", None):
            names = [t.function.name for t in self.tools or []]
            if not names:
                return "tool_choice", "tool_choice needs tools"
            if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
                return "tool_choice", f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools"
        return None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions

    def unsupported(self) -> tuple[str, str] | None:
        base = super().unsupported()
        if base:
            return base
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return None


# ---------------------------------------------------------------------------- responses
def sse(chunk: BaseModel) -> str:
    """One server-sent event: fields that are None are left out, except each choice's finish_reason
    (OpenAI sends `"finish_reason": null` until the last chunk)."""
    d = chunk.model_dump(exclude_none=True)
    for c in d.get("choices", []):
        c.setdefault("finish_reason", None)
    return "data: " + json.dumps(d, ensure_ascii=False) + "\n\n"


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str = ""


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        return sse(self)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        return sse(self)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "k2quant"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
