"""Chat formats: messages (+ tools) -> prompt ids per generation, stop ids, and answers -> text + tool calls.

What each generation's official code builds (our renderings are checked against published ids):
  ChatGLM-6B  "[Round i]\\n问：{q}\\n答：{a}\\n" for earlier turns (i from 0), then "[Round n]\\n问：{q}\\n答：";
              a first turn has no wrapper at all (the prompt is the question). Ends with [gMASK] <sop>.
  ChatGLM2-6B [gMASK] sop "[Round i]\\n\\n问：{q}\\n\\n答：{a}\\n\\n" with i from 1.
  ChatGLM3-6B [gMASK] sop then per message <|role|> + "{metadata}\\n" + content, ending with <|assistant|>;
              tools ride on the system message: content + "\\n" + json.dumps(tools, indent=4).
  GLM-4       [gMASK] <sop> then per message <|role|> + "{metadata}\\n{content}" (messages with empty content
              are skipped, as the published chat template does), tools as the template's "# 可用工具" system
              block, ending with <|assistant|>.
ChatGLM-6B and ChatGLM2-6B have no system role: as the official OpenAI demo (ChatGLM2-6B openai_api.py) does,
a leading system message is prepended to the last user message.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant", "tool", "function", "observation")
RETRAIN_KEY, RETRAIN_VALUE = "[[训练时间]]", "2023年"      # replaced in answers by every official chat()
CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
GLM4_TOOL_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                      "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_SUFFIX = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


class ChatFormatError(ValueError):
    """The messages cannot be rendered (bad roles, order, contents, or too long for the context)."""


@dataclass
class ToolCall:
    name: str
    arguments: str                                      # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ChatResponse(str):
    """The answer text (a str), with .content, .tool_calls, .finish_reason, .usage and .logprobs (None unless
    asked for: OpenAI-style entries, one per token)."""

    content: str
    tool_calls: list
    finish_reason: str
    usage: dict
    logprobs: Optional[list]

    def __new__(cls, content: str, tool_calls=None, finish_reason: str = "stop", usage=None):
        s = super().__new__(cls, content)
        s.content = content
        s.tool_calls = list(tool_calls or [])
        s.finish_reason = finish_reason
        s.usage = dict(usage or {})
        s.logprobs = None
        return s

    def to_message(self) -> dict:
        m: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = [t.to_openai() for t in self.tool_calls]
        return m


@dataclass
class Prompt:
    ids: list[int]
    tools: list = field(default_factory=list)           # normalised tools offered (names checked on parse)
    forced_tool: Optional[str] = None                   # the answer was opened as a call to this tool
    dropped: int = 0                                    # earliest messages dropped to fit the context


# ------------------------------------------------------------------------------------------------------------
# Input normalisation and validation (shared by the Python API, the CLI and the server)
# ------------------------------------------------------------------------------------------------------------

def _get(m, key, default=None):
    if isinstance(m, dict):
        return m.get(key, default)
    return getattr(m, key, default)


def _text_of(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):                       # OpenAI content parts
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif _get(part, "type") == "text":
                out.append(_get(part, "text") or "")
            else:
                raise ChatFormatError(f"{where}: content part of type {_get(part, 'type')!r} is not supported "
                                      "(text only)")
        return "".join(out)
    raise ChatFormatError(f"{where}: content must be a string, got {type(content).__name__}")


def _tool_calls_of(raw, where: str) -> list[ToolCall]:
    calls = []
    for j, tc in enumerate(raw or []):
        fn = _get(tc, "function") or {}
        name = _get(fn, "name")
        if not name:
            raise ChatFormatError(f"{where}.tool_calls[{j}] has no function name")
        args = _get(fn, "arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(name=name, arguments=args, id=_get(tc, "id") or f"call_{j}"))
    return calls


def normalize_messages(messages) -> list[dict]:
    """-> [{"role", "content", "tool_calls", "metadata"}], validated; a bare string is one user message."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not messages:
        raise ChatFormatError("messages is empty: give at least one user message")
    out: list[dict] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = _get(m, "role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        calls = _tool_calls_of(_get(m, "tool_calls"), where) if role == "assistant" else []
        fc = _get(m, "function_call") if role == "assistant" else None
        if fc:                                          # legacy OpenAI function_call
            calls += _tool_calls_of([{"function": fc}], where)
        content = _text_of(_get(m, "content"), where)
        if role in ("tool", "function", "observation"):
            role = "tool"
            prev = out[-1] if out else None
            if prev is None or not (prev["role"] == "tool" or prev["tool_calls"]):
                raise ChatFormatError(f"{where}: a tool message must follow an assistant message with tool_calls")
        out.append({"role": role, "content": content, "tool_calls": calls,
                    "metadata": _get(m, "metadata") or "", "name": _get(m, "name")})
    return out


def normalize_tools(tools) -> list[dict]:
    """-> OpenAI-style [{"type": "function", "function": {...}}]; bare function dicts are wrapped."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            t = t.model_dump() if hasattr(t, "model_dump") else dict(t)
        if t.get("type", "function") == "function" and "function" in t:
            fn = t["function"]
        elif "name" in t:
            fn = t
        else:
            raise ChatFormatError(f"tools[{i}] is not a function tool ({{'type': 'function', 'function': ...}})")
        if not isinstance(fn, dict) or not fn.get("name"):
            raise ChatFormatError(f"tools[{i}].function has no name")
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(tool_choice, tools: list[dict]) -> tuple[list[dict], Optional[str]]:
    """-> (tools to render, name of a forced tool or None)."""
    if tool_choice is None or tool_choice == "auto" or tool_choice == "required":
        return tools, None
    if tool_choice == "none":
        return [], None
    name = _get(_get(tool_choice, "function") or {}, "name") if not isinstance(tool_choice, str) else None
    if not name:
        raise ChatFormatError(f"tool_choice {tool_choice!r} is not 'auto', 'none' or a named function")
    chosen = [t for t in tools if t["function"]["name"] == name]
    if not chosen:
        raise ChatFormatError(f"tool_choice names {name!r}, which is not among the tools")
    return chosen, name


# ------------------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------------------

class ChatFormat:
    family = ""
    supports_tools = False
    defaults = {"temperature": 0.8, "top_p": 0.8}        # the official chat() defaults
    punct_fullwidth = False

    def __init__(self, tok):
        self.tok = tok

    @property
    def stop_ids(self) -> list[int]:
        return [self.tok.eos_id]

    def render(self, messages, tools=None, tool_choice=None, allow_special: bool = False) -> Prompt:
        """allow_special=False (the default, and what the server always uses): every text inside a message
        (contents of every role, tool results, tool definitions, names, metadata) is encoded as text, so
        "<|assistant|>" or "[gMASK]" written in it never becomes a control token. allow_special=True: texts are
        encoded as the official code encodes them (ChatGLM-6B and GLM-4 then read special-token text as the
        special token; ChatGLM2/3's official tokenizer never does)."""
        msgs = normalize_messages(messages)
        tools = normalize_tools(tools)
        if tools and not self.supports_tools:
            raise ChatFormatError(f"{self.family} has no tool calling; use ChatGLM3-6B or GLM-4")
        tools, forced = _tool_choice(tool_choice, tools) if tools else ([], None)
        fmt = self
        if allow_special:                                # a copy: the format object is shared between threads
            fmt = copy.copy(self)
            fmt._allow_special = True
        return Prompt(ids=fmt._render(msgs, tools, forced), tools=tools, forced_tool=forced)

    _allow_special = False

    def _text(self, text: str) -> list[int]:
        """Text of a message -> ids: plain text, or (allow_special) as the official tokenizer's encode()."""
        if self._allow_special:
            return self.tok.encode(text, add_special_tokens=False) if text else []
        return self.tok.encode_plain(text)

    def _render(self, msgs, tools, forced) -> list[int]:
        raise NotImplementedError

    def parser(self, prompt: Optional[Prompt] = None) -> "ResponseParser":
        return ResponseParser(self, prompt or Prompt(ids=[]))


class _RoundFormat(ChatFormat):
    """ChatGLM-6B / ChatGLM2-6B: history as (question, answer) rounds, no roles."""

    def _pairs(self, msgs) -> tuple[list[tuple[str, str]], str]:
        system = ""
        if msgs and msgs[0]["role"] == "system":
            system = msgs[0]["content"]
            msgs = msgs[1:]
        for m in msgs:
            if m["role"] not in ("user", "assistant"):
                raise ChatFormatError(f"{self.family} knows only user and assistant turns (and one leading "
                                      f"system message), not {m['role']!r}")
        # merge consecutive messages of one role (clients sometimes split a question in two)
        merged: list[dict] = []
        for m in msgs:
            if merged and merged[-1]["role"] == m["role"]:
                merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n" + m["content"]}
            else:
                merged.append(dict(m))
        if not merged or merged[-1]["role"] != "user":
            raise ChatFormatError("the last message must be the user's question")
        if merged[0]["role"] != "user":
            raise ChatFormatError("the conversation must start with a user message (after an optional system one)")
        history = [(merged[i]["content"], merged[i + 1]["content"]) for i in range(0, len(merged) - 1, 2)]
        return history, system + merged[-1]["content"]

    def _whole(self, prompt: str) -> list[int]:
        """The official code encodes the whole round text with encode(), which reads special-token text in
        it; without allow_special it is encoded as plain text (the same ids for text without such tokens),
        followed by what encode() adds: [gMASK] <sop> (ChatGLM-6B) / [gMASK] sop before it (ChatGLM2-6B)."""
        t = self.tok
        if self._allow_special:
            return t.encode(prompt)
        if self.family == "chatglm":
            return t.encode_plain(prompt) + [t.token_id("[gMASK]"), t.token_id("<sop>")]
        return [t.token_id("[gMASK]"), t.token_id("sop")] + t.encode_plain(prompt)


class ChatGLM6BFormat(_RoundFormat):
    family = "chatglm"
    defaults = {"temperature": 0.95, "top_p": 0.7}
    punct_fullwidth = True

    def _render(self, msgs, tools, forced):
        history, query = self._pairs(msgs)
        if not history:
            prompt = query
        else:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
            prompt += f"[Round {len(history)}]\n问：{query}\n答："
        return self._whole(prompt)


class ChatGLM2Format(_RoundFormat):
    family = "chatglm2"

    def _render(self, msgs, tools, forced):
        history, query = self._pairs(msgs)
        prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history))
        prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return self._whole(prompt)


