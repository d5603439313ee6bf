"""Fine-tuning data: four dataset formats -> one conversation form -> (input_ids, labels) in the model's own chat
format, loss on the assistant turns only.

Formats (detected per record with fmt="auto", or forced):
  columns   AdvertiseGen-style records, as ChatGLM-6B / ChatGLM2-6B ptuning/main.py reads them:
            {prompt_column: question, response_column: answer, history_column: [[q, a], ...]}. Without
            column names, ("content", "summary") and then ("prompt", "response") are tried. The history is
            prompt: its answers are not trained (the official script puts them in the prompt text).
  chatglm3  ChatGLM3-6B finetune_demo: {"conversations": [{"role", "content", "loss"?}], "tools"?}. Roles system,
            user, assistant, observation (a tool result); the demo's {"role": "tool", "name", "parameters",
            "observation"} becomes an assistant tool call plus its result. An assistant message may carry OpenAI
            "tool_calls", or ChatGLM3's raw form (metadata = tool name, content = ```python tool_call(...)```).
            `loss` (bool) chooses whether an assistant message is trained (default yes); system, user and
            observation messages never are. {"messages": [{"role", "content"}]} (OpenAI) reads the same way.
  alpaca    LLaMA-Factory alpaca: instruction, input (joined with "\\n"), output, optional system and history
            [[q, a], ...]. History answers are trained too (LLaMA-Factory's default).
  sharegpt  LLaMA-Factory sharegpt: {"conversations": [{"from": human|gpt|function_call|observation|system,
            "value"}], "system"?, "tools"?: JSON text or list}. A function_call value is {"name", "arguments"}
            JSON (or a list of them).
A file is a JSON list of records, one JSON record, or JSONL (one record per line; *.jsonl always, and a *.json
whose text is several JSON objects, as AdvertiseGen's dev.json is). A record that does not parse or lacks what its
format needs is reported to on_error as "file:line: reason" (the line of the record, also in a JSON list) and
skipped.

Rendering (encode_example). The ids are chat_format's: the prompt before each trained answer is token-identical to
`tok.chat_format.render(messages[:k]).ids`, what the server sends the model for that turn. Labels (aligned with
input_ids: label[i] is input_ids[i] or IGNORE; the loss shifts them, as transformers does) cover exactly what
the model generates for a trained turn: its answer ids and the stop id that ends it.
  ChatGLM3 / GLM-4  the whole conversation is one sequence. An assistant answer is its message ids after the role
            token (the metadata line, "\\n" for a plain answer or the tool name for a call, then the content; a
            tool call as chat_format renders it in history) followed by the next role token when that is a stop
            id (<|user|>, <|observation|>) or the <|assistant|> that opens the next segment of the same answer;
            the last answer is followed by eos (as the official ChatGLM3 finetune_demo).
  ChatGLM-6B / ChatGLM2-6B  their prompts re-encode the history as text every round, so one sequence cannot match
            every round's prompt: as the official ptuning main.py with --history_column, the last trained answer
            is trained after render(messages before it), the earlier rounds being its prompt. The answer is
            tok.encode(answer, add_special_tokens=False) + eos, as the official script. each_turn=True in
            encode_examples/load_dataset makes one sequence per trained answer instead. These generations have no
            tools: such examples are reported and skipped.

Truncation (max_source_length S, max_target_length T; None = no limit):
  source = the ids before the first trained token, target = the rest (ending with the final stop id).
  - A single-round example, and every columns record (whatever its history, as the official script): the source
    is cut to S ids as the official scripts cut the prompt (the special tokens at either end, [gMASK] sop,
    ChatGLM-6B's [gMASK] <sop>, ChatGLM3/GLM-4's closing <|assistant|>, are kept and the text before the closing
    ones is cut at its end); the target to T ids plus the final stop id (labelled when the cut falls inside an
    answer). ChatGLM-6B counts as its official script does: the prompt up to [gMASK] is the source (S + 1 ids
    with <sop>) and <sop> + answer + <eop> the target (T - 2 answer ids). Columns records give the official
    scripts' input ids exactly (ChatGLM-6B's official labels also train <sop>, which is prompt here).
  - A conversation of several rounds (a round starts at a user message) longer than S + T + 1 ids (the official
    ChatGLM3 maximum; ChatGLM-6B: S + T) when both limits are given: the oldest rounds are dropped, the leading
    system message and the tools kept, until it fits, as chat_format.render_within drops them at serving; what
    fits is not cut further. When only the last trained round is left and it is still too long, it is cut as a
    single round. With only one limit given, that part is cut.
  Messages after the last trained answer are never part of the sequence.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from ..chat_format import ChatFormatError, normalize_messages, normalize_tools, parse_chatglm3_call
from ..documents import expand_paths

IGNORE = -100
FORMATS = ("auto", "columns", "chatglm3", "alpaca", "sharegpt")
DEFAULT_COLUMNS = (("content", "summary"), ("prompt", "response"))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "call", "function": "call", "observation": "tool", "tool": "tool",
                  "system": "system"}

OnError = Optional[Callable[[str], None]]


class FinetuneDataError(ValueError):
    """No usable examples (or bad arguments): raised before any model needs loading."""


class _Bad(ValueError):
    """A record that cannot be used (the message is the reason)."""


@dataclass
class Example:
    messages: list            # OpenAI-style dicts: role system/user/assistant/tool, content, tool_calls
    tools: list = field(default_factory=list)       # OpenAI-style tools offered
    loss: list = field(default_factory=list)        # per message: train on it (assistant messages only)
    source: str = ""                                # "file:line"
    fmt: str = ""                                   # the format it was read as


@dataclass
class Summary:
    files: int = 0
    records: int = 0
    examples: int = 0
    skipped: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped_rounds: int = 0
    max_source_length: Optional[int] = None
    max_target_length: Optional[int] = None
    problems: list = field(default_factory=list)    # the first few reasons for skipping

    def line(self) -> str:
        return format_summary(self)


# ------------------------------------------------------------------------------------------------------------
# Files -> (line, record)
# ------------------------------------------------------------------------------------------------------------

def _files(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += [f for f in expand_paths([p]) if f.suffix in (".json", ".jsonl")]
        else:
            out += expand_paths([p])
    return out


def _ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in " \t\r\n":
        i += 1
    return i


class _Unreadable:
    """Stands for a record that could not be read (already reported): counted as a skipped record."""


UNREADABLE = _Unreadable()


def _json_list(text: str, src: str, on_error) -> Iterator[tuple[int, object]]:
    """The records of a JSON list with the line each starts on (raw_decode over the list, one record at a time)."""
    dec = json.JSONDecoder()
    i = _ws(text, 1)
    line, at = 1, 0
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", at, i)
        at = i
        try:
            rec, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            _report(on_error, f"{src}:{e.lineno}: not JSON ({e.msg}); the rest of the file is skipped")
            yield e.lineno, UNREADABLE
            return
        yield line, rec
        i = _ws(text, j)
        if i < len(text) and text[i] == ",":
            i = _ws(text, i + 1)
        elif i < len(text) and text[i] == "]":
            if _ws(text, i + 1) < len(text):
                _report(on_error, f"{src}:{line + text.count(chr(10), at, i)}: text after the end of the JSON list "
                                  "ignored")
            return
        else:
            lno = line + text.count("\n", at, i)
            _report(on_error, f"{src}:{lno}: not JSON (expected ',' or ']' after a record); the rest of the "
                              "file is skipped")
            yield lno, UNREADABLE
            return


def _json_line(s: str, lno: int, src: str, on_error) -> tuple[int, object]:
    try:
        return lno, json.loads(s)
    except json.JSONDecodeError as e:
        _report(on_error, f"{src}:{lno}: not JSON ({e.msg}), line skipped")
        return lno, UNREADABLE


def _json_lines(lines: Sequence[bytes], src: str, on_error) -> Iterator[tuple[int, object]]:
    for lno, b in enumerate(lines, 1):
        if not b.strip():
            continue
        try:
            s = b.decode("utf-8-sig" if lno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            _report(on_error, f"{src}:{lno}: not UTF-8 (byte {b[e.start]:#04x}), line skipped")
            yield lno, UNREADABLE
            continue
        yield _json_line(s, lno, src, on_error)


def _looks_like_jsonl(text: str) -> bool:
    """Several JSON objects, one per line (AdvertiseGen's dev.json), even when one of the first two is broken."""
    lines = [ln for ln in text.split("\n")[:50] if ln.strip()][:2]
    for ln in lines:
        try:
            if isinstance(json.loads(ln), dict):
                return True
        except json.JSONDecodeError:
            pass
    return False


def iter_records(path, on_error: OnError = None) -> Iterator[tuple[int, object]]:
    """(line, record) of one JSON / JSONL file. What cannot be read is reported as "file:line: reason" and
    yields (line, UNREADABLE) (a record lost)."""
    path = Path(path)
    src = str(path)
    raw = path.read_bytes()
    if not raw.strip():
        _report(on_error, f"{src}: empty file, skipped")
        return
    if path.suffix == ".jsonl":
        yield from _json_lines(raw.split(b"\n"), src, on_error)
        return
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lno = raw[:e.start].count(b"\n") + 1
        _report(on_error, f"{src}:{lno}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}), file skipped")
        yield lno, UNREADABLE
        return
    i = _ws(text, 0)
    if text[i] == "[":
        yield from _json_list(text, src, on_error)
        return
    if text[i] != "{":
        _report(on_error, f"{src}:{text.count(chr(10), 0, i) + 1}: not JSON or JSONL (records must be objects), "
                          "file skipped")
        yield text.count("\n", 0, i) + 1, UNREADABLE
        return
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or _looks_like_jsonl(text):
            yield from _json_lines(raw.split(b"\n"), src, on_error)   # JSONL in a .json file
        else:
            _report(on_error, f"{src}:{e.lineno}: not JSON ({e.msg}), file skipped")
            yield e.lineno, UNREADABLE
        return
    yield text.count("\n", 0, i) + 1, rec


def _report(on_error, msg: str):
    if on_error is not None:
        on_error(msg)


# ------------------------------------------------------------------------------------------------------------
# Records -> Example
# ------------------------------------------------------------------------------------------------------------

def _text(v, where: str, allow_empty: bool = True) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{where} must be a string, got {type(v).__name__}" if v is not None else f"{where} is missing")
    if not allow_empty and not v.strip():
        raise _Bad(f"{where} is empty")
    return v


def _json_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)


