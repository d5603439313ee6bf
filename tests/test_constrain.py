"""Constrained decoding (glmkit.constrain): the character-level validators on their own, then token masks over
the real ChatGLM-6B / ChatGLM3 vocabularies (and a small GLM-4 tiktoken file built here) driven by random
logits, as a tiny random-weight model would drive them: whatever the logits, the answer must parse, the
per-token texts must add up to tokenizer.decode(ids), and a step must stay cheap."""
from __future__ import annotations

import base64
import json
import keyword
import random
import time

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from glmkit.chat_format import parse_chatglm3_call
from glmkit.constrain import (ChatGLM3CallValidator, ConstraintError, JsonObjectValidator, TokenConstraint,
                              chatglm3_call_constraint, json_object_constraint, prepare, vocab_tables)
from glmkit.tokenizer import load_tokenizer

from conftest import GENERATIONS, OFFICIAL

J, C = JsonObjectValidator, ChatGLM3CallValidator


def refused_at(v, text):
    """Index of the first character v refuses (None: all accepted)."""
    for i, ch in enumerate(text):
        if not v.feed(ch):
            return i
    return None


def accepts(cls, text, **kw):
    v = cls(**kw)
    return refused_at(v, text) is None and v.done


def call(args: str) -> str:
    return f"```python\ntool_call({args})\n```"


# ------------------------------------------------------------------------------------------------------------
# JSON object validator
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "{}", " {}", "    {}", "{} ", "{}\n\n", '{"a": 1}', '{"a":1,"b":2}', '{ "a" : [ ] , "b" : { } }',
    '{"a": [1, [2, [3, {"b": null}]]], "c": {"d": {"e": true}}, "f": false}',
    '{"s": "x\\"y\\\\z\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00"}', '{"": ""}', '{"k": "你好, мир \u2028 \x7f"}',
    '{"n": [0, -0, 1, -1, 12.5, -0.5e+3, 1E5, 1e-7, 0.0, 3.25E+010, 123456789012]}',
    '{"a":\t1,\r\n"b": 2}',
])
def test_json_accepts(text):
    assert json.loads(text) is not None
    assert accepts(J, text)


@pytest.mark.parametrize("text, at", [
    ("[]", 0), ("x", 0), ('"a"', 0), ("     {}", 4), ("{'a': 1}", 1), ("{a: 1}", 1), ('{"a" 1}', 5),
    ('{"a": 01}', 7), ('{"a": 1.}', 8), ('{"a": .5}', 6), ('{"a": +1}', 6), ('{"a": -}', 7), ('{"a": 1e}', 8),
    ('{"a": 1e+}', 9), ('{"a": 1.2.3}', 9), ('{"a": --1}', 7), ('{"a": 1ee5}', 8), ('{"a": tru}', 9),
    ('{"a": True}', 6), ('{"a": NaN}', 6), ('{"a": Infinity}', 6), ('{"a": nul}', 9), ('{"a": 1,}', 8),
    ('{"a": [1,]}', 9), ('{"a": [1 2]}', 9), ('{"a": 1]', 7), ('{"a": [1}', 8), ('{"a": 1}}', 8),
    ('{"a": 1} x', 9), ('{"a": 1}{}', 8), ('{"a": 1}   ', 10), ('{"a":\n\n\n1}', 7), ('{"a": "\x01"}', 7),
    ('{"a": "x\ny"}', 8), ('{"a": "\\x41"}', 8), ('{"a": "\\u12G4"}', 11), ('{"a": "\\\'"}', 8),
    ('{"a"   : "b"}', 6),
])
def test_json_refuses(text, at):
    assert refused_at(J(), text) == at


def test_refused_character_leaves_the_state_unchanged():
    rng = random.Random(0)
    doc = '{"a": [1, -2.5e+3, "x\\u00e9y", {"b": null, "c": true}], "d": "z"}  '
    alphabet = '{}[]:,"\\ \n0159.eE+-tfnulrsaxu\x01é'
    for cut in range(len(doc) + 1):
        v = J()
        assert refused_at(v, doc[:cut]) is None
        for ch in rng.sample(alphabet, 12):
            before = (v.state_key(), v.n, v.done)
            ok = v.copy().feed(ch)
            if not ok:
                assert not v.feed(ch)
                assert (v.state_key(), v.n, v.done) == before
            w = v.copy()
            if not w.feed_text(ch + "\x00"):               # a piece that fails at its 2nd char: all undone
                assert (w.state_key(), w.n) == (v.state_key(), v.n)


