"""glmkit kb's PostgreSQL + pgvector store (glmkit/kb/pgstore.py) against a real PostgreSQL 16 server with the
pgvector extension, started by the tests themselves from the `pgserver` wheel (PostgreSQL binaries and
pgvector's vector.so in one PyPI package; Debian's postgresql has no pgvector package here).

  * the Store contract tests run on BOTH backends (parametrized: sqlite, pg): add / replace / unchanged /
    remove, a failure in the middle of a file leaves its old version, generation bumps, a reader on another
    connection never sees half a file, two writers on the same files take turns, vectors round-trip and the
    nearest-neighbour search (pgvector's <=> for pg) agrees with numpy;
  * test_kb.py's knowledge-base tests are run again with the KB directory pointing at PostgreSQL (its
    store.txt written first, so that their own KnowledgeBase.open(dir) calls get the pg store), including the
    real documents of ../shared/corpora/docs and the in-process CLI;
  * `--store` through the CLI: kept in KB/store.txt for later commands; a SIGKILL in the middle of an ingest
    into PostgreSQL leaves whole files only, and searches from this process during that ingest never fail.

Starting the server: pgserver.get_server(DIR) runs initdb + pg_ctl (about 1 s), listening on a Unix socket in
DIR only (no TCP port). As root — as here and on CI — PostgreSQL refuses to run, so pgserver runs it as an
unprivileged system user `pgserver` (made with useradd if absent) and makes every parent folder of DIR, and of
its own binaries in the venv, traversable (o+rx). DIR is therefore a fresh tempfile.mkdtemp() under /tmp, not
pytest's tmp_path (its base is 0700 and pytest tightens it again), removed afterwards. Everything skips with
the reason if psycopg or pgserver is missing or the server cannot start.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg 3 (pip install 'glmkit[pg]')")

import test_kb as base  # noqa: E402  (skips the module, with its reason, without bm25s/jieba)
from glmkit.kb import KBError, KnowledgeBase  # noqa: E402
from glmkit.kb.pgstore import PgStore, schema_name, split_uri, with_schema  # noqa: E402
from glmkit.kb.store import (STORE_FILE, FileRecord, Location, SQLiteStore, StoredChunk,  # noqa: E402
                             StoreError)

DOCS = base.DOCS


# ------------------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    """The URI of a fresh PostgreSQL server with pgvector, for the whole session."""
    with warnings.catch_warnings():               # platformdirs: "XDG_RUNTIME_DIR is not set" on import
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            pytest.skip("the pgserver package (PostgreSQL + pgvector in a wheel) is not installed: "
                        "pip install pgserver")
    root = Path(tempfile.mkdtemp(prefix="glmkit-pg-"))
    try:
        server = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            version = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
    except Exception as e:                       # noqa: BLE001 (any reason: skip with it)
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no PostgreSQL + pgvector server could be started with pgserver: {type(e).__name__}: {e}")
    assert version >= "0.5"
    yield uri
    server.cleanup()
    shutil.rmtree(root, ignore_errors=True)


def _drop(uri: str) -> None:
    conninfo, schema = split_uri(uri)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def pg_uri(pg_server):
    """A store URI with a schema of its own (dropped afterwards)."""
    uri = with_schema(pg_server, "t_" + uuid.uuid4().hex[:12])
    yield uri
    _drop(uri)


@pytest.fixture
def pg_kb_dir(tmp_path, pg_uri):
    """tmp_path/kb, a KB directory whose store is PostgreSQL (KB/store.txt written as `--store` would)."""
    kb = tmp_path / "kb"
    kb.mkdir()
    (kb / STORE_FILE).write_text(pg_uri + "\n")
    yield kb
    assert not (kb / "kb.sqlite").exists(), "the SQLite store was used"


def _sql(uri: str, query: str, args=()):
    conninfo, schema = split_uri(uri)
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f'SET search_path TO "{schema}"')
        return c.execute(query, args).fetchall()


# ------------------------------------------------------------------------------------------------------------
# the Store contract, on both backends
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "pg"])
def new_store(request, tmp_path):
    """-> connect(): another connection to one fresh store, as another process would open it."""
    opened = []
    if request.param == "sqlite":
        def connect():
            opened.append(SQLiteStore(tmp_path / "kb.sqlite"))
            return opened[-1]
    else:
        uri = request.getfixturevalue("pg_uri")

        def connect():
            opened.append(PgStore(uri))
            return opened[-1]
    yield connect
    for s in opened:
        s.close()


def _rec(path: str, sha: str = "h") -> FileRecord:
    return FileRecord(source="src/" + path, path="/abs/" + path, sha256=sha, signature="sig", size=10, chars=5)


def _chunks(texts, tag: str = "", vectors=None) -> list:
    return [StoredChunk(t, ("Top", tag) if tag else (), Location("line", i + 1, i + 2), f"tok{i} {t.lower()}",
                        None if vectors is None else vectors[i]) for i, t in enumerate(texts)]


def test_store_add_replace_unchanged_remove(new_store):
    s = new_store()
    assert s.generation() == 0 and s.files() == [] and s.index_data().ids == []
    s.add_file(_rec("b.md"), _chunks(["Bee one", "Bee two"], "B"))
    s.add_file(_rec("a.md"), _chunks(["Ant"]))
    assert s.generation() == 2
    assert [f.source for f in s.files()] == ["src/a.md", "src/b.md"]
    rec = s.file_record("/abs/b.md")
    assert (rec.source, rec.sha256, rec.signature, rec.size, rec.chars, rec.chunks) == ("src/b.md", "h", "sig", 10,
                                                                                          5, 2)
    assert rec.added > 0 and s.file_record("src/b.md") == rec and s.file_record("nope") is None
    assert s.file_hash("/abs/a.md") == "h"
    got = list(s.iter_chunks())
    assert [(c.source, c.seq, c.text, c.heading, str(c.location), c.tokens) for c in got] == [
        ("src/b.md", 0, "Bee one", ("Top", "B"), "lines 1-2", "tok0 bee one"),
        ("src/b.md", 1, "Bee two", ("Top", "B"), "lines 2-3", "tok1 bee two"),
        ("src/a.md", 0, "Ant", (), "lines 1-2", "tok0 ant")]
    ids = [c.id for c in got]
    assert ids == sorted(ids) and s.index_data().ids == ids
    assert [c.text for c in s.chunks([ids[2], 10 ** 9, ids[0]])] == ["Ant", "Bee one"]     # order given, gone left out

    other = new_store()                                  # another connection sees the same, committed
    assert other.generation() == 2 and [c.id for c in other.iter_chunks()] == ids

    s.add_file(_rec("b.md", "h2"), _chunks(["Bee new"], "B"))                             # replaced
    assert s.generation() == 3 and s.file_record("/abs/b.md").sha256 == "h2"
    assert s.chunks(ids[:2]) == []                                                       # old ids: nothing
    new = [c for c in s.iter_chunks() if c.source == "src/b.md"]
    assert [c.text for c in new] == ["Bee new"] and new[0].id > max(ids)                # ids never reused
    assert len(s.files()) == 2 and s.file_record("/abs/b.md").chunks == 1

    assert s.remove_file("/abs/a.md") is True and s.generation() == 4
    assert s.remove_file("/abs/a.md") is False and s.generation() == 4                   # nothing: no bump
    assert [f.source for f in other.files()] == ["src/b.md"] and other.chunks([ids[2]]) == []
    s.add_file(_rec("empty.md"), [])
    assert s.file_record("/abs/empty.md").chunks == 0 and s.generation() == 5


class Unstorable:
    """Not text: the database refuses it half-way through a file's chunks."""