def _call(name, arguments, where: str) -> dict:
    if not isinstance(name, str) or not name:
        raise _Bad(f"{where}: a tool call needs a function name")
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments or "{}")
        except json.JSONDecodeError:
            raise _Bad(f"{where}: the arguments of {name!r} are not JSON") from None
    else:
        parsed = arguments
    if not isinstance(parsed, dict):
        raise _Bad(f"{where}: the arguments of {name!r} must be a JSON object")
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(parsed, ensure_ascii=False)}}


def _tools(v, where: str = "tools") -> list:
    if v is None or v == "" or v == []:
        return []
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise _Bad(f"{where} is not JSON") from None
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list):
        raise _Bad(f"{where} must be a list of functions")
    try:
        return normalize_tools(v)
    except (ChatFormatError, TypeError, ValueError) as e:
        raise _Bad(f"{where}: {e}") from None


def _pairs(history, where: str) -> list[tuple[str, str]]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise _Bad(f"{where} must be a list of [question, answer] pairs")
    out = []
    for j, h in enumerate(history):
        if not (isinstance(h, (list, tuple)) and len(h) == 2):
            raise _Bad(f"{where}[{j}] is not a [question, answer] pair")
        out.append((_text(h[0], f"{where}[{j}][0]"), _text(h[1], f"{where}[{j}][1]")))
    return out