def test_copy_is_independent():
    v = J()
    assert refused_at(v, '{"a": [') is None
    w = v.copy()
    assert refused_at(w, '1]}') is None and w.done
    assert not v.done and refused_at(v, '"x"]}') is None and v.done


def test_depth_cap():
    v = J(max_depth=3)
    assert refused_at(v, '{"a": [[[') == 8                  # a 4th container
    assert accepts(J, '{"a": [[1]]}', max_depth=3)


def test_closing_budget():
    v = J(max_chars=10)
    assert refused_at(v, '{"abcdefgh') is None             # 10 characters: closing from now on
    assert not v.feed("i") and not v.feed("\\") and not v.feed(" ")
    assert v.feed('"') and not v.feed(" ") and v.feed(":")
    assert not v.feed("{") and not v.feed("[") and not v.feed("-")
    assert v.feed("7") and not v.feed("7") and not v.feed(".") and not v.feed(",")
    assert v.feed("}") and v.done and v.feed(" ")


def test_feed_text_checks_the_budget_once():
    v = J(max_chars=3)
    assert v.feed_text('{"abcdef')                          # the budget is soft: a piece may run past it
    assert not v.feed_text("g") and v.feed_text('"')


# Once closing, every state must still reach done (no dead end), within closing_reserve() characters.
_CLOSE_ALPHABET = list('{}[]:,"\'\\`() =\n\t0189aeEdDuTFNtfnrlsx_+-.é') + list("pyhoc")   # + "python"...


def longest_completion(v, memo, depth=0):
    """The most characters any path from v needs to reach done (-1: done is unreachable)."""
    assert depth < 400, "closing mode loops"
    if v.done:
        return 0
    key = v.state_key()
    if key not in memo:
        best = -1
        for ch in _CLOSE_ALPHABET:
            w = v.copy()
            if w.feed(ch):
                r = longest_completion(w, memo, depth + 1)
                if r >= 0:
                    best = max(best, r + 1)
                # a path that cannot finish is a dead end: no state may accept a character that leads there
                assert r >= 0, (key, ch)
        memo[key] = best
    return memo[key]


@pytest.mark.parametrize("cls, doc", [
    (J, '  {"a": [1, -2.5e+3, "x\\u00e9y", {"b": null, "c": true, "d": []}], "e": {}, "f": -0, "g": 1E-5}'),
    (J, '{"k\\ud83d": [[[[{"x": [false]}]]]], "y": 0.5}'),
    (C, call("a=1, b_2='x\\'y\\u00e9', c=[True, None, {\"k\": -1.5e+3, 'j': [False]}], d={}, ")),
    (C, "\n " + call("city=\"Beijing\", unit = 'celsius' , n=[ [ [ 0 ] ] ]")),
])
def test_closing_always_finishes_within_the_reserve(cls, doc):
    v = cls()
    memo: dict = {}
    for ch in doc + "\x00":
        w = v.copy()
        w.start_closing()
        n = longest_completion(w, memo)
        assert 0 <= n <= w.closing_reserve(), (v.state_key(), n)
        if ch == "\x00":
            break
        assert v.feed(ch), ch
    assert v.done


def test_closing_ends_a_call_name_once_usable():
    v = C()
    assert refused_at(v, "```python\ntool_call(ab=1, a") is None
    v.start_closing()
    assert not v.feed("x") and v.copy().feed("=")           # "a" is new: it must end here
    v = C()
    assert refused_at(v, "```python\ntool_call(ab=1, ab") is None
    v.start_closing()
    assert not v.feed("=") and v.feed("c") and v.feed("=")  # "ab" is taken: one more character first


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=12)


def depth(x):
    if isinstance(x, dict):
        return 1 + max(map(depth, x.values()), default=0)
    if isinstance(x, list):
        return 1 + max(map(depth, x), default=0)
    return 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.dictionaries(st.text(max_size=6), json_values, max_size=5), ascii_only=st.booleans(),
       compact=st.booleans(), lead=st.sampled_from(["", " ", "\n", " \t\r\n"]),
       trail=st.sampled_from(["", " ", "\n\n"]))
