"""ollama's API (issue 17, point 3) with the real `ollama` Python client and LangChain's ChatOllama against a real
`glmkit serve` process on the tiny ChatGLM3 reference checkpoint: chat, generate, streaming (NDJSON), options,
`format`, tags/show/ps/version, embed without an embedding model, and errors in ollama's shape.

References: the same server's OpenAI routes (held to the Pipeline by test_server.py) for the answers, the model
folder and its config for the listing, jsonschema for `format`."""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import REF, needs_shared
from _server_util import serve_process

pytestmark = needs_shared
ollama = pytest.importorskip("ollama", reason="the ollama client is a test dependency (pip install -e .[test])")

C3 = REF / "chatglm3-6b"
MODEL = "chatglm3-6b"
MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好，写一句诗"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def base():
    with serve_process("--model", C3, "--parallel", "2") as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return ollama.Client(host=base, timeout=60)


def _openai_chat(base, messages, **kw) -> dict:
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": messages, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# --- models ----------------------------------------------------------------------------------------------------

def test_tags_show_ps_version(base, client):
    from glmkit.config import from_hf

    models = client.list().models
    assert [m.model for m in models] == [f"{MODEL}:latest"]
    m = models[0]
    weights = [p for p in C3.iterdir() if p.suffix in (".bin", ".safetensors")]
    assert m.size == sum(p.stat().st_size for p in weights)
    assert m.details.family == "chatglm3" and m.details.format == "pytorch" and len(m.digest) == 64
    cfg = from_hf(json.loads((C3 / "config.json").read_text()), family="chatglm3")
    assert m.details.parameter_size == f"{cfg.num_params() / 1e6:.1f}M"
    ctx = httpx.get(base + "/v1/models").json()["data"][0]["context_length"]
    for name in (MODEL, f"{MODEL}:latest"):
        s = client.show(name)
        assert "tools" in s.capabilities and "completion" in s.capabilities
        assert s.modelinfo["chatglm3.context_length"] == ctx
        assert s.modelinfo["general.parameter_count"] == cfg.num_params()
        assert s.license.startswith("The ChatGLM3-6B License")
    assert [p.model for p in client.ps().models] == [f"{MODEL}:latest"]
    v = httpx.get(base + "/api/version").json()["version"]
    assert all(x.isdigit() for x in v.split("."))
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3")
    assert e.value.status_code == 404 and "llama3" in e.value.error


# --- chat --------------------------------------------------------------------------------------------------------

def test_chat_equals_the_openai_route(base, client):
    r = client.chat(model=MODEL, messages=MSGS, options=GREEDY)
    want = _openai_chat(base, MSGS, temperature=0, max_tokens=12)
    assert r.message.role == "assistant" and r.message.content == want["choices"][0]["message"]["content"]
    assert r.done and r.done_reason == want["choices"][0]["finish_reason"]
    assert r.prompt_eval_count == want["usage"]["prompt_tokens"] and r.eval_count == want["usage"]["completion_tokens"]
    assert r.total_duration >= r.eval_duration >= 0 and r.created_at.endswith("Z")


def test_chat_streaming_equals_non_streaming(client):
    whole = client.chat(model=MODEL, messages=MSGS, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=MSGS, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == whole.done_reason and parts[-1].eval_count == whole.eval_count


def test_tool_history_and_logprobs_render_as_the_openai_route(base, client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    o_msgs = [{"role": "user", "content": "北京天气？"},
              {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                                "arguments": {"city": "北京"}}}]},
              {"role": "tool", "content": "晴，25度", "tool_name": "get_weather"}]
    a_msgs = [o_msgs[0], {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "call_0", "type": "function",
                   "function": {"name": "get_weather", "arguments": json.dumps({"city": "北京"}, ensure_ascii=False)}}]},
              {"role": "tool", "content": "晴，25度", "tool_call_id": "call_0", "name": "get_weather"}]
    r = client.chat(model=MODEL, messages=o_msgs, tools=tools, options=GREEDY, logprobs=True, top_logprobs=2)
    want = _openai_chat(base, a_msgs, tools=tools, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    assert r.prompt_eval_count == want["usage"]["prompt_tokens"]
    assert r.message.content == want["choices"][0]["message"]["content"]
    lps = want["choices"][0]["logprobs"]["content"]
    assert [x.token for x in r.logprobs] == [x["token"] for x in lps]
    assert [round(x.logprob, 4) for x in r.logprobs] == [round(x["logprob"], 4) for x in lps]
    assert all(len(x.top_logprobs) == 2 for x in r.logprobs)


def test_stream_is_the_default_and_ndjson(base):
    with httpx.stream("POST", base + "/api/chat", json={"model": MODEL, "messages": MSGS, "options": GREEDY},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in r.iter_lines() if x]
    assert len(lines) > 2 and lines[-1]["done"] is True and "eval_count" in lines[-1]


def test_options(base, client):
    def chat(**opts):
        return client.chat(model=MODEL, messages=MSGS, options={"num_predict": 10, **opts}).message.content

    assert chat(temperature=1.0, seed=3) == chat(temperature=1.0, seed=3)
    want = _openai_chat(base, MSGS, temperature=1.0, top_p=0.9, top_k=20, seed=3, max_tokens=10,
                        repetition_penalty=1.2, presence_penalty=0.5)["choices"][0]["message"]["content"]
    assert chat(temperature=1.0, top_p=0.9, top_k=20, seed=3, repeat_penalty=1.2, presence_penalty=0.5) == want
    assert chat(temperature=1.0, top_k=1) == chat(temperature=0)                # top_k 1 is greedy
    full = chat(temperature=0)
    cut = full[2:4]
    assert chat(temperature=0, stop=[cut]) == full[:full.index(cut)]
    r = client.chat(model=MODEL, messages=MSGS, options={"temperature": 0, "num_predict": 3, "num_ctx": 4096,
                                                          "num_thread": 2})   # load-time options: ignored
    assert r.eval_count == 3 and r.done_reason == "length"


def test_format_json_and_schema(client):
    r = client.chat(model=MODEL, messages=MSGS, format="json", options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(r.message.content), dict)
    parts = list(client.chat(model=MODEL, messages=MSGS, format="json", stream=True,
                             options={"temperature": 0, "num_predict": 40}))
    assert "".join(p.message.content for p in parts) == r.message.content
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["name", "n"]}
    r = client.chat(model=MODEL, messages=MSGS, format=schema, options={"temperature": 0, "num_predict": 60})
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(r.message.content), schema)     # ollama's schemas need no additionalProperties


