"""Knowledge bases in the server (`glmkit serve --kb KB ...`): chat answered from a KB, its files and search.

Each served KB (name = its directory's name) is opened twice: a reader (searches, listings) and a writer
(uploads, removals), each a KnowledgeBase with its own SQLite connection and its own lock, used from worker
threads (asyncio.to_thread) one call at a time. WAL lets the reader search while the writer ingests, so an upload
never holds up questions, and neither ever runs on the event loop or the engine's thread (the model is touched by
the engine only; ingestion only competes with it for the CPU). After each change the writer builds the new index
and caches it in KB/index/, where the reader's next search finds it.

Chat: POST /v1/chat/completions with "knowledge_base": NAME retrieves with the last user message (and, for a
follow-up, the previous one: glmkit.kb.answer.retrieve), builds langchain-ChatGLM's prompt with the numbered
chunks that fit (answer.prepare: the same code as `glmkit kb ask`) and lets the engine answer it; the response's
"sources" field (streaming: the chunk with finish_reason) holds the chunks given to the model, numbered as in the
prompt. When no chunk passes the threshold the answer is the fixed refusal and no model runs. In such a request
`top_k` is the number of chunks retrieved (as in `kb ask --top-k` and Chatchat); the sampling top-k is then
`sample_top_k`.

Uploads (multipart/form-data, a `file` field per file) are stored in KB/files/NAME and ingested; a name that is
not a plain file name (a path, `..`, a drive, a hidden or control character) is refused with 400 before anything
is written, a file over --kb-max-upload-mb with 413.
"""
from __future__ import annotations

import asyncio
import base64
import os
import re
import threading
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from . import schemas
from .schemas import APIError

UPLOAD_DIR = "files"                       # uploads are stored in KB/files/
MULTIPART_OVERHEAD = 64 << 10              # bytes allowed for boundaries and part headers beyond the files
UPLOAD_PATH = re.compile(r"^/v1/knowledge_bases/[^/]+/files/?$")
MAX_NAME_BYTES = 255
_FORBIDDEN = set('/\\:*?"<>|')            # separators, drives and what Windows cannot store


# ------------------------------------------------------------------------------------------------------------
# The served knowledge bases
# ------------------------------------------------------------------------------------------------------------

class ServedKB:
    """One knowledge base: a reader and a writer KnowledgeBase, each used by one thread at a time."""

    def __init__(self, path, embedder=None):
        from ..kb import KnowledgeBase

        self.path = Path(path).expanduser().resolve()
        self.name = self.path.name
        self.reader = KnowledgeBase.open(self.path, embedder=embedder)
        self.mode, self.mode_note = self.reader.mode, self.reader.mode_note        # loads its embedding model
        self.embedder = self.reader.retriever.embedder
        model = self.embedder.name if self.embedder is not None else self.reader.settings["embedding_model"]
        self.embedding_model = Path(model).name if model else None
        self.writer = KnowledgeBase.open(self.path, embedder=self.embedder)    # the same model object
        self.files_dir = self.path / UPLOAD_DIR
        self._rlock, self._wlock = threading.Lock(), threading.Lock()
        self.reader.build_index()                                               # cached, or built once now

    async def read(self, fn: Callable):
        """fn(reader KB) in a worker thread, after any other read of this KB."""
        return await asyncio.to_thread(_locked, self._rlock, self.reader, fn)

    async def write(self, fn: Callable):
        """fn(writer KB) in a worker thread, after any other write of this KB."""
        return await asyncio.to_thread(_locked, self._wlock, self.writer, fn)

    def info(self, files: list) -> dict:
        return {"object": "knowledge_base", "name": self.name, "files": len(files),
                "chunks": sum(f.chunks for f in files), "mode": self.mode, "mode_note": self.mode_note,
                "embedding_model": self.embedding_model}

    def file_json(self, rec) -> dict:
        p = Path(rec.path)
        uploaded = p.parent == self.files_dir
        return {"object": "knowledge_base.file", "name": p.name if uploaded else rec.source, "source": rec.source,
                "uploaded": uploaded, "size": rec.size, "chars": rec.chars, "chunks": rec.chunks,
                "added": int(rec.added)}

    def close(self):
        with self._rlock, self._wlock:
            self.reader.close()
            self.writer.close()


