"""Blank infilling with ChatGLM-6B (Pipeline.infill, `glmkit infill`) against a hand-made reference: the tiny
random official checkpoint run forward with full recomputation (no cache), positions and prefix mask built here
as the official modeling_chatglm.py builds them."""
from __future__ import annotations

import io

import pytest
import torch

import glmkit.pipeline

from conftest import REF, needs_shared, ref_pipeline

pytestmark = needs_shared

N = 6                                        # tokens per span: the random model rarely says <eop>


def reference_span(model, ids, mask_pos, n, eop):
    """Greedy span for prompt ids (ending in <sop>) filling the mask at index mask_pos -> new ids (no <eop>).

    As ChatGLM-6B: context = everything before <sop>, seen bidirectionally; <sop> and the generated tokens take
    position mask_pos and block positions 1, 2, 3, ...; each step recomputes the whole sequence."""
    ids, out = list(ids), []
    ctx = len(ids) - 1
    for _ in range(n):
        T = len(ids)
        pos = [i if i < ctx else mask_pos for i in range(T)]
        block = [0 if i < ctx else i - ctx + 1 for i in range(T)]
        q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        mask = ((k <= q) | (k < ctx))[None, None]
        with torch.no_grad():
            logits = model(torch.tensor([ids]), position_ids=torch.tensor([[pos, block]]), attention_mask=mask,
                           last_only=True)
        tok = int(logits[0, -1].argmax())
        if tok == eop:
            break
        out.append(tok)
        ids.append(tok)
    return out


def reference_fill(pipe, text, n=N):
    """-> (completed text, spans, prompt ids of each round): the leftmost mask first, the text re-encoded whole."""
    tok = pipe.tokenizer
    masks = {tok.special[m] for m in ("[MASK]", "[sMASK]", "[gMASK]")}
    spans, prompts = [], []
    while True:
        names = [m for m in ("[MASK]", "[sMASK]", "[gMASK]") if m in text]
        if not names:
            return text, spans, prompts
        ids = tok.encode(text)
        mask_pos = next(i for i, t in enumerate(ids) if t in masks)
        span = tok.decode(reference_span(pipe.model, ids, mask_pos, n, tok.special["<eop>"]))
        first = min(names, key=text.index)
        text = text.replace(first, span, 1)
        spans.append(span)
        prompts.append((ids, mask_pos))


@pytest.fixture
def pipe():
    return ref_pipeline("chatglm-6b")


@pytest.fixture
def rounds(pipe, monkeypatch):
    """Records (prompt ids, SeqState) of every generation the pipeline starts."""
    seen = []
    generate = pipe.engine.generate

    def spy(ids, params, stop_ids=(), state=None, **kw):
        seen.append((list(ids), state))
        return generate(ids, params, stop_ids, state, **kw)

    monkeypatch.setattr(pipe.engine, "generate", spy)
    return seen


def test_one_mask_is_the_reference_greedy_fill(pipe, rounds):
    mask = "[MASK]"
    text = f"床前明月光，{mask}。举头望明月，低头思故乡。"
    want, spans, prompts = reference_fill(pipe, text)
    out = pipe.infill(text, max_new_tokens=N)
    assert out == want and out.spans == spans
    assert len(out.spans[0]) > 0 and mask not in out
    assert len(rounds) == 1 and rounds[0][0] == prompts[0][0]
    assert rounds[0][0][-1] == pipe.tokenizer.special["<sop>"]


def test_two_masks_are_filled_left_to_right(pipe, rounds):
    text = "床前明月光，[MASK]。举头望明月，[MASK]。"
    want, spans, prompts = reference_fill(pipe, text)
    out = pipe.infill(text, max_new_tokens=N)
    assert out == want and out.spans == spans and len(spans) == 2
    assert [r[0] for r in rounds] == [p[0] for p in prompts]          # same ids as encoding the whole text
    assert [int(r[1].mask_pos[0]) for r in rounds] == [p[1] for p in prompts]
    second = pipe.tokenizer.decode(rounds[1][0])
    assert spans[0] in second                                         # the first span is written in
    assert rounds[1][0].count(pipe.tokenizer.special["[MASK]"]) == 1
    assert out == f"床前明月光，{spans[0]}。举头望明月，{spans[1]}。"


def test_mixed_masks_use_the_leftmost_mask_position(pipe, rounds):
    """[sMASK], [MASK] and [gMASK] each against the reference. sequence_state would pick the [gMASK] (then the
    [MASK]); infill fills the [sMASK] first at its own position, then the [MASK], then the [gMASK]."""
    text = "[sMASK]今天天气很好。我们去[MASK]吧[gMASK]"
    want, spans, prompts = reference_fill(pipe, text)
    out = pipe.infill(text, max_new_tokens=N)
    assert out == want and out.spans == spans and len(spans) == 3
    ids, state = rounds[0]
    derived = int(pipe.model.sequence_state(torch.tensor([ids])).mask_pos[0])
    assert int(state.mask_pos[0]) == 0 != derived
    assert int(state.ctx_len[0]) == len(ids) - 1
    # the position matters: the span at the [gMASK]'s position is another one
    tok = pipe.tokenizer
    assert tok.decode(reference_span(pipe.model, ids, derived, N, tok.special["<eop>"])) != spans[0]


def test_sampling_options_and_seed(pipe):
    text = "床前明月光，[MASK]。"
    a = pipe.infill(text, temperature=0.9, top_k=40, seed=3, max_new_tokens=4)
    b = pipe.infill(text, temperature=0.9, top_k=40, seed=3, max_new_tokens=4)
    assert a == b and a.startswith("床前明月光，") and a.endswith("。")
    short = pipe.infill(text, max_new_tokens=2)
    assert short.stats[0].new_tokens <= 2


def test_text_without_mask_is_an_error(pipe):
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        pipe.infill("床前明月光")


def test_causal_family_is_an_error():
    with pytest.raises(ValueError, match="causal"):
        ref_pipeline("chatglm2-6b").infill("床前明月光，[MASK]。")


def test_cli_prints_the_completed_text(pipe, capsys, monkeypatch):
    from glmkit.cli.main import main

    text = "床前明月光，[MASK]。举头望明月，低头思故乡。"
    want = pipe.infill(text, max_new_tokens=4)
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))
    loaded = []

    def load(path, **kw):                                   # the session's pipeline: no second load
        loaded.append(str(path))
        return pipe

    monkeypatch.setattr(glmkit.pipeline, "load", load)
    assert main(["infill", "--model", str(REF / "chatglm-6b"), "-", "-n", "4", "--show-spans"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert loaded == [str(REF / "chatglm-6b")] and lines[0] == want
    assert lines[1].startswith("[MASK] #1: ") and want.spans[0] in lines[1]


def test_cli_errors(capsys):
    from glmkit.cli.main import main

    assert main(["infill", "--model", str(REF / "chatglm-6b"), "no blank here"]) == 1
    assert "no [MASK]" in capsys.readouterr().err
    # without --model the embedded glm-tiny fills it (an install without it explains --model: test_cli)
    assert main(["infill", "a[MASK]"]) == 0
    assert "[MASK]" not in capsys.readouterr().out
