"""glmkit kb: every file type read from the real documents in ../shared/corpora/docs, splitting, the content-hash
bookkeeping (unchanged skipped, changed replaced, removed gone), a SIGKILL in the middle of an ingest, searches
from another process during an ingest, bad files reported and skipped, the score scale, the refusal without a
model call, and the `glmkit kb` CLI's JSON."""
from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, SHARED

pytest.importorskip("bm25s", reason="glmkit kb needs bm25s (pip install 'glmkit[kb]')")
pytest.importorskip("jieba", reason="glmkit kb needs jieba (pip install 'glmkit[kb]')")

from glmkit.kb import KnowledgeBase, answer, retrieve  # noqa: E402
from glmkit.kb.readers import Block, read_file  # noqa: E402
from glmkit.kb.split import normalize, split_blocks  # noqa: E402

DOCS = SHARED / "corpora" / "docs"
needs_docs = pytest.mark.skipif(not DOCS.is_dir(), reason=f"{DOCS} (the real md/txt/html/docx/pdf documents) is "
                                                          "absent")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def glmkit_cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def docs_kb(tmp_path_factory):
    """A KB of all the shared documents, added once for the module (by their path as given)."""
    if not DOCS.is_dir():
        pytest.skip(f"{DOCS} is absent")
    path = tmp_path_factory.mktemp("docs") / "kb"
    kb = KnowledgeBase.open(path)
    report = kb.add([str(DOCS)], progress=False)
    assert report.skipped == [] and report.added == len([f for f in DOCS.iterdir()])
    kb.build_index()
    yield kb
    kb.close()


def chunks_of(kb, name: str) -> list:
    return [c for c in kb.store.iter_chunks() if c.source.endswith("/" + name)]


# ------------------------------------------------------------------------------------------------------------
# reading every file type
# ------------------------------------------------------------------------------------------------------------

@needs_docs
@pytest.mark.parametrize("suffix,unit", [(".md", "line"), (".txt", "line"), (".html", "line"),
                                         (".docx", "paragraph"), (".pdf", "page")])
def test_each_file_type_ingested(docs_kb, suffix, unit):
    names = sorted(f.name for f in DOCS.iterdir() if f.suffix == suffix)
    assert names
    for name in names:
        chunks = chunks_of(docs_kb, name)
        assert len(chunks) >= 3, name
        assert {c.location.unit for c in chunks} == {unit}, name
        assert all(c.text.strip() and "\ufffd" not in c.text for c in chunks), name
        assert all(c.location.start <= c.location.end for c in chunks)
        if suffix in (".md", ".html", ".docx"):
            assert sum(bool(c.heading) for c in chunks) >= len(chunks) // 2, f"{name}: headings lost"
    rec = next(f for f in docs_kb.files() if f.source.endswith(names[0]))
    assert rec.source == str(DOCS / names[0]) and rec.chunks == len(chunks_of(docs_kb, names[0]))


@needs_docs
def test_pdf_chunks_have_pages_and_chinese_text_is_intact(docs_kb):
    chunks = chunks_of(docs_kb, "maint-guide-zh-start.pdf")
    assert {c.location.unit for c in chunks} == {"page"} and max(c.location.end for c in chunks) == 12
    text = "\n".join(c.text for c in chunks)
    assert "只有当别人欣赏和感激你的贡献时，它才有真正的价值。" in text
    assert "如果你的软件包对其他人有用" in text           # a sentence wrapped across two PDF lines, re-joined
    assert "Debian 新维护者手册 2 / 57" not in text       # the running header of every page
    hits = docs_kb.search("别人欣赏和感激你的贡献", top_k=1)
    assert hits[0].source.endswith("maint-guide-zh-start.pdf")
    assert hits[0].location in ("page 2", "pages 1-2", "pages 2-3") and hits[0].page == int(hits[0].location[-1]) - \
        (hits[0].location != "page 2")                    # the sentence is on page 2 of the file
    en = chunks_of(docs_kb, "debian-faq-en-choosing.pdf")
    assert any("full system breakage" in c.text for c in en)


