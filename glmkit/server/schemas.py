"""OpenAI request shapes, validated strictly (a string where a number belongs is a 400, as OpenAI answers),
and the error body every failure uses: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                             413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class Message(_Strict):
    role: str
    content: Optional[Union[str, list[dict[str, Any]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[dict[str, Any]] = None


class _Sampling(_Strict):
    model: str
    stream: bool = False
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)                      # extension
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)       # extension (transformers' rule)
    n: Optional[int] = None
    logit_bias: Optional[dict[str, float]] = None                 # {"token id": bias from -100 to 100}
    stream_options: Optional[dict[str, Any]] = None
    user: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: Optional[int] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[dict[str, Any]]] = None              # legacy
    function_call: Optional[Union[str, dict[str, Any]]] = None    # legacy
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    parallel_tool_calls: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None
    response_format: Optional[dict[str, Any]] = None              # extension: structured outputs (as chat's)


class LegacyRequest(_Strict):
    """ChatGLM's api.py: POST / {prompt, history, max_length, top_p, temperature}."""
    prompt: str
    history: list[list[str]] = []
    max_length: Optional[int] = Field(None, gt=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    temperature: Optional[float] = Field(None, ge=0)


class KBSearchRequest(_Strict):
    """POST /v1/knowledge_bases/{name}/search."""
    query: str
    top_k: Optional[int] = Field(None, ge=1, le=100)
    score_threshold: Optional[float] = Field(None, ge=0, le=1)


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings (OpenAI's shape; `model` names a knowledge base or its embedding model)."""
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Optional[str] = None
    dimensions: Optional[int] = None
    user: Optional[str] = None


class TokenizeRequest(_Strict):
    """POST /tokenize (llama.cpp server's shape)."""
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    """POST /detokenize (llama.cpp server's shape)."""
    tokens: list[int]


def parse(model_cls, body: bytes):
    """Raw body -> validated request, or APIError(400) naming the first offending field."""
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return model_cls.model_validate_json(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        if err.get("type") == "json_invalid":
            raise APIError(400, f"the body is not valid JSON: {err.get('msg')}", code="invalid_json") from None
        if err.get("type") == "model_type" and not loc:
            raise APIError(400, "the body must be a JSON object", code="invalid_json") from None
        if err.get("type") == "missing":
            raise APIError(400, f"missing required parameter: '{loc}'", param=loc,
                           code="missing_required_parameter") from None
        raise APIError(400, f"invalid value for '{loc}': {err.get('msg')}", param=loc or None,
                       code="invalid_value") from None