class _RoleFormat(ChatFormat):
    supports_tools = True

    @property
    def stop_ids(self) -> list[int]:
        t = self.tok
        return [t.eos_id, t.token_id("<|user|>"), t.token_id("<|observation|>")]

    def _messages_with_tools(self, msgs, tools) -> list[dict]:
        """Put the tools on the (first) system message, creating one when the caller gave none."""
        msgs = [dict(m) for m in msgs]
        if tools:
            if msgs and msgs[0]["role"] == "system":
                msgs[0]["tools"] = tools
            else:
                msgs.insert(0, {"role": "system", "content": self.default_tool_system, "tools": tools,
                                "tool_calls": [], "metadata": ""})
        if msgs[-1]["role"] not in ("user", "tool"):
            raise ChatFormatError("the last message must be from the user or a tool result")
        return msgs

    default_tool_system = ""


def _py_literal(v) -> str:
    return repr(v)


class ChatGLM3Format(_RoleFormat):
    family = "chatglm3"
    default_tool_system = CHATGLM3_TOOL_PROMPT

    def _msg(self, role: str, metadata: str, content: str) -> list[int]:
        t = self.tok
        return [t.token_id(f"<|{role}|>")] + self._text(f"{metadata}\n") + self._text(content)

    def _render(self, msgs, tools, forced):
        t = self.tok
        ids = [t.token_id("[gMASK]"), t.token_id("sop")]
        for m in self._messages_with_tools(msgs, tools):
            role, content = m["role"], m["content"]
            if role == "system" and m.get("tools"):
                # ChatGLM3's native tool format is the bare function objects
                fns = [x["function"] for x in m["tools"]]
                content = content + "\n" + json.dumps(fns, indent=4, ensure_ascii=False)
            if role == "tool":
                ids += self._msg("observation", "", content)
            elif role == "assistant" and m["tool_calls"]:
                if content:
                    ids += self._msg("assistant", m["metadata"], content)
                for call in m["tool_calls"]:
                    ids += self._msg("assistant", call.name, _chatglm3_call_text(call))
            else:
                ids += self._msg(role, m["metadata"], content)
        ids.append(t.token_id("<|assistant|>"))
        if forced:
            ids += self._text(f"{forced}\n")
        return ids