@needs_docs
def test_headings_from_html_markdown_and_docx(docs_kb):
    def headings(name):
        return {" > ".join(c.heading) for c in chunks_of(docs_kb, name)}
    assert "Sorting HOW TO > Ascending and Descending" in headings("python-howto-sorting.html")
    assert any(h.endswith("授权信息") or "授权信息 >" in h for h in headings("lxgw-wenkai-readme.md"))
    assert any("Concepts" in h for h in headings("python-howto-argparse.docx"))
    assert any("3.1. 设置 quilt" in h for h in headings("maint-guide-zh-modify.docx"))
    html = "\n".join(c.text for c in chunks_of(docs_kb, "python-howto-sorting.html"))
    assert "function(" not in html and "{" not in html.split("sorted(")[0]       # no script or style text


def test_html_reader_drops_script_and_style(tmp_path):
    page = ("<html><head><title>T</title><style>.x { color: red }</style></head><body>\n"
            "<script>var secret = 42;</script>\n<h1>Guide</h1>\n<h2>Install</h2>\n<p>Run the installer.\n"
            "Then reboot.</p>\n<pre>  x = 1\n  y = 2</pre>\n<table><tr><td>a</td><td>b</td></tr></table>\n"
            "</body></html>")
    doc = read_file(tmp_path / "p.html", page.encode())
    texts = [b.text for b in doc.blocks]
    assert texts == ["Run the installer. Then reboot.", "  x = 1\n  y = 2", "a | b"]
    assert doc.blocks[0].heading == ("Guide", "Install") and (doc.blocks[0].start, doc.blocks[0].end) == (5, 6)
    assert doc.blocks[1].code


def test_json_and_jsonl_records(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "第一条记录。"}\nnot json\n{"content": "second record"}\n', encoding="utf-8")
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"title": "静夜思", "paragraphs": ["床前明月光，", "疑是地上霜。"]},
                              {"instruction": "Say hi", "output": "hi"}], ensure_ascii=False), encoding="utf-8")
    kb = KnowledgeBase.open(tmp_path / "kb")
    report = kb.add([jl, js], progress=False)
    assert report.added == 2 and report.skipped == []
    assert report.warnings == [(str(jl), "line 2: not JSON (Expecting value), skipped")]
    locs = {c.text.split("\n")[0]: str(c.location) for c in kb.store.iter_chunks()}
    assert locs["第一条记录。"] == "line 1" and locs["second record"] == "line 3" and locs["静夜思"] == "record 1"


# ------------------------------------------------------------------------------------------------------------
# normalising and splitting
# ------------------------------------------------------------------------------------------------------------

def test_normalize_nfkc_keeps_chinese_punctuation_and_code():
    assert normalize("Ｐｙｔｈｏｎ　３，很好！ ﬁle\u200b  x") == "Python 3，很好！ file x"
    code = "s = 'ﬁ²'\t# ½\r\n    indented  "
    assert normalize(code, code=True) == "s = 'ﬁ²'\t# ½\n    indented"


def test_split_chinese_aware_with_overlap_and_line_ranges():
    sents = [f"这是第{i}句话，讲的是第{i}件事。" for i in range(40)]
    text = "".join(sents[:20]) + "\n" + "".join(sents[20:])          # two lines of one paragraph
    blocks = [Block("Intro line. Second sentence! Third?", ("A",), "line", 1, 1),
              Block(text, ("A", "B"), "line", 3, 4)]
    chunks = split_blocks(blocks, chunk_size=100, chunk_overlap=20)
    assert chunks[0].text == "Intro line. Second sentence! Third?" and chunks[0].heading == ("A",)
    body = chunks[1:]
    assert all(len(c.text) <= 100 and c.heading == ("A", "B") for c in body)
    assert all(c.text.endswith("。") for c in body)                  # cut at sentence ends only
    for a, b in zip(body, body[1:]):                                   # each starts with the last sentence before
        assert b.text.startswith(a.text.rsplit("。", 2)[-2] + "。") or b.text.split("\n")[0] in a.text
    assert (body[0].start, body[-1].end) == (3, 4) and body[0].end == 3
    joined = "".join(c.text.replace("\n", "") for c in body)
    assert all(s in joined for s in sents)
    assert split_blocks([Block("x" * 250, (), "page", 2, 2)], 100, 0)[2].text == "x" * 50     # hard cut


def test_tokenize_chinese_and_english():
    toks = retrieve.tokenize("如何安装Debian软件包？The files' paths: path.join()")
    assert {"安装", "debian", "软件", "软件包", "file", "path", "join", "path.join"} <= set(toks)
    assert "如何" not in toks and "the" not in toks
    assert "键盘" in retrieve.tokenize("对多语言键\n盘输入")            # hard-wrapped Chinese lines joined


