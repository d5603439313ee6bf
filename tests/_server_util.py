"""Helpers for the server tests: a real uvicorn server on a free port in a background thread, and a
ChatGLM3-format random model big enough that an answer takes tens of seconds (slot and queue tests)."""
from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc=None, seconds: float = 30.0):
    """Poll GET /health until it answers 200 (raise if `proc`, the server's process, exits first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@contextlib.contextmanager
def running_server(model_dir=None, *, ctx=None, quantize=None, pipe=None, **settings):
    """Load `model_dir` (a fresh Pipeline), or take `pipe`, and serve it over real HTTP.
    Yields (base_url, app) where app.engine is the server's engine."""
    import uvicorn

    import glmkit
    from glmkit.server.app import ServerSettings, create_app

    if pipe is None:
        pipe = glmkit.load(model_dir, ctx=ctx, quantize=quantize)
    model_dir = model_dir or pipe.path
    settings.setdefault("model_id", Path(model_dir).name)
    app = create_app(pipe, ServerSettings(**settings))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    try:
        yield base, app
    finally:
        server.should_exit = True
        th.join(10)


@contextlib.contextmanager
def serve_process(*args, seconds: float = 120.0, log_path=None):
    """`python -m glmkit serve ARGS --port P` in a child process, as a user starts it; yields the base URL. Its
    output is kept in a file (log_path, else a temporary one) and shown when it fails to start."""
    import os
    import subprocess
    import sys
    import tempfile

    import pytest

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    port = free_port()
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", *map(str, args), "--port", str(port)], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(base, proc, seconds)
        except RuntimeError as e:
            log.seek(0)
            pytest.fail(f"glmkit serve {' '.join(map(str, args))}: {e}\n{log.read().decode(errors='replace')[-4000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_slow_model(src_dir: Path, out: Path, hidden=512, layers=4, seq=4096, seed=0) -> Path:
    """A random model with the tokenizer and format of `src_dir` (a tiny reference checkpoint), wide enough
    that decoding ~4000 tokens takes tens of seconds on 2 cores."""
    import torch

    from glmkit.checkpoint import load_model, save_model
    from glmkit.model import GLM

    if (out / "config.json").is_file():
        return out
    small, _ = load_model(src_dir, dtype="float32")
    c = small.config
    ffn = hidden * 8 // 3 // 16 * 16
    cfg = dataclasses.replace(c, hidden_size=hidden, num_layers=layers, ffn_hidden_size=ffn,
                              head_dim=hidden // c.num_heads, rope_dim=0, max_seq_len=seq)
    torch.manual_seed(seed)
    model = GLM(cfg).init_weights(seed=seed)
    save_model(model, out, source_dir=src_dir)
    return out