def _chatglm3_call_text(call: ToolCall) -> str:
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        raise ChatFormatError(f"tool call {call.name!r} has arguments that are not JSON: {call.arguments!r}")
    if not isinstance(args, dict):
        raise ChatFormatError(f"tool call {call.name!r} arguments must be a JSON object")
    kw = ", ".join(f"{k}={_py_literal(v)}" for k, v in args.items())
    return f"```python\ntool_call({kw})\n```"


class GLM4Format(_RoleFormat):
    family = "glm4"

    def _tools_text(self, tools) -> str:
        out = GLM4_TOOL_PREAMBLE
        for tl in tools:
            fn = tl["function"]
            # the template writes "\n\n## "; transformers renders it with trim_blocks, which eats the newline
            # that follows the {% if %} tag, so the published prompt has one
            out += f"\n## {fn['name']}\n\n{json.dumps(fn, indent=4, ensure_ascii=False)}{GLM4_TOOL_SUFFIX}"
        return out

    def _render(self, msgs, tools, forced):
        t = self.tok
        ids = [t.token_id("[gMASK]"), t.token_id("<sop>")]

        def add(role: str, metadata: str, content: str):
            if content:                                  # the template skips empty messages
                ids.append(t.token_id(f"<|{role}|>"))
                ids.extend(self._text(f"{metadata}\n{content}"))

        msgs = self._messages_with_tools(msgs, tools)
        if msgs and msgs[0].get("tools") and msgs[0]["content"] == self.default_tool_system:
            msgs[0]["content"] = ""                      # the template's tools block needs no system text
        for m in msgs:
            if m.get("tools"):
                ids.append(t.token_id("<|system|>"))
                ids.extend(self._text("\n" + self._tools_text(m["tools"])))
            role, content = m["role"], m["content"]
            if role == "tool":
                add("observation", "", content)
            elif role == "assistant" and m["tool_calls"]:
                add("assistant", m["metadata"], content)
                for call in m["tool_calls"]:
                    add("assistant", call.name, call.arguments)
            else:
                add(role, m["metadata"], content)
        ids.append(t.token_id("<|assistant|>"))
        if forced:
            ids += self._text(f"{forced}\n")
        return ids


