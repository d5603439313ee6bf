"""Fine-tuning data (glmkit/train/finetune_data.py): the four formats on their real sample files, rendering in each
generation's chat format (prompts token-identical to chat_format.render, labels = the answers + stop id), the
ChatGLM3 loss flag, tools and observations, truncation, bad lines and empty data."""
from __future__ import annotations

import base64
import collections
import json
import re

import pytest

from conftest import GENERATIONS, REF, SHARED
from glmkit.chat_format import CHATGLM3_TOOL_PROMPT, Prompt, normalize_tools, postprocess
from glmkit.tokenizer import load_tokenizer
from glmkit.train import finetune_data as fd
from glmkit.train.finetune_data import IGNORE, FinetuneDataError

CORPORA = SHARED / "corpora"
needs_corpora = pytest.mark.skipif(not (CORPORA / "instruct").is_dir() or not REF.is_dir(),
                                   reason=f"{SHARED} (corpora and reference tokenizers) is absent")
SAMPLES = {                                     # file -> (format detected, records)
    "advertisegen/dev.json": ("columns", 1070),
    "instruct/alpaca_en_demo.json": ("alpaca", 999),
    "instruct/alpaca_zh_demo.json": ("alpaca", 1000),
    "instruct/identity.json": ("alpaca", 91),
    "instruct/glaive_toolcall_en_demo.json": ("sharegpt", 300),
    "instruct/glaive_toolcall_zh_demo.json": ("sharegpt", 300),
}
FAMILIES = ["chatglm", "chatglm2", "chatglm3", "glm4"]
_TOKS: dict = {}


# ------------------------------------------------------------------------------------------------------------
# tokenizers: the reference checkpoints' (real vocabularies) and a GLM-4 tiktoken file built here
# ------------------------------------------------------------------------------------------------------------

def _tiktoken_file(path, text: str, merges: int = 150):
    """A small byte-level BPE in tiktoken's format (base64 token, rank): 256 bytes, then the commonest pairs."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in re.findall(r"\w+|[^\w\s]+|\s+", text)]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), n = pairs.most_common(1)[0]
        if n < 2:
            break
        ranks.setdefault(a + b, len(ranks))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def tok(family: str, tmp_path_factory=None):
    if family not in _TOKS:
        if family == "glm4":
            d = tmp_path_factory.mktemp("glm4tok")
            text = "\n".join(r["output"] for r in json.loads(
                (CORPORA / "instruct/alpaca_en_demo.json").read_text(encoding="utf-8"))[:12])
            _tiktoken_file(d / "tokenizer.model", text + " 你好，我是人工智能助手。北京的天气怎么样？ {\"name\": 1}")
            _TOKS[family] = load_tokenizer(d, "glm4")
        else:
            gen = next(g for g, f in GENERATIONS.items() if f == family)
            _TOKS[family] = load_tokenizer(REF / gen, family)
    return _TOKS[family]


@pytest.fixture(params=FAMILIES)
def family_tok(request, tmp_path_factory):
    if not REF.is_dir():
        pytest.skip(f"{SHARED} (reference tokenizers) is absent")
    return tok(request.param, tmp_path_factory)


@pytest.fixture(params=["chatglm3", "glm4"])
def tools_tok(request, tmp_path_factory):
    if not REF.is_dir():
        pytest.skip(f"{SHARED} (reference tokenizers) is absent")
    return tok(request.param, tmp_path_factory)


def read(rel, **kw):
    errors = []
    return fd.read_examples([CORPORA / rel], on_error=errors.append, **kw), errors


# ------------------------------------------------------------------------------------------------------------
# checks shared by the tests
# ------------------------------------------------------------------------------------------------------------

def parse_answer(t, prompt_ids, tools, answer_ids):
    """What the server makes of these generated ids: (content, [(name, arguments dict)])."""
    p = t.chat_format.parser(Prompt(ids=prompt_ids, tools=normalize_tools(tools)))
    for i in answer_ids:
        p.feed(i)
    p.finish()
    return p.text, [(c.name, json.loads(c.arguments)) for c in p.tool_calls]


def expected_answer(m):
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls") or []]
    return m["content"], calls


def check(t, ex, ids, labels, st):
    """Labels = exactly the trained answers + their stop id; every answer's prompt = chat_format.render."""
    fmt = t.chat_format
    asst = t.special.get("<|assistant|>")
    msgs = ex.messages
    assert len(ids) == len(labels)
    covered = set()
    for i, a, b in st["spans"]:
        assert labels[a:b] == ids[a:b]
        covered.update(range(a, b))
        opens = msgs[i - 1]["role"] != "assistant"
        if opens:                                      # the prompt the server sends for this turn
            assert ids[:a] == fmt.render(msgs[:i], tools=ex.tools or None).ids, ex.source
        stop = ids[b - 1]
        assert stop in fmt.stop_ids or stop == asst, ex.source
        if fmt.family in ("chatglm", "chatglm2"):
            e = max(j for j in range(i, len(msgs)) if all(m["role"] == "assistant" for m in msgs[i:j + 1])) + 1
            answer = "\n".join(m["content"] for m in msgs[i:e])
            assert ids[a:b - 1] == t.encode(answer, add_special_tokens=False), ex.source
            assert stop == t.eos_id
        else:
            content, calls = parse_answer(t, ids[:a], ex.tools, ids[a:b - 1])
            want_content, want_calls = expected_answer(msgs[i])
            assert calls == want_calls, ex.source
            assert content == postprocess(fmt, want_content), ex.source
            if not opens:
                assert ids[a - 1] == asst              # a segment of the same answer opens with <|assistant|>
    assert all(lab == IGNORE for k, lab in enumerate(labels) if k not in covered), ex.source
    assert ids[-1] == t.eos_id
    assert st["tokens"] == len(ids) and st["target_tokens"] == len(covered)


