"""Files -> blocks of text with their heading path and location, for the knowledge base.

read_file(path, data) -> Document(blocks, warnings) or raises ReadError(reason); collect(paths) expands folders
(recursively, hidden files and the KB's own folder left out) and reports what cannot be read as (path, reason).

  .txt            paragraphs (blank-line separated), located by line
  .md/.markdown   paragraphs, ATX (#) and Setext headings -> heading path, fenced code kept verbatim; by line
  .html/.htm      html.parser: script/style/head/nav dropped, block elements -> paragraphs, h1-h6 -> heading path,
                  <pre> verbatim; by line of the HTML source
  .pdf            pypdf, one page at a time: running headers/footers (a line repeated on most pages) dropped,
                  lines re-flowed into paragraphs (no space between CJK characters); located by page
  .docx           python-docx: body paragraphs and table rows in order, Title/Heading N (or 标题 N) styles ->
                  heading path, code styles verbatim; located by paragraph number
  .jsonl/.json    a text field per record, by glmkit.documents.record_text (the rules train/ reads data with:
                  "text", "content", poems, instruction data...); located by line (JSONL) or record number (JSON)

Text files are UTF-8 (a BOM is dropped), else GB18030 (common for Chinese files) with a warning. pypdf and
python-docx are imported only for their formats.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Optional


class ReadError(Exception):
    """A file that cannot be read; str(e) is the reason shown to the user."""


@dataclass
class Block:
    """One paragraph (or code block, table row, PDF paragraph) of a document."""
    text: str
    heading: tuple = ()            # heading path, outermost first
    unit: str = "line"             # what start/end count: line, page, paragraph, record
    start: int = 1
    end: int = 1
    code: bool = False             # preformatted: the normaliser keeps it verbatim
    section: int = 0               # a chunk never spans two sections (JSON records: one each)


@dataclass
class Document:
    blocks: list
    warnings: list = field(default_factory=list)


class Headings:
    """The heading path while reading: set(level, text) drops the deeper levels."""

    def __init__(self):
        self.stack: list = []      # [(level, text)]

    def set(self, level: int, text: str):
        text = " ".join(text.split()).rstrip("¶#").strip()
        if not text:
            return
        self.stack = [(lv, t) for lv, t in self.stack if lv < level] + [(level, text)]

    @property
    def path(self) -> tuple:
        out: list = []
        for _, t in self.stack:
            if not out or out[-1] != t:           # a Title repeated as Heading 1 is one entry
                out.append(t)
        return tuple(out)


# ------------------------------------------------------------------------------------------------------------
# plain text, Markdown
# ------------------------------------------------------------------------------------------------------------

def decode_text(data: bytes, warnings: list) -> str:
    """UTF-8 (BOM dropped), else GB18030; binary data (NUL bytes, control characters) -> ReadError."""
    if not data.strip():
        raise ReadError("empty file")
    if b"\x00" in data[:65536]:
        raise ReadError("binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        try:
            text = data.decode("gb18030")
            warnings.append(f"not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}): read as GB18030")
        except UnicodeDecodeError:
            raise ReadError(f"not text: neither UTF-8 nor GB18030 (byte {data[e.start]:#04x} at offset "
                            f"{e.start})") from None
    sample = text[:65536]
    controls = sum(1 for c in sample if c < " " and c not in "\t\n\r\f")
    if controls > len(sample) * 0.01:
        raise ReadError("binary file (control characters), not text")
    return text


def _paragraphs(lines: list, first_line: int, heading: tuple, code=False) -> list:
    """Consecutive non-blank lines -> a Block each (line numbers from first_line)."""
    out, para, start = [], [], 0
    for i, line in enumerate(lines + [""]):
        if line.strip():
            if not para:
                start = first_line + i
            para.append(line)
        elif para:
            out.append(Block("\n".join(para), heading, "line", start, start + len(para) - 1, code))
            para = []
    return out


def read_txt(data: bytes, warnings: list) -> list:
    return _paragraphs(decode_text(data, warnings).splitlines(), 1, ())


ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
FENCE = re.compile(r"^ {0,3}(```+|~~~+)")
SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")


def read_markdown(data: bytes, warnings: list) -> list:
    lines = decode_text(data, warnings).splitlines()
    heads, blocks, para, start = Headings(), [], [], 1
    fence, code, comment = None, [], False

    def flush():
        nonlocal para
        if para:
            blocks.append(Block("\n".join(para), heads.path, "line", start, start + len(para) - 1))
            para = []

    for n, line in enumerate(lines, 1):
        if fence:                                       # inside a fenced code block
            if line.strip().startswith(fence):
                if any(s.strip() for s in code):
                    blocks.append(Block("\n".join(code), heads.path, "line", n - len(code), n - 1, code=True))
                fence, code = None, []
            else:
                code.append(line)
            continue
        if comment or line.lstrip().startswith("<!--"):     # HTML comments (metadata, notes): not text
            flush()
            comment = "-->" not in line
            continue
        m = FENCE.match(line)
        if m:
            flush()
            fence, code = m.group(1)[:3], []
            continue
        m = ATX.match(line)
        if m:
            flush()
            heads.set(len(m.group(1)), m.group(2))
            continue
        m = SETEXT.match(line)
        if m and len(para) == 1:                        # "Title\n=====": the paragraph line was a heading
            heads.set(1 if m.group(1)[0] == "=" else 2, para[0])
            para = []
            continue
        if not line.strip():
            flush()
            continue
        if not para:
            start = n
        para.append(line)
    flush()
    if fence and any(s.strip() for s in code):          # unclosed fence: keep what it holds
        blocks.append(Block("\n".join(code), heads.path, "line", len(lines) - len(code) + 1, len(lines), True))
    return blocks


# ------------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------------

SKIP_TAGS = {"script", "style", "noscript", "template", "head", "svg", "nav", "iframe", "object"}
BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "table", "thead", "tbody", "tr", "pre",
              "blockquote", "section", "article", "aside", "header", "footer", "main", "figure", "figcaption",
              "form", "fieldset", "address", "details", "summary", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr",
              "body", "caption"}
CELL_TAGS = {"td", "th"}
HEADING_TAGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list = []
        self.heads = Headings()
        self.skip = 0              # depth inside dropped elements
        self.pre = 0
        self.heading_level = 0     # inside <hN>
        self.buf: list = []
        self.has_text = False      # buf holds more than whitespace
        self.start_line = 1

    def _flush(self):
        if self.heading_level:                 # a block tag inside <hN>: the heading goes on
            return
        raw = "".join(self.buf)
        self.buf, self.has_text = [], False
        text = raw.strip("\n").rstrip() if self.pre else " ".join(raw.split())
        if text.strip():
            end = max(self.getpos()[0], self.start_line)
            self.blocks.append(Block(text, self.heads.path, "line", self.start_line, end, code=bool(self.pre)))

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.skip = 0                      # a <head> left open ends here
        if self.skip or tag in SKIP_TAGS:
            if tag in SKIP_TAGS and tag not in VOID_TAGS:
                self.skip += 1
            return
        if tag in BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self.pre += 1
            elif tag in HEADING_TAGS:
                self.heading_level = int(tag[1])
        elif tag in CELL_TAGS and self.has_text:
            self.buf.append(" | ")

    def handle_endtag(self, tag):
        if tag in SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag in HEADING_TAGS and self.heading_level:
            self.heads.set(self.heading_level, "".join(self.buf))
            self.heading_level, self.buf, self.has_text = 0, [], False
        elif tag in BLOCK_TAGS:
            self._flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skip:
            return
        if not self.has_text and data.strip():
            lead = data[:len(data) - len(data.lstrip())]
            self.start_line = self.getpos()[0] + lead.count("\n")
            self.has_text = True
        self.buf.append(data)


def read_html(data: bytes, warnings: list) -> list:
    p = _HTMLText()
    p.feed(decode_text(data, warnings))
    p.close()
    p._flush()
    return p.blocks


def _optional(module: str, package: str):
    """An optional reader package, or a ReadError saying how to install it (the file is skipped)."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReadError(f"reading this format needs {package}: pip install {package}") from None


