"""Documents from files: plain text, JSONL and the chinese-poetry JSON, streamed, with bad data reported.
Shared by training (glmkit/train/) and the knowledge base (glmkit/kb/ uses record_text).

iter_documents(paths) yields Document(text, source, line) one at a time (files are read lazily, one after the
other). A folder stands for every *.txt/*.jsonl/*.json under it (sorted; folders named "error" skipped, the
chinese-poetry repository keeps its rejected poems there). Bad data never stops the stream: an empty file, bytes
that are not UTF-8, a JSONL line that does not parse or a JSON record without text is reported to `on_error`
("file:line: what") and skipped.

  *.txt     one document per blank-line-separated block; a block is cut at a line end once it reaches
            `max_chars` (a single longer line stays whole: the token cache cuts it into units later)
  *.jsonl   one document per line: {"text": ...} (or "content"); instruction data (instruction/input/output)
            is joined into one text
  *.json    a list of records (or one record): poems {"title", "paragraphs"|"content"|"para"} become the
            title line followed by one line per paragraph; other records use "text"/"content"/"desc"/
            "description", or instruction/input/output
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

SUFFIXES = (".txt", ".jsonl", ".json")
POEM_KEYS = ("paragraphs", "content", "para")
TEXT_KEYS = ("text", "content", "desc", "description")


@dataclass(frozen=True)
class Document:
    text: str
    source: str          # file path
    line: int            # 1-based line (JSONL), record index (JSON), first line of the block (txt)


def expand_paths(paths: Iterable[Union[str, Path]], exclude: Sequence[str] = ()) -> list[Path]:
    """Files and folders -> the files to read, in order. `exclude`: glob patterns matched against each file's
    path (e.g. "*/poet.tang.57000.json" keeps a held-out file out of training)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES
                          and "error" not in f.relative_to(p).parts[:-1])
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if exclude:
        out = [f for f in out if not any(fnmatch.fnmatch(str(f), pat) for pat in exclude)]
    return out


def record_text(rec) -> Optional[str]:
    """One JSON record -> its text (None if it has none we know)."""
    if isinstance(rec, str):
        return rec or None
    if not isinstance(rec, dict):
        return None
    for k in POEM_KEYS:
        v = rec.get(k)
        if isinstance(v, list) and v and all(isinstance(s, str) for s in v):
            lines = [s.strip() for s in v if s.strip()]
            title = rec.get("title") or rec.get("rhythmic")
            if isinstance(title, str) and title.strip():
                lines = [title.strip()] + lines
            return "\n".join(lines) or None
    for k in TEXT_KEYS:
        v = rec.get(k)
        if isinstance(v, str) and v.strip():
            return v
    if isinstance(rec.get("instruction"), str):
        parts = [rec.get("instruction", ""), rec.get("input", ""), rec.get("output", "")]
        text = "\n".join(s for s in parts if isinstance(s, str) and s)
        return text or None
    return None


def _report(on_error, msg: str):
    if on_error is not None:
        on_error(msg)


def _read_text(path: Path, on_error) -> Optional[str]:
    raw = path.read_bytes()
    if not raw.strip():
        _report(on_error, f"{path}: empty file, skipped")
        return None
    try:
        return raw.decode("utf-8-sig")                 # a byte-order mark is not text
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        _report(on_error, f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); "
                          "the bad bytes are replaced")
        return raw.decode("utf-8", errors="replace")


def iter_file(path: Path, on_error: Optional[Callable[[str], None]] = None,
              max_chars: int = 20000) -> Iterator[Document]:
    path = Path(path)
    src = str(path)
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            seen = False
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                seen = True
                try:
                    rec = json.loads(raw.decode("utf-8-sig" if i == 1 else "utf-8"))
                except UnicodeDecodeError:
                    _report(on_error, f"{src}:{i}: not UTF-8, line skipped")
                    continue
                except json.JSONDecodeError as e:
                    _report(on_error, f"{src}:{i}: not JSON ({e.msg}), line skipped")
                    continue
                text = record_text(rec)
                if text is None:
                    _report(on_error, f"{src}:{i}: no text field, line skipped")
                    continue
                yield Document(text, src, i)
        if not seen:
            _report(on_error, f"{src}: empty file, skipped")
        return
    text = _read_text(path, on_error)
    if text is None:
        return
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            _report(on_error, f"{src}:{e.lineno}: not JSON ({e.msg}), file skipped")
            return
        records = data if isinstance(data, list) else [data]
        for i, rec in enumerate(records):
            t = record_text(rec)
            if t is None:
                _report(on_error, f"{src}: record {i}: no text, skipped")
                continue
            yield Document(t, src, i)
        return
    # plain text: blocks separated by blank lines, long blocks cut at line ends
    block, size, start = [], 0, 1
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not block:
                start = line_no
            block.append(line)
            size += len(line) + 1
            if size >= max_chars:
                yield Document("\n".join(block), src, start)
                block, size = [], 0
        elif block:
            yield Document("\n".join(block), src, start)
            block, size = [], 0
    if block:
        yield Document("\n".join(block), src, start)


def iter_documents(paths: Iterable[Union[str, Path]], on_error: Optional[Callable[[str], None]] = None,
                   ) -> Iterator[Document]:
    for p in expand_paths(paths):
        yield from iter_file(p, on_error)
