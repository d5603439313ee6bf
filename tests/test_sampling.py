"""Sampling against hand-computed distributions, seeds, non-finite logits, and stop strings that arrive split
across tokens."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import needs_shared, ref_pipeline
from glmkit.pipeline import StopStringFilter
from glmkit.sampling import SamplingParams, probabilities, sample, seen_mask


def P(**kw):
    return SamplingParams(**kw).validate()


def probs(logits, **kw):
    return probabilities(torch.tensor([logits], dtype=torch.float32), P(**kw), **{
        k: v for k, v in kw.items() if k in ()})[0]


def close(a, b):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=1e-6)


def test_temperature():
    # softmax([1, 2, 3] / 2) = e^{0.5,1,1.5} / sum
    e = [math.exp(0.5), math.exp(1.0), math.exp(1.5)]
    assert close(probs([1.0, 2.0, 3.0], temperature=2.0), [x / sum(e) for x in e])
    assert close(probs([1.0, 2.0, 3.0], temperature=1.0), torch.softmax(torch.tensor([1.0, 2, 3]), 0))


def test_top_k():
    # top-2 of [1, 3, 2, 0]: tokens 1 and 2 with e^3 and e^2
    e3, e2 = math.exp(3), math.exp(2)
    assert close(probs([1.0, 3.0, 2.0, 0.0], top_k=2), [0, e3 / (e3 + e2), e2 / (e3 + e2), 0])


def test_top_p():
    base = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # ascending cumulative mass 0.05, 0.20, 0.50, 1.0; drop while it is <= 1 - p
    assert close(probs(base.tolist(), top_p=0.8), [0.625, 0.375, 0, 0])          # drops 0.05 and 0.15
    assert close(probs(base.tolist(), top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert close(probs(base.tolist(), top_p=0.01), [1, 0, 0, 0])                  # always keeps the top one


def test_top_k_then_top_p():
    base = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top_k=3 -> [0.4, 0.3, 0.2]/0.9; ascending cum 2/9, 5/9, 1: p=0.7 drops 2/9 <= 0.3
    assert close(probs(base.tolist(), top_k=3, top_p=0.7), [4 / 7, 3 / 7, 0, 0])


def test_repetition_penalty():
    from glmkit.sampling import apply_repetition_penalty

    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = seen_mask([0, 1, 1], 4)[None]
    assert close(apply_repetition_penalty(x, seen, 2.0)[0], [1.0, -4.0, 1.0, 0.5])
    # greedy honours it: token 0 (2.0 -> 0.5) loses to token 2 (1.0)
    p = P(temperature=0, repetition_penalty=4.0)
    assert sample(x, p, seen=seen).item() == 2


def test_presence_frequency_penalty():
    from glmkit.sampling import apply_presence_frequency

    x = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0]])
    assert close(apply_presence_frequency(x, counts, 0.5, 0.25)[0], [1.0, 1 - 0.5 - 0.25, 1 - 0.5 - 0.75])


def test_empirical_distribution_matches():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = P(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample(logits, params, g) for _ in range(n)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)


def test_seed_reproducible():
    logits = torch.randn(1, 1000)
    params = P(temperature=1.0, top_p=0.9)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, params, g).item() for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_non_finite_logits():
    params = P(temperature=0.7, top_p=0.9)
    x = torch.tensor([[1.0, float("nan"), 2.0, float("-inf")]])
    for _ in range(20):
        assert sample(x, params).item() in (0, 2)
    assert sample(torch.tensor([[1.0, float("inf"), 2.0]]), params).item() == 1
    all_bad = torch.tensor([[float("nan")] * 4])
    assert sample(all_bad, params, fallback=3).item() == 3
    assert sample(all_bad, P(temperature=0), fallback=3).item() == 3


def test_bad_params():
    for kw in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
               dict(repetition_penalty=0), dict(max_new_tokens=0)]:
        with pytest.raises(ValueError):
            P(**kw)


# ------------------------------------------------------------------------------------------------------------
# stop strings
# ------------------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abc<|>", min_size=0, max_size=30), st.lists(st.text(alphabet="abc<|>", min_size=1,
                                                                              max_size=4), min_size=1, max_size=3),
       st.data())
def test_stop_filter_never_leaks(text, stops, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    f = StopStringFilter(stops)
    out = "".join(f.push(p) for p in pieces) + f.flush()
    hits = [text.find(s) for s in stops if text.find(s) >= 0]
    assert out == (text[:min(hits)] if hits else text)


@needs_shared
def test_stop_string_split_across_tokens_end_to_end():
    """Greedy output of the reference model, stopped by a string that spans several tokens: the streamed
    pieces never contain any of it and generation ends there."""
    pipe = ref_pipeline("chatglm3-6b")
    full = pipe.generate("你好", temperature=0, max_new_tokens=30)
    ids = pipe.tokenizer.encode_plain(full)
    assert len(ids) > 8
    # a stop string made of the end of one token and the start of the next ones
    start = len(pipe.tokenizer.decode(ids[:5])) - 1
    stop = full[start:start + 4]
    assert len(stop) == 4
    pieces = list(pipe.stream_generate("你好", temperature=0, max_new_tokens=30, stop=[stop]))
    out = "".join(pieces)
    assert out == full[:full.find(stop)]
    assert pipe.last_stats.new_tokens < 30 and pipe.last_stats.finish_reason == "stop"
    assert stop not in out


@needs_shared
def test_nan_logits_do_not_crash_generation(monkeypatch):
    pipe = ref_pipeline("chatglm2-6b")
    real = pipe.model.output.forward

    def broken(x):
        y = real(x)
        return torch.full_like(y, float("nan"))

    monkeypatch.setattr(pipe.model.output, "forward", broken)
    r = pipe.chat("你好", max_new_tokens=5)
    assert r == "" and r.finish_reason == "stop"
    assert pipe.last_stats.nonfinite_logits


@needs_shared
def test_chat_seed_reproducible_and_max_tokens():
    pipe = ref_pipeline("chatglm3-6b")
    a = pipe.chat("你好", seed=11, max_new_tokens=12)
    b = pipe.chat("你好", seed=11, max_new_tokens=12)
    assert a == b and a.usage["completion_tokens"] <= 12
    assert "".join(pipe.stream_chat("你好", seed=11, max_new_tokens=12)) == a


def test_logit_bias():
    # softmax([1, 2, 3] + [0, 1.5, -1]) by hand; +100 on one token: all of its mass; greedy follows the bias
    x = [1.0 + 0, 2.0 + 1.5, 3.0 - 1]
    e = [math.exp(v) for v in x]
    assert close(probs([1.0, 2.0, 3.0], logit_bias={1: 1.5, 2: -1}), [v / sum(e) for v in e])
    assert close(probs([1.0, 2.0, 3.0], logit_bias={0: 100}), [1.0, 0.0, 0.0])
    assert close(probs([1.0, 2.0, 3.0], temperature=0, logit_bias={0: 100}), [1.0, 0.0, 0.0])
    assert close(probs([1.0, 2.0, 3.0], logit_bias={7: 100}), probs([1.0, 2.0, 3.0]))   # beyond the vocabulary
    for bad in ({-1: 1.0}, {"3": 1.0}, {0: 101}, {0: float("nan")}):
        with pytest.raises(ValueError, match="logit_bias"):
            P(logit_bias=bad)


@needs_shared
def test_chat_logit_bias_in_the_pipeline():
    pipe = ref_pipeline("chatglm3-6b")
    target = pipe.tokenizer.encode("月", add_special_tokens=False)[-1]
    r = pipe.chat("你好", temperature=0, max_new_tokens=3, logit_bias={target: 100})
    assert r == pipe.tokenizer.decode([target] * 3)
