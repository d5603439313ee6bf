"""Normalise text and split documents into chunks, Chinese-aware.

normalize(text, code) — prose: NFKC (full-width letters and digits -> ASCII, ligatures, compatibility spaces)
except the full-width punctuation Chinese is written with (，。！？；：（）…) which stays as it is; zero-width
characters and soft hyphens dropped; runs of spaces collapsed, lines stripped. Code (fenced Markdown, HTML
<pre>, DOCX code styles): only line ends and trailing spaces touched, never NFKC (it would rewrite x², ½, ﬁ,
µ inside string literals).

split_blocks(blocks, chunk_size, chunk_overlap) — the reader's blocks (paragraphs with heading path and
location) are cut into pieces at line ends and sentence ends (。！？； anywhere; .!? before a space or the line
end, so 3.14 and kb.sqlite stay whole); a piece longer than chunk_size is cut at a space or comma near the limit.
Pieces are packed into chunks of at most chunk_size characters; a heading change always starts a new chunk, so
every chunk has one heading path. When a chunk is full the next one starts with its last whole pieces that fit
in chunk_overlap characters (none if its last sentence is longer). Each chunk's location is the range of its
pieces (pages for PDF, lines for text/Markdown/HTML/JSONL, paragraphs for DOCX, records for JSON); a JSON or
JSONL record is never packed with another.

The defaults are module constants, chosen by benchmarks/kb_eval.py's grid on the question set (README.md).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

CHUNK_SIZE = 400                # characters (langchain-ChatGLM: 250; Chatchat: 250, overlap 50); chosen by
CHUNK_OVERLAP = 100             # benchmarks/kb_eval.py: the best hit@5 / MRR of sizes up to 600 (README)
SPLIT_VERSION = "1"             # part of each file's signature: a new splitter re-chunks files on the next add

# Full-width punctuation that NFKC would turn into ASCII: Chinese text keeps it (FF01-FF0F ！＂＃…／,
# FF1A-FF20 ：；＜＝＞？＠, FF3B-FF40 ［＼］＾＿｀, FF5B-FF60 ｛｜｝～), and the ellipsis … ‥.
_PROTECT = re.compile("([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff60\u2025\u2026]+)")
_INVISIBLE = re.compile("[\u200b-\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"[ \t\f\v]+")
# a sentence ends after 。！？； (with closing quotes/brackets), or after .!? followed by a space or the line end
_SENTENCE_END = re.compile(r"[。！？；]+[”’\"'」』）)】]*|[.!?]+[\"'”’)\]]*(?=\s|$)")
_SOFT_CUT = re.compile(r"[\s，、,；;：:]")
_SENTENCE_OR_LINE = re.compile(_SENTENCE_END.pattern + "|\n")      # the same ends, and line ends, in a block


@dataclass
class Chunk:
    text: str
    heading: tuple
    unit: str                   # page, line, paragraph, record
    start: int
    end: int


@dataclass(slots=True)
class _Piece:
    text: str
    sep: str                    # what joins it to the piece before: "" (same line), " ", "\n", "\n\n" (paragraph)
    unit: str
    start: int
    end: int


def _nfkc(text: str) -> str:
    if text.isascii() or unicodedata.is_normalized("NFKC", text):
        return text
    if unicodedata.is_normalized("NFKC", _PROTECT.sub("", text)):   # Chinese text in NFKC but for its punctuation
        return text                                                  # (each part between is a substring of it)
    parts = _PROTECT.split(text)                   # odd indices: protected punctuation
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))


def normalize(text: str, code: bool = False) -> str:
    """One block's text, normalised; keeps its line count (locations are counted in lines)."""
    text = _INVISIBLE.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if code:
        return "\n".join(line.rstrip() for line in text.split("\n"))
    text = _SPACES.sub(" ", _nfkc(text))
    if "\n" not in text:
        return text.strip()
    return "\n".join([line.strip() for line in text.split("\n")])


def sentences(line: str) -> list:
    """One line -> [(sentence, whitespace followed it)] at 。！？； and .!? boundaries."""
    n = len(line)
    ends = [m.end() for m in _SENTENCE_END.finditer(line)]
    if not ends or ends[-1] < n:
        ends.append(n)
    out, prev = [], 0
    for end in ends:                    # a piece is followed by whitespace if it ends with some or the next starts so
        s = line[prev:end].strip()
        if s:
            out.append((s, line[end - 1].isspace() or (end < n and line[end].isspace())))
        prev = end
    return out