def test_store_failure_mid_file_leaves_the_old_version(new_store):
    s = new_store()
    s.add_file(_rec("a.md"), _chunks(["old one", "old two"]))
    before = [(c.id, c.text) for c in s.iter_chunks()]
    gen = s.generation()
    bad = _chunks(["new one", "new two", "new three"])
    bad[2].text = Unstorable()
    with pytest.raises((sqlite3.Error, psycopg.Error)):
        s.add_file(_rec("a.md", "h2"), bad)
    for view in (s, new_store()):
        assert [(c.id, c.text) for c in view.iter_chunks()] == before
        assert view.file_record("/abs/a.md").sha256 == "h" and view.generation() == gen
    s.add_file(_rec("a.md", "h3"), _chunks(["fine"]))                   # the store still works afterwards
    assert [c.text for c in s.iter_chunks()] == ["fine"] and s.generation() == gen + 1
    assert min(c.id for c in s.iter_chunks()) > max(i for i, _ in before)


def test_store_generation_and_settings(new_store):
    s = new_store()
    s.set_settings({"chunk_size": 300, "embedding_model": "/m"})
    assert s.settings() == {"chunk_size": "300", "embedding_model": "/m"} and s.generation() == 1
    s.set_settings({"embedding_model": None})
    assert s.settings() == {"chunk_size": "300"} and s.generation() == 2
    with pytest.raises(StoreError):
        s.set_settings({"schema": "2"})
    assert s.generation() == 2
    s.close()
    again = new_store()                                                 # persisted
    assert again.settings() == {"chunk_size": "300"} and again.generation() == 2
    again.add_file(_rec("a.md"), _chunks(["x"]))
    data = again.index_data()
    assert data.generation == again.generation() == 3 and data.vectors is None


