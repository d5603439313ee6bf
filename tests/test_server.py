"""glmkit serve: the real openai client against a real HTTP server on the tiny reference checkpoints.

Greedy answers are compared with a separately loaded Pipeline (the reference path), so the server's batching,
detokenizing and stop handling are checked against the single-sequence generator, not against themselves.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from conftest import REF, needs_shared
from _server_util import make_slow_model, running_server

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

KEY = "sk-glmkit-test"
C3 = REF / "chatglm3-6b"


@pytest.fixture(scope="module")
def c3():
    """ChatGLM3 tiny reference, API key required, 4 slots."""
    with running_server(C3, api_key=KEY, parallel=4, max_body_bytes=64 << 10) as (base, app):
        yield base, app


@pytest.fixture(scope="module")
def client(c3):
    return openai.OpenAI(base_url=c3[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref3():
    import glmkit
    return glmkit.load(C3)


def test_models_and_health(c3, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["chatglm3-6b"]
    h = httpx.get(c3[0] + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 4


def test_chat_greedy_matches_pipeline(client, ref3):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好，介绍一下你自己"}]
    r = client.chat.completions.create(model="chatglm3-6b", messages=msgs, temperature=0, max_tokens=20)
    want = ref3.chat(msgs, temperature=0, max_new_tokens=20)
    assert r.choices[0].message.content == want.content
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.usage["prompt_tokens"]
    assert r.usage.completion_tokens == want.usage["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model="chatglm3-6b", messages=[{"role": "user", "content": "写一首诗"}], temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw).choices[0].message.content
    pieces, finish, usage = [], None, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(pieces) == full and len(pieces) > 1
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model="chatglm3-6b", messages=[{"role": "user", "content": "hi"}], temperature=0.9, top_p=0.9,
              max_tokens=12, seed=7, presence_penalty=0.5, frequency_penalty=0.5,
              extra_body={"repetition_penalty": 1.1})
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_string_cuts_the_answer(client):
    kw = dict(model="chatglm3-6b", messages=[{"role": "user", "content": "数数"}], temperature=0, max_tokens=30)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6
    stop = full[3:5]
    cut = full[:full.index(stop)]
    r = client.chat.completions.create(stop=[stop, "never-occurs"], **kw)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stop=stop, stream=True, **kw) if c.choices)
    assert streamed == cut


def test_completions(client, ref3):
    r = client.completions.create(model="chatglm3-6b", prompt="床前明月光，", max_tokens=10, temperature=0)
    want = ref3.generate("床前明月光，", max_new_tokens=10, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    s = "".join(c.choices[0].text for c in client.completions.create(
        model="chatglm3-6b", prompt="床前明月光，", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert s == want


def test_logprobs(client):
    r = client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens
    for e in lp:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)     # greedy: the chosen is the top one


def test_eight_concurrent_greedy_answers_equal_alone(c3, client):
    prompts = [f"问题{i}：{'天气' * (i + 1)}怎么样？" for i in range(8)]

    def ask(p):
        return client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": p}],
                                              temperature=0, max_tokens=16 + 3 * len(p) % 7).choices[0].message.content
    alone = [ask(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(ask, prompts))
    assert together == alone


def test_legacy_chatglm_route(c3):
    r = httpx.post(c3[0] + "/", json={"prompt": "你好", "history": [["在吗", "在"]], "max_length": 200,
                                      "top_p": 0.7, "temperature": 0.01}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60)
    d = r.json()
    assert r.status_code == 200 and d["status"] == 200 and isinstance(d["response"], str)
    assert d["history"] == [["在吗", "在"], ["你好", d["response"]]] and len(d["time"]) == 19


def test_metrics(c3, client):
    client.chat.completions.create(model="chatglm3-6b", messages=[{"role": "user", "content": "x"}], max_tokens=3)
    m = httpx.get(c3[0] + "/metrics").text
    assert 'glmkit_requests_total{endpoint="/v1/chat/completions",status="200"}' in m
    for name in ("glmkit_completion_tokens_total", "glmkit_queue_depth", "glmkit_time_to_first_token_seconds_count",
                 "glmkit_decode_tokens_per_second"):
        assert name in m


# --- bad input: OpenAI-style errors, and the server keeps serving ----------------------------------------------

def _post(base, body, key=KEY, path="/v1/chat/completions", raw=None):
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    return httpx.post(base + path, content=raw if raw is not None else json.dumps(body), headers=h, timeout=30)


OK_MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("malformed json", None, b'{"model": "chatglm3-6b", "messages": [', 400, "invalid_json", None),
    ("wrong type", {"model": "chatglm3-6b", "messages": OK_MSG, "temperature": "hot"}, None, 400, "invalid_value",
     "temperature"),
    ("messages not a list", {"model": "chatglm3-6b", "messages": "hi"}, None, 400, "invalid_value", "messages"),
    ("unknown role", {"model": "chatglm3-6b", "messages": [{"role": "wizard", "content": "x"}]}, None, 400,
     "invalid_value", "messages"),
    ("empty messages", {"model": "chatglm3-6b", "messages": []}, None, 400, "invalid_value", "messages"),
    ("tool without call", {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "x"},
                                                                {"role": "tool", "content": "42"}]}, None, 400,
     "invalid_value", "messages"),
    ("max_tokens 0", {"model": "chatglm3-6b", "messages": OK_MSG, "max_tokens": 0}, None, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens negative", {"model": "chatglm3-6b", "messages": OK_MSG, "max_completion_tokens": -3}, None, 400,
     "invalid_value", "max_completion_tokens"),
    ("missing model", {"messages": OK_MSG}, None, 400, "missing_required_parameter", "model"),
    ("unknown model", {"model": "gpt-4o", "messages": OK_MSG}, None, 404, "model_not_found", "model"),
    ("top_p out of range", {"model": "chatglm3-6b", "messages": OK_MSG, "top_p": 1.5}, None, 400, "invalid_value",
     "top_p"),
    ("n beyond the limit", {"model": "chatglm3-6b", "messages": OK_MSG, "n": 99}, None, 400, "invalid_value", "n"),
    ("bad response_format", {"model": "chatglm3-6b", "messages": OK_MSG, "response_format": {"type": "xml"}}, None,
     400, "invalid_value", "response_format"),
]


@pytest.mark.parametrize("name,body,raw,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request(c3, name, body, raw, status, code, param):
    r = _post(c3[0], body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param
    assert httpx.get(c3[0] + "/health").status_code == 200


def test_prompt_longer_than_context(c3):
    r = _post(c3[0], {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "天气 " * 400}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    n = int(err["message"].split("prompt has ")[1].split()[0])
    assert n > 256 and err["param"] == "messages"
    r = _post(c3[0], {"model": "chatglm3-6b", "prompt": "天气 " * 400}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(c3[0] + "/health").status_code == 200


@pytest.mark.parametrize("key,code", [(None, "missing_api_key"), ("sk-wrong", "invalid_api_key")])
def test_api_key(c3, key, code):
    r = _post(c3[0], {"model": "chatglm3-6b", "messages": OK_MSG}, key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == code
    if key:                                         # the client itself refuses to run without a key
        bad = openai.OpenAI(base_url=c3[0] + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    assert httpx.get(c3[0] + "/health").status_code == 200


def test_oversize_body(c3):
    r = _post(c3[0], {"model": "chatglm3-6b", "messages": [{"role": "user", "content": "x" * (100 << 10)}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(c3[0] + "/health").status_code == 200


def test_unknown_route_is_an_openai_error(c3):
    r = httpx.get(c3[0] + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_fuzzed_requests_never_break_the_server(c3):
    """hypothesis: request bodies with the schema's keys and values of any JSON type (bounded examples)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    json_vals = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-3, 3) | st.text(max_size=8),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                             max_leaves=6)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_vals,
                                     "content": st.text(max_size=20) | json_vals})
    body = st.fixed_dictionaries(
        {"model": st.just("chatglm3-6b") | json_vals, "messages": st.lists(message, max_size=3) | json_vals},
        optional={k: json_vals for k in ("temperature", "top_p", "stop", "seed", "tools", "tool_choice", "logprobs",
                                         "top_logprobs", "response_format", "presence_penalty", "n", "stream")}
        | {"max_tokens": st.integers(-2, 3)})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body)
    def check(b):
        b.setdefault("max_tokens", 2)
        r = _post(c3[0], b)
        assert r.status_code in (200, 400, 404), (b, r.status_code, r.text)
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    check()
    assert httpx.get(c3[0] + "/health").status_code == 200