# ------------------------------------------------------------------------------------------------------------
# the real sample files
# ------------------------------------------------------------------------------------------------------------

@needs_corpora
@pytest.mark.parametrize("rel", list(SAMPLES))
def test_sample_files_parse(rel):
    kind, n = SAMPLES[rel]
    examples, errors = read(rel, replacements={"name": "glm-tiny", "author": "glmkit"})
    forced, _ = read(rel, fmt=kind, replacements={"name": "glm-tiny", "author": "glmkit"})
    assert [e.fmt for e in examples] == [kind] * len(examples)
    assert [e.messages for e in forced] == [e.messages for e in examples]
    if rel.endswith("glaive_toolcall_zh_demo.json"):
        # two records answer with a plain "gpt" turn and then give an observation: no function_call to answer
        assert len(examples) == n - 2 and len(errors) == 2
        for msg in errors:
            line = int(msg.split(":")[1])
            text = (CORPORA / rel).read_text(encoding="utf-8").split("\n")
            assert text[line - 1].strip() == "{" and "tool message must follow" in msg
    else:
        assert len(examples) == n and errors == []
    raw = (CORPORA / rel).read_text(encoding="utf-8")
    first = json.loads(raw.split("\n")[0]) if kind == "columns" else json.loads(raw)[0]
    ex = examples[0]
    assert ex.source == f"{CORPORA / rel}:{1 if kind == 'columns' else 2}"
    if kind == "columns":
        assert ex.messages == [{"role": "user", "content": first["content"]},
                               {"role": "assistant", "content": first["summary"]}]
    elif kind == "alpaca":
        q = "\n".join(s for s in (first["instruction"], first["input"]) if s)
        a = first["output"].replace("{{name}}", "glm-tiny").replace("{{author}}", "glmkit")
        assert ex.messages == [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert "{{" not in json.dumps([e.messages for e in examples], ensure_ascii=False)
    else:
        roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
        assert [m["role"] for m in ex.messages] == [roles[c["from"]] for c in first["conversations"]]
        assert ex.tools == normalize_tools(json.loads(first["tools"]))
        assert any(m.get("tool_calls") for e in examples for m in e.messages)
    assert ex.loss == [m["role"] == "assistant" for m in ex.messages]


@needs_corpora
@pytest.mark.parametrize("rel", list(SAMPLES))
def test_sample_files_render_in_each_format(rel, family_tok):
    t = family_tok
    examples, _ = read(rel, replacements={"name": "glm-tiny", "author": "glmkit"})
    rounds = t.family in ("chatglm", "chatglm2")
    checked = 0
    for ex in examples[:25]:
        if rounds and (ex.tools or any(m["role"] == "tool" for m in ex.messages)):
            with pytest.raises(ValueError, match="no tool calling"):
                fd.encode_example(t, ex)
            continue
        for e in (fd.turn_examples(ex) if rounds else [ex]):
            ids, labels, st = fd.encode_example(t, e)
            check(t, e, ids, labels, st)
            assert not st["truncated"]
            checked += 1
    assert checked > 0


@needs_corpora
def test_glaive_tool_calls_and_observations_as_chat_format_renders_them(tools_tok):
    """Tools on the system turn, calls as chat_format renders history, observations as <|observation|> turns
    (ChatGLM-6B / ChatGLM2-6B have no tools: test_tools_need_a_tool_format)."""
    t = tools_tok
    examples, _ = read("instruct/glaive_toolcall_en_demo.json")
    ex = next(e for e in examples if sum(bool(m.get("tool_calls")) for m in e.messages) >= 2)
    ids, labels, st = fd.encode_example(t, ex)
    check(t, ex, ids, labels, st)
    trained = [ex.messages[i] for i, _, _ in st["spans"]]
    assert trained == [m for m in ex.messages if m["role"] == "assistant"]
    obs = t.token_id("<|observation|>")
    calls = [(i, a, b) for i, a, b in st["spans"] if ex.messages[i].get("tool_calls")]
    assert all(ids[b - 1] == obs for _, _, b in calls)            # a call ends with <|observation|>
    # the conversation without its last answer is what the server renders for that turn
    last = st["spans"][-1]
    assert ids[:last[1]] == t.chat_format.render(ex.messages[:last[0]], tools=ex.tools).ids
    # the observation text sits in the prompt, untrained
    tool_msg = next(m for m in ex.messages if m["role"] == "tool")
    k = ids.index(obs)
    assert labels[k + 1] == IGNORE and t.decode(ids[k:k + 40]).strip().startswith(tool_msg["content"][:10])


def test_tools_need_a_tool_format(tmp_path):
    if not REF.is_dir():
        pytest.skip(f"{SHARED} is absent")
    rec = {"conversations": [{"from": "human", "value": "weather?"},
                             {"from": "function_call", "value": '{"name": "w", "arguments": {"city": "x"}}'},
                             {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "It is sunny."}],
           "tools": '[{"name": "w", "description": "weather", "parameters": {}}]'}
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([rec, rec]))
    errors = []
    with pytest.raises(FinetuneDataError, match=r"no usable examples in .*tools.json for chatglm2: 2 of 2 records "
                                                r"skipped .*has no tool calling"):
        fd.load_dataset([f], tok("chatglm2"), on_error=errors.append)
    assert len(errors) == 2 and errors[0].startswith(f"{f}:1: ")
    pairs, s = fd.load_dataset([f], tok("chatglm3"), on_error=errors.append)
    assert s.examples == 2 and s.skipped == 0


