"""Knowledge-base storage: the Store interface and SQLiteStore, the embedded default (one SQLite file per KB).

A store holds files (FileRecord: the path as the user added it, the resolved path that identifies it, a content
hash and the chunking signature it was split with) and their chunks (StoredChunk: text, heading path, location,
BM25 tokens, optional embedding vector). The contract every backend keeps (tests/test_kb.py checks it):

  * add_file(record, chunks) replaces everything stored for record.path in ONE transaction, remove_file() too:
    a reader, or a process killed mid-ingest, sees each file whole or not at all.
  * every committed change bumps generation(); index_data() returns (generation, ids, tokens, vectors) read in one
    snapshot, so an index built from it matches exactly that generation (retrieve.py caches on disk by it).
  * chunk ids are never reused (a replaced file's chunks get new ids), so an id from an older index either
    fetches the same text or nothing.

SQLiteStore: KB/kb.sqlite in WAL mode (readers never block the writer nor it them), synchronous=NORMAL (a
killed process loses nothing committed; a power cut may lose the last commits but never leaves half of one),
busy_timeout so that two writers, or a reader during a checkpoint, wait instead of failing. PgStore
(pgstore.py): the same contract in PostgreSQL + pgvector, for a KB that a team shares. open_store() picks the
backend from a store spec (None: SQLite, or the URI the KB directory keeps in KB/store.txt; postgresql://...).
"""
from __future__ import annotations

import sqlite3
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

SCHEMA_VERSION = "1"
BUSY_TIMEOUT_MS = 60_000          # a writer holds the lock for one file's chunks: milliseconds, not minutes


class StoreError(ValueError):
    """The store cannot be opened or used (not a knowledge base, newer schema, ...)."""


@dataclass
class FileRecord:
    source: str                    # the path as the user added it (what citations show)
    path: str                      # resolved absolute path: identifies the file
    sha256: str                    # of the file's bytes
    signature: str                 # how it was chunked/indexed (chunk size, overlap, tokenizer, embedding model)
    size: int = 0                  # bytes of the file
    chars: int = 0                 # characters of text read from it
    chunks: int = 0
    added: float = 0.0             # time.time() of the last add


@dataclass
class Location:
    """Where a chunk is in its file: unit "page" (PDF), "line" (text, Markdown, HTML, JSONL), "paragraph"
    (DOCX) or "record" (JSON); start..end inclusive, 1-based."""
    unit: str
    start: int
    end: int

    def __str__(self) -> str:
        if self.end != self.start:
            return f"{self.unit}s {self.start}-{self.end}"
        return f"{self.unit} {self.start}"


@dataclass
class StoredChunk:
    text: str
    heading: tuple = ()            # heading path, outermost first
    location: Location = field(default_factory=lambda: Location("line", 1, 1))
    tokens: str = ""               # BM25 tokens, space-separated (retrieve.tokenize)
    vector: Optional[bytes] = None  # float32 embedding, L2-normalised, or None
    id: int = 0                    # set by the store
    source: str = ""               # set by the store on reads
    seq: int = 0                   # position in its file


@dataclass
class IndexData:
    """What a retrieval index is built from: one consistent snapshot of the store."""
    generation: int
    ids: list                      # chunk ids, ascending
    tokens: list                   # space-separated tokens per chunk
    vectors: Optional[list]        # float32 bytes per chunk (None where a chunk has none), or None: no vectors


class Store(ABC):
    """Files and chunks of one knowledge base. Implementations must keep the contract in the module docstring."""

    @abstractmethod
    def add_file(self, record: FileRecord, chunks: Sequence[StoredChunk]) -> None:
        """Insert or replace (by record.path) the file and all its chunks, in one transaction."""

    @abstractmethod
    def remove_file(self, path: str) -> bool:
        """Remove the file with this resolved path and its chunks (one transaction) -> whether it was there."""

    @abstractmethod
    def files(self) -> list:
        """Every FileRecord, ordered by source."""

    @abstractmethod
    def file_record(self, key: str) -> Optional[FileRecord]:
        """The file whose resolved path, or else source as added, is `key`."""

    def file_hash(self, key: str) -> Optional[str]:
        rec = self.file_record(key)
        return rec.sha256 if rec else None

    @abstractmethod
    def generation(self) -> int:
        """A counter bumped by every committed add/remove/settings change."""

    @abstractmethod
    def index_data(self, with_vectors: bool = False) -> IndexData:
        """(generation, chunk ids, tokens[, vectors]) read in one snapshot."""

    @abstractmethod
    def chunks(self, ids: Iterable[int]) -> list:
        """StoredChunks (with source) for these ids, in the order given; ids no longer stored are left out."""

    @abstractmethod
    def iter_chunks(self):
        """Every StoredChunk (with source), by id."""

    @abstractmethod
    def settings(self) -> dict:
        """The KB's persisted settings (str -> str)."""

    @abstractmethod
    def set_settings(self, values: dict) -> None:
        """Persist settings (str -> str; None deletes a key)."""

    @abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        """Where the store is, for people (no password)."""
        return type(self).__name__

    @property
    def cache_tag(self) -> Optional[str]:
        """None, or a name for this store's index cache (KB/index/<tag>/): a store whose data is not in the KB
        directory says which store instance its generations count, so that a cache never outlives it."""
        return None

    def nearest(self, vector: bytes, k: int = 10) -> list:
        """[(chunk id, cosine similarity)] of the k chunks whose vectors are most similar to this float32 vector
        (same dimension only), most similar first. Exact; backends with vector search override it."""
        import numpy as np

        q = np.frombuffer(vector, dtype=np.float32)
        data = self.index_data(with_vectors=True)
        keep = [(i, v) for i, v in zip(data.ids, data.vectors) if v is not None and len(v) == len(vector)]
        if not keep or not len(q):
            return []
        m = np.stack([np.frombuffer(v, dtype=np.float32) for _, v in keep])
        cos = m @ q / np.maximum(np.linalg.norm(m, axis=1) * np.linalg.norm(q), 1e-12)
        order = sorted(range(len(keep)), key=lambda j: (-cos[j], keep[j][0]))[:k]
        return [(int(keep[j][0]), float(cos[j])) for j in order]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE, source TEXT NOT NULL, sha256 TEXT NOT NULL, signature TEXT NOT NULL,
    size INTEGER NOT NULL, chars INTEGER NOT NULL, chunks INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,             -- AUTOINCREMENT: ids are never reused
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, text TEXT NOT NULL, heading TEXT NOT NULL,
    unit TEXT NOT NULL, loc_start INTEGER NOT NULL, loc_end INTEGER NOT NULL,
    tokens TEXT NOT NULL, vector BLOB);
