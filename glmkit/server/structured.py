"""Structured outputs at the HTTP edge: request fields -> the grammar constraint the engine decodes under
(glmkit/grammar.py), and the checks that make bad tools and schemas a 400 naming what is wrong.

  response_format  {"type": "json_object"} | {"type": "json_schema", "json_schema": {"name", "schema",
                   "strict"}} on /v1/chat/completions and /v1/completions
  tool_choice      a named function or "required": the call's arguments under the tool's parameters schema;
                   parallel_tool_calls (default true) lets "required" write several calls
  tools            every tool's parameters must be a JSON Schema object (checked on every request)
"""
from __future__ import annotations

from typing import Optional

from ..chat_format import Prompt
from ..grammar import GrammarError, check_tools, constraint_for
from ..sampling import SamplingParams
from .schemas import APIError


def validate_tools(tools, tool_choice) -> None:
    """400 for a tool whose parameters is not a JSON Schema object (naming the tool), and for
    tool_choice "required" without tools."""
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice", code="invalid_value")
    try:
        check_tools(tools)
    except GrammarError as e:
        raise APIError(400, str(e), param="tools", code="invalid_value") from None


def _constraint(pipe, params: SamplingParams, **kw):
    try:
        return constraint_for(pipe.tokenizer, pipe.chat_format.stop_ids, max_tokens=params.max_new_tokens, **kw)
    except GrammarError as e:
        param = "tools" if str(e).startswith("tools") else "response_format"
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def chat_constraint(pipe, r, prompt: Prompt, params: SamplingParams, tool_choice):
    """A chat request -> its constraint (or None): forced tool calls first, then response_format."""
    required = tool_choice == "required"
    if r.response_format is None and not prompt.forced_tool and not (required and prompt.tools):
        return None
    return _constraint(pipe, params, response_format=r.response_format, tools=prompt.tools,
                       forced=prompt.forced_tool, required=required, parallel=r.parallel_tool_calls)


def completion_constraint(pipe, r, params: SamplingParams) -> Optional[object]:
    """A /v1/completions request with response_format -> its constraint (or None)."""
    rf = getattr(r, "response_format", None)
    if rf is None:
        return None
    return _constraint(pipe, params, response_format=rf)