def _from_columns(rec: dict, prompt_column: str, response_column: str, history_column: Optional[str]):
    q = _text(rec.get(prompt_column), f"{prompt_column!r}", allow_empty=False)
    a = _text(rec.get(response_column), f"{response_column!r}", allow_empty=False)
    msgs, loss = [], []
    if history_column is not None:
        for hq, ha in _pairs(rec.get(history_column), f"{history_column!r}"):
            msgs += [{"role": "user", "content": hq}, {"role": "assistant", "content": ha}]
            loss += [False, False]                       # the official script puts the history in the prompt
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    loss += [False, True]
    return msgs, [], loss


def _from_alpaca(rec: dict):
    parts = [_text(rec.get("instruction"), "'instruction'")]
    if rec.get("input") is not None:
        parts.append(_text(rec.get("input"), "'input'"))
    q = "\n".join(p for p in parts if p)
    if not q.strip():
        raise _Bad("'instruction' and 'input' are empty")
    a = _text(rec.get("output"), "'output'", allow_empty=False)
    msgs, loss = [], []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _text(rec["system"], "'system'")})
        loss.append(False)
    for hq, ha in _pairs(rec.get("history"), "'history'"):
        msgs += [{"role": "user", "content": hq}, {"role": "assistant", "content": ha}]
        loss += [False, True]
    msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    loss += [False, True]
    return msgs, [], loss