# --- slots: disconnects, queue limits, time limits (a model slow enough to keep a slot busy) -------------------

@pytest.fixture(scope="module")
def slow_dir(tmp_path_factory):
    return make_slow_model(C3, tmp_path_factory.mktemp("slow") / "slow-chatglm3")


def _first_token_seconds(base, model, **kw):
    t = time.perf_counter()
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=120, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line and '"content": ""' not in line:
                return time.perf_counter() - t
    return time.perf_counter() - t


def test_disconnect_frees_the_slot(slow_dir):
    with running_server(slow_dir, parallel=1) as (base, app):
        body = {"model": "slow-chatglm3", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 3900, "temperature": 1.0, "seed": 1}
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"content": ""' not in line:
                    break                                          # one token seen, then hang up
        # the one slot must be free again within a decode step or so: the next request starts at once
        t = _first_token_seconds(base, "slow-chatglm3", max_tokens=4, temperature=0)
        assert t < 5.0, f"next request waited {t:.1f}s: the disconnected client still held the slot"
        assert httpx.get(base + "/health").json()["active"] == 0


def test_full_queue_gets_429_and_timeouts_end_with_length(slow_dir):
    with running_server(slow_dir, parallel=1, max_queue=1, request_timeout=4.0) as (base, app):
        body = {"model": "slow-chatglm3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3900,
                "temperature": 1.0, "seed": 2}
        with cf.ThreadPoolExecutor(2) as ex:
            busy = ex.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)
            for _ in range(100):                                    # wait until it holds the slot
                if app.engine.active_count == 1:
                    break
                time.sleep(0.05)
            queued = ex.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=60)
            for _ in range(100):
                if app.engine.queue_depth == 1:
                    break
                time.sleep(0.05)
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
            t = time.perf_counter()
            first = busy.result().json()
            assert first["choices"][0]["finish_reason"] == "length"       # the 4 s limit, not 3900 tokens
            assert first["usage"]["completion_tokens"] < 3900
            second = queued.result().json()
            assert second["choices"][0]["finish_reason"] == "length"
            assert time.perf_counter() - t < 30
        assert httpx.get(base + "/health").status_code == 200