class GLMFormat(ChatFormat):
    """The original GLM (2021) is no chat model: it fills blanks and continues text (infill, generate, choose).
    A span ends at <|endofpiece|>; a text ends at <|endoftext|>."""
    family = "glm"
    defaults = {"temperature": 0.0}                      # GLM's examples fill blanks greedily

    @property
    def stop_ids(self) -> list[int]:
        return [self.tok.eos_id, self.tok.pad_id]

    def _render(self, msgs, tools, forced):
        raise ChatFormatError("the original GLM (glm-10b, glm-large-chinese, ...) has no chat format: fill blanks "
                              "(glmkit infill / /v1/completions with [MASK], [sMASK] or [gMASK]), continue a text "
                              "(glmkit generate) or rank choices (glmkit choose)")


class GLM130BFormat(ChatFormat):
    """GLM-130B is a base model with no chat format: a conversation is the text of its messages, one per line,
    and the model continues it as GLM-130B's generate.py does ([gMASK] appended, eos, sop). Stops at eop/eos,
    generate.sh's sampling defaults."""
    family = "glm130b"
    defaults = {"temperature": 1.0, "top_p": 0.7, "top_k": 0}

    @property
    def stop_ids(self) -> list[int]:
        return [self.tok.special["eop"], self.tok.special["eos"]]

    def _render(self, msgs, tools, forced):
        if not msgs or msgs[-1]["role"] != "user":
            raise ChatFormatError("the last message must be the user's text")
        return self.tok.encode("\n".join(m["content"] for m in msgs))


