"""PgStore: a knowledge base in PostgreSQL + pgvector, for a KB that a team shares (`--store postgresql://...`).

The same Store contract as SQLiteStore (see store.py), kept by PostgreSQL's transactions:

  * each add_file/remove_file/set_settings is ONE transaction, and it starts by locking the single row of the
    KB's `state` table (SELECT ... FOR UPDATE): two writers, in any processes on any machines, take turns file
    by file and never interleave; the generation counter in that row is bumped in the same transaction, so it
    changes exactly when a change commits. A writer killed mid-file (or whose connection drops) is rolled back
    by the server: readers see each file whole or not at all.
  * index_data() and iter_chunks() read in one REPEATABLE READ snapshot: generation, ids, tokens and vectors
    agree; other reads are single statements (READ COMMITTED), like SQLite's autocommit reads.
  * chunk ids come from an identity column (a sequence): never reused, even by rolled-back transactions.

Layout: every table of one KB lives in its own schema, by default "kb_" + the KB directory's name (lower case,
[a-z0-9_], plus a short hash of the name when it had to be changed, e.g. my-kb -> kb_my_kb_1f0c2b9a), or the
one named by a `schema=NAME` parameter in the URI (stripped before connecting; libpq does not know it). The
schema is written into the URI that the KB directory keeps (KB/store.txt), so renaming the directory later
still finds the same tables. Tables: meta (schema version, instance id, settings), state (one row: generation),
files, chunks (text, heading, location, BM25 tokens, and the embedding in a pgvector `vector` column, NULL
when dense retrieval is off). PostgreSQL's text cannot hold U+0000: NUL characters are dropped from stored
text.

Retrieval itself stays in retrieve.py (an in-memory BM25 + dense index built from index_data() and cached in
KB/index/pg-<instance>/ by generation); nearest() runs pgvector's exact cosine search in the database.

Needs psycopg 3 (pip install 'glmkit[pg]') and the pgvector extension in the database: it is created (CREATE
EXTENSION IF NOT EXISTS vector) when the role may, else an error says to have a superuser create it.
"""
from __future__ import annotations

import functools
import hashlib
import re
import struct
import threading
import time
import unicodedata
import uuid
from contextlib import contextmanager
from typing import Iterable, Optional, Sequence

from .store import HEADING_SEP, FileRecord, IndexData, Store, StoredChunk, StoreError, _chunk_of

SCHEMA_VERSION = "1"
URI_PREFIXES = ("postgresql://", "postgres://")
_RESERVED = ("schema", "instance")             # meta keys that are not settings
LOCK_TIMEOUT_MS = 120_000                      # a writer waits this long for another writer's file to commit


def is_uri(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(URI_PREFIXES)


def schema_name(kb_name: str) -> str:
    """The default schema of a KB called kb_name: kb_<name> when the name is already lower-case [a-z0-9_],
    else kb_<name made so>_<8 hex of its hash> (so that my-kb and my_kb, or two Chinese names, stay apart)."""
    name = unicodedata.normalize("NFKC", kb_name)
    clean = re.sub(r"[^a-z0-9_]+", "_", name.lower()).strip("_")[:40]
    if clean != kb_name or not clean:
        clean = (clean + "_" if clean else "") + hashlib.sha1(kb_name.encode("utf-8")).hexdigest()[:8]
    return "kb_" + clean


def split_uri(uri: str) -> tuple:
    """'postgresql://u@h:5432/db?schema=s&sslmode=require' -> ('postgresql://u@h:5432/db?sslmode=require', 's')."""
    base, _, query = uri.partition("?")
    keep, schema = [], None
    for part in query.split("&") if query else ():
        key, _, value = part.partition("=")
        if key == "schema":
            from urllib.parse import unquote
            schema = unquote(value)
        else:
            keep.append(part)
    return base + ("?" + "&".join(keep) if keep else ""), schema


def with_schema(uri: str, schema: str) -> str:
    """The URI with schema=... set (what a KB directory keeps)."""
    from urllib.parse import quote
    conninfo, _ = split_uri(uri)
    return conninfo + ("&" if "?" in conninfo else "?") + "schema=" + quote(schema, safe="")


def redact(uri: str) -> str:
    """The URI with its password (if any) shown as ***."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@?]*):[^@/?]+@", r"\1:***@", uri)


def _need_psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("a postgresql:// store needs psycopg 3: pip install 'glmkit[pg]' (psycopg[binary])") from None
    return psycopg


# --- pgvector's binary wire format: int16 dims, int16 unused, dims float32, all big-endian --------------------

class _Vec:
    """A float32 little-endian embedding (StoredChunk.vector) to be sent as a pgvector `vector`."""
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        if len(data) % 4:
            raise StoreError(f"an embedding of {len(data)} bytes is not float32")
        self.data = data


def _adapters(conn, oid: int):
    """Register binary (and text) adapters for pgvector's type on this connection: bytes <-> vector."""
    import numpy as np
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format

    class VecDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj):
            a = np.frombuffer(obj.data, dtype="<f4")
            return struct.pack(">HH", len(a), 0) + a.astype(">f4").tobytes()

    VecDumper.oid = oid

    class VecBinaryLoader(Loader):
        format = Format.BINARY

        def load(self, data):
            dims = int.from_bytes(bytes(data[:2]), "big")
            return np.frombuffer(data, dtype=">f4", count=dims, offset=4).astype("<f4").tobytes()

    class VecTextLoader(Loader):
        format = Format.TEXT

        def load(self, data):
            s = bytes(data).decode()
            return np.array([float(x) for x in s[1:-1].split(",")] if len(s) > 2 else [],
                            dtype="<f4").tobytes()

    conn.adapters.register_dumper(_Vec, VecDumper)
    conn.adapters.register_loader(oid, VecBinaryLoader)
    conn.adapters.register_loader(oid, VecTextLoader)


