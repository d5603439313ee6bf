"""Chat formats of ChatGLM-6B/2/3 (GLM-4 in test_glm4.py): prompts, system folding, tools, tool-call parsing,
answer post-processing (streamed == batch == the official regexes), validation and context fitting."""
from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GENERATIONS, OFFICIAL, needs_shared
from glmkit.chat_format import (ChatFormatError, ContentStream, normalize_messages, parse_chatglm3_call,
                                postprocess, render_within)
from glmkit.tokenizer import load_tokenizer

_TOKS = {}


def tok(gen):
    if gen not in _TOKS:
        _TOKS[gen] = load_tokenizer(OFFICIAL / gen, GENERATIONS[gen])
    return _TOKS[gen]


# ------------------------------------------------------------------------------------------------------------
# ChatGLM-6B / ChatGLM2-6B
# ------------------------------------------------------------------------------------------------------------

@needs_shared
def test_chatglm6b_rounds_and_system_folding():
    t = tok("chatglm-6b")
    # first turn: the question itself, no [Round] wrapper
    assert t.apply_chat_template([{"role": "user", "content": "你好"}]) == t.encode("你好")
    # a system message is prepended to the last question, as ChatGLM2-6B's openai_api.py does
    msgs = [{"role": "system", "content": "你是诗人。"}, {"role": "user", "content": "写诗"},
            {"role": "assistant", "content": "好的"}, {"role": "user", "content": "再写一首"}]
    want = "[Round 0]\n问：写诗\n答：好的\n[Round 1]\n问：你是诗人。再写一首\n答："
    assert t.apply_chat_template(msgs) == t.encode(want)
    with pytest.raises(ChatFormatError, match="no tool calling"):
        t.chat_format.render(msgs, tools=[{"type": "function", "function": {"name": "f"}}])


@needs_shared
def test_chatglm2_rounds():
    t = tok("chatglm2-6b")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}]
    assert t.apply_chat_template(msgs) == t.encode("[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：c\n\n答：")
    # consecutive questions are merged with a newline; the answer must come last from the user
    assert t.apply_chat_template([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == \
        t.encode("[Round 1]\n\n问：x\ny\n\n答：")
    with pytest.raises(ChatFormatError, match="last message"):
        t.apply_chat_template(msgs[:2])


# ------------------------------------------------------------------------------------------------------------
# ChatGLM3-6B
# ------------------------------------------------------------------------------------------------------------

TRACK = {"name": "track", "description": "追踪指定股票的实时价格",
         "parameters": {"type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}},
                        "required": ["symbol"]}}


def official_chatglm3(t, history, query_role="user"):
    """ChatGLM3's build_chat_input, restated with sentencepiece directly (the oracle)."""
    sp, cmd = t.sp, t.token_id
    ids = [cmd("[gMASK]"), cmd("sop")]
    for item in history:
        content = item["content"]
        if item["role"] == "system" and "tools" in item:
            content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
        ids += [cmd(f"<|{item['role']}|>")] + sp.encode(f"{item.get('metadata', '')}\n") + sp.encode(content)
    return ids + [cmd("<|assistant|>")]


@needs_shared
def test_chatglm3_tools_prompt_and_round_trip():
    t = tok("chatglm3-6b")
    openai_tools = [{"type": "function", "function": TRACK}]
    q = [{"role": "user", "content": "帮我查询股票10111的价格"}]
    system = "Answer the following questions as best as you can. You have access to the following tools:"
    native = [{"role": "system", "content": system, "tools": [TRACK]}, q[0]]
    assert t.apply_chat_template(q, tools=openai_tools) == official_chatglm3(t, native)
    # with the call and its result in the history (observation role)
    convo = q + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "track", "arguments": '{"symbol": "10111"}'}}]},
        {"role": "tool", "content": '{"price": 12412}'}]
    native += [{"role": "assistant", "metadata": "track", "content": "```python\ntool_call(symbol='10111')\n```"},
               {"role": "observation", "content": '{"price": 12412}'}]
    assert t.apply_chat_template(convo, tools=openai_tools) == official_chatglm3(t, native)
    # a system message of the caller's own carries the tools
    own = [{"role": "system", "content": "You are a broker."}] + q
    assert t.apply_chat_template(own, tools=openai_tools) == official_chatglm3(
        t, [{"role": "system", "content": "You are a broker.", "tools": [TRACK]}, q[0]])


def test_chatglm3_tool_call_parsing_uses_ast_not_eval():
    assert parse_chatglm3_call(" ```python\ntool_call(symbol='10111', n=3, opts={'a': [1, 2]})\n```") == \
        {"symbol": "10111", "n": 3, "opts": {"a": [1, 2]}}
    assert parse_chatglm3_call("tool_call()") == {}
    # anything that is not a literal is refused, so nothing is ever executed
    for bad in ["tool_call(x=__import__('os').system('echo pwned'))", "tool_call(x=open('/etc/passwd'))",
                "os.system('ls')", "tool_call('positional')", "tool_call(**{'a': 1})", "not python ("]:
        assert parse_chatglm3_call(bad) is None