def _from_sharegpt(rec: dict):
    conv = rec.get("conversations", rec.get("messages"))
    if not isinstance(conv, list) or not conv:
        raise _Bad("'conversations' must be a non-empty list")
    msgs, loss = [], []
    if rec.get("system"):
        msgs.append({"role": "system", "content": _text(rec["system"], "'system'")})
        loss.append(False)
    for j, m in enumerate(conv):
        where = f"conversations[{j}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} is not an object")
        tag = m.get("from")
        role = SHAREGPT_ROLES.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise _Bad(f"{where}: unknown 'from' {tag!r} (expected human, gpt, function_call, observation or system)")
        value = m.get("value")
        if role == "call":
            v = value
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    raise _Bad(f"{where}: the function_call value is not JSON") from None
            calls = v if isinstance(v, list) else [v]
            if not calls or not all(isinstance(c, dict) for c in calls):
                raise _Bad(f"{where}: a function_call value is {{\"name\", \"arguments\"}} (or a list of them)")
            msgs.append({"role": "assistant", "content": "",
                         "tool_calls": [_call(c.get("name"), c.get("arguments", c.get("parameters")), where)
                                        for c in calls]})
            loss.append(True)
        elif role == "tool":
            msgs.append({"role": "tool", "content": _json_text(value) if value is not None else ""})
            loss.append(False)
        elif role == "system":
            if any(x["role"] != "system" for x in msgs):
                raise _Bad(f"{where}: a system message must come first")
            content = _text(value, f"{where}.value")
            if msgs:                                     # the system turn overrides a 'system' column
                msgs[0]["content"] = content
            else:
                msgs.append({"role": "system", "content": content})
                loss.append(False)
        else:
            msgs.append({"role": role, "content": _text(value, f"{where}.value")})
            loss.append(role == "assistant")
    return msgs, _tools(rec.get("tools")), loss


def _from_chatglm3(rec: dict):
    key = "conversations" if "conversations" in rec else "messages"
    conv = rec.get(key)
    if not isinstance(conv, list) or not conv:
        raise _Bad(f"{key!r} must be a non-empty list")
    msgs, loss = [], []
    for j, m in enumerate(conv):
        where = f"{key}[{j}]"
        if not isinstance(m, dict):
            raise _Bad(f"{where} is not an object")
        role = m.get("role")
        flag = m.get("loss", True)
        if not isinstance(flag, bool):
            raise _Bad(f"{where}: 'loss' must be true or false")
        if role in ("system", "user"):
            msgs.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
            loss.append(False)
        elif role == "assistant":
            content = m.get("content")
            content = "" if content is None else _text(content, f"{where}.content")
            out = {"role": "assistant", "content": content}
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise _Bad(f"{where}.tool_calls must be a list")
                out["tool_calls"] = []
                for c in calls:
                    fn = c.get("function") if isinstance(c, dict) else None
                    if not isinstance(fn, dict):
                        raise _Bad(f"{where}.tool_calls: each call is {{\"type\": \"function\", \"function\": ...}}")
                    out["tool_calls"].append(_call(fn.get("name"), fn.get("arguments"), where))
            elif isinstance(m.get("function_call"), dict):
                fc = m["function_call"]
                out["tool_calls"] = [_call(fc.get("name"), fc.get("arguments"), where)]
            elif isinstance(m.get("metadata"), str) and m["metadata"].strip():
                # ChatGLM3's own form: the tool name on the metadata line, the call as ```python tool_call(...)```
                # (or GLM-4's JSON arguments)
                name = m["metadata"].strip()
                args = parse_chatglm3_call(content)
                if args is None:
                    try:
                        args = json.loads(content)
                    except json.JSONDecodeError:
                        args = None
                if isinstance(args, dict):
                    out = {"role": "assistant", "content": "", "tool_calls": [_call(name, args, where)]}
                else:
                    out["metadata"] = m["metadata"]
            msgs.append(out)
            loss.append(flag)
        elif role == "tool" and ("parameters" in m or "arguments" in m or "observation" in m):
            # the ChatGLM3 finetune_demo's tool turn: a call and its result in one message
            args = m.get("parameters", m.get("arguments"))
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_call(m.get("name"), args, where)]})
            loss.append(flag)
            obs = m.get("observation")
            msgs.append({"role": "tool", "content": _json_text(obs) if obs is not None else ""})
            loss.append(False)
        elif role in ("tool", "observation", "function"):
            c = m.get("content")
            msgs.append({"role": "tool", "content": _json_text(c) if c is not None else ""})
            loss.append(False)
        else:
            raise _Bad(f"{where}: unknown role {role!r} (expected system, user, assistant, observation or tool)")
    return msgs, _tools(rec.get("tools")), loss


def _detect(rec: dict, columns: Optional[tuple]) -> str:
    if columns is not None and columns[0] in rec:
        return "columns"
    conv = rec.get("conversations", rec.get("messages"))
    if isinstance(conv, list):
        first = next((m for m in conv if isinstance(m, dict)), {})
        return "sharegpt" if "from" in first or "value" in first else "chatglm3"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if columns is None:
        for pc, rc in DEFAULT_COLUMNS:
            if pc in rec and rc in rec:
                return "columns"
    raise _Bad("not a known format: expected 'conversations' (ChatGLM3 or ShareGPT), 'instruction'/'output' "
               "(alpaca) or the prompt/response columns (--prompt-column/--response-column; AdvertiseGen's "
               "content/summary)")