def test_store_concurrent_reader_never_sees_half_a_file(new_store):
    """A writer on one connection adds and replaces files of 25 chunks; a reader on another connection reads
    snapshots meanwhile: every file it sees is whole and of one version, and the generation matches."""
    writer, reader = new_store(), new_store()
    n_files, per_file = 12, 25
    errors, done = [], threading.Event()
    read_taken = threading.Event()     # the writer waits (up to 5 s) for one snapshot after each file it adds, so
                                       # reads surely fall between and during the writes on any machine's speed

    def write():
        try:
            for version in range(3):
                for k in range(n_files):
                    texts = [f"f{k} v{version} part {j}" for j in range(per_file)]
                    writer.add_file(_rec(f"f{k}.md", f"v{version}"), _chunks(texts))
                    read_taken.wait(5)
                    read_taken.clear()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            done.set()

    t = threading.Thread(target=write)
    t.start()
    seen, snapshots = set(), 0
    try:
        while not done.is_set() or snapshots < 3:
            data = reader.index_data()
            files: dict = {}
            for tok in data.tokens:                       # "tok{j} f{k} v{version} part {j}"
                _, f, v, *_ = tok.split()
                files.setdefault(f, []).append(v)
            for f, versions in files.items():
                assert len(versions) == per_file and len(set(versions)) == 1, (f, versions)
            assert data.generation >= len(files)
            chunks = list(reader.iter_chunks())
            assert all(sum(1 for c in chunks if c.source == src) == per_file for src in {c.source for c in chunks})
            seen.add(data.generation)
            snapshots += 1
            read_taken.set()
    finally:
        t.join()
    assert errors == []
    assert reader.generation() == 3 * n_files and len(reader.files()) == n_files
    assert len(seen) >= 2, seen                       # the reads really ran during the writes


def test_store_two_writers_on_the_same_files_take_turns(new_store):
    """Two connections replacing the same files at once: each add is whole, none fails, none is lost."""
    a, b = new_store(), new_store()
    errors = []

    def write(store, who):
        try:
            for round_ in range(15):
                for k in range(3):
                    store.add_file(_rec(f"f{k}.md", f"{who}{round_}"),
                                   _chunks([f"{who} {round_} {j}" for j in range(8)]))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=write, args=(s, w)) for s, w in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    check = new_store()
    assert check.generation() == 2 * 15 * 3
    files = check.files()
    assert len(files) == 3
    chunks = list(check.iter_chunks())
    for f in files:
        mine = [c.text for c in chunks if c.source == f.source]
        who, round_ = f.sha256[0], f.sha256[1:]
        assert mine == [f"{who} {round_} {j}" for j in range(8)] and f.chunks == 8


