"""The web chat's knowledge-base panel in Chromium (Playwright, Debian's /usr/bin/chromium, as tests/test_web.py):

- against a canned API: the selector lists the KBs, the request carries "knowledge_base", the sources of the last
  chunk are shown numbered, [n] in the answer opens source n, a source expands to its chunk text;
- against the real `glmkit serve --kb DIR` (subprocess, the embedded glm-tiny): upload a file through the upload
  box, select the KB, ask, see the uploaded file cited with its lines and its chunk, the refusal's note, remove
  the file. Screenshot in test-artifacts/web_chat_kb.png.

Skips (with the reason) when playwright, the chromium binary or ../shared/corpora/docs are missing."""
from __future__ import annotations

import json

import pytest

from conftest import SHARED
from _server_util import serve_process
from test_web import ARTIFACTS, FAKE, PAGE, _sse
from test_web import browser, page  # noqa: F401  (pytest fixtures, used by name)

DOCS = SHARED / "corpora" / "docs"
NOTE = ("# Zorblax manual\n\n## Overview\n\nOverview text.\n\n## Settings\n\n"
        "The zorblax frobnicator reads its settings from\n/etc/zorblax.conf when it starts.\n\n"   # lines 9-10
        "## Other\n\nUnrelated closing words.\n")
SOURCES = [{"index": 1, "source": "/kb/files/guide.md", "location": "lines 3-5", "heading": "Guide > Install",
            "text": "Run make install <as root>.", "score": 0.61, "page": None},
           {"index": 2, "source": "/kb/manual.pdf", "location": "page 7", "heading": "", "text": "第七页的内容。",
            "score": 0.3, "page": 7}]


def _json(route, obj, status=200):
    return route.fulfill(status=status, content_type="application/json", body=json.dumps(obj, ensure_ascii=False))


def _canned(route, bodies):
    path = route.request.url[len(FAKE):].split("?")[0]
    if path == "/":
        return route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE.read_bytes())
    if path == "/v1/models":
        return _json(route, {"object": "list", "data": [{"id": "glm-test", "object": "model"}]})
    if path == "/v1/knowledge_bases":
        return _json(route, {"object": "list", "data": [
            {"object": "knowledge_base", "name": "guides", "files": 2, "chunks": 9, "mode": "bm25",
             "mode_note": "BM25 only", "embedding_model": None}]})
    if path == "/v1/knowledge_bases/guides/files":
        return _json(route, {"object": "list", "data": [
            {"name": "guide.md", "source": "/kb/files/guide.md", "uploaded": True, "chunks": 4},
            {"name": "/kb/manual.pdf", "source": "/kb/manual.pdf", "uploaded": False, "chunks": 5}]})
    if path == "/v1/chat/completions":
        bodies.append(json.loads(route.request.post_data))
        c = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "glm-test"}
        return route.fulfill(status=200, content_type="text/event-stream", body=_sse(
            json.dumps({**c, "choices": [{"index": 0, "delta": {"content": "先看 [1]，再看 [2]"}, "finish_reason": None}]}),
            json.dumps({**c, "choices": [{"index": 0, "delta": {"content": "；[3] 不存在。"}, "finish_reason": None}]}),
            json.dumps({**c, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "sources": SOURCES},
                       ensure_ascii=False),
            "[DONE]"))
    return _json(route, {"error": {"message": f"no route {path}", "type": "invalid_request_error", "param": None,
                                   "code": "not_found"}}, 404)


def test_kb_panel_with_canned_api(page):  # noqa: F811 (the fixture)
    bodies: list = []
    page.route(FAKE + "/**", lambda route: _canned(route, bodies))
    page.goto(FAKE + "/")
    page.wait_for_function("document.querySelectorAll('#kb option').length === 2")
    assert page.is_visible("#kb_panel") and not page.is_visible("#kb_tools")      # no KB chosen: plain chat
    page.select_option("#kb", "guides")
    page.wait_for_function("document.querySelectorAll('#kb_files li').length === 2")
    assert page.inner_text("#kb_files li >> nth=0").startswith("guide.md")
    page.fill("#prompt", "怎么安装？")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".msg.assistant details.source")
    assert bodies[0]["knowledge_base"] == "guides" and bodies[0]["messages"][-1]["content"] == "怎么安装？"
    ans = page.locator(".msg.assistant").last
    sums = ans.locator("details.source > summary")
    assert [sums.nth(i).inner_text() for i in range(2)] == ["[1] guide.md, lines 3-5", "[2] manual.pdf, page 7"]
    assert ans.locator("a.cite").count() == 2                        # [1] and [2] link; [3] is no source
    assert not ans.locator("details.source").nth(1).evaluate("d => d.open")
    ans.locator("a.cite").nth(1).click()                             # [2] in the answer opens source 2
    assert ans.locator("details.source").nth(1).evaluate("d => d.open")
    assert ans.locator(".src-text").nth(1).inner_text() == "第七页的内容。"
    sums.nth(0).click()                                              # a source expands to its chunk (escaped)
    assert ans.locator(".src-text").nth(0).inner_text() == "Run make install <as root>."
    assert "Guide > Install" in ans.locator(".src-meta").nth(0).inner_text()
    assert "2 sources from guides" in page.inner_text("#status")
    # plain chat again: no knowledge_base in the request
    page.select_option("#kb", "")
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 2 && "
                           "!document.getElementById('send').disabled")
    assert "knowledge_base" not in bodies[1]
    assert page.js_errors == []