def _fill(messages: list, replacements: dict) -> None:
    if not replacements:
        return
    for m in messages:
        if isinstance(m.get("content"), str):
            s = m["content"]
            for k, v in replacements.items():
                s = s.replace("{{" + k + "}}", v)
            m["content"] = s


def parse_record(rec, fmt: str = "auto", prompt_column: Optional[str] = None,
                 response_column: Optional[str] = None, history_column: Optional[str] = None,
                 replacements: Optional[dict] = None, source: str = "") -> Example:
    """One JSON record -> Example; raises ValueError with the reason when it cannot be used."""
    if not isinstance(rec, dict):
        raise _Bad(f"a record must be a JSON object, got {type(rec).__name__}")
    columns = (prompt_column, response_column) if prompt_column else None
    kind = _detect(rec, columns) if fmt == "auto" else fmt
    if kind == "columns":
        if columns is None:
            columns = next(((p, r) for p, r in DEFAULT_COLUMNS if p in rec), DEFAULT_COLUMNS[0])
        msgs, tools, loss = _from_columns(rec, columns[0], columns[1], history_column)
    elif kind == "alpaca":
        msgs, tools, loss = _from_alpaca(rec)
    elif kind == "sharegpt":
        msgs, tools, loss = _from_sharegpt(rec)
    elif kind == "chatglm3":
        msgs, tools, loss = _from_chatglm3(rec)
    else:
        raise FinetuneDataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _fill(msgs, replacements or {})
    try:
        normalize_messages(msgs)
    except ChatFormatError as e:
        raise _Bad(re.sub(r"messages\[(\d+)\]", r"message \1", str(e))) from None
    for j, m in enumerate(msgs):
        if m["role"] == "assistant" and not m.get("tool_calls") and not m["content"].strip():
            raise _Bad(f"message {j} (assistant) is empty")
    if not any(flag and m["role"] == "assistant" for m, flag in zip(msgs, loss)):
        raise _Bad("no assistant answer to train on")
    return Example(messages=msgs, tools=tools, loss=[bool(f and m["role"] == "assistant")
                                                     for m, f in zip(msgs, loss)],
                   source=source, fmt=kind)


def _check_args(fmt, prompt_column, response_column):
    if fmt not in FORMATS:
        raise FinetuneDataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if bool(prompt_column) != bool(response_column):
        raise FinetuneDataError("--prompt-column and --response-column go together")


def iter_examples(paths, fmt: str = "auto", prompt_column: Optional[str] = None,
                  response_column: Optional[str] = None, history_column: Optional[str] = None,
                  on_error: OnError = print, replacements: Optional[dict] = None,
                  summary: Optional[Summary] = None) -> Iterator[Example]:
    """Examples of every file in turn; bad records reported as "file:line: reason" and skipped."""
    _check_args(fmt, prompt_column, response_column)
    for p in _files(paths):
        if summary is not None:
            summary.files += 1
        for line, rec in iter_records(p, on_error):
            src = f"{p}:{line}"
            if summary is not None:
                summary.records += 1
            if rec is UNREADABLE:
                if summary is not None:
                    summary.skipped += 1
                continue
            try:
                yield parse_record(rec, fmt, prompt_column, response_column, history_column, replacements, src)
            except (_Bad, TypeError, AttributeError, KeyError) as e:     # the latter: shapes no check foresaw
                if summary is not None:
                    summary.skipped += 1
                reason = str(e) if isinstance(e, _Bad) else f"cannot be read ({type(e).__name__}: {e})"
                _report(on_error, f"{src}: {reason}, skipped")


class _Collect:
    """Forwards reports to on_error and keeps the first few (for the error message when nothing is usable)."""

    def __init__(self, on_error, keep: int = 3):
        self.on_error, self.keep, self.first, self.count = on_error, keep, [], 0

    def __call__(self, msg: str):
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(msg)
        _report(self.on_error, msg)


def _names(paths) -> str:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    names = [str(p) for p in paths]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _no_examples(paths, summary: "Summary", what: str = "") -> FinetuneDataError:
    where = f"no usable examples in {_names(paths)}{what}"
    first = f" (first problems: {'; '.join(summary.problems)})" if summary.problems else ""
    if summary.records == 0:
        return FinetuneDataError(f"{where}: no records in {summary.files} file{'s' if summary.files != 1 else ''}"
                                 f"{first}")
    return FinetuneDataError(f"{where}: {summary.skipped} of {summary.records} records skipped{first}")


def read_examples(paths, fmt: str = "auto", prompt_column: Optional[str] = None,
                  response_column: Optional[str] = None, history_column: Optional[str] = None,
                  on_error: OnError = print, replacements: Optional[dict] = None,
                  summary: Optional[Summary] = None) -> list[Example]:
    """All examples (no tokenizer needed, so a CLI fails fast before any model is loaded). Raises
    FinetuneDataError (a ValueError) when there are none."""
    summary = summary if summary is not None else Summary()
    col = _Collect(on_error)
    out = list(iter_examples(paths, fmt, prompt_column, response_column, history_column, col, replacements,
                             summary))
    summary.problems = col.first
    if not out:
        raise _no_examples(paths, summary)
    return out