# ------------------------------------------------------------------------------------------------------------
# ChatGLM3 conversations: loss flag, the demo's tool turn, raw metadata calls; parity with the official demo
# ------------------------------------------------------------------------------------------------------------

def official_chatglm3_sequence(t, rec):
    """The ChatGLM3 finetune demo's format_conversation + label shift, rebuilt from its description: each message is
    <|role|> + "{metadata}\\n" + content; a tool turn becomes an assistant call + an observation; the tools go on a
    system message first; eos at the end; a token is a label when the one before it is in a loss message."""
    def msg(role, metadata, content):
        return [t.token_id(f"<|{role}|>")] + t.encode_plain(f"{metadata}\n") + t.encode_plain(content)

    ids, mask = [t.token_id("[gMASK]"), t.token_id("sop")], [False, False]
    conv = list(rec["conversations"])
    if "tools" in rec:
        conv.insert(0, {"role": "system", "content": CHATGLM3_TOOL_PROMPT + "\n" +
                        json.dumps(rec["tools"], indent=4, ensure_ascii=False)})
    for m in conv:
        loss = m.get("loss", True) and m["role"] not in ("system", "user")
        if m["role"] == "tool":
            kw = ", ".join(f"{k}={v!r}" for k, v in m["parameters"].items())
            part = msg("assistant", m["name"], f"```python\ntool_call({kw})\n```")
            ids, mask = ids + part, mask + [loss] * len(part)
            part = msg("observation", "", json.dumps(m["observation"], ensure_ascii=False))
            ids, mask = ids + part, mask + [False] * len(part)
        else:
            part = msg(m["role"], "", m["content"])
            ids, mask = ids + part, mask + [loss] * len(part)
    ids.append(t.eos_id)
    mask.append(False)
    shifted = [False] + mask[:-1]
    return ids, [i if s else IGNORE for i, s in zip(ids, shifted)]