CREATE INDEX IF NOT EXISTS chunks_file ON chunks(file_id);
INSERT OR IGNORE INTO meta VALUES ('schema', '1');
INSERT OR IGNORE INTO meta VALUES ('generation', '0');
"""

HEADING_SEP = "\x1f"               # heading path stored as one string (unit separator: never in text)
_CHUNK_COLS = "c.id, f.source, c.seq, c.text, c.heading, c.unit, c.loc_start, c.loc_end, c.tokens, c.vector"


def _chunk_of(row) -> StoredChunk:
    cid, source, seq, text, heading, unit, a, b, tokens, vector = row
    return StoredChunk(text=text, heading=tuple(heading.split(HEADING_SEP)) if heading else (),
                       location=Location(unit, a, b), tokens=tokens, vector=vector, id=cid, source=source,
                       seq=seq)


def _record_of(row) -> FileRecord:
    return FileRecord(*row)


class SQLiteStore(Store):
    """One SQLite database file (KB/kb.sqlite). One connection per instance; not shared between threads."""

    FILE = "kb.sqlite"

    def __init__(self, db_path, create: bool = True):
        self.path = Path(db_path)
        if not self.path.exists() and not create:
            raise StoreError(f"{self.path}: no knowledge base here")
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                                      check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA foreign_keys=ON")
            if self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                self.db.execute("PRAGMA journal_mode=WAL")       # persistent: set once, by the creator
            self.db.execute("PRAGMA synchronous=NORMAL")
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks'").fetchone():
                with self._write() as db:             # IF NOT EXISTS: two processes may create it at once
                    for stmt in filter(str.strip, _SCHEMA.split(";")):
                        db.execute(stmt)
            schema = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a knowledge base ({e})") from e
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: knowledge-base schema {schema}, this glmkit reads {SCHEMA_VERSION}")

    # --- transactions ------------------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db, mode):
            self.db, self.mode = db, mode

        def __enter__(self):
            self.db.execute(f"BEGIN {self.mode}")
            return self.db

        def __exit__(self, exc_type, *_):
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _write(self):
        """A write transaction: IMMEDIATE takes the write lock up front (waiting busy_timeout for it), so it can
        never fail half-way on a lock upgrade."""
        return self._Tx(self.db, "IMMEDIATE")

    def _read(self):
        """A read transaction: everything read inside sees one snapshot (WAL)."""
        return self._Tx(self.db, "DEFERRED")

    def _bump(self, db):
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    # --- files -------------------------------------------------------------------------------------------
    def add_file(self, record: FileRecord, chunks: Sequence[StoredChunk]) -> None:
        rows = [(i, c.text, HEADING_SEP.join(c.heading), c.location.unit, c.location.start, c.location.end,
                 c.tokens, c.vector) for i, c in enumerate(chunks)]
        with self._write() as db:
            db.execute("DELETE FROM files WHERE path = ?", (record.path,))         # cascades to its chunks
            cur = db.execute(
                "INSERT INTO files (path, source, sha256, signature, size, chars, chunks, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.path, record.source, record.sha256, record.signature, record.size, record.chars,
                 len(rows), record.added or time.time()))
            fid = cur.lastrowid
            db.executemany("INSERT INTO chunks (file_id, seq, text, heading, unit, loc_start, loc_end, tokens, "
                           f"vector) VALUES ({fid}, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._bump(db)

    def remove_file(self, path: str) -> bool:
        with self._write() as db:
            gone = db.execute("DELETE FROM files WHERE path = ?", (path,)).rowcount > 0
            if gone:
                self._bump(db)
        return gone

    def files(self) -> list:
        rows = self.db.execute("SELECT source, path, sha256, signature, size, chars, chunks, added FROM files "
                               "ORDER BY source").fetchall()
        return [_record_of(r) for r in rows]

    def file_record(self, key: str) -> Optional[FileRecord]:
        cols = "source, path, sha256, signature, size, chars, chunks, added"
        row = (self.db.execute(f"SELECT {cols} FROM files WHERE path = ?", (key,)).fetchone()
               or self.db.execute(f"SELECT {cols} FROM files WHERE source = ?", (key,)).fetchone())
        return _record_of(row) if row else None

    # --- chunks ------------------------------------------------------------------------------------------
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def index_data(self, with_vectors: bool = False) -> IndexData:
        cols = "id, tokens" + (", vector" if with_vectors else "")
        with self._read() as db:
            gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            rows = db.execute(f"SELECT {cols} FROM chunks ORDER BY id").fetchall()
        ids = [r[0] for r in rows]
        tokens = [r[1] for r in rows]
        vectors = [r[2] for r in rows] if with_vectors else None
        return IndexData(gen, ids, tokens, vectors)

    def chunks(self, ids: Iterable[int]) -> list:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        got = {}
        for start in range(0, len(ids), 500):                  # SQLite's bound-parameter limit
            part = ids[start:start + 500]
            q = (f"SELECT {_CHUNK_COLS} FROM chunks c JOIN files f ON f.id = c.file_id "
                 f"WHERE c.id IN ({','.join('?' * len(part))})")
            got.update((r[0], _chunk_of(r)) for r in self.db.execute(q, part))
        return [got[i] for i in ids if i in got]

    def iter_chunks(self):
        q = f"SELECT {_CHUNK_COLS} FROM chunks c JOIN files f ON f.id = c.file_id ORDER BY c.id"
        with self._read() as db:
            rows = db.execute(q).fetchall()
        return iter([_chunk_of(r) for r in rows])

    # --- settings ----------------------------------------------------------------------------------------
    def settings(self) -> dict:
        rows = self.db.execute("SELECT key, value FROM meta WHERE key NOT IN ('schema', 'generation')")
        return dict(rows.fetchall())

    def set_settings(self, values: dict) -> None:
        with self._write() as db:
            for k, v in values.items():
                if k in ("schema", "generation"):
                    raise StoreError(f"{k} is not a setting")
                if v is None:
                    db.execute("DELETE FROM meta WHERE key = ?", (k,))
                else:
                    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, str(v)))
            self._bump(db)

    def describe(self) -> str:
        return f"SQLite {self.path}"

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


STORE_FILE = "store.txt"           # in a KB directory whose store is elsewhere: the store's URI, one line


def saved_store_spec(kb_dir) -> Optional[str]:
    """The store URI that the KB directory keeps (KB/store.txt), or None (its store is KB/kb.sqlite)."""
    try:
        return (Path(kb_dir) / STORE_FILE).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_store(spec: Optional[str], kb_dir, create: bool = True) -> Store:
    """The store of the KB in directory kb_dir. spec: None -> the URI kept in kb_dir/store.txt, else SQLite in
    kb_dir/kb.sqlite; "postgresql://user@host:port/db[?schema=NAME]" -> PgStore (schema by default from the
    directory's name), and its URI (with the schema) is kept in kb_dir/store.txt (made readable by its owner
    only: it may hold a password) so that later opens of the directory reuse it."""
    kb_dir = Path(kb_dir).expanduser()
    saved = saved_store_spec(kb_dir)
    spec = spec or saved
    if spec is None:
        if create:
            kb_dir.mkdir(parents=True, exist_ok=True)
        return SQLiteStore(kb_dir / SQLiteStore.FILE, create=create)
    from . import pgstore

    if saved and pgstore.is_uri(spec) and pgstore.split_uri(spec) == (pgstore.split_uri(saved)[0], None):
        spec = saved                    # the same server without ?schema=: the KB's schema (even if KB was renamed)
    if not pgstore.is_uri(spec):
        raise StoreError(f"--store {spec!r}: expected postgresql://user@host:port/db (the default store, without "
                         f"--store, is SQLite in {kb_dir / SQLiteStore.FILE})")
    if saved is None and (kb_dir / SQLiteStore.FILE).exists():
        raise StoreError(f"{kb_dir} holds a SQLite knowledge base ({SQLiteStore.FILE}); --store cannot move it: "
                         "use another directory for the PostgreSQL one")
    store = pgstore.PgStore(spec, kb_name=kb_dir.resolve().name, create=create)
    if store.uri != saved:
        try:
            kb_dir.mkdir(parents=True, exist_ok=True)
            tmp = kb_dir / f".{STORE_FILE}.tmp"
            tmp.touch(mode=0o600)
            tmp.chmod(0o600)
            tmp.write_text(store.uri + "\n", encoding="utf-8")
            tmp.replace(kb_dir / STORE_FILE)
        except BaseException:
            store.close()
            raise
    return store