# ------------------------------------------------------------------------------------------------------------
# content hashes: unchanged skipped, changed replaced, removed gone
# ------------------------------------------------------------------------------------------------------------

def test_changed_replaced_unchanged_skipped_removed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Alpha\n\nThe zebra lives in the savanna.\n", encoding="utf-8")
    (docs / "b.txt").write_text("长颈鹿生活在非洲草原。\n", encoding="utf-8")
    kb = KnowledgeBase.open(tmp_path / "kb")
    r = kb.add([str(docs)], progress=False)
    assert (r.added, r.replaced, r.unchanged, r.chunks) == (2, 0, 0, 2)
    ids = sorted(c.id for c in kb.store.iter_chunks())
    gen = kb.store.generation()

    r = kb.add([str(docs)], progress=False)
    assert (r.added, r.replaced, r.unchanged, r.chunks) == (0, 0, 2, 0)
    assert sorted(c.id for c in kb.store.iter_chunks()) == ids and kb.store.generation() == gen

    (docs / "a.md").write_text("# Alpha\n\nThe okapi lives in the rainforest.\n", encoding="utf-8")
    r = kb.add([str(docs)], progress=False)
    assert (r.added, r.replaced, r.unchanged) == (0, 1, 1)
    assert kb.search("zebra savanna", score_threshold=0) == []
    hit = kb.search("okapi", score_threshold=0)[0]
    assert hit.source == str(docs / "a.md") and hit.heading == "Alpha" and hit.location == "line 3"
    assert len([c for c in kb.store.iter_chunks() if c.source.endswith("a.md")]) == 1

    r = kb.add([str(docs)], chunk_size=200, progress=False)                 # new settings: chunks redone
    assert r.replaced == 2 and kb.settings["chunk_size"] == 200
    assert KnowledgeBase.open(tmp_path / "kb", create=False).settings["chunk_size"] == 200

    assert kb.remove([str(docs / "a.md")]) == [str(docs / "a.md")]
    assert [f.source for f in kb.files()] == [str(docs / "b.txt")]
    assert kb.search("okapi", score_threshold=0) == [] and kb.search("长颈鹿", score_threshold=0)
    (docs / "b.txt").unlink()                                               # gone from the folder: removed
    r = kb.add([str(docs)], progress=False)
    assert (r.removed, r.added) == (1, 1) and [f.source for f in kb.files()] == [str(docs / "a.md")]
    assert kb.search("长颈鹿", score_threshold=0) == []


# ------------------------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------------------------