def _locked(lock: threading.Lock, kb, fn: Callable):
    from ..kb import KBError

    with lock:
        try:
            return fn(kb)
        except KBError as e:
            raise APIError(400, str(e), code="invalid_value") from None


class KBRegistry:
    """The knowledge bases a server serves, by name."""

    def __init__(self, paths=(), embedder=None, max_upload_bytes: int = 50 << 20):
        self.max_upload_bytes = max_upload_bytes
        self.kbs: dict = {}
        for p in paths:
            kb = ServedKB(p, embedder)
            if kb.name in self.kbs:
                raise ValueError(f"--kb {p}: a knowledge base named {kb.name!r} is served already "
                                 f"({self.kbs[kb.name].path}); names are the directories' names")
            self.kbs[kb.name] = kb
        if self.kbs:
            from ..kb import retrieve
            retrieve.tokenize("知识库")                   # jieba's dictionary, loaded now rather than on a request

    def get(self, name) -> ServedKB:
        if not isinstance(name, str) or name not in self.kbs:
            served = ", ".join(map(repr, self.kbs)) or "none (start the server with --kb DIR)"
            raise APIError(404, f"the knowledge base {name!r} does not exist; this server serves {served}",
                           param="knowledge_base", code="knowledge_base_not_found")
        return self.kbs[name]

    def embedder(self, model: str):
        """The embedder for /v1/embeddings' `model`: a KB's name or its embedding model's folder name."""
        found = {}
        for kb in self.kbs.values():
            if kb.embedder is not None:
                found.setdefault(kb.name, kb.embedder)
                found.setdefault(Path(kb.embedder.name).name, kb.embedder)
        if not found:
            raise APIError(404, "no embedding model is configured: the knowledge bases served here are BM25-only "
                                "(give a KB one with `glmkit kb add KB --embedding-model DIR`)", param="model",
                           code="model_not_found")
        if model not in found:
            raise APIError(404, f"no embedding model {model!r}; this server embeds with "
                                f"{', '.join(map(repr, found))} (a knowledge base's name or its model's)",
                           param="model", code="model_not_found")
        return found[model]

    def close(self):
        for kb in self.kbs.values():
            kb.close()


# ------------------------------------------------------------------------------------------------------------
# Chat from a knowledge base
# ------------------------------------------------------------------------------------------------------------

@dataclass
class KBChat:
    """A chat request's knowledge-base part: the messages for the model (None: refuse), the answer's hits."""
    answer: Any                            # glmkit.kb.answer.Answer (its text is the refusal when not found)
    messages: Optional[list]

    def sources(self) -> list:
        return [{"index": i, **h.to_json(), "page": h.page} for i, h in enumerate(self.answer.hits, 1)]


def wants_kb(r) -> bool:
    return (r.model_extra or {}).get("knowledge_base") is not None          # null: a plain chat


def _number(extra: dict, key: str, lo: float, hi: float, integer: bool = False):
    v = extra.get(key)
    if v is None:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"invalid value for '{key}': {kind} from {lo} to {hi} is needed, got {v!r}",
                       param=key, code="invalid_value")
    return v


def _question(messages: list) -> tuple:
    """-> (the last user message's text, the messages before it)."""
    last = messages[-1] if messages else None
    if last is None or last.role != "user":
        raise APIError(400, "a knowledge-base chat must end with a user message (the question)", param="messages",
                       code="invalid_value")
    content = last.content
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    if not isinstance(content, str) or not content.strip():
        raise APIError(400, "the question (the last user message) is empty", param="messages", code="invalid_value")
    history = [{"role": m.role, "content": m.content if isinstance(m.content, str) else ""} for m in messages[:-1]]
    return content, history


