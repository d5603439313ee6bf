"""The command line as a user drives it: `glmkit chat` in a pseudo-terminal (streamed answer, history,
/clear, /exit, Ctrl-D), `glmkit generate`, --help everywhere, and the guidance when no model is given."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REF, needs_shared

pexpect = pytest.importorskip("pexpect", reason="pexpect (a test dependency) is not installed")

GLMKIT = [sys.executable, "-m", "glmkit"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def run(*args, **kw):
    return subprocess.run(GLMKIT + list(args), capture_output=True, text=True, env=ENV, timeout=120, **kw)


@pytest.mark.parametrize("cmd", [[], ["chat"], ["generate"]])
def test_help_has_examples(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and "glmkit" in r.stdout


def test_no_model_explains_where_weights_come_from(monkeypatch, capsys):
    """Without --model the embedded glm-tiny runs; an installation without it explains where weights come from."""
    import argparse

    import glmkit.models
    from glmkit.cli import common

    monkeypatch.setattr(glmkit.models, "embedded_model_path", lambda name="glm-tiny": None)
    args = argparse.Namespace(model=None, threads=None, dtype=None, device="cpu", ctx=None, quantize=None)
    with pytest.raises(SystemExit) as e:
        common.load_pipeline(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "THUDM/chatglm3-6b" in err and "huggingface" in err.lower()


@needs_shared
def test_generate_command_with_stop():
    full = run("generate", "--model", str(REF / "chatglm3-6b"), "--prompt", "你好", "-t", "0", "-n", "20")
    assert full.returncode == 0, full.stderr
    text = full.stdout.rstrip("\n")
    assert len(text) > 6
    stop = text[3:6]
    cut = run("generate", "--model", str(REF / "chatglm3-6b"), "--prompt", "你好", "-t", "0", "-n", "20",
              "--stop", stop, "--verbose")
    assert cut.stdout.rstrip("\n") == text[:text.find(stop)]
    assert "| stop]" in cut.stderr


@needs_shared
def test_bad_model_folder_is_a_clear_error(tmp_path):
    r = run("chat", "--model", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


STATS = re.compile(r"\[prompt (\d+) tok(?: \((\d+) cached\))? \| answer (\d+) tok")


@needs_shared
def test_chat_session_in_a_terminal():
    child = pexpect.spawn(GLMKIT[0], GLMKIT[1:] + ["chat", "--model", str(REF / "chatglm3-6b"), "-n", "60",
                                                    "--seed", "1", "--verbose", "--threads", "1"],
                          env=ENV, encoding="utf-8", timeout=60)
    try:
        child.expect("user> ")

        # turn 1: the answer streams (arrives in several reads spread over time), then the stats line
        child.sendline("你好")
        child.expect("ChatGLM3-6B> ")
        chunks, t0 = [], time.monotonic()
        buf = ""
        while not STATS.search(buf):
            try:
                got = child.read_nonblocking(size=64, timeout=30)
            except pexpect.TIMEOUT:
                break
            chunks.append((time.monotonic() - t0, got))
            buf += got
        m = STATS.search(buf)
        assert m, buf
        p1, n1 = int(m.group(1)), int(m.group(3))
        answer = buf[:buf.find("\n")]
        assert n1 > 0 and answer.strip()
        text_chunks = [t for t, c in chunks if c.strip() and "[prompt" not in c]
        assert len(text_chunks) >= 2 and text_chunks[-1] - text_chunks[0] > 0.05, chunks   # streamed

        # turn 2: the history is in the prompt (longer, and its prefix is reused from the cache)
        child.expect("user> ")
        child.sendline("再说一遍")
        child.expect(STATS)
        p2, cached2 = int(child.match.group(1)), int(child.match.group(2) or 0)
        assert p2 > p1 + n1 // 2 and cached2 > 0

        # /clear forgets the history: the same question gives a prompt as long as the first one
        child.expect("user> ")
        child.sendline("/clear")
        child.expect("conversation cleared")
        child.expect("user> ")
        child.sendline("你好")
        child.expect(STATS)
        assert int(child.match.group(1)) == p1

        child.expect("user> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


@needs_shared
def test_chat_ctrl_d_quits():
    child = pexpect.spawn(GLMKIT[0], GLMKIT[1:] + ["chat", "--model", str(REF / "chatglm-6b"), "-n", "4"],
                          env=ENV, encoding="utf-8", timeout=60)
    child.expect("user> ")
    child.sendline("hello")
    child.expect("ChatGLM-6B> ")
    child.expect("user> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
