"""glmkit serve --kb: knowledge-base chat through the real openai client (extra_body), streaming and not, with the
sources; the refusal without a model call; uploads (hostile names refused with 400, oversized ones 413, the server
up afterwards), search finding an uploaded file, delete removing it; unknown names 404; /v1/embeddings with a
stand-in embedder. Real HTTP (uvicorn in a thread) on the embedded glm-tiny, small documents from
../shared/corpora/docs."""
from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from conftest import SHARED
from _server_util import running_server
from test_kb import HashEmbedder  # the same stand-in dense model

pytest.importorskip("bm25s", reason="glmkit kb needs bm25s (pip install 'glmkit[kb]')")
pytest.importorskip("jieba", reason="glmkit kb needs jieba (pip install 'glmkit[kb]')")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

from glmkit.kb import KnowledgeBase, answer  # noqa: E402

DOCS = SHARED / "corpora" / "docs"
FILES = ["python-howto-sorting.html", "lxgw-wenkai-readme.md", "zh-man-find.txt"]
MODEL = "glm-tiny"
NOTE = ("# Zorblax manual\n\n## Overview\n\nOverview text.\n\n## Settings\n\n"
        "The zorblax frobnicator reads its settings from\n/etc/zorblax.conf when it starts.\n\n"   # lines 9-10
        "## Other\n\nUnrelated closing words.\n")




@pytest.fixture(scope="module")
def pipe():
    import glmkit
    return glmkit.load()                                   # the embedded glm-tiny


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory):
    if not DOCS.is_dir():
        pytest.skip(f"{DOCS} (the shared documents) is absent")
    path = tmp_path_factory.mktemp("kbs") / "docs"
    with KnowledgeBase.open(path) as kb:
        assert kb.add([str(DOCS / f) for f in FILES], progress=False).skipped == []
    return path


@pytest.fixture(scope="module")
def server(pipe, kb_dir):
    with running_server(pipe=pipe, model_id=MODEL, knowledge_bases=(str(kb_dir),)) as (base, app):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local_kb(kb_dir):
    """The same KB opened here: what the server should retrieve."""
    with KnowledgeBase.open(kb_dir, create=False) as kb:
        yield kb


def _ask(client, question, history=(), **extra):
    msgs = [*history, {"role": "user", "content": question}]
    return client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12,
                                          extra_body={"knowledge_base": "docs", **extra})


def _upload(base, kb, name, data: bytes):
    return httpx.post(f"{base}/v1/knowledge_bases/{kb}/files", files={"file": (name, data)}, timeout=60)


# ------------------------------------------------------------------------------------------------------------

def test_list_knowledge_bases(server):
    data = httpx.get(server + "/v1/knowledge_bases").json()["data"]
    assert [(d["name"], d["files"], d["mode"]) for d in data] == [("docs", 3, "bm25")]
    assert "BM25 only" in data[0]["mode_note"] and data[0]["chunks"] > 0
    files = httpx.get(server + "/v1/knowledge_bases/docs/files").json()["data"]
    assert sorted(f["source"].rsplit("/", 1)[-1] for f in files) == sorted(FILES)
    assert not any(f["uploaded"] for f in files)


def test_kb_chat_cites_the_retrieved_chunks_with_the_langchain_prompt(client, pipe, local_kb):
    q = "How do I sort in descending order?"
    r = _ask(client, q, top_k=2)
    sources = r.model_extra["sources"]
    # the model was given langchain-ChatGLM's prompt, built by glmkit.kb.answer (the same code as `kb ask`) with
    # the chunks that fit the context, and those are the sources, numbered as in the prompt
    ans, messages = answer.prepare(local_kb, q, pipe, None, 2, None, max_tokens=12)
    assert ans.hits and [(s["source"], s["location"], s["text"]) for s in sources] == \
        [(h.source, h.location, h.text) for h in ans.hits]
    assert [s["index"] for s in sources] == list(range(1, len(sources) + 1))
    assert [h.text for h in ans.hits] == [h.text for h in local_kb.search(q, top_k=2)][:len(ans.hits)]
    assert sources[0]["source"].endswith("python-howto-sorting.html") and sources[0]["location"].startswith("lines ")
    assert messages[-1]["content"].startswith("Known information:\n[1] ")
    assert r.usage.prompt_tokens == len(pipe.chat_format.render(messages).ids)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0