@dataclass
class KBQuery:
    """A chat request's knowledge-base part, validated: where and what to retrieve."""
    kb: ServedKB
    question: str
    history: list
    top_k: Optional[int]
    threshold: Optional[float]

    async def prepare(self, pipe, max_tokens: Optional[int]) -> KBChat:
        """Retrieve (in the KB's reader thread) and build the prompt that fits -> KBChat."""
        from ..kb import answer

        ans, messages = await self.kb.read(lambda k: answer.prepare(k, self.question, pipe, self.history, self.top_k,
                                                                    self.threshold, max_tokens=max_tokens))
        return KBChat(ans, messages)


def kb_query(kbs: KBRegistry, r) -> tuple:
    """A chat request naming a knowledge base -> (the request with `top_k` replaced by sample_top_k, KBQuery)."""
    extra = r.model_extra or {}
    kb = kbs.get(extra.get("knowledge_base"))
    if r.top_k is not None and not 1 <= r.top_k <= 100:
        raise APIError(400, f"top_k (chunks retrieved) must be from 1 to 100, got {r.top_k}", param="top_k",
                       code="invalid_value")
    threshold = _number(extra, "score_threshold", 0, 1)
    sample_top_k = _number(extra, "sample_top_k", 0, 1 << 20, integer=True)
    question, history = _question(r.messages)
    return r.model_copy(update={"top_k": sample_top_k}), KBQuery(kb, question, history, r.top_k, threshold)


def refusal(r, kbc: KBChat, include_usage: bool, sse: Callable):
    """The fixed refusal, answered without the model: a chat.completion, or its SSE stream."""
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    text = kbc.answer.text
    if not r.stream:
        return {"id": cid, "object": "chat.completion", "created": created, "model": r.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"}], "usage": usage, "sources": []}

    def chunk(delta, finish=None) -> dict:
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": r.model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**c, "usage": None} if include_usage else c

    async def body():
        yield sse(chunk({"role": "assistant", "content": ""}))
        yield sse(chunk({"content": text}))
        yield sse({**chunk({}, "stop"), "sources": []})
        if include_usage:
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": r.model,
                       "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------------------------
# Uploads: multipart bodies and file names
# ------------------------------------------------------------------------------------------------------------

@dataclass
class Part:
    field: str
    filename: Optional[str]
    data: bytes


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.I)
_PARAM = re.compile(r';\s*([\w*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _bad_form(why: str) -> APIError:
    return APIError(400, f"the upload is not valid multipart/form-data: {why}", code="invalid_upload")


def parse_multipart(body: bytes, content_type: str) -> list:
    """A multipart/form-data body -> [Part] (RFC 7578; the whole body is in memory, bounded by the edge)."""
    m = _BOUNDARY.search(content_type or "")
    if not (content_type or "").lower().startswith("multipart/form-data") or not m:
        raise APIError(400, "upload files as multipart/form-data, one 'file' field per file", code="invalid_upload")
    delim = b"\r\n--" + (m.group(1) or m.group(2)).encode("latin-1")
    pieces = (b"\r\n" + body).split(delim)
    if len(pieces) < 2 or not pieces[-1].startswith(b"--"):
        raise _bad_form("no closing boundary")
    return [_part(p) for p in pieces[1:-1]]


def _part(raw: bytes) -> Part:
    head, sep, data = raw.partition(b"\r\n\r\n")
    if not sep:
        raise _bad_form("a part without headers")
    disposition = ""
    for line in head.decode("utf-8", "replace").split("\r\n"):
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-disposition":
            disposition = v.strip()
    params = {k.lower(): _unquote(v) for k, v in _PARAM.findall(disposition)}
    if not disposition.lower().startswith("form-data") or "name" not in params:
        raise _bad_form("a part without Content-Disposition: form-data; name=...")
    filename = params.get("filename")
    if "filename*" in params:                                    # RFC 5987: UTF-8''percent-encoded
        from urllib.parse import unquote
        charset, _, value = params["filename*"].partition("''")
        filename = unquote(value, encoding=charset or "utf-8", errors="replace")
    return Part(params["name"], filename, data)


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        v = re.sub(r'\\(["\\])', r"\1", v[1:-1])
    return v.replace("%22", '"').replace("%0D", "\r").replace("%0A", "\n")      # as browsers encode them


def check_filename(name: Optional[str]) -> str:
    """An uploaded file's name -> the name it is stored under, or APIError(400): only a plain file name with a
    known extension is taken (no directories, '..', drive letters, absolute paths, hidden or control characters)."""
    from ..kb.readers import SUFFIXES

    n = unicodedata.normalize("NFC", name or "").strip()

    def refuse(why: str):
        raise APIError(400, f"file name {name!r} refused: {why}", param="file", code="invalid_file_name")

    if not n:
        refuse("every uploaded file needs a name")
    if _FORBIDDEN & set(n) or n.startswith("~"):
        refuse("a plain file name is needed, without a path, drive or any of / \\ : * ? \" < > |")
    if n.startswith("."):
        refuse("names starting with '.' (hidden files, '..') are not taken")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in n):
        refuse("control characters are not allowed")
    if len(n.encode()) > MAX_NAME_BYTES:
        refuse(f"longer than {MAX_NAME_BYTES} bytes")
    if Path(n).suffix.lower() not in SUFFIXES:
        refuse(f"the knowledge base reads {' '.join(sorted(set(SUFFIXES)))} files")
    return n