# ------------------------------------------------------------------------------------------------------------
# PDF
# ------------------------------------------------------------------------------------------------------------

_CJK_END = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]$")
_CJK_START = re.compile(r"^[\u2e80-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")
_BULLET = re.compile(r"^(?:[•●▪◦·\-–—*]\s|\d+(?:\.\d+)*[.)、]\s|[（(]\d+[)）])")
_SENT_END = re.compile(r"[。！？；.!?:：]['\"”’)）]*$")


def _join(a: str, b: str) -> str:
    """Two re-flowed lines: no space between CJK text (a line break in a Chinese PDF is not a word break)."""
    if _CJK_END.search(a) or _CJK_START.search(b):
        return a + b
    return a + " " + b


def _reflow(lines: list) -> list:
    """A page's lines -> paragraphs: a line ends its paragraph when it ends a sentence well short of the page's
    full line width, or the next line starts a list item."""
    width = max((len(s) for s in lines), default=0)
    paras, cur = [], ""
    for i, line in enumerate(lines):
        if not line:
            if cur:
                paras.append(cur)
            cur = ""
            continue
        if cur and _BULLET.match(line):
            paras.append(cur)
            cur = ""
        cur = _join(cur, line) if cur else line
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if _SENT_END.search(line) and len(line) < 0.8 * width and not (nxt and nxt[:1].islower()):
            paras.append(cur)
            cur = ""
    if cur:
        paras.append(cur)
    return paras


