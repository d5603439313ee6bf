"""The rest of the OpenAI surface (issue 17, point 2), with the real openai client against a real `glmkit serve`
process on the tiny ChatGLM3 reference checkpoint: `n` (choices decoding together, seeds derived per choice,
streamed chunks carrying their index), `logit_bias`, max_tokens beyond the context, GET /v1/models/{id},
POST /tokenize and /detokenize (llama.cpp's shapes) and the prefix cache's cached tokens in `usage`.

References: single-choice answers of the same server (n=1 with the derived seed), the tokenizer loaded here (held
to the official one by test_tokenizer.py), the server's own logprobs and Prometheus counters."""
from __future__ import annotations

import re

import httpx
import pytest

from conftest import REF, needs_shared
from _server_util import serve_process

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

C3 = REF / "chatglm3-6b"
MODEL = "chatglm3-6b"
HI = [{"role": "user", "content": "你好，写一句诗"}]


@pytest.fixture(scope="module")
def base():
    with serve_process("--model", C3, "--parallel", "4") as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok():
    from glmkit.tokenizer import load_tokenizer
    return load_tokenizer(C3, "chatglm3")


def _metric(base: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(base + "/metrics").text, re.M)
    return float(m.group(1))


# --- n ---------------------------------------------------------------------------------------------------------

def test_n_choices_have_derived_seeds_and_decode_together(base, client):
    from glmkit.server.choices import derive_seed

    kw = dict(model=MODEL, messages=HI, temperature=1.0, max_tokens=8, seed=11)
    steps0, toks0 = _metric(base, "glmkit_decode_step_seconds_count"), _metric(base, "glmkit_completion_tokens_total")
    cached0 = _metric(base, "glmkit_prompt_tokens_cached_total")
    r = client.chat.completions.create(n=4, **kw)
    steps = _metric(base, "glmkit_decode_step_seconds_count") - steps0
    made = _metric(base, "glmkit_completion_tokens_total") - toks0
    cached = _metric(base, "glmkit_prompt_tokens_cached_total") - cached0
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1                                   # different seeds, different answers
    # each choice is what n=1 answers with that choice's seed (choice 0 keeps the request's own)
    singles = [client.chat.completions.create(**{**kw, "seed": derive_seed(11, i)}) for i in range(4)]
    assert texts == [s.choices[0].message.content for s in singles]
    assert [c.finish_reason for c in r.choices] == [s.choices[0].finish_reason for s in singles]
    # usage: the prompt once, every choice's tokens
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles) == made
    # rows decoding together: the first token of each choice comes from its prompt, the rest from decode steps;
    # one choice at a time would take one step per token
    assert steps < made - 4
    # choices 1..3 reuse choice 0's prompt keys/values (all but the last prompt token) from its slot
    assert cached >= 3 * (r.usage.prompt_tokens - 1)
    # the same request again: the same choices (seeds derived, not drawn)
    assert [c.message.content for c in client.chat.completions.create(n=4, **kw).choices] == texts


