"""The built-in web chat page (glmkit/server/web/index.html) in a real browser: Playwright driving Debian's
chromium headless.

- the Markdown renderer and code highlighter, run in the page (`window.glmkitRender`), including that it is safe;
- the page against a canned API (Playwright routes): request payload, SSE parsing, usage in the status line,
  multi-turn history, error display, the API key header;
- the page against the real `glmkit serve` (tiny ChatGLM3 reference model): streamed answer, Stop, Clear,
  screenshots in test-artifacts/.

Skips (with the reason) when playwright, the chromium binary or ../shared are missing."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request

import pytest

from _server_util import serve_process
from conftest import REF, ROOT, needs_shared

PAGE = ROOT / "glmkit" / "server" / "web" / "index.html"
ARTIFACTS = ROOT / "test-artifacts"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
FAKE = "http://glmkit.test"          # origin of the canned-API tests (served by page.route, never resolved)


def _chromium() -> str | None:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    return exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


# ---------------------------------------------------------------------------------------------------------
# no browser needed
# ---------------------------------------------------------------------------------------------------------

def test_page_is_self_contained():
    """One file, works offline: nothing is loaded from another origin (no CDN, fonts, images, imports)."""
    html = PAGE.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", html, re.I)
    assert not re.search(r"@import|\burl\(|<link\b|<script[^>]+\bsrc\b|<iframe|<img\b", html, re.I)
    for el_id in ("prompt", "send", "stop", "clear", "system", "temperature", "top_p", "max_tokens", "messages", "status"):
        assert f'id="{el_id}"' in html, el_id


# ---------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright python package is not installed (pip install playwright)")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium binary on PATH or at /usr/bin/chromium (apt install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-proxy-server"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, locale="zh-CN")
    pg = ctx.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
    try:
        yield pg
    finally:
        ctx.close()


@pytest.fixture
def rendered(page):
    """The page loaded from the canned origin (the renderer does not need a server); returns render(md) -> html."""
    page.route(FAKE + "/**", lambda route: _canned(route, []))
    page.goto(FAKE + "/")
    page.wait_for_function("typeof window.glmkitRender === 'function'")
    yield lambda md: page.evaluate("md => window.glmkitRender(md)", md)
    assert page.js_errors == []


def _canned(route, requests, chat=None, models_status=200):
    """Serve the page, /v1/models and (via `chat(body) -> (status, content_type, text)`) /v1/chat/completions."""
    req, path = route.request, route.request.url[len(FAKE):].split("?")[0]
    if path == "/":
        return route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE.read_bytes())
    requests.append({"path": path, "headers": req.headers, "body": req.post_data})
    if path == "/v1/models":
        if models_status != 200:
            return route.fulfill(status=models_status, content_type="application/json",
                                 body=json.dumps({"error": {"message": "missing API key", "type": "authentication_error",
                                                            "param": None, "code": "missing_api_key"}}))
        return route.fulfill(status=200, content_type="application/json",
                             body=json.dumps({"object": "list", "data": [{"id": "chatglm3-test", "object": "model"}]}))
    if path == "/v1/chat/completions" and chat is not None:
        status, ctype, text = chat(json.loads(req.post_data))
        return route.fulfill(status=status, content_type=ctype, body=text.encode("utf-8"))
    return route.fulfill(status=404, content_type="application/json",
                         body=json.dumps({"error": {"message": f"no route {path}", "type": "invalid_request_error",
                                                    "param": None, "code": "not_found"}}))


# ---------------------------------------------------------------------------------------------------------
# the Markdown renderer and highlighter
# ---------------------------------------------------------------------------------------------------------

def test_markdown_basics(rendered):
    out = rendered("# T\n```python\nx = 1\n```")
    assert "<h1>T</h1>" in out
    pre = re.search(r"<pre>.*?</pre>", out, re.S).group(0)
    assert '<code class="language-python">' in pre and '<span class="tok-num">1</span>' in pre
    assert 'class="copy"' in out                                       # copy button on code blocks

    assert rendered("**b** *i* _j_ ~~s~~ `c<d`") == \
        "<p><strong>b</strong> <em>i</em> <em>j</em> <del>s</del> <code>c&lt;d</code></p>"
    assert rendered("line one\nline two\n\nnext") == "<p>line one<br>line two</p>\n<p>next</p>"
    assert rendered("## 标题\n你好，**世界**！") == "<h2>标题</h2>\n<p>你好，<strong>世界</strong>！</p>"
    assert rendered("snake_case_name and 2 * 3 * 4") == "<p>snake_case_name and 2 * 3 * 4</p>"
    assert rendered("- a\n- b\n  - nested\n\n1. x\n2. y") == \
        "<ul><li>a</li><li>b<ul><li>nested</li></ul></li></ul>\n<ol><li>x</li><li>y</li></ol>"
    assert rendered("3. three\n4. four").startswith('<ol start="3">')
    assert rendered("> quoted\n\n---") == "<blockquote><p>quoted</p></blockquote>\n<hr>"
    table = rendered("| a | b |\n|:--|--:|\n| 1 | **2** |")
    assert "<table>" in table and '<td style="text-align:right"><strong>2</strong></td>' in table
    # an unclosed fence while the answer is still streaming is already a code block
    assert "<pre>" in rendered("Here:\n```js\nconst a = 1;")


def test_markdown_links(rendered):
    out = rendered("[docs](https://example.com/a_b_c?x=1&y=2) and [bad](javascript:alert(1)) and "
                   "[data](data:text/html,hi) see https://a.example/x_y。谢谢")
    hrefs = re.findall(r'href="([^"]*)"', out)
    assert hrefs == ["https://example.com/a_b_c?x=1&amp;y=2", "https://a.example/x_y"]
    assert 'target="_blank"' in out and "noopener" in out
    assert "javascript" not in out and "data:" not in out               # only http(s) links
    assert "<em>" not in out                                           # underscores inside URLs stay literal
    assert "。谢谢" in out                                               # CJK after a bare URL is not part of it


def test_markdown_is_safe(rendered, page):
    evil = ('<script>alert(1)</script> <img src=x onerror="alert(2)"> <iframe src="https://evil"></iframe>\n'
            '[x](https://ok.example/"onmouseover="alert(3)) `<b>` **<i>x</i>**\n'
            '```html\n<script>alert(4)</script>\n```\n# <svg onload=alert(5)>\n- <a href="javascript:alert(6)">a</a>')
    out = rendered(evil)
    assert "<script" not in out and "&lt;script&gt;" in out
    assert not re.search(r"<(img|iframe|svg|i|b)\b", out)
    # parsed into a DOM: only the tags the renderer emits, and no attribute outside the expected ones
    tags, attrs = page.evaluate("""html => {
        const t = document.createElement('template'); t.innerHTML = html;
        const els = [...t.content.querySelectorAll('*')];
        return [[...new Set(els.map(e => e.tagName.toLowerCase()))],
                [...new Set(els.flatMap(e => [...e.attributes].map(a => a.name)))]];
    }""", out)
    assert set(tags) <= {"p", "br", "a", "code", "strong", "em", "div", "span", "button", "pre", "h1", "ul", "li"}
    assert set(attrs) <= {"href", "target", "rel", "class", "type"}
    for href in re.findall(r'href="([^"]*)"', out):
        assert href.startswith("https://") and '"' not in href
    assert "\u0000" not in rendered("a\u0000b `c\u0000` **d**")


@pytest.mark.parametrize("lang,code,expect", [
    ("python", 'def f(x):\n    # add\n    return x + 1.5  # "q"\ns = f"hi {x}"\n@dec\nclass A: pass',
     ['<span class="tok-kw">def</span>', '<span class="tok-fn">f</span>', '<span class="tok-com"># add</span>',
      '<span class="tok-num">1.5</span>', '<span class="tok-str">f&quot;hi {x}&quot;</span>',
      '<span class="tok-meta">@dec</span>', '<span class="tok-kw">class</span> <span class="tok-fn">A</span>']),
    ("js", "const a = `t${1}`; // c\nfunction g() { return null; }",
     ['<span class="tok-kw">const</span>', '<span class="tok-com">// c</span>', '<span class="tok-lit">null</span>',
      '<span class="tok-fn">g</span>', '<span class="tok-str">`t${1}`</span>']),
    ("json", '{"k": "v", "n": -2.5e3, "b": true, "z": null}',
     ['<span class="tok-key">&quot;k&quot;</span>', '<span class="tok-str">&quot;v&quot;</span>',
      '<span class="tok-num">-2.5e3</span>', '<span class="tok-lit">true</span>']),
    ("bash", 'export A=1 # note\necho "$HOME" ${B} --flag\nif [ -f x ]; then ls; fi',
     ['<span class="tok-com"># note</span>', '<span class="tok-var">${B}</span>', '<span class="tok-attr">--flag</span>',
      '<span class="tok-kw">if</span>', '<span class="tok-str">&quot;$HOME&quot;</span>']),
    ("rust", 'fn main() { let s = "x"; /* c */ }',
     ['<span class="tok-kw">fn</span>', '<span class="tok-fn">main</span>', '<span class="tok-com">/* c */</span>']),
])
def test_highlighter(rendered, lang, code, expect):
    out = rendered(f"```{lang}\n{code}\n```")
    for piece in expect:
        assert piece in out, (piece, out)
    # highlighting never changes the text
    assert re.sub(r"<[^>]+>", "", re.search(r"<code[^>]*>(.*)</code>", out, re.S).group(1)) == \
        code.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace("'", "&#39;")


# ---------------------------------------------------------------------------------------------------------
# the page against a canned API
# ---------------------------------------------------------------------------------------------------------

def _sse(*events: str, crlf=False) -> str:
    nl = "\r\n" if crlf else "\n"
    return "".join(f"data: {e}{nl}{nl}" for e in events)


def _chunk(delta=None, finish=None, usage=None):
    c = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "chatglm3-test",
         "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    if usage:
        c["usage"] = usage
    return json.dumps(c, ensure_ascii=False)


def test_page_with_canned_api(page):
    reqs: list = []
    answers = iter([
        lambda b: (200, "text/event-stream", _sse(
            _chunk({"role": "assistant", "content": ""}), _chunk({"content": "## 答"}), _chunk({"content": "案\n\n```py"}),
            _chunk({"content": "thon\nprint('hi')\n```\n"}), ": keep-alive comment",
            _chunk(finish="stop"), _chunk(usage={"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}),
            "[DONE]", crlf=True).replace("data: : keep-alive comment", ": keep-alive comment")),
        lambda b: (400, "application/json", json.dumps({"error": {
            "message": "the prompt has 300 tokens, but the context of this server is 256 tokens", "type":
            "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})),
        lambda b: (200, "text/event-stream", _sse(
            _chunk({"content": "partial"}), json.dumps({"error": {"message": "inference failed", "type": "server_error",
                                                                  "param": None, "code": "inference_error"}}), "[DONE]")),
    ])
    page.context.add_init_script("localStorage.setItem('glmkit.chat.api_key', 'sekrit')")
    page.route(FAKE + "/**", lambda route: _canned(route, reqs, chat=lambda body: next(answers)(body)))
    page.goto(FAKE + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'chatglm3-test'")
    assert reqs[0]["headers"].get("authorization") == "Bearer sekrit"

    page.fill("#system", "你是一个助手")
    page.fill("#temperature", "0.3")
    page.fill("#top_p", "0.5")
    page.fill("#max_tokens", "64")
    page.fill("#prompt", "第一行")
    page.press("#prompt", "Shift+Enter")                     # a new line, not a send
    page.type("#prompt", "第二行")
    assert page.locator(".msg").count() == 0
    page.press("#prompt", "Enter")
    page.wait_for_function("!document.getElementById('send').disabled && document.querySelector('.msg.assistant')")

    body = json.loads([r for r in reqs if r["path"] == "/v1/chat/completions"][0]["body"])
    assert body == {"model": "chatglm3-test", "stream": True, "stream_options": {"include_usage": True},
                    "temperature": 0.3, "top_p": 0.5, "max_tokens": 64,
                    "messages": [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "第一行\n第二行"}]}
    assert page.inner_text(".msg.user") == "第一行\n第二行"
    ans = page.locator(".msg.assistant")
    assert ans.locator("h2").inner_text() == "答案"
    assert ans.locator("pre .tok-bi").first.inner_text() == "print"
    status = page.inner_text("#status")
    assert "5 prompt + 7 completion tokens" in status and "tok/s" in status and "finish: stop" in status, status

    # second turn: the whole conversation is sent; the server's error message is shown, the turn is dropped
    page.fill("#prompt", "再来")
    page.click("#send")
    page.wait_for_selector(".msg.error")
    body2 = json.loads([r for r in reqs if r["path"] == "/v1/chat/completions"][1]["body"])
    assert [m["role"] for m in body2["messages"]] == ["system", "user", "assistant", "user"]
    assert body2["messages"][2]["content"] == "## 答案\n\n```python\nprint('hi')\n```\n"
    assert reqs[-1]["headers"].get("authorization") == "Bearer sekrit"
    assert "context of this server is 256 tokens" in page.inner_text(".msg.error")
    assert page.inner_text("#status").startswith("Error: HTTP 400")
    assert page.input_value("#prompt") == "再来"                     # restored for a retry
    assert page.locator(".msg.user.dropped").count() == 1

    # an error event inside the stream: the partial answer stays, the error is shown under it
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.error').length === 2")
    body3 = json.loads([r for r in reqs if r["path"] == "/v1/chat/completions"][2]["body"])
    assert [m["role"] for m in body3["messages"]] == ["system", "user", "assistant", "user"]   # failed turn not sent
    assert page.locator(".msg.assistant").last.inner_text() == "partial"
    assert "inference failed" in page.locator(".msg.error").last.inner_text()

    page.click("#clear")
    assert page.inner_html("#messages") == ""
    assert page.js_errors == []


def test_page_asks_for_api_key(page):
    reqs: list = []
    page.route(FAKE + "/**", lambda route: _canned(route, reqs, models_status=401))
    page.goto(FAKE + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('401')")
    assert "missing API key" in page.inner_text("#status") and "Set the API key" in page.inner_text("#status")
    assert page.locator("#conn[open]").count() == 1 and page.is_visible("#api_key")     # the key field is opened
    assert page.js_errors == []


# ---------------------------------------------------------------------------------------------------------
# the page against the real server
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    model = REF / "chatglm3-6b"
    if not model.is_dir():
        pytest.skip(f"{model} is absent")
    with serve_process("--model", model, "--parallel", "2", seconds=60) as base:
        yield base


_LAST_ASSISTANT = "(() => { const a = document.querySelectorAll('#messages .msg.assistant'); return a[a.length - 1]; })()"


def _wait(page, condition: str, timeout_ms: int):
    """Wait for `condition` (JS) or for an error message in the page; fail with what the page shows."""
    page.wait_for_function(f"({condition}) || document.querySelector('.msg.error')", timeout=timeout_ms)
    if page.locator(".msg.error").count():
        pytest.fail(f"the page shows an error: {page.locator('.msg.error').last.inner_text()!r} "
                    f"(status: {page.inner_text('#status')!r})")


@needs_shared
def test_chat_with_real_server(server, page):
    with NO_PROXY.open(server + "/", timeout=10) as r:
        assert r.status == 200 and r.headers.get_content_type() == "text/html"
        assert r.read() == PAGE.read_bytes()
    chats: list = []
    page.on("request", lambda rq: chats.append(rq.post_data) if rq.url.endswith("/v1/chat/completions") else None)
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'chatglm3-6b'", timeout=10_000)
    page.fill("#system", "You are a helpful assistant.")
    # the tiny reference model has a 256-token context: keep the turns short enough for three of them
    page.fill("#max_tokens", "64")

    # 1. a streamed answer: record the answer's length on every DOM change, so partial renders are seen
    page.evaluate(f"""() => {{
        window.__lens = [];
        new MutationObserver(() => {{ const a = {_LAST_ASSISTANT}; if (a) window.__lens.push(a.innerText.length); }})
            .observe(document.getElementById('messages'), {{childList: true, subtree: true, characterData: true}});
    }}""")
    page.fill("#prompt", "你好")
    page.press("#prompt", "Enter")
    _wait(page, f"{_LAST_ASSISTANT} && {_LAST_ASSISTANT}.innerText.trim().length > 0", 30_000)
    first = page.evaluate(f"{_LAST_ASSISTANT}.innerText.length")
    _wait(page, "!document.getElementById('send').disabled", 60_000)
    final = page.evaluate(f"{_LAST_ASSISTANT}.innerText.length")
    lens = page.evaluate("window.__lens")
    assert final >= first > 0
    partial = sorted({n for n in lens if 0 < n < final})
    print(f"first answer: {final} chars, partial renders at lengths {partial}")
    assert partial, f"the answer appeared in one piece, not streamed (lengths seen: {lens[:50]})"
    assert page.locator(".msg.user").first.inner_text() == "你好"
    status = page.inner_text("#status")
    assert re.search(r"\d+ prompt \+ \d+ completion tokens", status) and "tok/s" in status, status
    assert page.locator(".msg.assistant.stopped").count() == 0
    assert page.is_disabled("#stop")
    ARTIFACTS.mkdir(exist_ok=True)

    # 2. a long answer stopped while streaming. The tiny model decodes hundreds of tokens a second, so the
    #    browser's network is throttled (DevTools network emulation) to make "while streaming" last long enough.
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": 2000,
                                                  "uploadThroughput": -1})
    page.fill("#max_tokens", "200")
    page.fill("#prompt", "请写一篇很长的文章")
    page.click("#send")
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    _wait(page, f"document.querySelectorAll('.msg.assistant').length === 2 && "
                f"{_LAST_ASSISTANT}.innerText.trim().length > 0", 30_000)
    page.click("#stop")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=5_000)
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    assert page.is_disabled("#stop")
    stopped = page.locator(".msg.assistant").nth(1)
    assert "stopped" in stopped.get_attribute("class")
    kept = stopped.inner_text()
    assert kept.strip(), "the partial answer was not kept"
    assert page.inner_text("#status").startswith("Stopped"), page.inner_text("#status")
    time.sleep(0.5)
    assert stopped.inner_text() == kept                                 # nothing arrives after Stop

    # 3. a third turn carries the whole conversation, the stopped partial answer included
    page.fill("#max_tokens", "8")
    page.fill("#prompt", "继续")
    page.press("#prompt", "Enter")
    _wait(page, "document.querySelectorAll('.msg.assistant').length === 3 && "
                "!document.getElementById('send').disabled", 30_000)
    assert page.locator(".msg.error").count() == 0
    body = json.loads(chats[-1])
    assert body["model"] == "chatglm3-6b" and body["stream"] is True and body["max_tokens"] == 8
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "You are a helpful assistant."
    assert body["messages"][1]["content"] == "你好" and body["messages"][5]["content"] == "继续"
    assert body["messages"][4]["content"].strip()

    page.screenshot(path=str(ARTIFACTS / "web_chat.png"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(ARTIFACTS / "web_chat_dark.png"))
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 390, "height": 800})             # phone: settings become a drawer
    assert page.is_visible("#toggle-settings")
    assert page.locator("#sidebar").bounding_box()["x"] + page.locator("#sidebar").bounding_box()["width"] <= 0
    page.screenshot(path=str(ARTIFACTS / "web_chat_mobile.png"))
    page.click("#toggle-settings")
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().x === 0")
    page.click("#close-settings")
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    page.set_viewport_size({"width": 1280, "height": 800})

    # 4. Clear empties the conversation
    page.click("#clear")
    assert page.inner_html("#messages") == ""
    page.fill("#prompt", "你好")
    page.press("#prompt", "Enter")
    _wait(page, "document.querySelectorAll('.msg.assistant').length === 1 && "
                "!document.getElementById('send').disabled", 30_000)
    assert [m["role"] for m in json.loads(chats[-1])["messages"]] == ["system", "user"]
    assert page.js_errors == []