def test_any_json_dumps_of_a_dict_is_accepted(obj, ascii_only, compact, lead, trail):
    assume(depth(obj) <= 16)
    text = lead + json.dumps(obj, ensure_ascii=ascii_only,
                             separators=(",", ":") if compact else None) + trail
    v = J()
    assert refused_at(v, text) is None, text
    assert v.done


# ------------------------------------------------------------------------------------------------------------
# ChatGLM3 call validator
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    ("", {}), ("a=1", {"a": 1}), ("a=1,", {"a": 1}), (" a = 1 , b=2 ", {"a": 1, "b": 2}),
    ("city='Beijing', unit=\"celsius\"", {"city": "Beijing", "unit": "celsius"}),
    ("x=[True, False, None], y={'k': [1, -2.5e+3, 'v']}, z={}", {"x": [True, False, None],
                                                                  "y": {"k": [1, -2500.0, "v"]}, "z": {}}),
    ("s='it\\'s \"q\" \\\\ \\n\\u00e9', t=\"a'b\"", {"s": "it's \"q\" \\ \n\u00e9", "t": "a'b"}),
    ("_x1=-0, match=1, type=2", {"_x1": 0, "match": 1, "type": 2}),
])
def test_call_accepts_and_parses(args, expected):
    text = call(args)
    assert accepts(C, text), text
    assert parse_chatglm3_call(text) == expected
    assert accepts(C, " " + text) and accepts(C, "\n" + text) and accepts(C, text + " ")


@pytest.mark.parametrize("text, at", [
    (call("if=1"), 22), (call("None=1"), 24), (call("a=1, a=2"), 26), (call("a=true"), 22),
    (call("a=null"), 22), (call("1"), 20), (call("a=1 b=2"), 24), (call("a='x`y'"), 24),
    (call("a='\\/'"), 24), (call("a='\\ud800'"), 26), (call("a='\\x41'"), 24), (call("a=(1, 2)"), 22),
    (call("a={1: 2}"), 23), (call("a=[1,]"), 25), (call("é=1"), 20), (call("a=1e100"), 26),
    (call("a=1") + "`", 28), ("```python\ntool_call (a=1)", 19), ("```py\n", 5), ("   " + call(""), 2),
    (call("a='x\ny'"), 24),
])
def test_call_refuses(text, at):
    assert refused_at(C(), text) == at


_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True).filter(lambda s: not keyword.iskeyword(s))
_texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="`"), max_size=8)
_call_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**15, 10**15) | _texts
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x == 0 or 1e-90 < abs(x) < 1e90),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_texts, kids, max_size=3), max_leaves=10)


def py_literal(x, rng: random.Random) -> str:
    """The value as Python source the way a model might write it (either quote style where repr allows)."""
    if isinstance(x, str):
        if x.isascii() and x.isprintable() and rng.random() < 0.5:
            return repr(x)
        # \\uXXXX escapes only inside the BMP: Python reads a JSON surrogate pair as two lone surrogates
        return json.dumps(x, ensure_ascii=rng.random() < 0.5 and all(ord(ch) < 0x10000 for ch in x))
    if isinstance(x, list):
        return "[" + ", ".join(py_literal(v, rng) for v in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{py_literal(k, rng)}: {py_literal(v, rng)}" for k, v in x.items()) + "}"
    return repr(x)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(args=st.dictionaries(_names, _call_values, max_size=4), seed=st.integers(0, 1000))
def test_any_call_of_python_literals_is_accepted_and_parses(args, seed):
    assume(depth(args) <= 15)
    rng = random.Random(seed)
    text = call(", ".join(f"{k}={py_literal(v, rng)}" for k, v in args.items()))
    v = C()
    assert refused_at(v, text) is None, text
    assert v.done
    assert parse_chatglm3_call(text) == args


# ------------------------------------------------------------------------------------------------------------
# Token layer on the real vocabularies
# ------------------------------------------------------------------------------------------------------------

needs_official = pytest.mark.skipif(not (OFFICIAL / "chatglm3-6b" / "tokenizer.model").is_file(),
                                    reason=f"{OFFICIAL} (the official tokenizer files) is absent")
_TOKS: dict = {}


