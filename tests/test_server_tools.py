"""glmkit serve: tool calls (ChatGLM3 and GLM-4 formats, streamed and not), JSON mode, ChatGLM-6B infilling
through /v1/completions, and LangChain's ChatOpenAI, all through real clients over HTTP.

The models are tiny and random, so a tool call only happens when the request forces it (tool_choice names a
function): the server then decodes the arguments under a grammar (glmkit/grammar.py), which is what makes
them parse. Unforced calls are parsed by the same ResponseParser (tests/test_chat_format.py, test_glm4.py)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import REF, needs_shared
from _server_util import running_server

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
FORCE = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "北京今天天气怎么样？"}]


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory):
    from test_glm4 import SPECIAL_IDS, build_tiktoken, tiny_glm_hf, to_chatglm_layout

    tmp = tmp_path_factory.mktemp("glm4srv")
    tiny_glm_hf(tmp / "hf", vocab=151552, seed=1)
    out = tmp / "glm-4-tiny"
    to_chatglm_layout(tmp / "hf", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["seq_length"] = 2048                    # rotary positions: room for GLM-4's long tools preamble
    (out / "config.json").write_text(json.dumps(cfg))
    build_tiktoken(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for c, i in SPECIAL_IDS.items()}}))
    shutil.rmtree(tmp / "hf")
    return out


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def server(request, glm4_dir):
    path = REF / "chatglm3-6b" if request.param == "chatglm3" else glm4_dir
    with running_server(path, parallel=4) as (base, app):
        yield request.param, base, openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120), \
            path.name


def test_forced_tool_call(server):
    fam, base, client, model = server
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=FORCE, max_tokens=60,
                                       temperature=0.8, seed=3)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_forced_tool_call_streamed_in_pieces(server):
    fam, base, client, model = server
    kw = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=FORCE, max_tokens=60, temperature=0.8, seed=5)
    want = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    deltas, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            if c.delta.tool_calls:
                deltas += c.delta.tool_calls
            finish = c.finish_reason or finish
    assert finish == "tool_calls"
    assert deltas[0].id and deltas[0].function.name == "get_weather" and all(d.index == 0 for d in deltas)
    args = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(args) == json.loads(want.function.arguments)
    if fam == "glm4":                         # GLM-4 arguments are JSON as generated: streamed token by token
        assert sum(1 for d in deltas if d.function.arguments) > 2
    else:                                     # ChatGLM3 writes tool_call(...): name first, JSON once parsed
        assert len(deltas) >= 2


def test_tool_result_round_trip(server):
    fam, base, client, model = server
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=FORCE, max_tokens=60,
                                       temperature=0.8, seed=3)
    msg = r.choices[0].message
    follow = ASK + [msg.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"temperature": 25}'}]
    r2 = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=8, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_gives_text(server):
    fam, base, client, model = server
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=6,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None


def test_json_mode_output_parses(server):
    fam, base, client, model = server
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "用JSON回答"}],
                                           response_format={"type": "json_object"}, max_tokens=48, temperature=1.0,
                                           seed=seed)
        assert isinstance(json.loads(r.choices[0].message.content), dict), r.choices[0].message.content


def test_langchain_chat_openai(server):
    lc = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    fam, base, client, model = server
    llm = lc.ChatOpenAI(base_url=base + "/v1", api_key="x", model=model, temperature=0, max_tokens=8,
                        max_retries=0)
    out = llm.invoke("你好")
    assert isinstance(out.content, str) and out.response_metadata.get("finish_reason") in ("stop", "length")
    assert "".join(c.content for c in llm.stream("你好")) == out.content


def test_chatglm6b_infilling_completion():
    import glmkit

    path = REF / "chatglm-6b"
    prompt = "床前明月光，[MASK]。举头望明月，低头思故乡。"
    want = glmkit.load(path).generate(prompt, max_new_tokens=8, temperature=0)
    with running_server(path, parallel=2) as (base, app):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.completions.create(model="chatglm-6b", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].text == want
        chat = client.chat.completions.create(model="chatglm-6b", messages=[{"role": "user", "content": "你好"}],
                                              max_tokens=6, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
