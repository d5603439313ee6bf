"""glmkit serve's access flags against a real `glmkit serve` process (the embedded glm-tiny): API keys from
--api-key and --api-key-file (re-read on SIGHUP), --rate-limit (429 + Retry-After per key), --cors-origin, HTTPS
through --ssl-certfile/--ssl-keyfile, and request log lines that hold no message text unless --log-content."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from glmkit.models import embedded_model_path
from glmkit.server.access import KeyFileError, KeyRing, RateLimiter, fingerprint

GLMKIT = [sys.executable, "-m", "glmkit"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("GLMKIT_API_KEY", None)
SECRET = "PINEAPPLE-SUBMARINE-4711 我的秘密"
STATIC, LOGGED, RATE = "sk-static-0", "sk-logged-0", "sk-rate-0"
ORIGIN = "http://app.example"

pytestmark = pytest.mark.skipif(embedded_model_path() is None, reason="glmkit/models/glm-tiny is not in this checkout")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp, *flags, https=False):
        self.port, self.log = _port(), tmp / f"server-{time.monotonic_ns()}.log"
        self.base = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        self.verify = True
        if https:
            cert, key = tmp / "cert.pem", tmp / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                            "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
            flags += ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
            self.verify = ssl.create_default_context(cafile=str(cert))     # trusts exactly this certificate
        self.client = httpx.Client(base_url=self.base, verify=self.verify, timeout=60)
        self.proc = subprocess.Popen(GLMKIT + ["serve", "--port", str(self.port), *map(str, flags)], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 300              # a loaded 2-core machine can take minutes
        while True:
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self.log.read_text()}")
            time.sleep(0.1)

    def get(self, path, key=None, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.client.get(path, headers={**headers, **kw.pop("headers", {})}, **kw)

    def chat(self, key, text):
        return self.client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "glm-tiny", "messages": [{"role": "user", "content": text}],
                                      "max_tokens": 2, "temperature": 0})

    def log_lines(self, needle: str, wait: float = 30) -> list[str]:
        """The log lines holding `needle`, waiting for the first (a request's line is written once its
        response has gone out, so it can land just after the client has read the answer)."""
        deadline = time.monotonic() + wait
        while True:
            lines = [ln for ln in self.log.read_text(encoding="utf-8").splitlines() if needle in ln]
            if lines or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(15)
        self.client.close()


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    f = tmp_path_factory.mktemp("keys") / "keys.txt"
    f.write_text("# team keys\nsk-alpha-1\n\n" + RATE + "\n")
    return f


@pytest.fixture(scope="module")
def server(tmp_path_factory, keyfile):
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a test certificate) is not installed")
    s = Server(tmp_path_factory.mktemp("srv"), "--api-key", STATIC, "--api-key", LOGGED, "--api-key-file", keyfile, "--rate-limit", 3,
               "--cors-origin", ORIGIN, https=True)
    yield s
    s.stop()


def test_https_and_keys(server):
    assert server.base.startswith("https://")
    assert server.get("/v1/models").json()["error"]["code"] == "missing_api_key"
    assert server.get("/v1/models", key="sk-nobody").status_code == 401
    assert server.get("/v1/models", key=STATIC).status_code == 200          # --api-key
    with pytest.raises(httpx.HTTPError):                                      # plain HTTP is not served
        httpx.get(server.base.replace("https", "http") + "/health", timeout=5)


def test_key_file_reloaded_on_sighup(server, keyfile):
    assert server.get("/v1/models", key="sk-alpha-1").status_code == 200
    assert server.get("/v1/models", key="sk-beta-2").status_code == 401
    keyfile.write_text("sk-beta-2\n" + RATE + "\n")
    os.kill(server.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while server.get("/v1/models", key="sk-beta-2").status_code != 200:
        assert time.monotonic() < deadline, "the new key was not accepted after SIGHUP"
        time.sleep(0.1)
    assert server.get("/v1/models", key="sk-alpha-1").status_code == 401    # removed from the file: refused
    assert server.get("/v1/models", key=STATIC).status_code == 200           # --api-key keys stay
    assert server.proc.poll() is None                                         # SIGHUP did not stop the server
    assert server.log_lines("reloaded 2 API keys")


def test_per_key_rate_limit(server):
    for _ in range(3):
        assert server.get("/v1/models", key=RATE).status_code == 200
    r = server.get("/v1/models", key=RATE)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert server.get("/v1/models", key=STATIC).status_code == 200           # another key has its own budget
    assert server.get("/health").status_code == 200


def test_cors_origin(server):
    pre = server.client.options("/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    other = server.client.options("/v1/models", headers={"Origin": "http://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in other.headers


def test_request_log_holds_no_message_text(server):
    r = server.chat(LOGGED, SECRET)
    assert r.status_code == 200, r.text
    lines = server.log_lines('"POST /v1/chat/completions" 200')
    assert lines and fingerprint(LOGGED) in lines[-1]
    log = server.log.read_text(encoding="utf-8")
    assert "PINEAPPLE" not in log and "秘密" not in log and LOGGED not in log


def test_log_content_puts_the_text_in_the_log(tmp_path):
    s = Server(tmp_path, "--api-key", STATIC, "--log-content")
    try:
        assert s.chat(STATIC, SECRET).status_code == 200
        lines = s.log_lines('"POST /v1/chat/completions" 200')
        assert lines and "PINEAPPLE-SUBMARINE-4711" in lines[-1]
        assert STATIC not in s.log.read_text(encoding="utf-8")               # the key never is
    finally:
        s.stop()


def test_rate_limiter_window_and_retry_after():
    now = [1000.0]
    rl = RateLimiter(2, clock=lambda: now[0])
    assert rl.hit("a") is None and rl.hit("a") is None
    now[0] += 10
    assert rl.hit("a") == 50 and rl.hit("b") is None                         # a's first request frees at +60
    now[0] += 50
    assert rl.hit("a") is None
    assert RateLimiter(0).hit("a") is None


def test_key_file_errors(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing(key_file=tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("two keys on one line\n")
    with pytest.raises(KeyFileError, match=r"bad.txt:1"):
        KeyRing(key_file=bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    ring = KeyRing(key_file=empty)
    assert ring.enabled and ring.match("anything") is None                   # fails closed
    good = tmp_path / "good.txt"
    good.write_text("k1\n")
    ring = KeyRing(key_file=good)
    good.unlink()
    assert ring.reload() == 1 and ring.match("k1") == "k1"                    # unreadable: the old keys stay