def format_for(tok) -> ChatFormat:
    return {"chatglm": ChatGLM6BFormat, "chatglm2": ChatGLM2Format, "chatglm3": ChatGLM3Format,
            "glm4": GLM4Format, "glm": GLMFormat, "glm130b": GLM130BFormat}[tok.family](tok)


# ------------------------------------------------------------------------------------------------------------
# Context fitting
# ------------------------------------------------------------------------------------------------------------

def render_within(fmt: ChatFormat, messages, max_prompt_tokens: int, tools=None, tool_choice=None,
                  allow_special: bool = False) -> Prompt:
    """Render, dropping the oldest turns (never the system message) until the prompt fits max_prompt_tokens."""
    msgs = normalize_messages(messages)
    prompt = fmt.render(msgs, tools=tools, tool_choice=tool_choice, allow_special=allow_special)
    if len(prompt.ids) <= max_prompt_tokens:
        return prompt
    head = 1 if msgs[0]["role"] == "system" else 0
    # turn starts: each user message begins a turn; the last turn is the one being answered
    starts = [i for i in range(head, len(msgs)) if msgs[i]["role"] == "user"]
    dropped = 0
    for s in starts[1:]:
        trial = msgs[:head] + msgs[s:]
        prompt = fmt.render(trial, tools=tools, tool_choice=tool_choice, allow_special=allow_special)
        dropped = s - head
        if len(prompt.ids) <= max_prompt_tokens:
            prompt.dropped = dropped
            return prompt
    raise ChatFormatError(
        f"the last message needs a prompt of {len(prompt.ids)} tokens, more than the {max_prompt_tokens} the "
        "context window leaves for it; shorten the message (or raise the context size)")


# ------------------------------------------------------------------------------------------------------------
# Answers -> content (streamed) + tool calls
# ------------------------------------------------------------------------------------------------------------

_NOT_A_TOOL_NAME = re.compile(r"[^A-Za-z0-9_.\-]")
_PUNCT = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def _cjk(c: str) -> bool:
    return "\u4e00" <= c <= "\u9fff"