@needs_shared
def test_chatglm3_answer_parsing():
    t = tok("chatglm3-6b")
    fmt = t.chat_format
    prompt = fmt.render([{"role": "user", "content": "查股票"}], tools=[{"type": "function", "function": TRACK}])

    def run(text_ids):
        p = fmt.parser(prompt)
        out = "".join(p.feed(i) for i in text_ids) + p.finish()
        return out, p.tool_calls

    call_ids = t.encode_plain("track\n") + t.encode_plain(" ```python\ntool_call(symbol='10111')\n```")
    text, calls = run(call_ids)
    assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("track", {"symbol": "10111"})]
    text, calls = run(t.encode_plain("\n") + t.encode_plain(" 你好，[[训练时间]]的数据。 "))
    assert text == "你好，2023年的数据。" and calls == []
    # an answer segment then a new <|assistant|> segment with a call
    text, calls = run(t.encode_plain("\n好的") + [t.token_id("<|assistant|>")] + call_ids)
    assert text == "好的" and calls[0].name == "track"
    # a code block that is not a tool_call(...) stays text
    text, calls = run(t.encode_plain("track\n") + t.encode_plain("```python\nprint(1)\n```"))
    assert calls == [] and "print(1)" in text


@needs_shared
def test_stop_ids_per_generation():
    assert tok("chatglm3-6b").chat_format.stop_ids == [2, 64795, 64797]
    assert tok("chatglm2-6b").chat_format.stop_ids == [2]
    assert tok("chatglm-6b").chat_format.stop_ids == [130005]


# ------------------------------------------------------------------------------------------------------------
# post-processing: streaming == batch == official
# ------------------------------------------------------------------------------------------------------------

def official_process_response(response: str, fullwidth: bool) -> str:
    """ChatGLM-6B's process_response (ChatGLM2/3: only the first two steps)."""
    response = response.strip()
    response = response.replace("[[训练时间]]", "2023年")
    if fullwidth:
        for a, b in [[",", "，"], ["!", "！"], [":", "："], [";", "；"], [r"\?", "？"]]:
            response = re.sub(r"([\u4e00-\u9fff])%s" % a, r"\1%s" % b, response)
            response = re.sub(r"%s([\u4e00-\u9fff])" % a, r"%s\1" % b, response)
    return response


ALPHABET = list("你好ab ,!:;?，\n[]训练时间") + ["[[训练时间]]", "  "]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=30), st.booleans(), st.data())
def test_postprocess_streaming_equals_official(chunks, fullwidth, data):
    text = "".join(chunks)
    want = official_process_response(text, fullwidth)
    # split the text at arbitrary points, as tokens would arrive
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    cs = ContentStream(fullwidth)
    streamed = "".join(cs.push(p) for p in pieces) + cs.push("", final=True)
    assert streamed == want


@needs_shared
def test_postprocess_examples():
    fmt = tok("chatglm-6b").chat_format
    assert postprocess(fmt, " 你好,世界!How are you?好的:是; ") == "你好，世界！How are you？好的：是；"


# ------------------------------------------------------------------------------------------------------------
# validation and context fitting
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages,match", [
    ([], "empty"),
    ([{"role": "wizard", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}], "must follow an assistant"),
    ([{"role": "user", "content": 5}], "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "not supported"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ChatFormatError, match=match):
        normalize_messages(messages)


def test_content_parts_and_bare_string():
    assert normalize_messages("hi")[0]["content"] == "hi"
    m = normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert m[0]["content"] == "ab"


@needs_shared
@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_oldest_turns_dropped_system_kept(gen):
    t = tok(gen)
    fmt = t.chat_format
    system = [{"role": "system", "content": "SYSTEM PROMPT"}]
    turns = []
    for k in range(6):
        turns += [{"role": "user", "content": f"question {k} " + "很长的问题" * 10},
                  {"role": "assistant", "content": f"answer {k} " + "很长的回答" * 10}]
    msgs = system + turns + [{"role": "user", "content": "last question"}]
    full = len(fmt.render(msgs).ids)
    budget = full - 40
    p = render_within(fmt, msgs, budget)
    assert len(p.ids) <= budget and p.dropped >= 2 and p.dropped % 2 == 0
    text = t.decode(p.ids)
    assert "SYSTEM PROMPT" in text and "last question" in text and "question 0 " not in text
    with pytest.raises(ChatFormatError, match="tokens"):
        render_within(fmt, system + [{"role": "user", "content": "很长" * 500}], 100)