def upload_parts(body: bytes, content_type: str, limit: int) -> list:
    """The request's files -> [(stored name, bytes)], all checked before anything is written."""
    files = [p for p in parse_multipart(body, content_type) if p.filename is not None]
    if not files:
        raise APIError(400, "no file in the upload (send each file in a multipart 'file' field)", param="file",
                       code="invalid_upload")
    out = {}
    for p in files:
        name = check_filename(p.filename)
        if len(p.data) > limit:
            raise APIError(413, f"{name} is {len(p.data) / 2**20:.1f} MB; uploads are limited to "
                                f"{limit / 2**20:g} MB (--kb-max-upload-mb)", param="file", code="file_too_large")
        out[name] = p.data                            # the same name twice: the last one is kept
    return list(out.items())


class _Staged:
    """A file written into KB/files/ (atomically), with the version it replaced kept until the ingest is done."""

    def __init__(self, files_dir: Path, name: str, data: bytes):
        files_dir.mkdir(parents=True, exist_ok=True)
        self.dest = files_dir / name
        if self.dest.resolve().parent != files_dir.resolve():         # cannot happen after check_filename
            raise APIError(400, f"file name {name!r} refused", param="file", code="invalid_file_name")
        tmp = files_dir / f".upload-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        self.backup = None
        if self.dest.exists():
            self.backup = files_dir / f".previous-{uuid.uuid4().hex}"
            os.replace(self.dest, self.backup)
        os.replace(tmp, self.dest)

    def done(self, kept: bool):
        """kept: the KB took the new file; else the previous version (or nothing) is put back."""
        if kept:
            if self.backup is not None:
                self.backup.unlink(missing_ok=True)
        elif self.backup is not None:
            os.replace(self.backup, self.dest)
        else:
            self.dest.unlink(missing_ok=True)


def ingest(kb, files_dir: Path, files: list) -> dict:
    """(In the writer's thread.) Store and add the files -> the upload's answer: each file's status."""
    staged = [_Staged(files_dir, name, data) for name, data in files]
    before = {s.dest: kb.store.file_record(str(s.dest.resolve())) for s in staged}
    report = kb.add([str(s.dest) for s in staged], progress=False)
    skipped = dict(report.skipped)
    out = []
    for s in staged:
        old, reason = before[s.dest], skipped.get(str(s.dest))
        s.done(kept=reason is None)
        rec = kb.store.file_record(str(s.dest.resolve()))
        status = ("skipped" if reason is not None else "added" if old is None
                  else "unchanged" if old.sha256 == rec.sha256 and old.signature == rec.signature else "replaced")
        item = {"name": s.dest.name, "source": str(s.dest), "status": status, "chunks": rec.chunks if rec else 0}
        out.append({**item, "reason": reason} if reason is not None else item)
    if report.added or report.replaced:
        kb.build_index()
    return {"object": "list", "data": out, "summary": report.summary()}