# ------------------------------------------------------------------------------------------------------------
# Example -> (input_ids, labels)
# ------------------------------------------------------------------------------------------------------------

def _roles(fmt) -> bool:
    return fmt.family in ("chatglm3", "glm4")


_PROBE = {"role": "user", "content": "x"}


def _blocks(msgs) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive assistant messages (one generation at inference)."""
    out, i = [], 0
    while i < len(msgs):
        if msgs[i]["role"] == "assistant":
            j = i
            while j < len(msgs) and msgs[j]["role"] == "assistant":
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def _need_prompt(msgs, k: int, family: str):
    if k == 0 or msgs[k - 1]["role"] not in ("user", "tool"):
        raise ChatFormatError(f"message {k}: a trained assistant turn must follow a user message or a tool result "
                              f"(the {family} prompt for it ends with one)")


class _MemoTok:
    """The tokenizer with encode_plain memoised: the prefixes of one conversation are rendered many times."""

    def __init__(self, tok):
        self._tok, self._memo = tok, {}

    def encode_plain(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = self._memo[text] = self._tok.encode_plain(text)
        return list(ids)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def _render_roles(tok, msgs, tools, loss) -> tuple[list[int], list[int], list]:
    """ChatGLM3 / GLM-4: one sequence; every trained message's prompt is render(messages before its block)."""
    fmt = type(tok.chat_format)(_MemoTok(tok))          # chat_format's own rendering, with a memo
    asst = tok.token_id("<|assistant|>")
    special = tok.special_ids
    stops = set(fmt.stop_ids)
    blocks = [(s, e) for s, e in _blocks(msgs) if any(loss[s:e])]
    last = blocks[-1][1]
    msgs = msgs[:last]                                   # nothing after the last trained answer
    full = fmt.render(msgs + [_PROBE], tools=tools or None).ids

    def end_of(ids, start):
        for p in range(start, len(ids)):
            if ids[p] in special and ids[p] != asst:
                return p
        raise ChatFormatError("internal: the rendered answer has no end")

    spans = []                                           # (message index, start, end) end = the stop position
    for s, e in blocks:
        _need_prompt(msgs, s, tok.family)
        prompt = fmt.render(msgs[:s], tools=tools or None).ids
        if full[:len(prompt)] != prompt:
            raise ChatFormatError("internal: chat_format's rendering is not incremental for this conversation")
        start = len(prompt)
        for i in range(s, e):
            ids_i = fmt.render(msgs[:i + 1] + [_PROBE], tools=tools or None).ids
            end = end_of(ids_i, start)
            if full[:end] != ids_i[:end]:
                raise ChatFormatError("internal: chat_format's rendering is not incremental for this conversation")
            if loss[i]:
                spans.append((i, start, end))
            if i + 1 < e:
                if end >= len(full) or full[end] != asst:
                    raise ChatFormatError(f"internal: message {i + 1} does not open with <|assistant|>")
                start = end + 1
    end_last = end_of(full, spans[-1][1])                 # the end of the last trained block
    input_ids = full[:end_last] + [tok.eos_id]
    labels = [IGNORE] * len(input_ids)
    out_spans = []
    for i, a, b in spans:
        stop = b < len(input_ids) and (input_ids[b] in stops or input_ids[b] == asst)
        hi = b + 1 if stop else b
        labels[a:hi] = input_ids[a:hi]
        out_spans.append((i, a, hi))
    return input_ids, labels, out_spans


def _render_rounds(tok, msgs, loss) -> tuple[list[int], list[int], list]:
    """ChatGLM-6B / ChatGLM2-6B: the last trained answer after render(messages before it)."""
    fmt = tok.chat_format
    for j, m in enumerate(msgs):
        if m["role"] == "tool" or m.get("tool_calls"):
            raise ChatFormatError(f"{tok.family} has no tool calling (message {j}); use ChatGLM3-6B or GLM-4")
    s, e = [(s, e) for s, e in _blocks(msgs) if any(loss[s:e])][-1]
    _need_prompt(msgs, s, tok.family)
    prompt = fmt.render(msgs[:s]).ids
    answer = tok.encode("\n".join(m["content"] for m in msgs[s:e]), add_special_tokens=False)
    input_ids = prompt + answer + [tok.eos_id]
    labels = [IGNORE] * len(prompt) + answer + [tok.eos_id]
    return input_ids, labels, [(s, len(prompt), len(input_ids))]