# ---------------------------------------------------------------------------------------------------------
# the real server
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kb_server(tmp_path_factory):
    if not DOCS.is_dir():
        pytest.skip(f"{DOCS} (the shared documents) is absent")
    pytest.importorskip("bm25s", reason="glmkit kb needs bm25s (pip install 'glmkit[kb]')")
    from glmkit.kb import KnowledgeBase

    kb_dir = tmp_path_factory.mktemp("web") / "docs"
    with KnowledgeBase.open(kb_dir) as kb:
        kb.add([str(DOCS / "python-howto-sorting.html")], progress=False)
    log = kb_dir.parent / "serve.log"                          # no --model: the embedded glm-tiny
    with serve_process("--kb", kb_dir, "--parallel", "2", seconds=60, log_path=log) as base:
        assert "knowledge base 'docs'" in log.read_text()
        yield base, kb_dir


def _answered(page, n: int, timeout_ms: int = 30_000):  # noqa: F811
    page.wait_for_function(f"(document.querySelectorAll('#messages .msg.assistant').length === {n} && "
                           "!document.getElementById('send').disabled) || document.querySelector('.msg.error')",
                           timeout=timeout_ms)
    if page.locator(".msg.error").count():
        pytest.fail(f"the page shows an error: {page.locator('.msg.error').last.inner_text()!r}")


def test_upload_select_ask_and_see_the_sources(kb_server, page):  # noqa: F811 (the fixture)
    base, kb_dir = kb_server
    page.goto(base + "/")
    page.wait_for_function("document.querySelectorAll('#kb option').length === 2", timeout=10_000)
    page.select_option("#kb", "docs")
    page.wait_for_function("document.querySelectorAll('#kb_files li').length === 1")
    page.fill("#max_tokens", "12")

    # upload through the upload box
    page.set_input_files("#kb_upload", files=[{"name": "zorblax.md", "mimeType": "text/markdown",
                                              "buffer": NOTE.encode()}])
    page.wait_for_function("document.querySelectorAll('#kb_files li').length === 2", timeout=20_000)
    assert "zorblax.md: added" in page.inner_text("#kb_status")
    assert (kb_dir / "files" / "zorblax.md").read_text() == NOTE

    # ask: the uploaded file is cited first, with its lines, and expands to its chunk
    page.fill("#prompt", "Where does the zorblax frobnicator read its settings?")
    page.press("#prompt", "Enter")
    _answered(page, 1)
    ans = page.locator(".msg.assistant").last
    first = ans.locator("details.source").first
    assert first.locator("summary").inner_text() == "[1] zorblax.md, lines 9-10"
    first.locator("summary").click()
    assert "/etc/zorblax.conf" in first.locator(".src-text").inner_text()
    assert str(kb_dir / "files" / "zorblax.md") in first.locator(".src-meta").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_chat_kb.png"), full_page=True)

    # a new chat (a follow-up would be retrieved with the question before it) with nothing in the KB: the fixed
    # refusal, and the page says no source matched
    page.click("#clear")
    page.fill("#prompt", "今天北京的天气怎么样？")
    page.press("#prompt", "Enter")
    _answered(page, 1)
    last = page.locator(".msg.assistant").last
    assert last.inner_text().startswith("根据已知信息无法回答该问题。") and last.locator(".sources.none").count() == 1

    # remove the uploaded file with its button (confirmed)
    page.once("dialog", lambda d: d.accept())
    page.locator("#kb_files li", has_text="zorblax.md").locator(".kb-remove").click()
    page.wait_for_function("document.querySelectorAll('#kb_files li').length === 1", timeout=10_000)
    assert not (kb_dir / "files" / "zorblax.md").exists()
    assert page.js_errors == []