def test_n_streamed_chunks_carry_their_index(client):
    kw = dict(model=MODEL, messages=HI, temperature=1.0, max_tokens=8, seed=5, n=3)
    whole = client.chat.completions.create(**kw)
    parts, finish, usage = {}, {}, None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            parts.setdefault(c.index, []).append(c.delta.content or "")
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert sorted(parts) == [0, 1, 2]
    assert ["".join(parts[i]) for i in range(3)] == [c.message.content for c in whole.choices]
    assert [finish[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_n_on_completions(client):
    r = client.completions.create(model=MODEL, prompt="床前明月光", n=2, max_tokens=5, temperature=1.0, seed=2)
    one = client.completions.create(model=MODEL, prompt="床前明月光", max_tokens=5, temperature=1.0, seed=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == one.choices[0].text


@pytest.mark.parametrize("n", [0, 9, 100])
def test_n_out_of_range(client, n):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, n=n, max_tokens=2)
    assert e.value.body["param"] == "n" and "from 1 to 8" in e.value.body["message"]


def test_a_seed_beyond_64_bits_is_a_400_not_a_failed_step(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, seed=1 << 64)
    assert "seed" in e.value.body["message"]


# --- logit_bias ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_plus_100_makes_that_token_the_answer(client, tok, temperature):
    target = tok.encode("月", add_special_tokens=False)[-1]
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, temperature=temperature, seed=0,
                                       logit_bias={str(target): 100})
    assert r.choices[0].message.content == tok.decode([target] * 4)
    assert r.choices[0].finish_reason == "length"


def test_logit_bias_minus_100_removes_the_greedy_token(client):
    kw = dict(model=MODEL, messages=HI, max_tokens=1, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content[0]
    best = plain.top_logprobs[0]
    assert best.token == plain.token
    pieces = httpx.post(str(client.base_url).replace("/v1/", "/tokenize"),
                        json={"content": plain.token, "with_pieces": True}).json()["tokens"]
    first_id = [p["id"] for p in pieces if p["piece"] == plain.token]
    assert len(first_id) == 1
    biased = client.chat.completions.create(logit_bias={str(first_id[0]): -100}, **kw).choices[0].logprobs.content[0]
    assert biased.token == plain.top_logprobs[1].token               # the runner-up wins


@pytest.mark.parametrize("bias,why", [({"65024": 5}, "token id"), ({"abc": 1}, "token id"), ({"-1": 1}, "token id"),
                                      ({"100": 101}, "from -100 to 100")])
def test_logit_bias_is_validated(client, bias, why):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, logit_bias=bias)
    assert e.value.body["param"] == "logit_bias" and why in e.value.body["message"]


# --- max_tokens beyond the context -------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_beyond_the_context_is_a_400_naming_both(client, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, **{field: 5000})
    b = e.value.body
    assert b["code"] == "context_length_exceeded" and b["param"] == field
    assert "5000" in b["message"] and "256" in b["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="床前", max_tokens=256)
    assert "256" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    # 255 fits beside a one-token prompt: accepted as before (the answer is ended at once by biasing eos)
    r = client.chat.completions.create(model=MODEL, messages=HI, **{field: 255}, temperature=0,
                                       logit_bias={"2": 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 0


# --- models, tokenize, usage -------------------------------------------------------------------------------------

def test_model_by_id(client):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.body["code"] == "model_not_found"


def test_tokenize_and_detokenize(base, tok):
    text = "床前明月光，hello world <|user|>"
    r = httpx.post(base + "/tokenize", json={"content": text}).json()
    assert r == {"tokens": tok.encode(text, add_special_tokens=False)}
    assert httpx.post(base + "/tokenize", json={"content": text, "add_special": True}).json()["tokens"] == \
        tok.encode(text)
    assert httpx.post(base + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"] == \
        tok.encode_plain(text)
    pieces = httpx.post(base + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == r["tokens"]
    assert all(p["piece"] == tok.decode([p["id"]], skip_special_tokens=False) for p in pieces)
    d = httpx.post(base + "/detokenize", json={"tokens": tok.encode(text)}).json()
    assert d == {"content": tok.decode(tok.encode(text), skip_special_tokens=False)}
    bad = httpx.post(base + "/detokenize", json={"tokens": [1, 10 ** 7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(base + "/tokenize", json={"text": "x"}).status_code == 400          # llama.cpp's field names


def test_usage_reports_cached_prompt_tokens(client):
    msgs = [{"role": "system", "content": "你是一个诗人。" * 8}, {"role": "user", "content": "写一句关于月亮的诗"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_tokenize_pieces_of_a_byte_level_tokenizer(tmp_path):
    """GLM-4's tiktoken tokens may hold part of a UTF-8 character: the piece is then its bytes (llama.cpp's rule),
    and the pieces' bytes put together are the text."""
    import json as _json

    from test_glm4 import SPECIAL_IDS, build_tiktoken
    from glmkit.server.tokens import piece
    from glmkit.tokenizer import load_tokenizer

    build_tiktoken(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(_json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for c, i in SPECIAL_IDS.items()}}))
    tok = load_tokenizer(tmp_path, "glm4")
    text = "龘天气 sunny"                          # 龘 is not in the toy merges: three single-byte tokens
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [piece(tok, i) for i in ids]
    assert any(isinstance(p, list) for p in pieces) and any(isinstance(p, str) for p in pieces)
    assert b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in pieces).decode() == text
    assert piece(tok, tok.special["<|user|>"]) == "<|user|>"