def _running_lines(pages: list) -> set:
    """Header/footer lines: the first or last two lines of a page that recur (digits ignored) on at least half
    of the pages (of a file with 3 pages or more)."""
    if len(pages) < 3:
        return set()
    counts: dict = {}
    for lines in pages:
        for key in {re.sub(r"\d+", "#", s) for s in lines[:2] + lines[-2:]}:
            counts[key] = counts.get(key, 0) + 1
    return {k for k, n in counts.items() if n >= max(3, len(pages) // 2)}


def read_pdf(data: bytes, warnings: list) -> list:
    import logging

    pypdf = _optional("pypdf", "pypdf")
    from pypdf.errors import PdfReadError

    logging.getLogger("pypdf").setLevel(logging.ERROR)          # damaged-file chatter: the reason is reported
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")                          # owner-password-only PDFs open with ""
            except Exception as e:                               # noqa: BLE001 (unsupported algorithm...)
                raise ReadError(f"encrypted PDF ({e})") from None
            if not ok:
                raise ReadError("encrypted PDF: a password is needed to read it")
        pages = []
        for page in reader.pages:
            text = page.extract_text() or ""
            pages.append([" ".join(s.split()) for s in text.splitlines()])
    except ReadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as e:
        raise ReadError(f"broken PDF ({type(e).__name__}: {e})") from None
    running = _running_lines(pages)
    blocks = []
    for no, lines in enumerate(pages, 1):
        lines = [s for s in lines if re.sub(r"\d+", "#", s) not in running]
        for para in _reflow(lines):
            blocks.append(Block(para, (), "page", no, no))
    if not blocks:
        raise ReadError(f"no text in its {len(pages)} pages (a scanned PDF? OCR is not supported)")
    return blocks


# ------------------------------------------------------------------------------------------------------------
# DOCX
# ------------------------------------------------------------------------------------------------------------

_HEADING_STYLE = re.compile(r"^(?:heading|标题)\s*(\d)$", re.I)
_CODE_STYLE = re.compile(r"code|preformatted|source|源代码", re.I)


def _docx_items(doc):
    """Body paragraphs and table rows in document order -> (style name, text)."""
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for child in doc.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            p = Paragraph(child, doc)
            yield (p.style.name if p.style is not None else ""), p.text
        elif tag == "tbl":
            for row in Table(child, doc).rows:
                cells = []
                for c in row.cells:
                    t = " ".join(c.text.split())
                    if t and (not cells or cells[-1] != t):    # merged cells repeat their text
                        cells.append(t)
                yield "", " | ".join(cells)


def read_docx(data: bytes, warnings: list) -> list:
    import zipfile

    docx = _optional("docx", "python-docx")

    try:
        doc = docx.Document(io.BytesIO(data))
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise ReadError(f"broken DOCX ({type(e).__name__}: {e})") from None
    except Exception as e:                                          # noqa: BLE001 (lxml and docx errors)
        raise ReadError(f"broken DOCX ({type(e).__name__}: {e})") from None
    heads, blocks = Headings(), []
    for n, (style, text) in enumerate(_docx_items(doc), 1):
        if not text.strip():
            continue
        m = _HEADING_STYLE.match(style)
        if style == "Title" or m:
            heads.set(int(m.group(1)) if m else 0, text)
            continue
        blocks.append(Block(text, heads.path, "paragraph", n, n, code=bool(_CODE_STYLE.search(style))))
    return blocks


# ------------------------------------------------------------------------------------------------------------
# JSON / JSONL (glmkit.documents.record_text: the record -> text rules train/ uses)
# ------------------------------------------------------------------------------------------------------------

def read_records(text: str, jsonl: bool, warnings: list) -> list:
    """JSONL: a block per line with a text field; JSON: a list of records (or one) -> a block per record."""
    import json

    from ..documents import record_text

    blocks = []
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                t = record_text(json.loads(line))
            except json.JSONDecodeError as e:
                warnings.append(f"line {n}: not JSON ({e.msg}), skipped")
                continue
            if t is None:
                warnings.append(f"line {n}: no text field, skipped")
            else:
                blocks.append(Block(t, (), "line", n, n, section=n))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReadError(f"not JSON (line {e.lineno}: {e.msg})") from None
        for i, rec in enumerate(data if isinstance(data, list) else [data], 1):
            t = record_text(rec)
            if t is None:
                warnings.append(f"record {i}: no text field, skipped")
            else:
                blocks.append(Block(t, (), "record", i, i, section=i))
    if not blocks:
        raise ReadError("no records with a text field (text, content, ...)" +
                        (f": {warnings[0]}" if warnings else ""))
    return blocks


READERS = {".txt": read_txt, ".text": read_txt, ".md": read_markdown, ".markdown": read_markdown,
           ".html": read_html, ".htm": read_html, ".xhtml": read_html, ".pdf": read_pdf, ".docx": read_docx}
RECORD_SUFFIXES = (".jsonl", ".json")
SUFFIXES = tuple(READERS) + RECORD_SUFFIXES


def read_file(path, data: Optional[bytes] = None) -> Document:
    """One file -> Document(blocks, warnings); raises ReadError(reason) when it cannot be read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ReadError(f"unsupported file type {suffix or '(no extension)'} (supported: "
                        f"{' '.join(sorted(set(SUFFIXES)))})")
    if data is None:
        data = path.read_bytes()
    if not data.strip():
        raise ReadError("empty file")
    warnings: list = []
    if suffix in RECORD_SUFFIXES:
        blocks = read_records(decode_text(data, warnings), suffix == ".jsonl", warnings)
    else:
        blocks = READERS[suffix](data, warnings)
    blocks = [b for b in blocks if b.text.strip()]
    if not blocks:
        raise ReadError("no text found")
    return Document(blocks, warnings)


def collect(paths: Iterable, exclude: Iterable = ()) -> tuple:
    """Files and folders -> ([(source as given, Path)], [(path, reason)] not found). A folder stands for every
    file under it (sorted; hidden files and folders and anything under `exclude` folders left out); the source
    of a file found in folder F is F joined with its relative path."""
    excluded = [Path(e).resolve() for e in exclude]
    files, missing = [], []
    for given in paths:
        given = str(given)
        p = Path(given).expanduser()
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and not any(Path(root, d).resolve() == e for e in excluded))
                for name in sorted(names):
                    if not name.startswith("."):
                        f = Path(root, name)
                        files.append((os.path.join(given, os.path.relpath(f, p)), f))
        elif p.is_file():
            files.append((given, p))
        else:
            missing.append((given, "no such file or folder"))
    return files, missing