def _reconnecting(method):
    """A public PgStore method: run under the thread lock; if the connection died under it (a server restart, a
    dropped network link, an idle timeout), run once more on a new connection — every operation is one
    transaction that replaces by key (add_file, remove_file, set_settings) or reads, so once more is safe; other
    failures of the server as StoreError."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        psycopg = _need_psycopg()
        with self._lock:
            for attempt in (0, 1):
                try:
                    return method(self, *args, **kwargs)
                except psycopg.OperationalError as e:
                    if attempt or not self._dead():
                        raise StoreError(f"{self.describe()}: {_msg(e)}") from e
    return run


def _nul(s):
    return s.replace("\x00", "") if isinstance(s, str) and "\x00" in s else s


def _msg(e) -> str:
    """A psycopg error's message on one line."""
    return " ".join(str(e).split())


_CHUNK_COLS = "c.id, f.source, c.seq, c.text, c.heading, c.unit, c.loc_start, c.loc_end, c.tokens, c.vector"
_FILE_COLS = "source, path, sha256, signature, size, chars, chunks, added"


class PgStore(Store):
    """One KB's schema in a PostgreSQL database. One connection per instance (reconnected when it drops); calls
    from several threads are serialised."""

    def __init__(self, uri: str, kb_name: str = "kb", create: bool = True, connect_timeout: int = 10):
        if not is_uri(uri):
            raise StoreError(f"--store {uri!r}: expected a postgresql://user@host:port/db URI")
        self.conninfo, schema = split_uri(uri)
        self.schema = schema or schema_name(kb_name)
        if not self.schema or len(self.schema.encode()) > 63 or "\x00" in self.schema:
            raise StoreError(f"schema {self.schema!r}: PostgreSQL names are 1-63 bytes")
        self.uri = with_schema(uri, self.schema)          # what the KB directory keeps
        self.connect_timeout = connect_timeout
        self._lock = threading.RLock()
        self.conn, self._closed = None, False
        self._instance = None
        self._connect()
        self._init_schema(create)

    # --- connection --------------------------------------------------------------------------------------
    def describe(self) -> str:
        return f"PostgreSQL {redact(self.conninfo)}, schema {self.schema}"

    @property
    def cache_tag(self) -> str:
        return f"pg-{self._instance[:12]}"

    _VECTOR_TYPE = ("SELECT t.oid, n.nspname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                    "JOIN pg_extension e ON e.extnamespace = n.oid AND e.extname = 'vector' WHERE t.typname = 'vector'")

    def _connect(self):
        psycopg = _need_psycopg()
        from psycopg import sql

        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout,
                                   application_name="glmkit-kb")
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to {redact(self.conninfo)}: {_msg(e)}") from e
        try:
            row = conn.execute(self._VECTOR_TYPE).fetchone()
            if row is None:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error as e:
                    row = conn.execute(self._VECTOR_TYPE).fetchone()      # another process created it meanwhile?
                    if row is None:
                        raise StoreError(
                            f"{redact(self.conninfo)}: the pgvector extension is not installed in this database "
                            f"and this role cannot create it ({_msg(e)}); have a superuser run CREATE EXTENSION "
                            "vector in it") from e
                row = row or conn.execute(self._VECTOR_TYPE).fetchone()
            oid, ext = row
            _adapters(conn, oid)
            # Only the KB's schema is searched: an unqualified table is ours or an error, never another schema's
            # table of the same name; pgvector's type, operator and functions are named with their schema.
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
        self.conn, self._ext = conn, sql.Identifier(ext).as_string(conn)

    def _dead(self) -> bool:
        return not self._closed and (self.conn is None or self.conn.closed or self.conn.broken)

    def _db(self):
        """The connection, reconnected if it was lost (a server restart, a network drop)."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._dead():
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            self._connect()
        return self.conn

    @contextmanager
    def _op(self):
        """The live connection, under the thread lock (public methods run inside _reconnecting)."""
        with self._lock:
            yield self._db()

    @contextmanager
    def _write(self):
        """A write transaction holding the KB's writer lock (its state row) from the start."""
        with self._op() as db, db.transaction():
            db.execute("SELECT generation FROM state WHERE id = 1 FOR UPDATE")
            yield db
            db.execute("UPDATE state SET generation = generation + 1 WHERE id = 1")

    @contextmanager
    def _snapshot(self):
        with self._op() as db, db.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db

    @_reconnecting
    def _init_schema(self, create: bool):
        from psycopg import sql

        with self._op() as db:
            exists = db.execute("SELECT to_regclass(%s) IS NOT NULL",
                                (sql.Identifier(self.schema, "state").as_string(db),)).fetchone()[0]
            if not exists:
                if not create:
                    raise StoreError(f"{self.describe()}: no knowledge base here (create one with "
                                     "`glmkit kb add KB FILES --store URI`)")
                with db.transaction():           # two processes creating it at once: the second waits here
                    db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("glmkit-kb:" + self.schema,))
                    db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                    for stmt in _SCHEMA:
                        db.execute(stmt.replace("{ext}", self._ext))
                    db.execute("INSERT INTO meta VALUES ('schema', %s), ('instance', %s) ON CONFLICT DO NOTHING",
                               (SCHEMA_VERSION, uuid.uuid4().hex))
                    db.execute("INSERT INTO state VALUES (1, 0) ON CONFLICT DO NOTHING")
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('schema', 'instance')").fetchall())
        if meta.get("schema") != SCHEMA_VERSION:
            raise StoreError(f"{self.describe()}: knowledge-base schema {meta.get('schema')}, this glmkit reads "
                             f"{SCHEMA_VERSION}")
        self._instance = meta["instance"]

    # --- files -------------------------------------------------------------------------------------------
    @_reconnecting
    def add_file(self, record: FileRecord, chunks: Sequence[StoredChunk]) -> None:
        rows = [(i, _nul(c.text), _nul(HEADING_SEP.join(c.heading)), c.location.unit, c.location.start,
                 c.location.end, _nul(c.tokens), _Vec(c.vector) if c.vector is not None else None)
                for i, c in enumerate(chunks)]
        with self._write() as db:
            db.execute("DELETE FROM files WHERE path = %s", (record.path,))          # cascades to its chunks
            fid = db.execute(
                f"INSERT INTO files ({_FILE_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (_nul(record.source), record.path, record.sha256, record.signature, record.size, record.chars,
                 len(rows), record.added or time.time())).fetchone()[0]
            if rows:
                with db.cursor() as cur:
                    cur.executemany("INSERT INTO chunks (file_id, seq, text, heading, unit, loc_start, loc_end, "
                                    f"tokens, vector) VALUES ({int(fid)}, %s, %s, %s, %s, %s, %s, %s, %s)", rows)

    @_reconnecting
    def remove_file(self, path: str) -> bool:
        with self._op() as db, db.transaction():
            db.execute("SELECT generation FROM state WHERE id = 1 FOR UPDATE")
            gone = db.execute("DELETE FROM files WHERE path = %s", (path,)).rowcount > 0
            if gone:
                db.execute("UPDATE state SET generation = generation + 1 WHERE id = 1")
        return gone

    @_reconnecting
    def files(self) -> list:
        with self._op() as db:
            rows = db.execute(f"SELECT {_FILE_COLS} FROM files ORDER BY source COLLATE \"C\"").fetchall()
        return [FileRecord(*r) for r in rows]

    @_reconnecting
    def file_record(self, key: str) -> Optional[FileRecord]:
        with self._op() as db:
            row = (db.execute(f"SELECT {_FILE_COLS} FROM files WHERE path = %s", (key,)).fetchone()
                   or db.execute(f"SELECT {_FILE_COLS} FROM files WHERE source = %s ORDER BY id LIMIT 1",
                                 (key,)).fetchone())
        return FileRecord(*row) if row else None

    # --- chunks ------------------------------------------------------------------------------------------
    @_reconnecting
    def generation(self) -> int:
        with self._op() as db:
            return int(db.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0])

    @_reconnecting
    def index_data(self, with_vectors: bool = False) -> IndexData:
        cols = "id, tokens" + (", vector" if with_vectors else "")
        with self._snapshot() as db:
            gen = int(db.execute("SELECT generation FROM state WHERE id = 1").fetchone()[0])
            rows = db.execute(f"SELECT {cols} FROM chunks ORDER BY id", binary=True).fetchall()
        return IndexData(gen, [r[0] for r in rows], [r[1] for r in rows],
                         [r[2] for r in rows] if with_vectors else None)

    @_reconnecting
    def chunks(self, ids: Iterable[int]) -> list:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        with self._op() as db:
            rows = db.execute(f"SELECT {_CHUNK_COLS} FROM chunks c JOIN files f ON f.id = c.file_id "
                              "WHERE c.id = ANY(%s::bigint[])", (ids,), binary=True).fetchall()
        got = {r[0]: _chunk_of(r) for r in rows}
        return [got[i] for i in ids if i in got]

    @_reconnecting
    def iter_chunks(self):
        with self._snapshot() as db:
            rows = db.execute(f"SELECT {_CHUNK_COLS} FROM chunks c JOIN files f ON f.id = c.file_id ORDER BY c.id",
                              binary=True).fetchall()
        return iter([_chunk_of(r) for r in rows])

    @_reconnecting
    def nearest(self, vector: bytes, k: int = 10) -> list:
        """pgvector's exact cosine search: [(chunk id, cosine similarity)], most similar first, over the chunks
        whose vector has this one's dimension."""
        q = _Vec(bytes(vector))
        with self._op() as db:
            dist = f"vector OPERATOR({self._ext}.<=>) %(q)s"
            rows = db.execute(f"SELECT id, 1 - ({dist}) FROM chunks WHERE vector IS NOT NULL AND "
                              f"{self._ext}.vector_dims(vector) = %(d)s ORDER BY {dist}, id LIMIT %(k)s",
                              {"q": q, "d": len(q.data) // 4, "k": int(k)}).fetchall()
        return [(int(i), float(s)) for i, s in rows]

    # --- settings ----------------------------------------------------------------------------------------
    @_reconnecting
    def settings(self) -> dict:
        with self._op() as db:
            rows = db.execute("SELECT key, value FROM meta WHERE key <> ALL(%s)", (list(_RESERVED),)).fetchall()
        return dict(rows)

    @_reconnecting
    def set_settings(self, values: dict) -> None:
        for k in values:
            if k in _RESERVED or k == "generation":
                raise StoreError(f"{k} is not a setting")
        with self._write() as db:
            for k, v in values.items():
                if v is None:
                    db.execute("DELETE FROM meta WHERE key = %s", (k,))
                else:
                    db.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
                               "EXCLUDED.value", (k, _nul(str(v))))

    @_reconnecting
    def drop(self) -> None:
        """Delete this KB's schema and everything in it (tests; `DROP SCHEMA ... CASCADE` by hand otherwise)."""
        from psycopg import sql

        with self._op() as db:
            db.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self.conn is not None:
                self.conn.close()
                self.conn = None


# Unqualified names: search_path is the KB's schema alone (set per connection), created just before;
# {ext}: pgvector's schema.
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), generation BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS files (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        path TEXT NOT NULL UNIQUE, source TEXT NOT NULL, sha256 TEXT NOT NULL, signature TEXT NOT NULL,
        size BIGINT NOT NULL, chars BIGINT NOT NULL, chunks INTEGER NOT NULL, added DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS files_source ON files (source)",
    """CREATE TABLE IF NOT EXISTS chunks (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,     -- a sequence: ids are never reused
        file_id BIGINT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL, text TEXT NOT NULL, heading TEXT NOT NULL,
        unit TEXT NOT NULL, loc_start INTEGER NOT NULL, loc_end INTEGER NOT NULL,
        tokens TEXT NOT NULL, vector {ext}.vector)""",
    "CREATE INDEX IF NOT EXISTS chunks_file ON chunks (file_id)",
]