CHATGLM3_REC = {
    "tools": [{"name": "get_weather", "description": "weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
    "conversations": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？", "loss": False},
        {"role": "user", "content": "北京的天气怎么样？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 25}},
        {"role": "assistant", "content": "北京今天晴，气温二十五度。"},
    ]}


@needs_corpora
def test_chatglm3_loss_flag_tool_turn_and_official_parity():
    t = tok("chatglm3")
    ex = fd.parse_record(CHATGLM3_REC, source="x:1")
    assert ex.fmt == "chatglm3"
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant", "tool",
                                                "assistant"]
    assert ex.loss == [False, False, False, False, True, False, True]
    assert ex.messages[4]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
    assert ex.messages[5] == {"role": "tool", "content": '{"temp": 25}'}
    ids, labels, st = fd.encode_example(t, ex)
    check(t, ex, ids, labels, st)
    assert [i for i, _, _ in st["spans"]] == [4, 6]                 # the loss: false answer is not trained
    greeting = t.encode_plain("你好！有什么可以帮你？")
    k = next(j for j in range(len(ids)) if ids[j:j + len(greeting)] == greeting)
    assert set(labels[k - 3:k + len(greeting) + 1]) == {IGNORE}
    # the tools go on the (given) system message, as chat_format does; with the system text being the default
    # tool prompt the official demo's sequence is the same, token for token
    rec = {**CHATGLM3_REC, "conversations": CHATGLM3_REC["conversations"][1:]}
    ex2 = fd.parse_record(rec)
    ids2, labels2, _ = fd.encode_example(t, ex2)
    assert (ids2, labels2) == official_chatglm3_sequence(t, rec)
    # an observation that is also marked loss: true is still not trained
    rec3 = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                              {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "loss": False}]}
    ids3, labels3, st3 = fd.encode_example(t, fd.parse_record(rec3))
    assert [i for i, _, _ in st3["spans"]] == [1]
    assert labels3[-1] == t.eos_id and t.decode(ids3).endswith("a")  # the untrained last turn is left out