def tok(gen):
    if gen not in _TOKS:
        _TOKS[gen] = load_tokenizer(OFFICIAL / gen, GENERATIONS[gen])
    return _TOKS[gen]


def force(c: TokenConstraint, text: str) -> list[int]:
    """Advance c by single-character tokens spelling text; returns their ids."""
    ids = []
    for ch in text:
        ids.append(c._index().texts.index(ch))
        c.advance(ids[-1])
    return ids


def generate(c: TokenConstraint, vocab: int, seed: int, steps: int, bias=None, check_every=0, times=None):
    """Random logits each step (a random-weight model), greedy pick through the mask. Returns the ids."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    ids = []
    for step in range(steps):
        logits = torch.randn(vocab + 5, generator=g)        # a model's padded vocabulary is often larger
        if bias is not None:
            logits[:vocab] += bias
        t0 = time.perf_counter()
        masked = c.mask_logits(logits)
        if times is not None:
            times.append(time.perf_counter() - t0)
        if check_every and step % check_every == 0 and not c.done:
            check_mask_exact(c, rng)
        tid = int(masked.argmax())
        assert masked[tid] > float("-inf")
        c.advance(tid)
        if c.finished:
            return ids
        ids.append(tid)
    return ids


def check_mask_exact(c: TokenConstraint, rng: random.Random, sample: int = 1500):
    """The mask against feeding each text to a copy of the validator, on a sample of ids."""
    allowed = c.allowed()
    texts = c._index().texts
    banned = set(c._marker_ban(c._index()) or ())          # ChatGLM-6B: ids completing a <n>-style marker
    ids = rng.sample(range(len(texts)), min(sample, len(texts))) + allowed.nonzero().flatten().tolist()[:300]
    for i in ids:
        t = texts[i]
        v = c.validator.copy()
        ok = t is not None and i not in c.stop_ids and i not in banned and v.feed_text(t)
        assert bool(allowed[i]) == ok, (i, t, c.text[-30:])


def structural_bias(tables, strength=6.0):
    """Favour short ASCII texts (brackets, quotes, digits...), so random walks nest and close things."""
    return torch.tensor([strength if t is not None and len(t) <= 2 and t.isascii() else 0.0 for t in tables.texts])


@needs_official
@pytest.mark.parametrize("gen", ["chatglm3-6b", "chatglm-6b"])
def test_token_texts_do_not_depend_on_the_anchor(gen):
    t = tok(gen)
    tables = vocab_tables(t)
    anchor = t.encode_plain("q")
    assert len(anchor) == 1 and t.decode(anchor) == "q" and anchor[0] != tables.anchor
    base = t.decode(anchor * 2)
    for i in range(0, t.vocab_size, 7):
        if tables.texts[i] is None:
            continue
        s = t.decode(anchor * 2 + [i])
        assert s.startswith(base) and s[len(base):] == tables.texts[i], i


@needs_official
@pytest.mark.parametrize("gen", ["chatglm3-6b", "chatglm-6b"])
def test_token_tables(gen):
    t = tok(gen)
    tables = vocab_tables(t)
    assert vocab_tables(t) is tables                       # built once per tokenizer
    texts, start = tables.texts, tables.start_index().texts
    for sid in t.special_ids:
        assert texts[sid] is None and start[sid] is None
    assert all(x is None or (x and "\ufffd" not in x) for x in texts)
    space = next(i for i, x in enumerate(texts) if x == " the")
    assert t.decode([space]) == "the" and start[space] == "the"    # SentencePiece's dummy-prefix space
    for i in range(t.vocab_size):                          # the first piece of a decode: decoded alone
        assert start[i] == (texts[i] and t.decode([i]) or None), i
    partial = [i for i in range(0, t.vocab_size, 3) if "\ufffd" in t.decode([tables.anchor, i])]
    assert partial and all(texts[i] is None for i in partial)


@needs_official
@pytest.mark.parametrize("gen", ["chatglm3-6b", "chatglm-6b"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("biased", [False, True])
def test_random_logits_give_a_json_object(gen, seed, biased):
    t = tok(gen)
    tables = vocab_tables(t)
    c = TokenConstraint(t, JsonObjectValidator, [t.eos_id], max_tokens=120)
    ids = generate(c, t.vocab_size, seed, 200, bias=structural_bias(tables) if biased else None,
                   check_every=9 if seed == 0 else 0)
    assert c.finished and len(ids) <= 120
    text = t.decode(ids)
    assert text == c.text == "".join(c.pieces)
    assert isinstance(json.loads(text), dict), text


@needs_official
@pytest.mark.parametrize("gen", ["chatglm3-6b", "chatglm-6b"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("biased", [False, True])
def test_random_logits_give_a_chatglm3_call(gen, seed, biased):
    t = tok(gen)
    tables = vocab_tables(t)
    c = chatglm3_call_constraint(t, [t.eos_id], max_tokens=150)
    ids = generate(c, t.vocab_size, seed, 200, bias=structural_bias(tables) if biased else None,
                   check_every=9 if seed == 0 else 0)
    assert c.finished and len(ids) <= 150
    text = t.decode(ids)
    assert text == c.text
    args = parse_chatglm3_call(text)
    assert isinstance(args, dict), text
    json.dumps(args, allow_nan=False)                      # what the server sends back is strict JSON


@needs_official
@pytest.mark.parametrize("cls", [JsonObjectValidator, ChatGLM3CallValidator])
@pytest.mark.parametrize("max_tokens", [1, 10, 40])
def test_max_tokens_bounds_the_answer(cls, max_tokens):
    t = tok("chatglm3-6b")
    bias = structural_bias(vocab_tables(t))
    for seed in range(3):
        c = TokenConstraint(t, cls, [t.eos_id], max_tokens=max_tokens)
        ids = generate(c, t.vocab_size, seed, 400, bias=bias if seed else None)
        assert c.finished
        assert len(ids) <= max(max_tokens, cls().closing_reserve())


@needs_official
def test_stop_ids_only_once_done_and_then_alone():
    t = tok("chatglm3-6b")
    stops = [t.eos_id, t.token_id("<|user|>"), t.token_id("<|observation|>")]
    c = TokenConstraint(t, JsonObjectValidator, stops)
    allowed = c.allowed()
    assert not allowed[stops].any()
    with pytest.raises(ConstraintError):
        c.advance(t.eos_id)
    with pytest.raises(ConstraintError):
        c.advance(t.encode_plain("hello")[0])
    force(c, '{"a":')
    assert not c.done and c.text == '{"a":'
    with pytest.raises(ConstraintError):
        c.advance(c._index().texts.index("}"))               # refused ids leave the constraint as it was
    force(c, "1}")
    assert c.done
    allowed = c.allowed()
    assert allowed[stops].all() and int(allowed.sum()) == len(stops)
    logits = c.mask_logits(torch.zeros(t.vocab_size + 30))
    assert torch.isfinite(logits).sum() == len(stops)
    c.advance(stops[1])
    assert c.finished
    with pytest.raises(ConstraintError):
        c.mask_logits(logits)


@needs_official
def test_padding_rows_and_batched_logits_are_masked():
    t = tok("chatglm3-6b")
    c = json_object_constraint(t, [t.eos_id])
    out = c.mask_logits(torch.zeros(2, t.vocab_size + 226))
    assert out.shape == (2, t.vocab_size + 226)
    assert torch.isinf(out[:, t.vocab_size:]).all()
    assert torch.equal(out[0], out[1]) and torch.isfinite(out[0]).any()


@needs_official
def test_not_at_start_uses_mid_stream_texts():
    t = tok("chatglm3-6b")
    space_brace = next(i for i, x in enumerate(vocab_tables(t).texts) if x == " {")
    c = TokenConstraint(t, JsonObjectValidator, [t.eos_id], at_start=False)
    assert c.allowed()[space_brace]
    assert c.advance(space_brace) == " {"
    c = TokenConstraint(t, JsonObjectValidator, [t.eos_id])
    assert c.advance(space_brace) == "{"                    # the answer's first piece loses its space


@needs_official
def test_chatglm6b_tokens_never_complete_a_whitespace_marker():
    """ChatGLM-6B's decode turns "<n>" into a newline even when three tokens spell it: "<" "n" ">"."""
    t = tok("chatglm-6b")
    texts = vocab_tables(t).texts
    lt, n, gt, a = (texts.index(x) for x in ("<", "n", ">", "a"))
    assert t.decode([a, lt, n, gt]) == "a\n"                # what the mask has to prevent
    c = TokenConstraint(t, JsonObjectValidator, [t.eos_id])
    ids = force(c, '{"k": "')
    c.advance(lt)
    c.advance(n)
    assert not c.allowed()[gt] and c.allowed()[a]
    assert not any(c.allowed()[i] for i, x in enumerate(texts) if x is not None and x.startswith(">"))
    with pytest.raises(ConstraintError):
        c.advance(gt)
    c.advance(a)
    assert c.allowed()[gt]                                  # "<na>" is no marker
    ids += [lt, n, a] + force(c, '>"}')
    assert t.decode(ids) == c.text == '{"k": "<na>"}'


