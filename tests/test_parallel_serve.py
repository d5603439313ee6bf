"""`torchrun --nproc_per_node 2 -m glmkit serve --tp 2` (a real server process of 2 ranks, gloo on CPU) answers
the openai client with the greedy text of a single-process `glmkit serve` of the same model."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys

import pytest

from conftest import REF, ROOT, needs_shared
from _server_util import free_port, wait_healthy

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

C3 = REF / "chatglm3-6b"
PROMPTS = ["你好", "What is tensor parallelism?", "写一首诗"]


def _start(cmd: list[str], port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd + ["serve", *extra, "--model", str(C3), "--port", str(port), "--parallel", "2",
                                   "--threads", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def servers():
    p1, p2 = free_port(), free_port()
    one = _start([sys.executable, "-m", "glmkit"], p1)
    two = _start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "glmkit"], p2, "--tp", "2")
    try:
        for proc, port in ((one, p1), (two, p2)):
            wait_healthy(f"http://127.0.0.1:{port}", proc, seconds=300)
        yield (openai.OpenAI(base_url=f"http://127.0.0.1:{p1}/v1", api_key="x", max_retries=0, timeout=120),
               openai.OpenAI(base_url=f"http://127.0.0.1:{p2}/v1", api_key="x", max_retries=0, timeout=120), two)
    finally:
        for proc in (one, two):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (one, two):
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _ask(client, prompt: str) -> str:
    r = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=24)
    return r.choices[0].message.content


def test_tp2_server_answers_as_one_process(servers):
    one, two, _ = servers
    want = [_ask(one, p) for p in PROMPTS]
    assert any(want)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:      # decoded together in the 2 slots (+ queue)
        got = list(pool.map(lambda p: _ask(two, p), PROMPTS))
    assert got == want
    # streaming, after the batch: the same text again
    chunks = two.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": PROMPTS[0]}],
                                         temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want[0]