def _pdf_bytes(encrypt: bool) -> bytes:
    import pypdf
    w = pypdf.PdfWriter()
    w.add_blank_page(200, 200)
    if encrypt:
        w.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def test_every_bad_file_kind_is_reported_and_skipped(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = d / "good.md"
    good.write_text("The batch goes on after bad files.\n", encoding="utf-8")
    bad = {"encrypted.pdf": (_pdf_bytes(True), "encrypted PDF"),
           "broken.pdf": (_pdf_bytes(False)[:150], "broken PDF"),
           "binary.txt": (bytes(range(256)) * 8, "binary file"),
           "image.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "unsupported file type .png"),
           "empty.md": (b"", "empty file"),
           "broken.docx": (b"PK\x03\x04 not really a zip", "broken DOCX"),
           "bad.json": (b"{oops", "not JSON")}
    for name, (data, _) in bad.items():
        (d / name).write_bytes(data)
    kb = KnowledgeBase.open(tmp_path / "kb")
    r = kb.add([str(d), str(tmp_path / "missing.md")], progress=False)
    reasons = dict(r.skipped)
    assert r.added == 1 and [f.source for f in kb.files()] == [str(good)]
    for name, (_, why) in bad.items():
        assert why in reasons[str(d / name)], (name, reasons)
    assert reasons[str(tmp_path / "missing.md")] == "no such file or folder"
    assert len(r.skipped) == len(bad) + 1


# ------------------------------------------------------------------------------------------------------------
# crash safety and concurrent readers
# ------------------------------------------------------------------------------------------------------------

def _make_corpus(folder: Path, n_files: int, paragraphs: int = 30) -> None:
    rng = random.Random(0)
    words = ["系统", "软件包", "安装", "配置", "网络", "用户", "文件", "服务", "kernel", "package", "install", "config"]
    folder.mkdir()
    for i in range(n_files):
        paras = [f"文档{i}的第{k}段。docmark{i} " + "，".join(rng.choice(words) for _ in range(40)) + "。"
                 for k in range(paragraphs)]
        (folder / f"doc{i:04d}.txt").write_text("\n\n".join(paras) + "\n", encoding="utf-8")


def _whole_files(db_path: Path) -> dict:
    """{source: chunks} read in one snapshot, asserting every file's chunks are all there."""
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT f.source, f.chunks, COUNT(c.id) FROM files f LEFT JOIN chunks c ON c.file_id = f.id "
                      "GROUP BY f.id").fetchall()
    orphans = db.execute("SELECT COUNT(*) FROM chunks WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
    db.close()
    assert orphans == 0
    assert all(want == got for _, want, got in rows), [r for r in rows if r[1] != r[2]]
    return {s: n for s, n, _ in rows}


def _files_in(db_path: Path) -> int:
    try:
        db = sqlite3.connect(db_path, timeout=5)
        n = db.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        db.close()
        return n
    except sqlite3.OperationalError:          # not created yet
        return 0


def test_sigkill_mid_ingest_leaves_whole_files_and_the_next_add_completes(tmp_path):
    corpus, kbdir = tmp_path / "corpus", tmp_path / "kb"
    n = 150
    _make_corpus(corpus, n)
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "kb", "add", str(kbdir), str(corpus), "-q"],
                            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while _files_in(kbdir / "kb.sqlite") < n // 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest ended before it was killed: make the corpus larger"
    have = _whole_files(kbdir / "kb.sqlite")
    assert 0 < len(have) < n

    kb = KnowledgeBase.open(kbdir, create=False)
    expect = {str(corpus / f"doc{i:04d}.txt") for i in range(n)}
    for f in kb.files():                         # each file's chunks are exactly what splitting it gives
        want = split_blocks(read_file(f.path).blocks, kb.settings["chunk_size"], kb.settings["chunk_overlap"])
        assert f.chunks == len(want) and f.source in expect
    r = kb.add([str(corpus)], progress=False)
    assert r.unchanged == len(have) and r.added == n - len(have) and not r.skipped
    assert len(_whole_files(kbdir / "kb.sqlite")) == n
    assert kb.search(f"docmark{n - 1}", top_k=1)[0].source == str(corpus / f"doc{n - 1:04d}.txt")


SEARCHER = r"""
import json, sqlite3, sys, time
from glmkit.kb import KnowledgeBase
kb_dir, stop, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kb = KnowledgeBase.open(kb_dir, create=False)
out = {"searches": 0, "errors": [], "wrong": [], "half": [], "generations": set()}
import os
i = 0
while not os.path.exists(stop) or out["searches"] < 5:
    i += 1
    try:
        fresh = KnowledgeBase.open(kb_dir, create=False) if i % 3 == 0 else kb     # a new process's first search too
        hits = fresh.search(f"docmark{i % n}", top_k=3, score_threshold=0)
        out["searches"] += 1
        out["generations"].add(kb.store.generation())
        out["wrong"] += [h.source for h in hits if not h.source.endswith(f"doc{i % n:04d}.txt")][:1]
        db = sqlite3.connect(kb_dir + "/kb.sqlite", timeout=30)
        db.execute("BEGIN")
        rows = db.execute("SELECT f.source, f.chunks, COUNT(c.id) FROM files f LEFT JOIN chunks c "
                          "ON c.file_id = f.id GROUP BY f.id").fetchall()
        db.execute("COMMIT")
        db.close()
        out["half"] += [r[0] for r in rows if r[1] != r[2]]
        if fresh is not kb:
            fresh.close()
    except Exception as e:
        out["errors"].append(f"{type(e).__name__}: {e}")
print(json.dumps({**out, "generations": len(out["generations"])}))
"""