@needs_corpora
def test_chatglm3_raw_and_openai_tool_calls_read_the_same():
    t = tok("chatglm3")
    call = {"name": "get_weather", "arguments": '{"city": "北京"}'}
    base = [{"role": "user", "content": "北京的天气？"}]
    tail = [{"role": "observation", "content": "晴"}, {"role": "assistant", "content": "晴天。"}]
    raw = {"conversations": base + [{"role": "assistant", "metadata": "get_weather",
                                     "content": "```python\ntool_call(city='北京')\n```"}] + tail}
    openai = {"messages": base + [{"role": "assistant", "content": None,
                                   "tool_calls": [{"type": "function", "function": call}]}] + tail}
    demo = {"conversations": base + [{"role": "tool", "name": "get_weather", "parameters": {"city": "北京"},
                                      "observation": "晴"}] + tail[1:]}
    a, b, c = (fd.encode_example(t, fd.parse_record(r))[:2] for r in (raw, openai, demo))
    assert a == b == c


# ------------------------------------------------------------------------------------------------------------
# columns (AdvertiseGen) and the official truncation
# ------------------------------------------------------------------------------------------------------------

def official_columns(t, q, a, S, T, history=()):
    """ptuning/main.py's preprocess_function_train (ChatGLM-6B: prompt[:S-1] + [gMASK] <sop> + answer[:T-2] +
    <eop>; ChatGLM2-6B: ([gMASK] sop + prompt)[:S] + answer[:T] + eos), our labels (no loss on <sop>)."""
    if t.family == "chatglm":
        p = q if not history else "".join(f"[Round {i}]\n问：{x}\n答：{y}\n" for i, (x, y) in enumerate(history)) + \
            f"[Round {len(history)}]\n问：{q}\n答："
        a_ids = t.encode(p, add_special_tokens=False)[:S - 1] + [t.token_id("[gMASK]"), t.token_id("<sop>")]
        b_ids = t.encode(a, add_special_tokens=False)[:T - 2]
    else:
        p = "".join(f"[Round {i + 1}]\n\n问：{x}\n\n答：{y}\n\n" for i, (x, y) in enumerate(history)) + \
            f"[Round {len(history) + 1}]\n\n问：{q}\n\n答："
        a_ids = t.encode(p)[:S]
        b_ids = t.encode(a, add_special_tokens=False)[:T]
    return a_ids + b_ids + [t.eos_id], [IGNORE] * len(a_ids) + b_ids + [t.eos_id]


@needs_corpora
@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_columns_truncation_is_the_official_scripts(family):
    t = tok(family)
    S, T = 24, 20
    examples, _ = read("advertisegen/dev.json")
    examples = examples[:60]
    pairs, s = fd.encode_examples(t, examples, S, T, on_error=None)
    n_trunc = 0
    for ex, (ids, labels) in zip(examples, pairs):
        q, a = ex.messages[0]["content"], ex.messages[1]["content"]
        assert (ids, labels) == official_columns(t, q, a, S, T)
        full = fd.encode_example(t, ex)[0]
        n_trunc += len(full) != len(ids)
        assert len(ids) <= S + T + (family != "chatglm")
    assert s.truncated == n_trunc > 0 and s.examples == 60


