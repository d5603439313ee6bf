"""The embedded glm-tiny: shipped in the package within its limits, and the default of load(), chat, infill and
serve when no model is named (no download, no ../shared needed)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from _server_util import wait_healthy

from glmkit.models import DEFAULT_MODEL, embedded_model_path

GLMKIT = [sys.executable, "-m", "glmkit"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
CJK = re.compile(r"^[\u3400-\u9fff]+$")

TINY = embedded_model_path()
pytestmark = pytest.mark.skipif(TINY is None, reason="this checkout does not carry glmkit/models/glm-tiny")


@pytest.fixture(scope="module")
def pipe():
    import glmkit

    return glmkit.load()


def test_shipped_within_limits_with_a_model_card():
    from glmkit.checkpoint import read_config
    from glmkit.config import ModelConfig

    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "ice_text.model", "tokenizer_config.json",
            "README.md"} <= set(files)
    assert sum(files.values()) <= 40 * 2 ** 20
    cfg = ModelConfig.from_dict(read_config(TINY))
    assert cfg.num_params() <= 30_000_000
    # the ChatGLM-6B architecture: prefix attention, 2D rotary, alpha-scaled residual
    assert cfg.family == "chatglm" and cfg.prefix_lm and cfg.rope_2d and cfg.glm_residual
    card = (TINY / "README.md").read_text(encoding="utf-8")
    for must in ("validation loss", "unigram", "exact", "character", "cannot"):
        assert must in card.lower(), must


def test_load_without_a_path_is_glm_tiny(pipe):
    assert pipe.path == TINY
    assert pipe.tokenizer.vocab_size <= pipe.model.config.vocab_size
    # its own tokenizer follows ChatGLM-6B's conventions
    ids = pipe.tokenizer.encode("床前明月光，[MASK]。")
    assert ids[-1] == pipe.tokenizer.special["<sop>"] and pipe.tokenizer.special["[MASK]"] in ids


def test_infill_fills_a_poem_line_with_chinese_characters(pipe):
    text = "靜夜思\n床前明月光，[MASK]。\n舉頭望明月，低頭思故鄉。"
    out = pipe.infill(text)
    assert out.startswith("靜夜思\n床前明月光，") and out.endswith("。\n舉頭望明月，低頭思故鄉。")
    assert len(out.spans) == 1 and CJK.match(out.spans[0]), out.spans


def test_chat_without_model_in_a_terminal():
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(GLMKIT[0], GLMKIT[1:] + ["chat", "-n", "24", "--seed", "1"], env=ENV,
                          encoding="utf-8", timeout=60)
    try:
        child.expect(f"using the embedded {DEFAULT_MODEL}")
        child.expect("user> ")
        child.sendline("你好")
        child.expect("ChatGLM-6B> ")
        child.expect("user> ")
        answer = child.before.strip()
        assert answer, "no answer"
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


def test_infill_command_without_model():
    r = subprocess.run(GLMKIT + ["infill", "床前明月光，[MASK]。舉頭望明月，低頭思故鄉。"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("床前明月光，") and out.endswith("。舉頭望明月，低頭思故鄉。") and "[MASK]" not in out


def test_serve_without_model_answers_openai_requests():
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(GLMKIT + ["serve", "--port", str(port)], env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, p, seconds=60)
        models = httpx.get(base + "/v1/models").json()
        assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL]
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 16})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] > 0
    finally:
        p.terminate()
        p.wait(10)


def test_generation_config_is_read(pipe):
    d = json.loads((TINY / "generation_config.json").read_text())
    assert pipe.defaults["temperature"] == d["temperature"]