class ContentStream:
    """Streaming form of the official answer post-processing, giving the same text as the batch form:
    strip(), "[[训练时间]]" -> "2023年", and for ChatGLM-6B half-width ,!:;? next to a CJK character -> full-width.
    Holds back only what the next character could still change (a punctuation mark, trailing whitespace, a
    partial "[[训练时间]]")."""

    def __init__(self, fullwidth: bool):
        self.fullwidth = fullwidth
        self.buf = ""            # raw text not yet processed (a partial replacement key)
        self.started = False     # leading whitespace is dropped
        self.hold: list[str] = []
        self.pending = None      # (punctuation, char before it) waiting for the char after it
        self.last = ""

    def _char(self, ch: str, out: list[str]):
        if self.pending is not None:
            p, before = self.pending
            self.hold.append(_PUNCT[p] if (_cjk(before) or _cjk(ch)) else p)
            self.pending = None
        if self.fullwidth and ch in _PUNCT:
            self.pending = (ch, self.last)
        elif ch.isspace():
            self.hold.append(ch)
        else:
            out.extend(self.hold)
            out.append(ch)
            self.hold = []
        self.last = ch

    def push(self, text: str, final: bool = False) -> str:
        s = self.buf + text
        self.buf = ""
        out: list[str] = []
        i, n = 0, len(s)
        while i < n:
            c = s[i]
            if not self.started:
                if c.isspace():
                    i += 1
                    continue
                self.started = True
            if c == "[":
                if s.startswith(RETRAIN_KEY, i):
                    for ch in RETRAIN_VALUE:
                        self._char(ch, out)
                    i += len(RETRAIN_KEY)
                    continue
                if not final and RETRAIN_KEY.startswith(s[i:]):
                    self.buf = s[i:]
                    break
            self._char(c, out)
            i += 1
        if final:
            if self.pending is not None:
                p, before = self.pending
                self.hold.append(_PUNCT[p] if _cjk(before) else p)
                self.pending = None
            while self.hold and self.hold[-1].isspace():
                self.hold.pop()
            out.extend(self.hold)
            self.hold = []
        return "".join(out)


def postprocess(fmt: ChatFormat, text: str) -> str:
    """The batch form of the official answer post-processing."""
    return ContentStream(fmt.punct_fullwidth).push(text, final=True)


class _JsonNames(ast.NodeTransformer):
    """JSON's true/false/null inside a call's values read as Python's True/False/None (a call decoded under a
    tool's JSON Schema writes its values as JSON: glmkit/grammar.py)."""

    NAMES = {"true": True, "false": False, "null": None}

    def visit_Name(self, node):
        if node.id in self.NAMES:
            return ast.copy_location(ast.Constant(self.NAMES[node.id]), node)
        return node


def parse_chatglm3_call(body: str) -> Optional[dict]:
    """```python\\ntool_call(a=1, b='x')\\n``` -> {"a": 1, "b": "x"}, with ast (literals only; also JSON's
    true/false/null), never eval."""
    code = body.strip()
    if "```" in code:
        parts = code.split("```")
        code = parts[1] if len(parts) >= 3 else parts[-1]
        if code.startswith("python"):
            code = code[len("python"):]
    code = code.strip()
    try:
        node = ast.parse(code, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"
            and not node.args):
        return None
    out = {}
    for kw in node.keywords:
        if kw.arg is None:
            return None
        try:
            out[kw.arg] = ast.literal_eval(_JsonNames().visit(kw.value))
        except (ValueError, SyntaxError, TypeError):
            return None
    return out


