"""glmkit kb: a local knowledge base — ingest files, split, index, retrieve; answer.py answers from it with
citations. Offline: nothing here reaches the network.

    kb = KnowledgeBase.open("my-kb")                       # a directory: my-kb/kb.sqlite (+ my-kb/index/)
    report = kb.add(["docs/", "notes.md"])                 # AddReport: added, replaced, unchanged, removed...
    for hit in kb.search("如何安装软件包？", top_k=3):      # Hit: source, location, heading, text, score
        print(hit.score, hit.source, hit.location)
    from glmkit.kb.answer import ask
    print(ask(kb, "如何安装软件包？", glmkit.load()).text)

Layers: readers.py (file -> blocks) -> split.py (normalise, chunk) -> retrieve.py (tokens, BM25/dense index,
scores) over store.py (Store interface; SQLiteStore; PgStore in pgstore.py for `--store postgresql://...`).
This package uses glmkit's pipeline only through answer.py, and nothing in glmkit's core imports it. Settings
(chunk size, overlap, embedding model) are kept in the store and used by every later add; a file's chunks are
redone when its bytes or these settings change.
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import retrieve, split
from .readers import ReadError, collect, read_file
from .store import STORE_FILE, FileRecord, Location, SQLiteStore, Store, StoredChunk, StoreError, open_store, \
    saved_store_spec

__all__ = ["AddReport", "Hit", "KBError", "KnowledgeBase"]


class KBError(ValueError):
    """A knowledge base that cannot be opened or an invalid request (the CLI prints it as an error)."""


@dataclass
class AddReport:
    added: int = 0                 # files new to the KB
    replaced: int = 0              # files whose content (or chunking settings) changed: all their chunks redone
    unchanged: int = 0             # same bytes, same settings: nothing done
    removed: int = 0               # files under an added folder that no longer exist: removed
    chunks: int = 0                # chunks written
    skipped: list = field(default_factory=list)     # [(path as given, reason)]
    warnings: list = field(default_factory=list)    # [(path, what)] read, with a problem (bad JSONL line...)
    bytes: int = 0                 # bytes of the files read
    seconds: float = 0.0

    def summary(self) -> str:
        mb = self.bytes / 1e6
        rate = f", {mb / self.seconds:.2f} MB/s" if self.seconds > 0 and self.bytes else ""
        return (f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, {self.removed} removed, "
                f"{len(self.skipped)} skipped; {self.chunks} chunks written ({mb:.2f} MB in {self.seconds:.1f} s"
                f"{rate})")


@dataclass
class Hit:
    source: str                    # the file's path as it was added
    location: str                  # "page 3", "pages 3-4", "lines 10-24", "paragraphs 5-7", "record 2"
    heading: str                   # heading path, "Chapter > Section" ("" if none)
    text: str
    score: float                   # 0..1, one scale for every retrieval mode (see retrieve.py)
    page: Optional[int] = None     # first page, for PDFs
    chunk_id: int = 0

    def to_json(self) -> dict:
        return {"source": self.source, "location": self.location, "heading": self.heading, "text": self.text,
                "score": round(self.score, 4)}

    def cite(self) -> str:
        """'file, page 3' — how answers list their sources."""
        return f"{self.source}, {self.location}"


def _hit(c: StoredChunk, score: float) -> Hit:
    return Hit(c.source, str(c.location), " > ".join(c.heading), c.text, score,
               c.location.start if c.location.unit == "page" else None, c.id)


class KnowledgeBase:
    """One knowledge base: a directory holding its store (kb.sqlite) and index cache (index/)."""

    DB_FILE = SQLiteStore.FILE
    STORE_FILE = STORE_FILE            # instead of kb.sqlite: the URI of the store elsewhere (PostgreSQL)
    INDEX_DIR = "index"

    def __init__(self, path: Path, store: Store, embedding_model: Optional[str] = None, embedder=None):
        self.path, self.store = Path(path), store
        self._embedder, self._embedder_set = embedder, embedder is not None
        self._note = f"hybrid: BM25 + dense vectors of {embedder.name}" if embedder is not None else None
        if embedding_model:                   # kept as an absolute path: later commands may run elsewhere
            folder = Path(embedding_model).expanduser()
            if not folder.is_dir():
                raise KBError(f"--embedding-model {embedding_model}: no such folder (a local sentence-transformers "
                              "model folder is needed; nothing is downloaded)")
            embedding_model = str(folder.resolve())
        if embedding_model is not None and (embedding_model or None) != self.settings["embedding_model"]:
            self.store.set_settings({"embedding_model": embedding_model or None})
        cache = self.path / self.INDEX_DIR
        tag = getattr(store, "cache_tag", None)
        if tag:                               # a store elsewhere: each store instance's cache apart
            cache = cache / tag
        self.retriever = retrieve.Retriever(store, cache, embedder)

    @classmethod
    def open(cls, path, create: bool = True, embedding_model: Optional[str] = None, embedder=None,
             store: Optional[Store] = None) -> "KnowledgeBase":
        """Open (or with create, make) the KB in directory `path`. embedding_model: a sentence-transformers
        folder to use from now on (persisted; "" turns dense retrieval off); embedder: an object with .name and
        .encode(texts) -> [n, D] normalised vectors, used instead of loading a model (tests, servers);
        store: a Store backend, or a store URI ("postgresql://user@host:port/db[?schema=NAME]": PgStore, kept in
        path/store.txt so that later opens of the directory use it; see store.open_store). Default: the URI that
        path/store.txt holds, else SQLiteStore in path/kb.sqlite."""
        path = Path(path).expanduser()
        if store is None or isinstance(store, str):
            if path.exists() and not path.is_dir():
                raise KBError(f"{path}: a knowledge base is a directory, this is a file")
            spec = store or saved_store_spec(path)
            if spec is None and not (path / cls.DB_FILE).is_file():
                if not create:
                    raise KBError(f"{path}: no knowledge base here (create one with `glmkit kb add {path} FILES`)")
                path.mkdir(parents=True, exist_ok=True)
            try:
                store = open_store(spec, path, create=create)
            except StoreError as e:
                raise KBError(str(e)) from e
        return cls(path, store, embedding_model, embedder)

    # --- settings ----------------------------------------------------------------------------------------
    @property
    def settings(self) -> dict:
        """chunk_size, chunk_overlap (ints) and embedding_model (str or None), as persisted (defaults if not)."""
        s = self.store.settings()
        return {"chunk_size": int(s.get("chunk_size", split.CHUNK_SIZE)),
                "chunk_overlap": int(s.get("chunk_overlap", split.CHUNK_OVERLAP)),
                "embedding_model": s.get("embedding_model") or None}

    def _embedding(self):
        """The embedder of the KB's embedding model (loaded once), or None; sets the mode note."""
        if not self._embedder_set:
            self._embedder, self._note = retrieve.load_embedder(self.settings["embedding_model"])
            self._embedder_set = True
            self.retriever.embedder = self._embedder
        return self._embedder

    @property
    def mode(self) -> str:
        """"hybrid" (BM25 + dense) or "bm25"."""
        return "hybrid" if self._embedding() is not None else "bm25"

    @property
    def mode_note(self) -> str:
        """What the retrieval mode is and why (e.g. BM25 only because sentence-transformers is missing)."""
        self._embedding()
        return self._note

    # --- files -------------------------------------------------------------------------------------------
    def files(self) -> list:
        """FileRecords (source, path, sha256, size, chars, chunks, added...), by source."""
        return self.store.files()

    def add(self, paths: Iterable, chunk_size: Optional[int] = None, chunk_overlap: Optional[int] = None,
            progress: bool = True) -> AddReport:
        """Add files and folders (recursively). Unchanged files are skipped, changed ones replaced (each file in
        one transaction), files under an added folder that were deleted from disk removed; files that cannot
        be read are reported in .skipped with the reason and the rest go on. chunk_size/chunk_overlap, when
        given, become the KB's settings (files chunked otherwise are redone)."""
        paths = [str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
        cs, co = self._chunking(chunk_size, chunk_overlap)
        embedder = self._embedding()
        sig = (f"split={split.SPLIT_VERSION};size={cs};overlap={co};tok={retrieve.TOKENIZER_VERSION};"
               f"embed={embedder.name if embedder is not None else ''}")
        t0, report = time.perf_counter(), AddReport()
        files, report.skipped = collect(paths, exclude=[self.path])
        report.removed = self._remove_vanished(paths)
        bar = _progress(len(files), progress)
        try:
            for source, f in files:
                self._add_one(source, f, cs, co, sig, embedder, report)
                bar.update(1)
                mb = report.bytes / 1e6
                bar.set_postfix_str(f"{report.chunks} chunks, {mb / max(time.perf_counter() - t0, 1e-9):.2f} MB/s",
                                    refresh=False)
        finally:
            bar.close()
        report.seconds = time.perf_counter() - t0
        return report

    def _chunking(self, chunk_size, chunk_overlap) -> tuple:
        cur = self.settings
        cs = cur["chunk_size"] if chunk_size is None else int(chunk_size)
        co = cur["chunk_overlap"] if chunk_overlap is None else int(chunk_overlap)
        if chunk_size is not None and chunk_overlap is None:
            co = min(co, cs // 2)
        split.split_blocks([], cs, co)                                # validates both
        if (cs, co) != (cur["chunk_size"], cur["chunk_overlap"]) or "chunk_size" not in self.store.settings():
            self.store.set_settings({"chunk_size": cs, "chunk_overlap": co})
        return cs, co

    def _add_one(self, source: str, f: Path, cs: int, co: int, sig: str, embedder, report: AddReport):
        try:
            data = f.read_bytes()
        except OSError as e:
            report.skipped.append((source, f"cannot read: {e.strerror or e}"))
            return
        report.bytes += len(data)
        resolved = str(f.resolve())
        sha = hashlib.sha256(data).hexdigest()
        old = self.store.file_record(resolved)
        if old is not None and old.sha256 == sha and old.signature == sig:
            report.unchanged += 1
            return
        try:
            doc = read_file(f, data)
        except ReadError as e:
            kept = " (the version added before is kept)" if old is not None else ""
            report.skipped.append((source, str(e) + kept))
            return
        report.warnings += [(source, w) for w in doc.warnings]
        chunks = split.split_blocks(doc.blocks, cs, co)
        heads: dict = {}                      # heading path -> its tokens, indexed with every chunk under it
        stored = []
        for c in chunks:
            if c.heading not in heads:
                heads[c.heading] = retrieve.tokenize(" ".join(c.heading)) if c.heading else []
            tokens = heads[c.heading] + retrieve.tokenize(c.text)
            stored.append(StoredChunk(c.text, c.heading, Location(c.unit, c.start, c.end), " ".join(tokens)))
        if embedder is not None and stored:
            for c, v in zip(stored, embedder.encode([c.text for c in chunks])):
                c.vector = v.tobytes()
        rec = FileRecord(source, resolved, sha, sig, len(data), sum(len(b.text) for b in doc.blocks), len(stored))
        self.store.add_file(rec, stored)
        report.chunks += len(stored)
        if old is None:
            report.added += 1
        else:
            report.replaced += 1

    def _remove_vanished(self, paths) -> int:
        """Files recorded under an added folder that no longer exist on disk: removed."""
        folders = [Path(p).expanduser().resolve() for p in paths if Path(p).expanduser().is_dir()]
        n = 0
        for rec in self.store.files() if folders else ():
            p = Path(rec.path)
            if any(p.is_relative_to(d) for d in folders) and not p.exists():
                n += self.store.remove_file(rec.path)
        return n

    def remove(self, files: Iterable) -> list:
        """Remove files (as added, or any path to them; a folder removes every file under it) -> the sources
        removed. Paths that match nothing are ignored (compare the result)."""
        files = [files] if isinstance(files, (str, Path)) else files
        records = self.store.files()
        removed = []
        for given in map(str, files):
            target = Path(given).expanduser().resolve()
            for rec in records:
                p = Path(rec.path)
                hit = rec.source == given or p == target or p.is_relative_to(target)
                if hit and rec.source not in removed and self.store.remove_file(rec.path):
                    removed.append(rec.source)
        return removed

    # --- search ------------------------------------------------------------------------------------------
    def build_index(self) -> None:
        """Build (or load) the index of the current contents now, and cache it on disk for other processes."""
        self._embedding()
        self.retriever.index()

    def search(self, query: str, top_k: Optional[int] = None, score_threshold: Optional[float] = None) -> list:
        """-> [Hit] best first: at most top_k (default retrieve.TOP_K), each scoring at least score_threshold
        (default retrieve.SCORE_THRESHOLD; 0 keeps every hit with anything in common with the query)."""
        top_k = retrieve.TOP_K if top_k is None else int(top_k)
        thr = retrieve.SCORE_THRESHOLD if score_threshold is None else float(score_threshold)
        if not 0.0 <= thr <= 1.0:
            raise KBError(f"score threshold must be between 0 and 1 (scores are 0..1), got {thr}")
        self._embedding()
        found = self.retriever.search(query, top_k, thr)
        scores = dict(found)
        return [_hit(c, scores[c.id]) for c in self.store.chunks([i for i, _ in found])]

    def close(self) -> None:
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(total: int, enabled: bool):
    """A tqdm bar over files (postfix: chunks, MB/s) on stderr."""
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="kb add", disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)