# --- generate ----------------------------------------------------------------------------------------------------

def test_generate(base, client):
    r = client.generate(model=MODEL, prompt="写一句诗", system="You are terse.", options=GREEDY)
    want = _openai_chat(base, MSGS[:1] + [{"role": "user", "content": "写一句诗"}], temperature=0, max_tokens=12)
    assert r.response == want["choices"][0]["message"]["content"] and r.done
    parts = list(client.generate(model=MODEL, prompt="写一句诗", system="You are terse.", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == r.response and parts[-1].done and not parts[0].done
    raw = client.generate(model=f"{MODEL}:latest", prompt="床前明月光，", raw=True, options=GREEDY)
    comp = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "床前明月光，", "temperature": 0,
                                                      "max_tokens": 12}, timeout=60).json()
    assert raw.response == comp["choices"][0]["text"]
    assert raw.prompt_eval_count == comp["usage"]["prompt_tokens"]
    j = client.generate(model=MODEL, prompt="列出三种水果", format="json", options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(j.response), dict)
    loaded = client.generate(model=MODEL)                                  # no prompt: ollama's "load the model"
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


# --- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,words", [
    ({"model": "llama3", "messages": MSGS}, 404, "llama3"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "看图", "images": ["aGVsbG8="]}]}, 400, "images"),
    ({"model": MODEL, "messages": MSGS, "options": {"temperature": "hot"}}, 400, "temperature"),
    ({"model": MODEL, "messages": MSGS, "options": {"temprature": 0.5}}, 400, "temprature"),
    ({"model": MODEL, "messages": MSGS, "options": {"mirostat": 2}}, 400, "mirostat"),
    ({"model": MODEL, "messages": MSGS, "options": {"num_predict": 5000}}, 400, "256"),
    ({"model": MODEL, "messages": MSGS, "think": True}, 400, "thinking"),
    ({"model": MODEL, "messages": MSGS, "format": "yaml"}, 400, "format"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "wizard"),
    ({"messages": MSGS}, 400, "model"),
])
def test_chat_errors_in_ollama_shape(base, body, status, words):
    r = httpx.post(base + "/api/chat", json={**body, "stream": False}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert list(err) == ["error"] and isinstance(err["error"], str) and words in err["error"]


def test_errors_through_the_client(base, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="看图", images=[b"\x89PNG not really"])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        list(client.chat(model="nope", messages=MSGS, stream=True))
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=MODEL, input="你好")
    assert e.value.status_code == 400 and "embedding model" in e.value.error
    r = httpx.get(base + "/api/no-such-route")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    r = httpx.post(base + "/api/chat", content=b"x" * (5 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and list(r.json()) == ["error"] and "bytes" in r.json()["error"]
    assert httpx.get(base + "/health").status_code == 200


# --- LangChain's ChatOllama --------------------------------------------------------------------------------------

def test_langchain_chat_ollama(base, client):
    lc = pytest.importorskip("langchain_ollama", reason="langchain-ollama is a test dependency")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = lc.ChatOllama(model=MODEL, base_url=base, temperature=0, num_predict=12, validate_model_on_init=True)
    msgs = [SystemMessage(MSGS[0]["content"]), HumanMessage(MSGS[1]["content"])]
    want = client.chat(model=MODEL, messages=MSGS, options=GREEDY)
    out = llm.invoke(msgs)
    assert out.content == want.message.content
    assert out.usage_metadata["input_tokens"] == want.prompt_eval_count
    assert out.usage_metadata["output_tokens"] == want.eval_count
    assert "".join(c.content for c in llm.stream(msgs)) == want.message.content
    js = lc.ChatOllama(model=MODEL, base_url=base, temperature=0, num_predict=40, format="json").invoke(msgs)
    assert isinstance(json.loads(js.content), dict)
    with pytest.raises(ValueError, match="not found"):
        lc.ChatOllama(model="llama3", base_url=base, validate_model_on_init=True)