@needs_official
def test_step_time():
    """Worst case: no memoised mask (every state new), random logits, a 65k vocabulary."""
    t = tok("chatglm3-6b")
    prepare(t, JsonObjectValidator, ChatGLM3CallValidator)
    tables = vocab_tables(t)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                                # tiny ops; other processes may hold the cores
    try:
        cold, warm = [], []
        runs = [(JsonObjectValidator, 0, 0.0), (ChatGLM3CallValidator, 1, 3.0), (JsonObjectValidator, 5, 3.0),
                (ChatGLM3CallValidator, 2, 0.0)]
        for cls, seed, strength in runs:
            for sink, clear in ((cold, True), (warm, False)):
                c = TokenConstraint(t, cls, [t.eos_id], max_tokens=100)
                g = torch.Generator().manual_seed(seed)
                bias = structural_bias(tables, strength)
                while not c.finished:
                    logits = torch.randn(t.vocab_size, generator=g) + bias
                    if clear:
                        tables.index.memo.clear()
                        tables.start_index().memo.clear()
                    t0 = time.perf_counter()
                    tid = int(c.mask_logits(logits).argmax())
                    sink.append(time.perf_counter() - t0)
                    c.advance(tid)
    finally:
        torch.set_num_threads(threads)
    mean = lambda xs: sum(xs) / len(xs)                     # noqa: E731
    print(f"per step: cold mean {mean(cold) * 1e3:.2f} ms max {max(cold) * 1e3:.1f} ms; "
          f"warm mean {mean(warm) * 1e3:.2f} ms max {max(warm) * 1e3:.1f} ms ({len(cold)} steps)")
    assert mean(cold) < 0.02 and max(cold) < 0.25
    assert mean(warm) < 0.02


