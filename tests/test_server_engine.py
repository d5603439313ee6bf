"""The engine seen from its two drivers on the tiny ChatGLM3 reference: the Pipeline (JSON mode, forced tool calls
and logprobs, as the server has them) and the server (cached prompt tokens in `usage`, the hit rate in /metrics,
history trimming as an option), and a Pipeline and a server sharing one model, each with its own cache."""
from __future__ import annotations

import json

import httpx
import pytest
import torch

from conftest import REF, needs_shared
from _server_util import running_server

pytestmark = needs_shared
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e .[test])")

C3 = REF / "chatglm3-6b"
SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。请根据已知信息简洁而专业地回答用户的问题，" * 3}


@pytest.fixture(scope="module")
def fresh():
    """The reference: its own model, nothing shared with the pipelines under test."""
    import glmkit
    return glmkit.load(C3, cache_mb=0)


def test_json_mode_forced_tools_and_logprobs_through_the_pipeline(fresh):
    import glmkit
    pipe = glmkit.load(C3)
    for seed in (0, 1, 2):
        r = pipe.chat("用JSON列出三种水果", response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                      max_tokens=48)
        assert isinstance(json.loads(r), dict), r
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    r = pipe.chat("北京天气怎么样", tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  temperature=1.0, seed=3, max_tokens=48)
    assert r.finish_reason == "tool_calls" and r.tool_calls[0].name == "get_weather"
    assert isinstance(json.loads(r.tool_calls[0].arguments), dict)
    with pytest.raises(ValueError, match="response_format"):
        pipe.chat("x", response_format={"type": "yaml"})
    # logprobs: one entry per generated token, each the log-softmax of a full forward at its position
    msgs = [{"role": "user", "content": "你好"}]
    r = pipe.chat(msgs, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3)
    assert len(r.logprobs) == r.usage["completion_tokens"] == 8
    prompt = pipe.chat_format.render(msgs).ids
    with torch.inference_mode():
        full = fresh.model(torch.tensor([prompt + _ids_of(pipe, r)]))[0].float().log_softmax(-1)
    for k, e in enumerate(r.logprobs):
        ls = full[len(prompt) - 1 + k]
        assert abs(e["logprob"] - float(ls.max())) < 1e-4                  # greedy: the chosen is the top one
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx(ls.topk(3).values.tolist(), abs=1e-4)
    assert pipe.chat(msgs, temperature=0, max_tokens=8).logprobs is None


def _ids_of(pipe, r) -> list[int]:
    """The generated ids of a greedy answer (re-generated with the same settings through the token stream)."""
    prompt = pipe.chat_format.render([{"role": "user", "content": "你好"}]).ids
    from glmkit.sampling import SamplingParams
    return list(pipe.engine.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8),
                                     pipe.chat_format.stop_ids))


def test_pipeline_and_server_sharing_a_model_never_reuse_each_others_cache(fresh):
    """Each engine has its own KV cache and prefix cache: the server answering other prompts between two turns
    of a Pipeline chat cannot leave keys/values that the Pipeline's next turn would take for its own."""
    import glmkit
    pipe = glmkit.load(C3)
    with running_server(pipe=pipe, parallel=2) as (base, app):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        x = [{"role": "user", "content": "第一个问题：今天做什么？"}]
        a = pipe.chat(x, temperature=0, max_tokens=16)
        y = [{"role": "user", "content": "一个完全不同而且更长一些的问题，关于别的事情"}]
        s = client.chat.completions.create(model=app.fastapi.state.settings.model_id, messages=y, temperature=0,
                                           max_tokens=16)
        x2 = x + [a.to_message(), {"role": "user", "content": "继续说"}]
        b = pipe.chat(x2, temperature=0, max_tokens=16)
        y2 = y + [{"role": "assistant", "content": s.choices[0].message.content},
                  {"role": "user", "content": "然后呢"}]
        s2 = client.chat.completions.create(model=app.fastapi.state.settings.model_id, messages=y2,
                                            temperature=0, max_tokens=16)
        assert b.usage["prompt_tokens_details"]["cached_tokens"] > 0          # its own history, reused
        assert s2.usage.prompt_tokens_details.cached_tokens > 0
        assert str(a) == fresh.chat(x, temperature=0, max_tokens=16)
        assert str(b) == fresh.chat(x2, temperature=0, max_tokens=16)
        assert s.choices[0].message.content == fresh.chat(y, temperature=0, max_tokens=16)
        assert app.engine is not pipe.engine and app.engine.cache is not pipe.engine.cache