def _render(tok, msgs, tools, loss):
    if _roles(tok.chat_format):
        return _render_roles(tok, msgs, tools, loss)
    if tools:
        raise ChatFormatError(f"{tok.family} has no tool calling; use ChatGLM3-6B or GLM-4")
    return _render_rounds(tok, msgs, loss)


def _budgets(tok, S, T):
    """(source budget, answer budget) in this module's terms (source = ids before the first label)."""
    if tok.family == "chatglm":       # official: a_ids[:S-1] + [gMASK] | <sop> + b_ids[:T-2] + <eop>
        return (None if S is None else S + 1), (None if T is None else max(T - 2, 1))
    return S, T


def _cut_source(tok, ids: list[int], budget: int) -> list[int]:
    special = tok.special_ids
    a = 0
    while a < len(ids) and ids[a] in special:
        a += 1
    b = len(ids)
    while b > a and ids[b - 1] in special:
        b -= 1
    head, text, tail = ids[:a], ids[a:b], ids[b:]
    keep = max(budget - len(head) - len(tail), 0)
    return head + text[:keep] + tail


def _rounds(msgs) -> tuple[int, list[int]]:
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    return head, [i for i in range(head, len(msgs)) if msgs[i]["role"] == "user"]


def _check_limits(max_source_length, max_target_length):
    for name, v in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise FinetuneDataError(f"{name} must be a positive number of tokens, got {v!r}")


def encode_example(tokenizer, example: Example, max_source_length: Optional[int] = None,
                   max_target_length: Optional[int] = None) -> tuple[list[int], list[int], dict]:
    """-> (input_ids, labels, stats). labels[i] is input_ids[i] on the answer ids + stop id of every trained turn,
    IGNORE (-100) elsewhere. stats: tokens, target_tokens, truncated (bool), source_cut / target_cut (ids
    removed), dropped_rounds, spans [(i, start, end)]: the labelled runs, i the example's
    message a run begins with (ChatGLM-6B/2: the answer's first message); the ids before a run that begins an
    answer are chat_format.render(the messages before it). Raises ChatFormatError
    (a ValueError) when the example cannot be rendered for this model (e.g. tools on ChatGLM2-6B)."""
    tok = tokenizer
    ends = [e for s, e in _blocks(example.messages) if any(example.loss[s:e])]
    if not ends:
        raise ChatFormatError("no assistant answer to train on")
    last = ends[-1]
    msgs = [dict(m) for m in example.messages[:last]]      # nothing after the last trained answer
    loss = list(example.loss[:last])
    tools = example.tools
    _check_limits(max_source_length, max_target_length)
    S, T = _budgets(tok, max_source_length, max_target_length)
    input_ids, labels, spans = _render(tok, msgs, tools, loss)
    dropped = 0
    head, starts = _rounds(msgs)
    cut = True                       # the source/target cut: single rounds, the columns format (official)
    if example.fmt != "columns" and len(starts) > 1 and S is not None and T is not None:
        cut = len(input_ids) > S + T + 1
        for s in starts[1:] if cut else []:
            if not any(loss[s:]):
                break
            trial = msgs[:head] + msgs[s:]
            t_loss = loss[:head] + loss[s:]
            input_ids, labels, spans = _render(tok, trial, tools, t_loss)
            spans = [(i if i < head else i + s - head, a, b) for i, a, b in spans]   # the example's indices
            dropped = sum(1 for i in starts if i < s)
            cut = len(input_ids) > S + T + 1                # a longer round than fits is cut as a single one
            if not cut:
                break
    first = next(i for i, l in enumerate(labels) if l != IGNORE)
    source, target = input_ids[:first], input_ids[first:]
    src_labels, tgt_labels = labels[:first], labels[first:]
    source_cut = target_cut = 0
    if cut and S is not None and len(source) > S:
        new = _cut_source(tok, source, S)
        source_cut = len(source) - len(new)
        source, src_labels = new, [IGNORE] * len(new)
    if cut and T is not None and len(target) > T + 1:
        stop = target[-1]
        prev_ok = tgt_labels[T - 1] != IGNORE and target[T - 1] not in tok.special_ids
        target_cut = len(target) - (T + 1)
        target = target[:T] + [stop]
        tgt_labels = tgt_labels[:T] + [stop if prev_ok else IGNORE]
    if source_cut or target_cut:
        limit = len(source) + len(target) - 1 if target_cut else None    # where the appended stop id is
        moved = []
        for i, a, b in spans:
            a, b = a - source_cut, b - source_cut
            if limit is not None:
                if a >= limit:
                    continue
                if b > limit:
                    b = limit + (1 if tgt_labels[-1] != IGNORE else 0)
            moved.append((i, a, b))
        spans = moved
    input_ids, labels = source + target, src_labels + tgt_labels
    stats = {"tokens": len(input_ids), "target_tokens": sum(1 for l in labels if l != IGNORE),
             "truncated": bool(source_cut or target_cut or dropped), "source_cut": source_cut,
             "target_cut": target_cut, "dropped_rounds": dropped, "spans": spans}
    return input_ids, labels, stats