def remove(kb, served: ServedKB, file: str) -> dict:
    """(In the writer's thread.) Remove a file, named as the listing names it (or by its source)."""
    for rec in kb.files():
        info = served.file_json(rec)
        if file in (info["name"], rec.source):
            kb.remove([rec.path])
            if info["uploaded"]:
                Path(rec.path).unlink(missing_ok=True)
            kb.build_index()
            return {"object": "knowledge_base.file", "name": info["name"], "source": rec.source, "deleted": True}
    raise APIError(404, f"the knowledge base {served.name!r} has no file {file!r}", param="file",
                   code="file_not_found")


# ------------------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------------------

def install(app, kbs: KBRegistry, auth: Callable) -> None:
    """Add the knowledge-base routes and POST /v1/embeddings to the FastAPI app."""

    @app.get("/v1/knowledge_bases")
    async def list_kbs(request: Request):
        auth(request)
        data = [kb.info(await kb.read(lambda k: k.files())) for kb in kbs.kbs.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/knowledge_bases/{name}")
    async def kb_info(name: str, request: Request):
        auth(request)
        kb = kbs.get(name)
        return kb.info(await kb.read(lambda k: k.files()))

    @app.get("/v1/knowledge_bases/{name}/files")
    async def list_files(name: str, request: Request):
        auth(request)
        kb = kbs.get(name)
        return {"object": "list", "data": [kb.file_json(f) for f in await kb.read(lambda k: k.files())]}

    @app.post("/v1/knowledge_bases/{name}/files")
    async def upload(name: str, request: Request):
        auth(request)
        kb = kbs.get(name)
        files = upload_parts(await request.body(), request.headers.get("content-type", ""), kbs.max_upload_bytes)
        result = await kb.write(lambda k: ingest(k, kb.files_dir, files))
        if all(f["status"] == "skipped" for f in result["data"]):
            why = "; ".join(f"{f['name']}: {f['reason']}" for f in result["data"])
            raise APIError(400, f"nothing could be read from the upload ({why})", param="file",
                           code="unreadable_file")
        return result

    @app.delete("/v1/knowledge_bases/{name}/files/{file:path}")
    async def delete_file(name: str, file: str, request: Request):
        auth(request)
        kb = kbs.get(name)
        return await kb.write(lambda k: remove(k, kb, file))

    @app.post("/v1/knowledge_bases/{name}/search")
    async def search(name: str, request: Request):
        auth(request)
        kb = kbs.get(name)
        r = schemas.parse(schemas.KBSearchRequest, await request.body())
        hits = await kb.read(lambda k: k.search(r.query, r.top_k, r.score_threshold))
        return {"object": "list", "mode": kb.mode,
                "data": [{"index": i, **h.to_json(), "page": h.page} for i, h in enumerate(hits, 1)]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        auth(request)
        r = schemas.parse(schemas.EmbeddingRequest, await request.body())
        texts = _embedding_inputs(r)
        emb = kbs.embedder(r.model)
        vectors = await asyncio.to_thread(emb.encode, texts)
        return _embedding_response(r, emb, texts, vectors)


def _embedding_inputs(r) -> list:
    texts = [r.input] if isinstance(r.input, str) else r.input
    if not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "input must be a string or a list of strings (token ids are not taken: the embedding "
                            "model has its own tokenizer)", param="input", code="invalid_value")
    if len(texts) > 2048 or any(not t for t in texts):
        raise APIError(400, "input must hold 1 to 2048 non-empty strings", param="input", code="invalid_value")
    if r.encoding_format not in (None, "float", "base64"):
        raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format",
                       code="invalid_value")
    if r.dimensions is not None:
        raise APIError(400, "dimensions is not supported: the model's vectors are returned whole",
                       param="dimensions", code="invalid_value")
    return texts


def _embedding_response(r, emb, texts: list, vectors) -> dict:
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32)
    tok = getattr(getattr(emb, "model", None), "tokenizer", None)          # sentence-transformers' own
    n = sum(len(tok(t)["input_ids"]) for t in texts) if callable(tok) else 0
    as_b64 = r.encoding_format == "base64"
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else v.tolist()}
            for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": r.model, "usage": {"prompt_tokens": n, "total_tokens": n}}