class ResponseParser:
    """Token ids of one answer -> content pieces as they become final; finish() -> (tail, tool_calls).

    ChatGLM3 / GLM-4 answers start with a metadata line: empty for a plain answer, the tool's name for a tool
    call (then the arguments: a ```python tool_call(...)``` block for ChatGLM3, JSON for GLM-4). An
    <|assistant|> token inside the answer starts a new segment, as the official process_response splits them.
    """

    def __init__(self, fmt: ChatFormat, prompt: Prompt):
        self.fmt = fmt
        self.tok = fmt.tok
        self.prompt = prompt
        self.roles = isinstance(fmt, _RoleFormat)
        self.assistant_id = self.tok.token_id("<|assistant|>") if self.roles else None
        self.decoder = self.tok.decoder()
        self.content = ContentStream(fmt.punct_fullwidth)
        self.text = ""                       # content given out so far
        self.tool_calls: list[ToolCall] = []
        # streaming of tool calls (the server's delta.tool_calls), drained by the caller:
        #   ("start", index, id, name)  once the name line names one of the offered tools
        #   ("args", index, text)       arguments text (GLM-4: as generated; ChatGLM3: the JSON once parsed)
        self.events: list[tuple] = []
        self._started: Optional[tuple[int, str]] = None      # (index, id) of the call being streamed
        self._new_segment(prompt.forced_tool)

    def _new_segment(self, forced: Optional[str] = None):
        self._started = None
        if not self.roles:
            self.state = "content"
        elif forced:
            self.state, self.meta, self.body = "tool", forced, ""
            self._start_call(forced)
        else:
            self.state, self.meta, self.body = "meta", "", ""

    def _start_call(self, name: str, parsed: bool = False):
        if parsed or name in {t["function"]["name"] for t in self.prompt.tools}:
            self._started = (len(self.tool_calls), "call_" + uuid.uuid4().hex[:24])
            self.events.append(("start", self._started[0], self._started[1], name))

    def _stream_args(self, piece: str):
        if self._started is None or self.fmt.family == "chatglm3":
            return
        if not self.body.strip():                        # nothing but whitespace so far: drop it
            return
        if not self.body[:len(self.body) - len(piece)].strip():
            piece = self.body.lstrip()                   # the first non-blank text of the arguments
        self.events.append(("args", self._started[0], piece))

    def _text(self, piece: str, final: bool = False) -> str:
        out = ""
        if self.state == "meta":
            self.meta += piece
            if "\n" in self.meta:
                self.meta, rest = self.meta.split("\n", 1)
                if self.meta.strip():
                    self.state, self.body = "tool", rest
                    self._start_call(self.meta.strip())
                    self._stream_args(rest)
                else:
                    self.state = "content"
                    out += self.content.push(rest)
            elif final or _NOT_A_TOOL_NAME.search(self.meta.strip()):
                # no metadata line (or a first line no tool name can have): plain text, stream it now
                self.state = "content"
                out += self.content.push(self.meta)
        elif self.state == "content":
            out += self.content.push(piece)
        else:
            self.body += piece
            self._stream_args(piece)
        return out

    def _close_segment(self) -> str:
        """End of a segment: a tool call is parsed (or, if it is not one, becomes content)."""
        if self.state != "tool":
            return ""
        call = self._parse_call(self.meta.strip(), self.body)
        if call is not None:
            streamed = self._started is not None and self.fmt.family != "chatglm3"
            if self._started is None:
                self._start_call(call.name, parsed=True)
            call.id = self._started[1]
            if not streamed:
                self.events.append(("args", self._started[0], call.arguments))
            self.tool_calls.append(call)
            return ""
        return self.content.push(self.meta + "\n" + self.body)

    def _parse_call(self, name: str, body: str) -> Optional[ToolCall]:
        names = {t["function"]["name"] for t in self.prompt.tools}
        if names and name not in names:
            return None
        if self.fmt.family == "chatglm3":
            args = parse_chatglm3_call(body)
            if args is None:
                return None
            return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))
        try:
            args = json.loads(body.strip())
        except json.JSONDecodeError:
            return None
        if not isinstance(args, dict):
            return None
        return ToolCall(name=name, arguments=json.dumps(args, ensure_ascii=False))

    def feed(self, token_id: int) -> str:
        """One generated id (stop ids excluded) -> newly final content text ('' if none yet)."""
        out = ""
        if self.roles and token_id == self.assistant_id:
            out += self._text(self.decoder.flush(), final=True)
            out += self._close_segment()
            self.decoder = self.tok.decoder()
            self._new_segment()
        elif token_id in self.tok.special_ids:
            return ""
        else:
            out += self._text(self.decoder.push(token_id))
        self.text += out
        return out

    def finish(self) -> str:
        out = self._text(self.decoder.flush(), final=True)
        out += self._close_segment()
        out += self.content.push("", final=True)
        self.text += out
        return out