# ------------------------------------------------------------------------------------------------------------
# GLM-4 (tiktoken) on a small file built here
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glm4_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4constrain")
    extra = [b'{"', b'":', b'", "', b'"}', b' "', b'},', b'true', b'null', b'12', b'-0', b'.5', b'e+', b'  ',
             b'\n\n', b'\\u', b'\\"', b'abc', b' the', b'[{', b'}]', b'"]', "你".encode(), "好".encode(),
             "你好".encode(), "你".encode()[:2], "好".encode()[1:]]
    ranks = [bytes([b]) for b in range(256)] + extra
    (d / "tokenizer.model").write_text("".join(f"{base64.b64encode(x).decode()} {i}\n" for i, x in enumerate(ranks)))
    return load_tokenizer(d, "glm4")


def test_glm4_tables(glm4_tok):
    t = glm4_tok
    texts = vocab_tables(t).texts
    assert texts[ord("x")] == "x" and texts[256] == '{"' and texts[256 + 21] == "你"
    assert texts[0x80] is None and texts[256 + 24] is None and texts[256 + 25] is None   # partial UTF-8
    assert all(texts[i] is None for i in t.special_ids)
    assert vocab_tables(t).start_index().texts == texts      # tiktoken has no dummy-prefix space


@pytest.mark.parametrize("cls", [JsonObjectValidator, ChatGLM3CallValidator])
def test_glm4_random_logits(glm4_tok, cls):
    t = glm4_tok
    for seed in range(6):
        c = TokenConstraint(t, cls, [t.eos_id], max_tokens=80)
        ids = generate(c, t.vocab_size, seed, 120, check_every=3)
        assert c.finished
        text = t.decode(ids)
        assert text == c.text
        parsed = json.loads(text) if cls is JsonObjectValidator else parse_chatglm3_call(text)
        assert isinstance(parsed, dict), text