def turn_examples(example: Example) -> list[Example]:
    """One example per trained answer (the conversation up to it, earlier answers untrained): for ChatGLM-6B /
    ChatGLM2-6B, whose prompts re-encode the history, this trains every answer with its own serving prompt."""
    blocks = [(s, e) for s, e in _blocks(example.messages) if any(example.loss[s:e])]
    out = []
    for s, e in blocks:
        loss = [False] * s + example.loss[s:e]
        out.append(Example(messages=example.messages[:e], tools=example.tools, loss=loss,
                           source=example.source, fmt=example.fmt))
    return out


def encode_examples(tokenizer, examples: Iterable[Example], max_source_length: Optional[int] = None,
                    max_target_length: Optional[int] = None, on_error: OnError = print, each_turn: bool = False,
                    summary: Optional[Summary] = None, paths=None) -> tuple[list[tuple[list[int], list[int]]],
                                                                           Summary]:
    """Examples -> [(input_ids, labels)] and the Summary; examples the model's format cannot render are
    reported as "file:line: reason" and skipped. each_turn: one sequence per trained answer on ChatGLM-6B /
    ChatGLM2-6B (ChatGLM3 / GLM-4 train every answer in one sequence anyway). Raises FinetuneDataError when
    nothing is left."""
    _check_limits(max_source_length, max_target_length)
    counted = summary is not None                      # read_examples counted the files and records
    summary = summary if summary is not None else Summary()
    summary.max_source_length, summary.max_target_length = max_source_length, max_target_length
    col = _Collect(on_error)
    out = []
    rounds = not _roles(tokenizer.chat_format)
    for ex in examples:
        if not counted:
            summary.records += 1
        for e in (turn_examples(ex) if each_turn and rounds else [ex]):
            try:
                ids, labels, st = encode_example(tokenizer, e, max_source_length, max_target_length)
            except (ChatFormatError, ValueError) as err:
                summary.skipped += 1
                col(f"{e.source}: {err}, skipped")
                break
            if st["target_tokens"] == 0:
                summary.skipped += 1
                col(f"{e.source}: no answer token left after truncation, skipped")
                continue
            out.append((ids, labels))
            summary.examples += 1
            summary.tokens += st["tokens"]
            summary.target_tokens += st["target_tokens"]
            summary.truncated += int(st["truncated"])
            summary.dropped_rounds += st["dropped_rounds"]
    summary.problems = (summary.problems + col.first)[:3]
    if not out:
        what = f" for {tokenizer.family}" if col.count else ""
        raise _no_examples(paths if paths is not None else ["the data"], summary, what)
    return out, summary


def load_dataset(paths, tokenizer, fmt: str = "auto", prompt_column: Optional[str] = None,
                 response_column: Optional[str] = None, history_column: Optional[str] = None,
                 max_source_length: Optional[int] = None, max_target_length: Optional[int] = None,
                 on_error: OnError = print, replacements: Optional[dict] = None,
                 each_turn: bool = False) -> tuple[list[tuple[list[int], list[int]]], Summary]:
    """Files -> [(input_ids, labels)], Summary (examples, skipped, tokens, target_tokens, truncated)."""
    summary = Summary()
    examples = read_examples(paths, fmt, prompt_column, response_column, history_column, on_error,
                             replacements, summary)
    return encode_examples(tokenizer, examples, max_source_length, max_target_length, on_error, each_turn,
                           summary, paths)


def format_summary(s: Summary) -> str:
    """The line a run prints before training starts."""
    files = f" from {s.files} file{'s' if s.files != 1 else ''}" if s.files else ""
    skipped = f", {s.skipped} skipped" if s.skipped else ""
    limits = []
    if s.max_source_length is not None:
        limits.append(f"--max-source-length {s.max_source_length}")
    if s.max_target_length is not None:
        limits.append(f"--max-target-length {s.max_target_length}")
    trunc = f"{s.truncated} truncated" + (f" ({', '.join(limits)}" if limits else "")
    if s.dropped_rounds:
        trunc += f"{'; ' if limits else ' ('}{s.dropped_rounds} oldest rounds dropped"
    trunc += ")" if (limits or s.dropped_rounds) else ""
    return (f"fine-tuning data: {s.examples} examples{files} ({s.records} records{skipped}), "
            f"{s.tokens} tokens, {s.target_tokens} of them trained, {trunc}")
