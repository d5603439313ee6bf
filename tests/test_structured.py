"""Structured outputs (glmkit/grammar.py, llguidance): the 34-schema set of benchmarks/data/json_schemas.json
decoded under each schema, streamed and not, by a real `glmkit serve` process for a ChatGLM3-format and a
GLM-4-format model (tiny random models: only the grammar makes their output parse), checked with jsonschema
(formats included); response_format json_schema on /v1/completions; tool_choice "required" and
parallel_tool_calls; tool definitions and schemas that cannot be used get a 400 naming them; Pipeline
schema= / json=True and `glmkit generate --json-schema`; the budgeted close under a short max_tokens."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REF, ROOT, needs_shared
from _server_util import free_port, wait_healthy

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = json.loads((ROOT / "benchmarks" / "data" / "json_schemas.json").read_text(encoding="utf-8"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
ASK = [{"role": "user", "content": "按要求输出JSON"}]
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"date": {"type": "string", "format": "date"}, "vip": {"type": "boolean"}},
        "required": ["date", "vip"], "additionalProperties": False}}}]
TOOL_ASK = [{"role": "system", "content": "工具："}, {"role": "user", "content": "订票"}]


def format_checker():
    fc = jsonschema.FormatChecker()

    @fc.checks("date-time")
    def _date_time(s):          # RFC 3339 (jsonschema checks it only with an extra package)
        return not isinstance(s, str) or re.fullmatch(
            r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", s) is not None
    return fc


FC = format_checker()


def check(schema, text: str):
    value = json.loads(text)
    jsonschema.validators.validator_for(schema)(schema, format_checker=FC).validate(value)
    return value


# ------------------------------------------------------------------------------------------------------------
# One `glmkit serve` process per family (module scope)
# ------------------------------------------------------------------------------------------------------------

def _glm4(tmp_path_factory):
    import shutil

    from test_glm4 import SPECIAL_IDS, build_tiktoken, tiny_glm_hf, to_chatglm_layout

    tmp = tmp_path_factory.mktemp("glm4structured")
    tiny_glm_hf(tmp / "hf", vocab=151552, seed=1)
    out = tmp / "glm-4-tiny"
    to_chatglm_layout(tmp / "hf", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["seq_length"] = 2048
    (out / "config.json").write_text(json.dumps(cfg))
    build_tiktoken(out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for c, i in SPECIAL_IDS.items()}}))
    shutil.rmtree(tmp / "hf")
    return out


def _chatglm3(tmp_path_factory):
    """The reference ChatGLM3 with room for a tools block: its 256 positions, made 2048 (rotary is computed)."""
    import shutil

    out = tmp_path_factory.mktemp("chatglm3structured") / "chatglm3-6b"
    shutil.copytree(REF / "chatglm3-6b", out, ignore=shutil.ignore_patterns("expected_*"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["seq_length"] = 2048
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module", params=["chatglm3", "glm4"])
def server(request, tmp_path_factory):
    path = _chatglm3(tmp_path_factory) if request.param == "chatglm3" else _glm4(tmp_path_factory)
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "glmkit", "serve", "--model", str(path), "--port", str(port),
                                 "--parallel", "4", "--ctx", "2048"], env=ENV, stdout=f, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, seconds=400)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
        yield request.param, base, client, path.name
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _schema_format(e, strict):
    return {"type": "json_schema", "json_schema": {"name": e["name"], "schema": e["schema"], "strict": strict}}


def _strict_ok(schema) -> bool:
    from glmkit.grammar import GrammarError, check_strict
    try:
        check_strict(schema, "s")
        return True
    except GrammarError:
        return False


def _one(client, model, e, i, stream):
    kw = dict(model=model, messages=ASK, response_format=_schema_format(e, _strict_ok(e["schema"])),
              max_tokens=96, temperature=1.0, seed=i)
    if not stream:
        ch = client.chat.completions.create(**kw).choices[0]
        return ch.message.content, ch.finish_reason
    text, finish = [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    return "".join(text), finish


def test_every_schema_parses_and_validates_streamed_and_not(server):
    fam, base, client, model = server
    jobs = [(e, i, stream) for i, e in enumerate(SCHEMAS) for stream in (False, True)]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda j: _one(client, model, *j), jobs))
    bad = []
    for (e, i, stream), (text, finish) in zip(jobs, results):
        try:
            assert finish == "stop", f"finish_reason {finish}"
            check(e["schema"], text)
        except (AssertionError, ValueError, jsonschema.ValidationError) as err:
            bad.append(f"{e['name']} stream={stream}: {str(err)[:120]} in {text[:80]!r}")
    assert not bad, "\n".join(bad)


def test_completions_take_a_schema(server):
    fam, base, client, model = server
    e = next(x for x in SCHEMAS if x["name"] == "strict_person")
    r = client.completions.create(model=model, prompt="一个人的信息：", max_tokens=128, temperature=1.0, seed=1,
                                  extra_body={"response_format": _schema_format(e, True)})
    assert r.choices[0].finish_reason == "stop"
    check(e["schema"], r.choices[0].text)


def _args_valid(call):
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    return check(tool["function"]["parameters"], call.function.arguments)


def test_tool_choice_required_calls_a_tool_under_its_schema(server):
    fam, base, client, model = server
    names = set()
    for seed in range(4):
        for stream in (False, True):
            kw = dict(model=model, messages=TOOL_ASK, tools=TOOLS, tool_choice="required", max_tokens=100,
                      temperature=1.0, seed=seed)
            if not stream:
                ch = client.chat.completions.create(**kw).choices[0]
                calls, finish = ch.message.tool_calls, ch.finish_reason
            else:
                parts, finish = {}, None
                for chunk in client.chat.completions.create(stream=True, **kw):
                    for c in chunk.choices:
                        for d in c.delta.tool_calls or []:
                            p = parts.setdefault(d.index, {"name": None, "args": ""})
                            p["name"] = d.function.name or p["name"]
                            p["args"] += d.function.arguments or ""
                        finish = c.finish_reason or finish
                calls = [openai.types.chat.ChatCompletionMessageToolCall(
                    id="x", type="function", function={"name": p["name"], "arguments": p["args"]})
                    for p in parts.values()]
            assert finish == "tool_calls" and calls, (finish, calls)
            for call in calls:
                _args_valid(call)
                names.add(call.function.name)
    assert names <= {"weather", "book"}


def test_parallel_tool_calls_false_gives_one_call(server):
    fam, base, client, model = server
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=100, temperature=1.0, seed=seed)
        (call,) = r.choices[0].message.tool_calls
        _args_valid(call)


def test_named_tool_choice_follows_the_tool_schema(server):
    fam, base, client, model = server
    r = client.chat.completions.create(model=model, messages=TOOL_ASK, tools=TOOLS, max_tokens=100, temperature=1.0,
                                       seed=2, tool_choice={"type": "function", "function": {"name": "book"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "book"
    assert set(_args_valid(call)) == {"date", "vip"}


@pytest.mark.parametrize("params, needle", [
    ({"type": "strnig"}, "is not a valid JSON Schema"),
    ("an object", "must be a JSON Schema object"),
    ({"type": "array", "items": {"type": "string"}}, "of type 'object'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": "one"}}}, "is not a valid JSON Schema"),
])
def test_invalid_tool_schema_is_a_400_naming_the_tool(server, params, needle):
    fam, base, client, model = server
    tools = TOOLS + [{"type": "function", "function": {"name": "broken_tool", "parameters": params}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, tools=tools, max_tokens=4)
    err = e.value.body
    assert "broken_tool" in err["message"] and needle in err["message"] and err["param"] == "tools", err


@pytest.mark.parametrize("rf, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "has no 'schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties":
                                                                       {"a": {"type": "string"}}},
                                             "strict": True}}, "additionalProperties"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}},
     "(unclosed"),
    ({"type": "xml"}, "not supported"),
])
def test_unusable_response_format_is_a_400(server, rf, needle):
    fam, base, client, model = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, response_format=rf, max_tokens=4)
    assert needle in e.value.body["message"] and e.value.body["param"] == "response_format", e.value.body


def test_tool_choice_required_without_tools_is_a_400(server):
    fam, base, client, model = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=ASK, tool_choice="required", max_tokens=4)
    assert e.value.body["param"] == "tool_choice"


# ------------------------------------------------------------------------------------------------------------
# Pipeline, CLI, budget
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    from conftest import ref_pipeline
    return ref_pipeline("chatglm3-6b")


def test_pipeline_schema_and_json(pipe):
    e = next(x for x in SCHEMAS if x["name"] == "nested_objects")
    r = pipe.chat(ASK, schema=e["schema"], max_tokens=96, temperature=1.0, seed=3)
    check(e["schema"], r)
    assert isinstance(json.loads(pipe.chat(ASK, json=True, max_tokens=48, temperature=1.0, seed=1)), dict)
    out = pipe.generate("JSON: ", schema={"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                        max_tokens=40, temperature=1.0, seed=2)
    assert all(isinstance(x, int) for x in json.loads(out))


@pytest.mark.parametrize("max_tokens", [8, 16, 30])
def test_short_max_tokens_close_the_answer_or_say_length(pipe, max_tokens):
    e = next(x for x in SCHEMAS if x["name"] == "strict_nested_mixed")
    for seed in range(3):
        run = pipe.start_chat(ASK, schema=e["schema"], max_tokens=max_tokens, temperature=1.0, seed=seed)
        text = run.result()
        assert run.stats.new_tokens <= max_tokens
        if run.response.finish_reason != "length":
            check(e["schema"], text)
    run = pipe.start_chat(ASK, schema=e["schema"], max_tokens=64, temperature=1.0, seed=0)
    check(e["schema"], run.result())          # room for the schema's shortest answer: closed within the budget


def test_generate_json_schema_file(tmp_path):
    f = tmp_path / "s.json"
    schema = next(x for x in SCHEMAS if x["name"] == "integer_range")["schema"]
    f.write_text(json.dumps(schema))
    r = subprocess.run([sys.executable, "-m", "glmkit", "generate", "--model", str(REF / "chatglm3-6b"), "--prompt",
                        "日期：", "--json-schema", str(f), "-n", "40", "-t", "1", "--seed", "4"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    check(schema, r.stdout)
    (tmp_path / "bad.json").write_text('{"type": 5}')
    r = subprocess.run([sys.executable, "-m", "glmkit", "generate", "--model", str(REF / "chatglm3-6b"), "--prompt",
                        "x", "--json-schema", str(tmp_path / "bad.json")], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert r.returncode == 1 and "bad.json is not a valid JSON Schema" in r.stderr


def test_chatglm3_call_arguments_read_json_literals():
    from glmkit.chat_format import parse_chatglm3_call
    assert parse_chatglm3_call('```python\ntool_call(a=true, b=[null, false], c="x")\n```') == \
        {"a": True, "b": [None, False], "c": "x"}
    assert parse_chatglm3_call("tool_call(a=undefined_name)") is None


def test_tool_grammar_for_a_schema_with_a_non_identifier_property():
    from glmkit.grammar import GrammarError, tool_call_grammar
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a-b": {"type": "string"}}, "required": ["a-b"]}}}]
    with pytest.raises(GrammarError, match="'a-b'"):
        tool_call_grammar("chatglm3", bad, "f", False, 64796)
    assert tool_call_grammar("glm4", bad, "f", False, 151337)       # GLM-4 writes JSON: any key