def test_kb_chat_streaming_has_the_sources_in_the_last_chunk(client):
    q = "霞鹜文楷的许可证是什么？"
    full = _ask(client, q)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(stream=True, extra_body={"knowledge_base": "docs"}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    with_sources = [i for i, c in enumerate(chunks) if "sources" in (c.model_extra or {})]
    assert with_sources == [len(chunks) - 1] and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["sources"] == full.model_extra["sources"]
    assert full.model_extra["sources"][0]["source"].endswith("lxgw-wenkai-readme.md")


def test_follow_up_is_retrieved_with_the_history(client, pipe, local_kb):
    history = [{"role": "user", "content": "霞鹜文楷是什么？"}, {"role": "assistant", "content": "一款字体。"}]
    r = _ask(client, "它的许可证呢？", history)
    ans, messages = answer.prepare(local_kb, "它的许可证呢？", pipe, history, max_tokens=12)
    assert ans.hits and [s["text"] for s in r.model_extra["sources"]] == [h.text for h in ans.hits]
    assert r.model_extra["sources"][0]["source"].endswith("lxgw-wenkai-readme.md")
    assert messages[:2] == history and r.usage.prompt_tokens == len(pipe.chat_format.render(messages).ids)


def test_nothing_found_is_the_refusal_without_the_model(client, server):
    r = _ask(client, "今天北京的天气怎么样？")
    assert r.choices[0].message.content == answer.REFUSAL_ZH and r.model_extra["sources"] == []
    assert r.usage.total_tokens == 0                                        # no model ran
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"knowledge_base": "docs"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.REFUSAL_EN
    assert [c.model_extra.get("sources") for c in chunks if c.choices][-1] == []
    assert chunks[-1].usage.total_tokens == 0
    r = _ask(client, "How do I sort in descending order?", score_threshold=1.0)     # nothing scores 1
    assert r.choices[0].message.content == answer.REFUSAL_EN


def test_bad_kb_requests_are_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"knowledge_base": "nope"})
    assert e.value.body["code"] == "knowledge_base_not_found" and "'docs'" in e.value.body["message"]
    for kw in ({"score_threshold": 2}, {"top_k": 0}, {"score_threshold": "high"}, {"sample_top_k": -1},
               {"max_tokens": 0}):
        with pytest.raises(openai.BadRequestError):
            _ask(client, "今天北京的天气怎么样？", **kw)          # refused before retrieval, refusal or not
    assert _ask(client, "How do I sort in descending order?", sample_top_k=5, top_k=1).model_extra["sources"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}],
                                       extra_body={"knowledge_base": "docs"})
    for method, path in (("GET", "nope/files"), ("POST", "nope/search"), ("DELETE", "nope/files/x.md"),
                         ("DELETE", "docs/files/not-there.md"), ("GET", "nope")):
        r = httpx.request(method, f"{server}/v1/knowledge_bases/{path}", json={"query": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] in ("knowledge_base_not_found", "file_not_found")
    r = httpx.post(server + "/v1/knowledge_bases/docs/search", json={"top_k": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"
    r = httpx.post(server + "/v1/embeddings", json={"model": "docs", "input": "x"})     # BM25-only KBs
    assert r.status_code == 404 and "no embedding model is configured" in r.json()["error"]["message"]


HOSTILE = ["../../etc/passwd", "..\\x.txt", "/etc/passwd.txt", "C:\\Windows\\x.txt", "C:x.txt", "..", ".hidden.md",
           "a/b.md", "bad\nname.md", "", "tool.exe"]


def test_hostile_file_names_are_refused(server, kb_dir):
    before = sorted(p for p in kb_dir.parent.rglob("*"))
    for name in HOSTILE:
        r = _upload(server, "docs", name, b"hello world\n")
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("invalid_file_name", "invalid_upload"), name
    # the same through RFC 5987's filename*, and one hostile file among good ones: nothing at all is written
    for disposition in (b"filename*=UTF-8''..%2F..%2Fevil.md", b'filename="x.txt\x00.md"', b'filename="/abs.md"'):
        body = b'--B\r\nContent-Disposition: form-data; name="file"; ' + disposition + b'\r\n\r\nx\r\n--B--\r\n'
        r = httpx.post(server + "/v1/knowledge_bases/docs/files", content=body,
                       headers={"content-type": "multipart/form-data; boundary=B"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_name", disposition
    r = httpx.post(server + "/v1/knowledge_bases/docs/files",
                   files=[("file", ("fine.md", b"# ok\n")), ("file", ("../evil.md", b"x"))])
    assert r.status_code == 400
    r = httpx.post(server + "/v1/knowledge_bases/docs/files", content=b"not multipart",
                   headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert sorted(p for p in kb_dir.parent.rglob("*")) == before
    assert len(httpx.get(server + "/v1/knowledge_bases/docs/files").json()["data"]) == 3
    assert httpx.get(server + "/health").status_code == 200


def test_upload_search_chat_cite_and_delete(server, client, kb_dir):
    r = _upload(server, "docs", "zorblax.md", NOTE.encode())
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert item["status"] == "added" and item["name"] == "zorblax.md" and item["chunks"] >= 1
    stored = kb_dir / "files" / "zorblax.md"
    assert stored.read_text() == NOTE and item["source"] == str(stored)
    assert _upload(server, "docs", "zorblax.md", NOTE.encode()).json()["data"][0]["status"] == "unchanged"

    hits = httpx.post(server + "/v1/knowledge_bases/docs/search",
                      json={"query": "zorblax frobnicator settings", "top_k": 2}).json()["data"]
    assert hits[0]["source"] == str(stored) and hits[0]["location"] == "lines 9-10"
    assert hits[0]["heading"] == "Zorblax manual > Settings" and "/etc/zorblax.conf" in hits[0]["text"]
    src = _ask(client, "Where does the zorblax frobnicator read its settings?").model_extra["sources"][0]
    assert (src["index"], src["source"], src["location"]) == (1, str(stored), "lines 9-10")
    listed = httpx.get(server + "/v1/knowledge_bases/docs/files").json()["data"]
    assert [f["name"] for f in listed if f["uploaded"]] == ["zorblax.md"]

    r = httpx.delete(server + "/v1/knowledge_bases/docs/files/zorblax.md")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert not stored.exists()
    assert httpx.post(server + "/v1/knowledge_bases/docs/search",
                      json={"query": "zorblax frobnicator"}).json()["data"] == []
    after = _ask(client, "Where does the zorblax frobnicator read its settings?").model_extra["sources"]
    assert all(s["source"] != str(stored) for s in after)
    assert httpx.delete(server + "/v1/knowledge_bases/docs/files/zorblax.md").status_code == 404


def test_an_ingest_holds_up_neither_searches_nor_chat(server, client):
    """A 2 MB upload is ingested in the KB's writer thread: meanwhile the event loop, the reader (search) and the
    engine (a chat) all answer."""
    import random
    import threading

    rng = random.Random(0)
    words = "alpha beta gamma delta server model token retrieval chunk index".split()
    big = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(6000)).encode()
    done: dict = {}
    th = threading.Thread(target=lambda: done.update(r=_upload(server, "docs", "big.txt", big),
                                                     t=time.monotonic()))
    th.start()
    time.sleep(0.5)
    assert httpx.get(server + "/health", timeout=5).status_code == 200
    hits = httpx.post(server + "/v1/knowledge_bases/docs/search", json={"query": "sort descending"}, timeout=5)
    t_search = time.monotonic()
    assert hits.status_code == 200 and hits.json()["data"]
    assert _ask(client, "How do I sort in descending order?").model_extra["sources"]
    th.join(60)
    assert done["r"].status_code == 200 and done["r"].json()["data"][0]["status"] == "added"
    assert t_search < done["t"], "the search waited for the ingest"
    assert httpx.delete(server + "/v1/knowledge_bases/docs/files/big.txt").status_code == 200


def test_unreadable_upload_is_reported_and_not_kept(server, kb_dir):
    r = _upload(server, "docs", "broken.pdf", b"%PDF-1.4 this is not really a pdf")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unreadable_file"
    assert "broken.pdf" in r.json()["error"]["message"] and not (kb_dir / "files" / "broken.pdf").exists()


# --- a second server: a small upload limit, and a KB with (stand-in) dense vectors -------------------------

@pytest.fixture(scope="module")
def small(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "dense"          # does not exist yet: created empty
    with running_server(pipe=pipe, model_id=MODEL, knowledge_bases=(str(path),), kb_max_upload_bytes=16 << 10,
                        kb_embedder=HashEmbedder()) as (base, app):
        yield base, path


def test_oversized_upload_is_413_and_the_server_stays_up(small):
    base, path = small
    r = _upload(base, "dense", "big.txt", b"x" * (20 << 10))                 # over the limit, under the edge's
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    r = _upload(base, "dense", "huge.txt", b"word " * (60 << 10))            # the body itself refused at the edge
    assert r.status_code == 413 and "--kb-max-upload-mb" in r.json()["error"]["message"]
    assert not (path / "files" / "big.txt").exists() and not (path / "files" / "huge.txt").exists()
    assert httpx.get(base + "/health").status_code == 200
    r = _upload(base, "dense", "ok.txt", "猫喜欢吃鱼。\n\nDogs like bones.\n".encode())
    assert r.status_code == 200 and r.json()["data"][0]["status"] == "added"


def test_embeddings_and_hybrid_kb(small):
    import numpy as np

    base, _ = small
    kb = httpx.get(base + "/v1/knowledge_bases/dense").json()
    assert kb["mode"] == "hybrid" and kb["embedding_model"] == "hash-embedder"
    hits = httpx.post(base + "/v1/knowledge_bases/dense/search", json={"query": "Dogs like bones",
                                                                      "score_threshold": 0}).json()["data"]
    assert hits and "Dogs like bones." in hits[0]["text"] and hits[0]["source"].endswith("ok.txt")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["猫喜欢吃鱼", "Dogs like bones"]
    want = HashEmbedder().encode(texts)
    for model in ("dense", "hash-embedder"):                  # a KB's name, or its embedding model's
        got = client.embeddings.create(model=model, input=texts)
        assert [d.index for d in got.data] == [0, 1]
        assert np.allclose([d.embedding for d in got.data], want, atol=1e-6)
    j = httpx.post(base + "/v1/embeddings", json={"model": "dense", "input": "Dogs like bones",
                                                  "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(j["data"][0]["embedding"]), "<f4"), want[1], atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="other", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="dense", input=[[1, 2, 3]])
    ollama = pytest.importorskip("ollama", reason="the ollama client is a test dependency")
    got = ollama.Client(host=base, timeout=60).embed(model="dense", input=texts)     # ollama's /api/embed
    assert np.allclose(got.embeddings, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "猫喜欢吃什么？"}],
                                                 max_tokens=8, stream=True,
                                                 extra_body={"knowledge_base": "dense", "score_threshold": 0.05}))
    assert json.dumps(chunks[-1].model_extra["sources"], ensure_ascii=False).count("猫喜欢吃鱼") == 1