def _hard_cut(text: str, size: int) -> list:
    """A sentence longer than a chunk -> parts of at most `size` characters, cut at a space or comma in the last
    half of each part where there is one."""
    parts = []
    while len(text) > size:
        cut = size
        for m in _SOFT_CUT.finditer(text, size // 2, size):
            cut = m.end()
        parts.append(text[:cut].strip())
        text = text[cut:].strip()
    return parts + ([text] if text else [])


_CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def _glue(a: str, b: str) -> str:
    """The separator of two parts of a sentence cut apart: none next to CJK text, else a space."""
    return "" if _CJK.match(a[-1:]) or _CJK.match(b[:1]) else " "


def _pieces(block, size: int) -> list:
    """A block -> its pieces (sentences, or lines of code), each with its own line range."""
    text = normalize(block.text, block.code)
    unit = block.unit
    by_line = unit == "line"
    out = []
    if block.code:                                  # code: one piece per line (blank lines inside kept)
        for i, line in enumerate(text.split("\n")):
            start = block.start + i if by_line else block.start
            end = start if by_line else block.end
            sep = "\n\n" if i == 0 else "\n"
            if line.strip() or out:
                for p in _hard_cut(line, size) if len(line) > size else [line]:
                    out.append(_Piece(p, sep, unit, start, end))
                    sep = ""
        return out
    # prose: sentences() of each line, in one pass over the block
    n, first, last = len(text), block.start, block.end
    line, prev, sep = 0, 0, "\n\n"
    for m in _SENTENCE_OR_LINE.finditer(text):
        cut = m.end()
        newline = text[cut - 1] == "\n"
        sent = text[prev:cut - 1 if newline else cut].strip()
        if sent:
            start = first + line if by_line else first
            end = start if by_line else last
            if len(sent) <= size:
                out.append(_Piece(sent, sep, unit, start, end))
            else:
                parts = _hard_cut(sent, size)
                for j, p in enumerate(parts):
                    out.append(_Piece(p, sep if j == 0 else _glue(parts[j - 1], p), unit, start, end))
            # whitespace after a sentence (at its end, or starting the next one in the line): joined by a space
            sep = " " if not newline and (text[cut - 1].isspace() or (cut < n and text[cut] != "\n"
                                                                       and text[cut].isspace())) else ""
        if newline:
            line, sep = line + 1, "\n"
        prev = cut
    sent = text[prev:].strip()
    if sent:
        start = first + line if by_line else first
        end = start if by_line else last
        parts = [sent] if len(sent) <= size else _hard_cut(sent, size)
        for j, p in enumerate(parts):
            out.append(_Piece(p, sep if j == 0 else _glue(parts[j - 1], p), unit, start, end))
    return out


def _text(pieces) -> str:
    return "".join((p.sep if i else "") + p.text for i, p in enumerate(pieces))


def _chunk(pieces, heading) -> Chunk:
    return Chunk(_text(pieces), heading, pieces[0].unit, min(p.start for p in pieces), max(p.end for p in pieces))


def _overlap(pieces, overlap: int) -> list:
    """The last whole pieces of a full chunk that fit in `overlap` characters."""
    tail, size = [], 0
    for p in reversed(pieces):
        size += len(p.text) + len(p.sep)
        if size > overlap:
            break
        tail.insert(0, p)
    return tail


def split_blocks(blocks, chunk_size: int = CHUNK_SIZE, chunk_overlap: int = CHUNK_OVERLAP) -> list:
    """Blocks of one document -> Chunks (see the module docstring)."""
    if chunk_size < 20:
        raise ValueError(f"chunk size must be at least 20 characters, got {chunk_size}")
    if not 0 <= chunk_overlap <= chunk_size // 2:
        raise ValueError(f"chunk overlap must be between 0 and half the chunk size, got {chunk_overlap}")
    chunks, cur, size, heading, section = [], [], 0, None, None     # size: len(_text(cur))
    for block in blocks:
        if cur and (block.heading != heading or getattr(block, "section", 0) != section):
            chunks.append(_chunk(cur, heading))
            cur, size = [], 0
        heading, section = block.heading, getattr(block, "section", 0)
        for piece in _pieces(block, chunk_size):
            if cur and size + len(piece.sep) + len(piece.text) > chunk_size:
                chunks.append(_chunk(cur, heading))
                cur = _overlap(cur, chunk_overlap)
                size = len(_text(cur))
                while cur and size + len(piece.sep) + len(piece.text) > chunk_size:
                    cur.pop(0)
                    size = len(_text(cur))
            cur.append(piece)
            size += (len(piece.sep) if len(cur) > 1 else 0) + len(piece.text)
    if cur:
        chunks.append(_chunk(cur, heading))
    return chunks
