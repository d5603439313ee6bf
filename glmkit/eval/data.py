"""Evaluation data: a JSON file (a list of objects) or JSON Lines (one object per line), with a prompt, a
response (the reference answer) and optionally a history column, as ChatGLM-6B's ptuning/main.py reads
AdvertiseGen (--prompt_column content --response_column summary [--history_column history]).

An example that cannot be used (a line that is not JSON, not an object, or lacks a column) is reported as
`file:line: reason` and skipped; like the official preprocessing, an example whose prompt or response is empty
is skipped too. Pure Python: nothing here imports torch.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


class DataError(ValueError):
    """The data file cannot be read, or holds no usable example (.problems: why each one was skipped)."""

    def __init__(self, message: str, problems: Optional[list] = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass
class Example:
    prompt: str
    response: str
    history: list = field(default_factory=list)     # [(question, answer), ...] before the prompt
    where: str = ""                                 # "file:line"

    def messages(self) -> list[dict]:
        """The chat: each history pair as a user and an assistant turn, then the prompt as the user turn."""
        msgs = []
        for q, a in self.history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        msgs.append({"role": "user", "content": self.prompt})
        return msgs


@dataclass
class Dataset:
    path: Path
    examples: list[Example]
    problems: list[str]                             # "file:line: reason" for each example skipped


_WS = re.compile(r"\s*")


def _json_array(text: str, name: str):
    """(line, value) for each element of a top-level JSON array, without losing where each one starts."""
    dec = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(e: json.JSONDecodeError):
        raise DataError(f"{name}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None

    pos = _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        try:
            value, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            fail(e)
        yield line_at(pos), value
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos) and not text[pos + 1:].strip():
            return
        fail(json.JSONDecodeError("expected ',' or ']' after an element" if not text.startswith("]", pos)
                                  else "extra data after the list", text, pos))


def _json_lines(text: str, name: str, problems: list):
    for n, raw in enumerate(text.split("\n"), 1):
        s = raw.strip()
        if not s:
            continue
        try:
            yield n, json.loads(s)
        except json.JSONDecodeError as e:
            problems.append(f"{name}:{n}: not valid JSON: {e.msg} (column {e.colno})")


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an object" if isinstance(value, dict) else "a list" if isinstance(value, list) else "a string"


def _text(value, column: str) -> tuple[Optional[str], Optional[str]]:
    """-> (text, None) or (None, reason)."""
    if not isinstance(value, str):
        return None, f"column {column!r} is {_json_kind(value)}, not a string"
    if not value:
        return None, f"column {column!r} is empty"
    return value, None


def _history(value, column: str) -> tuple[Optional[list], Optional[str]]:
    if value is None:
        return [], None
    bad = (None, f"column {column!r} must be a list of [question, answer] pairs of strings")
    if not isinstance(value, list):
        return bad
    pairs = []
    for turn in value:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            return bad
        pairs.append((turn[0], turn[1]))
    return pairs, None


def read_dataset(path, prompt_column: str, response_column: str, history_column: Optional[str] = None,
                 limit: Optional[int] = None) -> Dataset:
    """Read the examples of a JSON / JSON Lines file (the first `limit` usable ones when given). Raises
    DataError when the file cannot be read or no example is usable; skipped ones are in .problems."""
    path = Path(path)
    name = str(path)
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, got {limit}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{name}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder; give a .json or .jsonl file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot be read: {e.strerror or e}") from None
    if not text.strip():
        raise DataError(f"{name}: the file is empty")
    problems: list[str] = []
    items = (_json_array(text, name) if text.lstrip().startswith("[") else _json_lines(text, name, problems))
    examples: list[Example] = []
    for line, obj in items:
        where = f"{name}:{line}"
        if not isinstance(obj, dict):
            problems.append(f"{where}: not a JSON object ({_json_kind(obj)})")
            continue
        missing = [c for c in (prompt_column, response_column) if c not in obj]
        if missing:
            has = ", ".join(map(repr, list(obj)[:8])) or "none"
            problems.append(f"{where}: no {' or '.join(map(repr, missing))} column (its columns: {has})")
            continue
        prompt, why = _text(obj[prompt_column], prompt_column)
        response, why2 = _text(obj[response_column], response_column) if why is None else (None, None)
        history, why3 = (_history(obj.get(history_column), history_column) if history_column and not (why or why2)
                         else ([], None))
        reason = why or why2 or why3
        if reason:
            problems.append(f"{where}: {reason}")
            continue
        examples.append(Example(prompt, response, history, where))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        detail = f"; {len(problems)} skipped, the first: {problems[0]}" if problems else ""
        raise DataError(f"{name}: no usable example (each needs a string {prompt_column!r} and "
                        f"{response_column!r}){detail}", problems)
    return Dataset(path, examples, problems)