def test_usage_reports_cached_prompt_tokens_and_metrics_the_hit_rate(fresh):
    with running_server(C3, parallel=2) as (base, app):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        model = app.fastapi.state.settings.model_id
        first = [SYSTEM, {"role": "user", "content": "第一个用户的问题"}]
        second = [SYSTEM, {"role": "user", "content": "另一个用户的问题"}]
        r1 = client.chat.completions.create(model=model, messages=first, temperature=0, max_tokens=12)
        assert r1.usage.prompt_tokens_details.cached_tokens == 0
        stream = client.chat.completions.create(model=model, messages=second, temperature=0, max_tokens=12,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        usage = chunks[-1].usage
        n_sys = len(fresh.chat_format.render([SYSTEM, {"role": "user", "content": ""}]).ids) - 4
        assert usage.prompt_tokens_details.cached_tokens >= n_sys - 4       # the shared system prompt
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == fresh.chat(second, temperature=0, max_tokens=12)    # a hit gives the recomputed answer
        assert r1.choices[0].message.content == fresh.chat(first, temperature=0, max_tokens=12)
        m = httpx.get(base + "/metrics").text
        rate = float(next(ln.split()[1] for ln in m.splitlines() if ln.startswith("glmkit_prefix_cache_hit_rate")))
        assert 0 < rate < 1
        for name in ("glmkit_prefill_chunk_seconds_max", "glmkit_decode_step_seconds_count",
                     "glmkit_prefix_cache_bytes", "glmkit_prompt_tokens_cached_total"):
            assert any(ln.startswith(name + " ") for ln in m.splitlines()), name


def test_history_trimming_is_an_option_of_the_server(fresh):
    history = []
    for k in range(12):
        history += [{"role": "user", "content": f"第{k}个问题，" + "很长的问题" * 4},
                    {"role": "assistant", "content": "一个不短的回答" * 4}]
    msgs = history + [{"role": "user", "content": "最后的问题"}]
    body = {"messages": msgs, "temperature": 0, "max_tokens": 8}
    with running_server(C3) as (base, app):
        r = httpx.post(base + "/v1/chat/completions", json={"model": app.fastapi.state.settings.model_id, **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with running_server(C3, trim_history=True) as (base, app):
        r = httpx.post(base + "/v1/chat/completions", json={"model": app.fastapi.state.settings.model_id, **body})
        assert r.status_code == 200
        want = fresh.chat(msgs, temperature=0, max_tokens=8)          # the Pipeline trims the same way
        assert r.json()["choices"][0]["message"]["content"] == want
        assert r.json()["usage"]["prompt_tokens"] == want.usage["prompt_tokens"] < fresh.ctx


def test_nonfinite_logits_end_the_answer_the_same_way_in_both_drivers(monkeypatch):
    """One engine, one rule: a step with no finite logit yields the end-of-answer token (Pipeline and server
    used to fall back to different ids)."""
    import glmkit
    pipe = glmkit.load(C3)
    real = pipe.model.output.forward
    monkeypatch.setattr(pipe.model.output, "forward", lambda x: torch.full_like(real(x), float("nan")))
    r = pipe.chat("你好", max_tokens=5)
    assert r == "" and r.finish_reason == "stop" and pipe.last_stats.nonfinite_logits
    with running_server(pipe=pipe) as (base, app):
        body = {"model": app.fastapi.state.settings.model_id, "messages": [{"role": "user", "content": "你好"}],
                "max_tokens": 5}
        j = httpx.post(base + "/v1/chat/completions", json=body).json()
        assert j["choices"][0]["message"]["content"] == "" and j["choices"][0]["finish_reason"] == "stop"
        assert httpx.get(base + "/health").status_code == 200