def test_store_vectors_round_trip_and_nearest_neighbours(new_store):
    import numpy as np

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((40, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    s = new_store()
    blobs = [v.tobytes() for v in vecs]
    s.add_file(_rec("a.md"), _chunks([f"a{i}" for i in range(20)], vectors=blobs[:20]))
    s.add_file(_rec("b.md"), _chunks([f"b{i}" for i in range(20)], vectors=blobs[20:]))
    s.add_file(_rec("plain.md"), _chunks(["no vector"]))                               # BM25-only chunk
    s.add_file(_rec("other.md"), _chunks(["other model"], vectors=[np.ones(8, np.float32).tobytes()]))
    data = s.index_data(with_vectors=True)
    assert data.vectors[:40] == blobs and data.vectors[40] is None and len(data.vectors[41]) == 32   # bit-exact
    assert [c.vector for c in s.iter_chunks()][:40] == blobs
    assert s.chunks([data.ids[3]])[0].vector == blobs[3]

    q = vecs[7] * 0.8 + vecs[30] * 0.2
    q = (q / np.linalg.norm(q)).astype(np.float32)
    got = s.nearest(q.tobytes(), k=5)
    cos = vecs @ q
    want = np.argsort(-cos)[:5]
    assert [i for i, _ in got] == [data.ids[j] for j in want]
    assert np.allclose([c for _, c in got], cos[want], atol=1e-5)
    assert got[0][0] == data.ids[7] and got[0][1] > got[1][1]
    assert [i for i, _ in s.nearest(np.ones(8, np.float32).tobytes(), k=3)] == [data.ids[41]]     # same dim only
    s.remove_file("/abs/a.md")
    assert {i for i, _ in s.nearest(q.tobytes(), k=40)} == set(data.ids[20:40])


def test_pg_store_layout_names_and_errors(pg_server, tmp_path):
    assert schema_name("docs") == "kb_docs"
    assert schema_name("my-kb").startswith("kb_my_kb_") and schema_name("my-kb") != schema_name("my_kb_")
    assert schema_name("知识库").startswith("kb_") and len(schema_name("x" * 300)) <= 63
    s = PgStore(pg_server, kb_name="My KB")
    try:
        assert s.schema == schema_name("My KB") and split_uri(s.uri) == (pg_server, s.schema)
        assert "schema " + s.schema in s.describe() and s.cache_tag.startswith("pg-")
        s.add_file(_rec("x.md"), _chunks(["NUL\x00 dropped"]))            # PostgreSQL text holds no U+0000
        assert [c.text for c in s.iter_chunks()] == ["NUL dropped"]
        tables = {r[0] for r in _sql(s.uri, "SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = %s", (s.schema,))}
        assert tables == {"meta", "state", "files", "chunks"}
        col = _sql(s.uri, "SELECT udt_name FROM information_schema.columns WHERE table_schema = %s AND "
                          "table_name = 'chunks' AND column_name = 'vector'", (s.schema,))
        assert col == [("vector",)]                                       # a pgvector column
    finally:
        s.drop()
        s.close()
    with pytest.raises(StoreError, match="no knowledge base"):
        PgStore(with_schema(pg_server, "absent_kb"), create=False)
    bad = pg_server.replace("/postgres?", "/no_such_db?")
    with pytest.raises(StoreError, match="cannot connect"):
        PgStore(bad)


def test_pg_store_reconnects_after_the_server_drops_it(pg_uri):
    s = PgStore(pg_uri)
    try:
        s.add_file(_rec("a.md"), _chunks(["one"]))
        pid = s.conn.info.backend_pid
        _sql(pg_uri, "SELECT pg_terminate_backend(%s)", (pid,))           # a server restart, an idle timeout...
        assert s.generation() == 1 and s.conn.info.backend_pid != pid     # the next call runs on a new connection
        s.add_file(_rec("b.md"), _chunks(["two"]))
        assert [f.source for f in s.files()] == ["src/a.md", "src/b.md"] and s.generation() == 2
    finally:
        s.close()


def test_pg_store_without_pgvector_says_what_to_do(pg_server):
    """A database without the extension and a role that may not create it: an error naming the fix."""
    conninfo, _ = split_uri(pg_server)
    name = "novec_" + uuid.uuid4().hex[:8]
    with psycopg.connect(conninfo, autocommit=True) as c:
        c.execute(f"CREATE ROLE {name} LOGIN")
        c.execute(f"CREATE DATABASE {name} OWNER {name}")
    try:
        uri = conninfo.replace("postgresql://postgres:@/postgres?", f"postgresql://{name}@/{name}?")
        with pytest.raises(StoreError, match="pgvector extension is not installed.*CREATE EXTENSION vector"):
            PgStore(uri)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as c:
            c.execute(f"DROP DATABASE {name}")
            c.execute(f"DROP ROLE {name}")


# ------------------------------------------------------------------------------------------------------------
# test_kb.py's knowledge-base tests, with the KB in PostgreSQL
# ------------------------------------------------------------------------------------------------------------

def _is_pg(kb_dir: Path) -> None:
    with KnowledgeBase.open(kb_dir, create=False) as kb:
        assert isinstance(kb.store, PgStore)


def test_pg_changed_replaced_unchanged_skipped_removed(pg_kb_dir):
    base.test_changed_replaced_unchanged_skipped_removed(pg_kb_dir.parent)
    _is_pg(pg_kb_dir)


def test_pg_every_bad_file_kind_is_reported_and_skipped(pg_kb_dir):
    base.test_every_bad_file_kind_is_reported_and_skipped(pg_kb_dir.parent)
    _is_pg(pg_kb_dir)


def test_pg_json_and_jsonl_records(pg_kb_dir):
    base.test_json_and_jsonl_records(pg_kb_dir.parent)


def test_pg_hybrid_mode_fuses_and_keeps_the_scale(pg_kb_dir):
    base.test_hybrid_mode_fuses_and_keeps_the_scale(pg_kb_dir.parent)       # the vectors go through pgvector
    _is_pg(pg_kb_dir)


def test_pg_cli_list_remove_and_errors(pg_kb_dir, capsys):
    base.test_cli_list_remove_and_errors(pg_kb_dir.parent, capsys)
    _is_pg(pg_kb_dir)


@pytest.fixture(scope="module")
def pg_docs_kb(pg_server, tmp_path_factory):
    """The shared documents, added once into a PostgreSQL KB (what test_kb.py's docs_kb is for SQLite)."""
    if not DOCS.is_dir():
        pytest.skip(f"{DOCS} is absent")
    uri = with_schema(pg_server, "docs_" + uuid.uuid4().hex[:8])
    kb = KnowledgeBase.open(tmp_path_factory.mktemp("pgdocs") / "kb", store=uri)
    report = kb.add([str(DOCS)], progress=False)
    assert report.skipped == [] and report.added == len(list(DOCS.iterdir()))
    kb.build_index()
    yield kb
    kb.close()
    _drop(uri)


@base.needs_docs
@pytest.mark.parametrize("suffix,unit", [(".md", "line"), (".txt", "line"), (".html", "line"),
                                         (".docx", "paragraph"), (".pdf", "page")])
def test_pg_each_file_type_ingested(pg_docs_kb, suffix, unit):
    base.test_each_file_type_ingested(pg_docs_kb, suffix, unit)


@base.needs_docs
def test_pg_docs_search_and_answers(pg_docs_kb):
    assert isinstance(pg_docs_kb.store, PgStore)
    base.test_pdf_chunks_have_pages_and_chinese_text_is_intact(pg_docs_kb)
    base.test_headings_from_html_markdown_and_docx(pg_docs_kb)
    base.test_scores_are_on_one_scale_and_the_threshold_filters(pg_docs_kb)
    base.test_unanswerable_question_gets_the_refusal_without_a_model_call(pg_docs_kb)
    base.test_ask_builds_the_langchain_prompt_fits_it_and_cites(pg_docs_kb)
    hits = pg_docs_kb.search("如何设置 ibus 输入法？", top_k=3)
    assert hits and hits[0].source.endswith("debian-reference-zh-i18n.txt")


@base.needs_docs
def test_pg_and_sqlite_give_the_same_chunks_and_hits(pg_uri, tmp_path):
    files = [DOCS / n for n in ("python-howto-sorting.html", "lxgw-wenkai-readme.md", "zh-man-find.txt")]
    kbs = [KnowledgeBase.open(tmp_path / "sqlite"), KnowledgeBase.open(tmp_path / "pg", store=pg_uri)]
    assert isinstance(kbs[0].store, SQLiteStore) and isinstance(kbs[1].store, PgStore)
    for kb in kbs:
        kb.add([str(f) for f in files], progress=False)

    def chunks(kb):
        return [(c.source, c.seq, c.text, c.heading, c.location, c.tokens) for c in kb.store.iter_chunks()]
    assert chunks(kbs[0]) == chunks(kbs[1]) and len(chunks(kbs[0])) > 20
    for q in ("sort descending reverse", "霞鹜文楷 授权", "find -name 查找文件", "key function lambda"):
        a, b = ([(h.source, h.location, h.text, round(h.score, 6)) for h in kb.search(q, top_k=5, score_threshold=0)]
                for kb in kbs)
        assert a == b and a, q


# ------------------------------------------------------------------------------------------------------------
# --store: kept for later commands; the KB shared by two directories; SIGKILL mid-ingest; searches meanwhile
# ------------------------------------------------------------------------------------------------------------

def test_store_option_is_kept_and_a_second_directory_shares_the_kb(pg_server, tmp_path, capsys):
    from glmkit.cli.main import main

    uri = pg_server.replace("postgresql://postgres:@", "postgresql://postgres:s3cret@")   # trust auth: ignored
    (tmp_path / "a.md").write_text("# T\n\nThe okapi lives in the rainforest.\n", encoding="utf-8")
    mine = tmp_path / "alice-kb"
    assert main(["kb", "add", str(mine), str(tmp_path / "a.md"), "-q", "--store", uri]) == 0
    assert "1 added" in capsys.readouterr().out
    kept = (mine / STORE_FILE).read_text().strip()
    schema = schema_name("alice-kb")
    assert kept == with_schema(uri, schema) and (mine / STORE_FILE).stat().st_mode & 0o077 == 0
    assert not (mine / "kb.sqlite").exists()
    try:
        assert main(["kb", "list", str(mine), "--json"]) == 0                     # no --store: store.txt
        listed = json.loads(capsys.readouterr().out)
        assert [f["source"] for f in listed["files"]] == [str(tmp_path / "a.md")]
        assert listed["store"].startswith("PostgreSQL ") and "s3cret" not in listed["store"]
        assert schema in listed["store"]

        theirs = tmp_path / "bob"                        # a teammate: another directory, the same KB (schema)
        assert main(["kb", "search", str(theirs), "okapi", "--json", "--store", kept]) == 0
        assert json.loads(capsys.readouterr().out)[0]["source"] == str(tmp_path / "a.md")
        (tmp_path / "b.md").write_text("长颈鹿生活在非洲草原。\n", encoding="utf-8")
        assert main(["kb", "add", str(theirs), str(tmp_path / "b.md"), "-q"]) == 0
        capsys.readouterr()
        with KnowledgeBase.open(mine, create=False) as kb:                        # alice sees bob's file
            assert kb.search("长颈鹿", score_threshold=0)[0].source == str(tmp_path / "b.md")
            assert len(kb.files()) == 2
        renamed = tmp_path / "renamed"
        mine.rename(renamed)                             # the schema is in store.txt: still the same KB
        with KnowledgeBase.open(renamed, create=False, store=uri) as kb:
            assert kb.store.schema == schema and len(kb.files()) == 2

        # errors: no KB in that schema (and no directory made); a SQLite KB directory cannot be moved
        with pytest.raises(KBError, match="no knowledge base"):
            KnowledgeBase.open(tmp_path / "nobody", create=False, store=pg_server)
        assert not (tmp_path / "nobody").exists()
        KnowledgeBase.open(tmp_path / "local").close()
        with pytest.raises(KBError, match="SQLite"):
            KnowledgeBase.open(tmp_path / "local", store=uri)
        assert main(["kb", "list", str(tmp_path / "x"), "--store", "mysql://nope"]) == 1
        assert "postgresql://" in capsys.readouterr().err
    finally:
        _drop(kept)


def _whole_files(uri: str) -> dict:
    """{source: chunks}, in one statement (one snapshot), asserting that every file's chunks are all there."""
    rows = _sql(uri, "SELECT f.source, f.chunks, COUNT(c.id), (SELECT COUNT(*) FROM chunks WHERE file_id NOT IN "
                     "(SELECT id FROM files)) FROM files f LEFT JOIN chunks c ON c.file_id = f.id GROUP BY f.id")
    assert all(r[3] == 0 for r in rows)
    assert all(want == got for _, want, got, _ in rows), [r for r in rows if r[1] != r[2]]
    return {s: n for s, n, _, _ in rows}


def test_pg_sigkill_mid_ingest_and_searches_meanwhile(pg_uri, tmp_path):
    """`glmkit kb add KB corpus` (no --store: KB/store.txt) into PostgreSQL in another process; this one searches
    and checks for half files meanwhile, then SIGKILLs it: whole files only, and the next add completes."""
    corpus, kbdir = tmp_path / "corpus", tmp_path / "kb"
    n = 150
    base._make_corpus(corpus, n)
    kb = KnowledgeBase.open(kbdir, store=pg_uri)
    assert kb.add([str(corpus / "doc0000.txt")], progress=False).added == 1
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "kb", "add", str(kbdir), str(corpus), "-q"],
                            env=base.ENV, cwd=base.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    searches, generations, errors, i = 0, set(), [], 0
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            i += 1
            try:
                hits = kb.search(f"docmark{i % 20}", top_k=3, score_threshold=0)
                assert all(h.source.endswith(f"doc{i % 20:04d}.txt") for h in hits), hits
                searches += 1
                generations.add(kb.store.generation())
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {e}")
            if len(_whole_files(pg_uri)) >= n // 3:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, ("the ingest ended before it was killed", proc.stderr.read()[-2000:])
    assert errors == [] and searches >= 3 and len(generations) >= 2, (errors, searches, generations)
    have = _whole_files(pg_uri)
    assert 0 < len(have) < n
    kb.close()

    kb = KnowledgeBase.open(kbdir, create=False)            # store.txt -> the same PostgreSQL KB
    assert isinstance(kb.store, PgStore)
    r = kb.add([str(corpus)], progress=False)
    assert r.unchanged == len(have) and r.added == n - len(have) and not r.skipped
    assert len(_whole_files(pg_uri)) == n
    assert kb.search(f"docmark{n - 1}", top_k=1)[0].source == str(corpus / f"doc{n - 1:04d}.txt")
    kb.close()
    assert not (kbdir / "kb.sqlite").exists() and os.listdir(kbdir / "index") == [kb.store.cache_tag]