@needs_corpora
def test_columns_with_history_and_custom_names(tmp_path):
    f = tmp_path / "adgen.jsonl"
    rows = [{"q": "第三个问题", "a": "第三个回答", "h": [["第一个问题", "第一个回答"], ["第二个问题", "第二个回答"]]},
            {"q": "只有一个问题", "a": "一个回答", "h": []}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    ex = fd.read_examples([f], prompt_column="q", response_column="a", history_column="h", on_error=None)
    assert [e.fmt for e in ex] == ["columns", "columns"]
    assert ex[0].loss == [False, False, False, False, False, True]   # the history is prompt, as the official script
    for family in ("chatglm", "chatglm2"):
        t = tok(family)
        for e, r in zip(ex, rows):
            ids, labels, st = fd.encode_example(t, e, 1000, 1000)
            assert (ids, labels) == official_columns(t, r["q"], r["a"], 1000, 1000, r["h"])
            check(t, e, ids, labels, st)
    t = tok("chatglm3")
    ids, labels, st = fd.encode_example(t, ex[0])
    check(t, ex[0], ids, labels, st)
    assert len(st["spans"]) == 1
    with pytest.raises(FinetuneDataError, match="go together"):
        fd.read_examples([f], prompt_column="q")


@needs_corpora
def test_role_format_source_cut_keeps_the_special_ends(family_tok):
    t = family_tok
    S, T = 12, 6
    ex = fd.parse_record({"content": "类型#裙*颜色#白色*风格#简约*图案#刺绣*裙长#连衣裙*裙领型#半高领",
                          "summary": "简约而不简单的连衣裙，白色的裙身十分百搭，刺绣装饰彰显别样时尚。"})
    full, full_labels, _ = fd.encode_example(t, ex)
    ids, labels, st = fd.encode_example(t, ex, S, T)
    first = next(i for i, x in enumerate(full_labels) if x != IGNORE)
    prompt, answer = full[:first], full[first:-1]
    specials = t.special_ids
    head = next(i for i, x in enumerate(prompt) if x not in specials)
    tail = next(i for i, x in enumerate(reversed(prompt)) if x not in specials)
    s_budget, t_budget = (S + 1, T - 2) if t.family == "chatglm" else (S, T)
    want_src = prompt[:s_budget - tail] + prompt[len(prompt) - tail:]
    assert ids == want_src + answer[:t_budget] + [t.eos_id]
    assert labels == [IGNORE] * len(want_src) + answer[:t_budget] + [t.eos_id]
    assert prompt[:head] == want_src[:head] and len(want_src) == s_budget
    assert st["truncated"] and st["source_cut"] == len(prompt) - s_budget
    assert st["target_cut"] == len(answer) - t_budget
    if t.family in ("chatglm3", "glm4"):
        assert ids[len(want_src) - 1] == t.token_id("<|assistant|>")


# ------------------------------------------------------------------------------------------------------------
# multi-turn truncation: oldest rounds dropped (system and tools kept), then the source/target cut
# ------------------------------------------------------------------------------------------------------------

def long_chat(rounds=6):
    conv = [{"from": "system", "value": "SYSTEM PROMPT"}]
    for k in range(rounds):
        conv += [{"from": "human", "value": f"question {k}: " + "很长的问题" * 6},
                 {"from": "gpt", "value": f"answer {k}: " + "很长的回答" * 6}]
    return {"conversations": conv}


@needs_corpora
def test_multi_turn_drops_oldest_rounds(family_tok):
    t = family_tok
    ex = fd.parse_record(long_chat(), source="chat.json:1")
    assert ex.fmt == "sharegpt" and ex.messages[0] == {"role": "system", "content": "SYSTEM PROMPT"}
    full, _, st0 = fd.encode_example(t, ex)
    assert not st0["truncated"]
    conv = long_chat()["conversations"]
    last_round = fd.parse_record({"conversations": conv[:1] + conv[-2:]})
    S = T = len(fd.encode_example(t, last_round)[0])                 # about two rounds fit
    ids, labels, st = fd.encode_example(t, ex, S, T)
    limit = S + T + (0 if t.family == "chatglm" else 1)
    assert len(full) > limit >= len(ids)
    assert st["truncated"] and st["dropped_rounds"] >= 1 and st["source_cut"] == 0 and st["target_cut"] == 0
    text = t.decode(ids)
    assert "SYSTEM PROMPT" in text and "question 0:" not in text and "answer 5:" in text
    kept = ex.messages[:1] + ex.messages[1 + 2 * st["dropped_rounds"]:]
    i, a, b = st["spans"][-1]
    assert ex.messages[i]["content"].startswith("answer 5:")
    kept_i = i - 2 * st["dropped_rounds"]
    assert ids[:a] == t.chat_format.render(kept[:kept_i]).ids       # what the server renders after dropping
    # one round that is still too long: its prompt cut to S, its answer to T
    ids, labels, st = fd.encode_example(t, ex, 8, 6)
    first = next(k for k, x in enumerate(labels) if x != IGNORE)
    s_budget, t_budget = (9, 4) if t.family == "chatglm" else (8, 6)
    assert st["dropped_rounds"] == 5 and first <= s_budget and len(ids) - first <= t_budget + 1
    assert labels[-1] == t.eos_id and sum(x != IGNORE for x in labels) == t_budget + 1


@needs_corpora
def test_each_turn_gives_every_answer_its_own_serving_prompt():
    conv = [{"role": "user", "content": f"问题{k}"} if j == 0 else {"role": "assistant", "content": f"回答{k}"}
            for k in range(3) for j in range(2)]
    conv[3]["loss"] = False                                          # the second answer is not trained
    ex = fd.parse_record({"conversations": conv}, source="c.json:1")
    for family in ("chatglm", "chatglm2"):
        t = tok(family)
        one, s1 = fd.encode_examples(t, [ex], on_error=None)
        each, s2 = fd.encode_examples(t, [ex], on_error=None, each_turn=True)
        assert s1.examples == 1 and s2.examples == 2 and s2.records == 1
        assert each[-1] == one[0]                                    # the last answer after the whole history
        for (ids, labels), e in zip(each, fd.turn_examples(ex)):
            check(t, e, ids, labels, fd.encode_example(t, e)[2])
        answers = [t.decode([x for x in labels if x != IGNORE]) for _, labels in each]
        assert answers == ["回答0", "回答2"]
    t = tok("chatglm3")
    (ids, labels), = fd.encode_examples(t, [ex], on_error=None, each_turn=True)[0]
    st = fd.encode_example(t, ex)[2]
    assert [i for i, _, _ in st["spans"]] == [1, 5]                 # one sequence trains both answers
    check(t, ex, ids, labels, st)


@needs_corpora
def test_summary_counts_and_line():
    t = tok("chatglm3")
    pairs, s = fd.load_dataset([CORPORA / "advertisegen/dev.json", CORPORA / "instruct/identity.json"], t,
                               max_source_length=32, max_target_length=64, on_error=None,
                               replacements={"name": "glm-tiny", "author": "glmkit"})
    assert s.files == 2 and s.records == s.examples == len(pairs) == 1070 + 91 and s.skipped == 0
    assert s.tokens == sum(len(i) for i, _ in pairs)
    assert s.target_tokens == sum(sum(x != IGNORE for x in lab) for _, lab in pairs)
    assert 0 < s.truncated < s.examples
    line = fd.format_summary(s)
    assert line == s.line()
    assert (f"{s.examples} examples from 2 files" in line and f"{s.tokens} tokens" in line
            and f"{s.target_tokens} of them trained" in line and f"{s.truncated} truncated" in line
            and "--max-source-length 32" in line)


# ------------------------------------------------------------------------------------------------------------
# bad data
# ------------------------------------------------------------------------------------------------------------

def test_bad_lines_are_reported_and_skipped(tmp_path):
    f = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"instruction": "hi", "input": "", "output": "hello"}),               # 1 ok
        '{"instruction": "broken", ',                                                      # 2 not JSON
        json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),  # 3 ok
        json.dumps({"foo": 1}),                                                            # 4 unknown format
        "",                                                                                # 5 blank
        json.dumps({"instruction": "no output"}),                                          # 6 no output
        json.dumps({"conversations": [{"from": "robot", "value": "q"}]}),                  # 7 bad role
        json.dumps({"conversations": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a", "loss": "yes"}]}),  # 8 bad loss
        json.dumps({"conversations": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a", "loss": False}]}),  # 9 nothing trained
        json.dumps({"conversations": [{"from": "human", "value": "q"},
                                       {"from": "function_call", "value": "not json"}]}),  # 10 bad call
        json.dumps([1, 2]),                                                                # 11 not an object
        json.dumps({"content": "q", "summary": "a"}),                                      # 12 ok (AdvertiseGen)
    ]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    errors = []
    s = fd.Summary()
    ex = fd.read_examples([f], on_error=errors.append, summary=s)
    assert [e.source for e in ex] == [f"{f}:1", f"{f}:3", f"{f}:12"]
    assert [e.fmt for e in ex] == ["alpaca", "sharegpt", "columns"]
    assert [m.split(": ")[0] for m in errors] == [f"{f}:{n}" for n in (2, 4, 6, 7, 8, 9, 10, 11)]
    for n, words in [(2, "not JSON"), (4, "not a known format"), (6, "'output' is missing"), (7, "'robot'"),
                     (8, "'loss' must be true or false"), (9, "no assistant answer"), (10, "not JSON"),
                     (11, "must be a JSON object")]:
        msg = next(m for m in errors if m.startswith(f"{f}:{n}: "))
        assert words in msg and msg.endswith("skipped"), msg
    assert (s.files, s.records, s.skipped) == (1, 11, 8)


def test_json_list_errors_name_the_record_line(tmp_path):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d", "output": "e"}]
    f = tmp_path / "list.json"
    f.write_text(json.dumps(recs, indent=2))
    errors = []
    ex = fd.read_examples([f], on_error=errors.append)
    starts = [n for n, ln in enumerate(f.read_text().split("\n"), 1) if ln == "  {"]   # each record's "{"
    assert starts == [2, 6, 9]
    assert [e.source for e in ex] == [f"{f}:2", f"{f}:9"] and len(errors) == 1
    assert errors[0].startswith(f"{f}:6: ") and "'output' is missing" in errors[0]
    # a list broken in the middle: the records before it are kept, the break is reported where it is
    g = tmp_path / "broken.json"
    g.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c", "output": \n]\n')
    errors = []
    ex = fd.read_examples([g], on_error=errors.append)
    assert len(ex) == 1 and len(errors) == 1 and errors[0].startswith(f"{g}:4: not JSON")
    # a .json file holding JSONL (AdvertiseGen's dev.json) with a broken first line
    h = tmp_path / "adgen.json"
    h.write_text('{"content": "q1", "summary": \n{"content": "q2", "summary": "a2"}\n')
    errors = []
    ex = fd.read_examples([h], on_error=errors.append)
    assert [e.source for e in ex] == [f"{h}:2"] and errors[0].startswith(f"{h}:1: not JSON")


def test_empty_and_all_bad_data_are_clear_errors_before_any_model(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    errors = []
    with pytest.raises(FinetuneDataError, match=r"no usable examples in .*empty.jsonl: no records in 1 file "
                                                r"\(first problems: .*empty file"):
        fd.read_examples([empty], on_error=errors.append)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\nnot json\n{"foo": 2}\n')
    with pytest.raises(FinetuneDataError) as e:
        fd.load_dataset([bad], tokenizer=None, on_error=None)   # fails before the tokenizer is ever used
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert msg.startswith(f"no usable examples in {bad}: 3 of 3 records skipped (first problems: {bad}:1: ")
    assert f"{bad}:2: not JSON" in msg and f"{bad}:3: " in msg
    d = tmp_path / "folder"
    d.mkdir()
    with pytest.raises(FinetuneDataError, match="no records in 0 files"):
        fd.read_examples([d], on_error=None)
    with pytest.raises(FinetuneDataError, match="unknown data format"):
        fd.read_examples([bad], fmt="csv")
    with pytest.raises(FinetuneDataError, match="forced"):
        fd.read_examples([bad], fmt="forced")
    with pytest.raises(FileNotFoundError):
        fd.read_examples([tmp_path / "missing.json"])


def test_forced_format_reports_what_the_format_needs(tmp_path):
    f = tmp_path / "sharegpt.json"
    f.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
    errors = []
    with pytest.raises(FinetuneDataError, match="'instruction' is missing"):
        fd.read_examples([f], fmt="alpaca", on_error=errors.append)
    assert errors == [f"{f}:1: 'instruction' is missing, skipped"]
    ex = fd.read_examples([f], fmt="sharegpt", on_error=None)
    assert ex[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