def test_searches_from_another_process_during_an_ingest_never_fail(tmp_path):
    corpus, kbdir, stop = tmp_path / "corpus", tmp_path / "kb", tmp_path / "stop"
    n = 80
    _make_corpus(corpus, n, paragraphs=20)
    kb = KnowledgeBase.open(kbdir)
    assert kb.add([str(corpus / "doc0000.txt")], progress=False).added == 1
    searcher = subprocess.Popen([sys.executable, "-c", SEARCHER, str(kbdir), str(stop), str(n)], env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        r = glmkit_cli("kb", "add", kbdir, corpus, "-q", timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        stop.touch()
        out, err = searcher.communicate(timeout=120)
    assert searcher.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["errors"] == [] and got["wrong"] == [] and got["half"] == []
    assert got["searches"] >= 5 and got["generations"] >= 2, got      # the searches ran while files were added


# ------------------------------------------------------------------------------------------------------------
# scores and answering
# ------------------------------------------------------------------------------------------------------------

@needs_docs
def test_scores_are_on_one_scale_and_the_threshold_filters(docs_kb):
    hits = docs_kb.search("How do I sort a list in descending order?", top_k=10, score_threshold=0)
    assert hits[0].source.endswith("python-howto-sorting.html")
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    cut = docs_kb.search("How do I sort a list in descending order?", top_k=10, score_threshold=scores[3])
    assert [h.chunk_id for h in cut] == [h.chunk_id for h in hits if h.score >= scores[3]]
    assert docs_kb.search("What is the capital of France?", score_threshold=0) == []
    assert docs_kb.search("今天天气怎么样？") == []
    with pytest.raises(ValueError):
        docs_kb.search("x", score_threshold=2)


class HashEmbedder:
    """A stand-in dense model: normalised bag of lower-cased character bigrams hashed into 64 dimensions."""
    name = "hash-embedder"

    def encode(self, texts):
        import zlib

        import numpy as np
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            t = t.lower()
            for a, b in zip(t, t[1:]):
                out[i, zlib.crc32((a + b).encode()) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_hybrid_mode_fuses_and_keeps_the_scale(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for i, text in enumerate(["猫喜欢吃鱼。", "狗喜欢啃骨头。", "Cats like fish.", "Dogs like bones."]):
        (d / f"{i}.txt").write_text(text + "\n", encoding="utf-8")
    kb = KnowledgeBase.open(tmp_path / "kb", embedder=HashEmbedder())
    kb.add([str(d)], progress=False)
    assert kb.mode == "hybrid"
    assert all(c.vector is not None and len(c.vector) == 64 * 4 for c in kb.store.iter_chunks())
    hits = kb.search("猫喜欢吃什么鱼", top_k=4, score_threshold=0)
    assert hits[0].source.endswith("0.txt") and all(0 < h.score <= 1 for h in hits)
    assert all(h.score >= 0.5 for h in kb.search("猫喜欢吃什么鱼", top_k=4, score_threshold=0.5))
    plain = KnowledgeBase.open(tmp_path / "kb", create=False)          # no model given: BM25 only, and says so
    assert plain.mode == "bm25" and "BM25 only" in plain.mode_note
    assert plain.search("Kats lik fsh", score_threshold=0) == []        # no word in common
    kb = KnowledgeBase.open(tmp_path / "kb", embedder=HashEmbedder())   # over the BM25-only process's cache
    dense = kb.search("Kats lik fsh", top_k=1, score_threshold=0)
    assert dense and dense[0].source.endswith("2.txt") and 0 < dense[0].score <= 1


class NoModel:
    """A pipe that must not be used."""
    def __getattr__(self, name):
        raise AssertionError(f"the model was called ({name}) for an unanswerable question")


@needs_docs
def test_unanswerable_question_gets_the_refusal_without_a_model_call(docs_kb):
    a = answer.ask(docs_kb, "今天北京的天气怎么样？", NoModel())
    assert a.text == "根据已知信息无法回答该问题。" and not a.found and a.hits == []
    run = answer.ask(docs_kb, "What is the capital of France?", NoModel(), stream=True)
    assert "".join(run) == "The knowledge base has no answer to that." and run.answer.found is False
    assert a.to_json() == {"answer": "根据已知信息无法回答该问题。", "found": False, "sources": []}


class FakeRun:
    def __init__(self, text):
        self.response = text

    def __iter__(self):
        return iter([self.response[:2], self.response[2:]])


class RecordingPipe:
    """The part of Pipeline that ask() uses: one token per character, a 600-token prompt budget."""
    class tokenizer:
        @staticmethod
        def encode(s):
            return list(s)

    def __init__(self):
        self.calls = []

    def sampling_params(self, **kw):
        return kw

    def prompt_budget(self, params):
        return 600

    def start_chat(self, messages, **kw):
        self.calls.append((messages, kw))
        return FakeRun("答案在这里。")


@needs_docs
def test_ask_builds_the_langchain_prompt_fits_it_and_cites(docs_kb):
    pipe = RecordingPipe()
    run = answer.ask(docs_kb, "如何设置 ibus 输入法？", pipe, stream=True, max_new_tokens=8)
    text = "".join(run)
    (messages, kw), = pipe.calls
    prompt = messages[-1]["content"]
    assert kw == {"max_new_tokens": 8} and len(messages) == 1
    assert prompt.startswith("已知信息：\n[1] ") and prompt.endswith("答案请使用中文。 问题是：如何设置 ibus 输入法？")
    assert "根据上述已知信息，简洁和专业的来回答用户的问题。" in prompt and len(prompt) <= 600 - answer.PROMPT_MARGIN
    ans = run.answer
    assert ans.found and ans.text == "答案在这里。" and 1 <= len(ans.hits) <= 3
    assert all(f"[{i}] " in prompt for i in range(1, len(ans.hits) + 1))
    assert text == "答案在这里。\n\n来源：\n" + "\n".join(f"[{i}] {h.source}, {h.location}"
                                                  for i, h in enumerate(ans.hits, 1))
    assert all(h.source.endswith("debian-reference-zh-i18n.txt") for h in ans.hits)

    en = answer.ask(docs_kb, "How do I sort in descending order?", pipe)
    assert pipe.calls[-1][0][-1]["content"].startswith("Known information:\n[1] ")
    assert en.full_text.split("\n\n")[-1].startswith("Sources:\n[1] ")

    history = [{"role": "user", "content": "如何设置 ibus 输入法？"}, {"role": "assistant", "content": "见文档。"}]
    answer.ask(docs_kb, "需要重新登录吗？", pipe, history=history)
    messages = pipe.calls[-1][0]
    assert messages[:2] == history and "需要重新登录吗？" in messages[-1]["content"]
    assert "输入" in messages[-1]["content"]           # retrieved with the previous question too


# ------------------------------------------------------------------------------------------------------------
# the CLI
# ------------------------------------------------------------------------------------------------------------

@needs_docs
def test_cli_add_search_json_and_ask_json(tmp_path):
    """Through the real command line: `python -m glmkit kb ...` in a subprocess."""
    kbdir = tmp_path / "kb"
    src = [DOCS / "python-howto-sorting.html", DOCS / "lxgw-wenkai-readme.md"]
    r = glmkit_cli("kb", "add", kbdir, *src)
    assert r.returncode == 0, r.stderr
    assert "2 added" in r.stdout and "BM25 only" in r.stderr

    r = glmkit_cli("kb", "search", kbdir, "sort descending reverse", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 2 and {"source", "location", "text", "score"} <= set(hits[0])
    assert hits[0]["source"] == str(src[0]) and re.fullmatch(r"lines? \d+(-\d+)?", hits[0]["location"])
    assert hits[0]["score"] >= hits[1]["score"] > 0 and "reverse" in hits[0]["text"]

    r = glmkit_cli("kb", "ask", kbdir, "今天北京的天气怎么样？", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"answer": "根据已知信息无法回答该问题。", "found": False, "sources": []}
    assert "glm-tiny" not in r.stderr                    # refused before any model was loaded

    r = glmkit_cli("kb", "ask", kbdir, "霞鹜文楷的授权许可是什么？", "--json", "-n", "8", "-t", "0", timeout=240)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert set(got) == {"answer", "found", "sources"} and got["found"] is True and isinstance(got["answer"], str)
    assert got["sources"] and all(s["source"] == str(src[1]) for s in got["sources"])
    assert {"source", "location", "text", "score"} <= set(got["sources"][0])


def test_cli_list_remove_and_errors(tmp_path, capsys):
    """The same CLI functions in this process (each subprocess pays for glmkit's start-up)."""
    from glmkit.cli.main import main

    (tmp_path / "a.md").write_text("# T\n\nThe okapi lives in the rainforest.\n", encoding="utf-8")
    kbdir = tmp_path / "kb"
    assert main(["kb", "add", str(kbdir), str(tmp_path / "a.md"), str(tmp_path / "nope.pdf"), "-q"]) == 0
    out = capsys.readouterr()
    assert "1 added" in out.out and f"skipped {tmp_path / 'nope.pdf'}: no such file or folder" in out.err
    assert main(["kb", "list", str(kbdir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [f["source"] for f in listed["files"]] == [str(tmp_path / "a.md")]
    assert listed["settings"]["chunk_size"] == 400 and listed["settings"]["embedding_model"] is None
    assert main(["kb", "remove", str(kbdir), str(tmp_path / "a.md")]) == 0
    assert f"removed {tmp_path / 'a.md'}" in capsys.readouterr().out
    assert main(["kb", "remove", str(kbdir), str(tmp_path / "a.md")]) == 1
    assert main(["kb", "search", str(kbdir), "okapi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["kb", "search", str(tmp_path / "nowhere"), "x"]) == 1
    assert "no knowledge base" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------------------
# the fast segmenter; `glmkit kb` without torch
# ------------------------------------------------------------------------------------------------------------

@needs_docs
def test_rjieba_segments_word_for_word_as_jieba(docs_kb):
    """retrieve.py uses rjieba (jieba-rs) when it is installed: the stored tokens must be jieba's exactly, so a KB
    built with one and searched with the other finds the same chunks."""
    rjieba = pytest.importorskip("rjieba", reason="rjieba (the fast segmenter) is not installed")
    import unicodedata

    import jieba
    jieba.initialize()
    run = re.compile(f"[{retrieve._CJK_CHARS}]{{2,}}")
    runs = set()
    for c in docs_kb.store.iter_chunks():
        runs.update(run.findall(unicodedata.normalize("NFKC", c.text).lower()))
    runs.update(["中华人民共和国成立了", "研究生命的起源", "結婚的和尚未結婚的", "𠀀𠀁中文㐀字"])
    assert len(runs) > 1000
    assert [r for r in sorted(runs) if rjieba.cut_for_search(r, False) != list(jieba.dt.cut_for_search(r, HMM=False))
            ] == []


def test_tokenize_is_the_same_with_either_segmenter(monkeypatch):
    pytest.importorskip("rjieba", reason="rjieba (the fast segmenter) is not installed")
    texts = ["如何安装Debian软件包？The files' paths: path.join()", "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
             "对多语言键\n盘输入的支持", "ＡＢＣ　全角，和 ﬁle 连字"]
    monkeypatch.delenv("GLMKIT_KB_SEGMENTER", raising=False)
    monkeypatch.setattr(retrieve, "_segment", None)
    monkeypatch.setattr(retrieve, "_CJK_CACHE", {})
    fast = [retrieve.tokenize(t) for t in texts]
    assert retrieve.SEGMENTER == "rjieba"
    monkeypatch.setenv("GLMKIT_KB_SEGMENTER", "jieba")
    monkeypatch.setattr(retrieve, "_segment", None)
    monkeypatch.setattr(retrieve, "_CJK_CACHE", {})
    assert [retrieve.tokenize(t) for t in texts] == fast and retrieve.SEGMENTER == "jieba"
    assert [retrieve.tokenize(t) for t in texts] == fast                      # from the caches: the same again


NO_TORCH_PROBE = """
import json, runpy, sys
sys.argv = ["glmkit", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("glmkit", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "imported": [m for m in ("torch", "glmkit.checkpoint") if m in sys.modules]}),
      file=sys.stderr)
"""


def test_cli_kb_search_does_not_import_torch(tmp_path):
    """`glmkit kb search` (and its errors) never load a model, so they must not pay for importing torch."""
    (tmp_path / "a.txt").write_text("猫喜欢吃鱼。\n\nThe okapi lives in the rainforest.\n", encoding="utf-8")
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        kb.add([str(tmp_path / "a.txt")], progress=False)

    def probe(*args):
        r = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *map(str, args)], capture_output=True, text=True,
                           env=ENV, cwd=ROOT, timeout=120)
        return r, json.loads(r.stderr.strip().splitlines()[-1])

    r, got = probe("kb", "search", tmp_path / "kb", "okapi", "--json")
    assert got == {"code": 0, "imported": []}, r.stderr
    assert json.loads(r.stdout)[0]["text"].startswith("猫喜欢吃鱼")
    r, got = probe("kb", "search", tmp_path / "nowhere", "okapi")
    assert got == {"code": 1, "imported": []} and "error" not in r.stdout
    assert "no knowledge base" in r.stderr
