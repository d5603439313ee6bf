"""Tests of glmkit.train.blank_infilling: GLM's autoregressive blank infilling (Part A / Part B, 2D positions,
[MASK] / [sMASK] / [gMASK] spans, packing with block-diagonal attention) and its agreement with the
ChatGLM-6B architecture of glmkit.model (training-style forward == the generation path)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.config import ModelConfig
from glmkit.model import GLM
from glmkit.train.blank_infilling import (
    IGNORE, KINDS, ObjectiveConfig, Sample, SpecialIds, attention_mask, build_sample, make_sample, pack_rows,
    prompt_answer_sample, reconstruct, sample_gmask_span, sample_mask_spans, sample_sentence_spans,
    sentence_bounds,
)

# --- a tiny vocabulary: ordinary ids 0..57, the special ids inside the vocabulary --------------------------
V = 64
M, SM, G, S, E, P = 58, 59, 60, 61, 62, 63          # [MASK] [sMASK] [gMASK] <sop> <eop> <pad>
SP = SpecialIds(mask=M, smask=SM, gmask=G, sop=S, eop=E, pad=P)
MASKS = {M: "mask", SM: "smask", G: "gmask"}
END = 5                                              # a sentence-end id ("." of this vocabulary)
X = IGNORE

# --- strategies ----------------------------------------------------------------------------------------
token = st.one_of(st.integers(0, 57), st.just(END))   # sentence ends are frequent
docs = st.lists(token, min_size=1, max_size=120)
seeds = st.integers(0, 2**32 - 1)
kinds = st.sampled_from(["mask", "smask", "gmask", None])


@st.composite
def mixtures(draw):
    w = draw(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)).filter(lambda t: sum(t) > 0))
    return ObjectiveConfig(mask=w[0] / sum(w), smask=w[1] / sum(w), gmask=w[2] / sum(w))


configs = st.one_of(st.just(ObjectiveConfig()), mixtures(),
                    st.sampled_from([ObjectiveConfig.parse(f"{k}=1") for k in KINDS]))


def arr(sample: Sample):
    return (sample.input_ids.tolist(), sample.targets.tolist(), sample.position_ids.tolist(),
            sample.block_position_ids.tolist(), sample.sep)


def assert_sample_equal(s: Sample, inp, tgt, pos, blk, sep):
    assert s.input_ids.tolist() == inp
    assert s.targets.tolist() == tgt
    assert s.position_ids.tolist() == pos
    assert s.block_position_ids.tolist() == blk
    assert s.sep == sep
    assert len(s) == len(inp)
    for a in (s.input_ids, s.targets, s.position_ids, s.block_position_ids):
        assert a.dtype == np.int64


def decode(sample: Sample):
    """Our own inverse of a sample, independent of `reconstruct`, checking the layout on the way.

    Returns (document, spans as [start, end) in the document in Part A order, mask token ids in Part A order).
    """
    inp, tgt, pos, blk, sep = arr(sample)
    L = len(inp)
    assert 0 < sep <= L
    # Part A: positions 0..sep-1, block position 0, no loss
    assert pos[:sep] == list(range(sep))
    assert blk[:sep] == [0] * sep
    assert tgt[:sep] == [X] * sep
    assert S not in inp[:sep] and E not in inp[:sep]
    # Part B: blocks starting at block position 1 with <sop>
    blocks: list[list[int]] = []
    for j in range(sep, L):
        if blk[j] == 1:
            blocks.append([j])
        else:
            assert blocks, "Part B must start with a block position 1"
            blocks[-1].append(j)
    content: dict[int, list[int]] = {}
    for idx in blocks:
        p = pos[idx[0]]
        assert [pos[j] for j in idx] == [p] * len(idx), "a span keeps its mask token's position"
        assert [blk[j] for j in idx] == list(range(1, len(idx) + 1)), "block positions 1..len+1"
        assert inp[idx[0]] == S
        span = [inp[j] for j in idx[1:]]
        assert len(span) >= 1, "spans are non-empty"
        assert [tgt[j] for j in idx] == span + [E], "targets: the span then <eop>"
        assert 0 <= p < sep and inp[p] in MASKS, "Part B positions point at a mask token of Part A"
        assert p not in content, "one Part B block per mask token"
        content[p] = span
    mask_at = [i for i in range(sep) if inp[i] in MASKS]
    assert sorted(content) == mask_at, "every mask token of Part A has exactly one span"
    doc, spans = [], []
    for i in range(sep):
        if inp[i] in MASKS:
            spans.append((len(doc), len(doc) + len(content[i])))
            doc += content[i]
        else:
            doc.append(inp[i])
    return doc, spans, [inp[i] for i in mask_at]


# ======================================================================================================
# 1. hand-checked examples
# ======================================================================================================

DOC = list(range(11, 21))        # 11 12 13 14 15 16 17 18 19 20 at indices 0..9


def test_build_sample_mask_spans_by_hand():
    s = build_sample(DOC, [(2, 4), (7, 8)], M, SP, rng=None)
    # Part A: 11 12 [M] 15 16 17 [M] 19 20 (mask tokens at 2 and 6); Part B: <sop> 13 14, <sop> 18
    assert_sample_equal(
        s,
        inp=[11, 12, M, 15, 16, 17, M, 19, 20, S, 13, 14, S, 18],
        tgt=[X, X, X, X, X, X, X, X, X, 13, 14, E, 18, E],
        pos=[0, 1, 2, 3, 4, 5, 6, 7, 8, 2, 2, 2, 6, 6],
        blk=[0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 1, 2],
        sep=9)
    assert reconstruct(s, SP) == DOC
    assert len(s) == len(DOC) + 2 * 2


def test_build_sample_gmask_suffix_by_hand():
    s = build_sample(DOC, [(6, 10)], G, SP, rng=None)
    assert_sample_equal(
        s,
        inp=[11, 12, 13, 14, 15, 16, G, S, 17, 18, 19, 20],
        tgt=[X, X, X, X, X, X, X, 17, 18, 19, 20, E],
        pos=[0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6],
        blk=[0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5],
        sep=7)
    assert reconstruct(s, SP) == DOC


def test_build_sample_whole_document_and_shuffle():
    s = build_sample([7, 8], [(0, 2)], G, SP)
    assert_sample_equal(s, inp=[G, S, 7, 8], tgt=[X, 7, 8, E], pos=[0, 0, 0, 0], blk=[0, 1, 2, 3], sep=1)
    # with an rng the Part B blocks come in some order, but each one is the same block as without shuffling
    spans = [(0, 1), (2, 3), (4, 6), (8, 9)]
    plain = build_sample(DOC, spans, M, SP)
    seen_orders = set()
    for seed in range(20):
        sh = build_sample(DOC, spans, M, SP, rng=np.random.default_rng(seed))
        assert sh.sep == plain.sep
        assert sh.input_ids[:sh.sep].tolist() == plain.input_ids[:plain.sep].tolist()
        assert reconstruct(sh, SP) == DOC
        starts = [j for j in range(sh.sep, len(sh)) if sh.block_position_ids[j] == 1]
        seen_orders.add(tuple(int(sh.position_ids[j]) for j in starts))
    assert sorted(next(iter(seen_orders))) == [0, 2, 4, 7]
    assert len(seen_orders) > 1, "Part B is shuffled when an rng is given"


@pytest.mark.parametrize("spans", [[(3, 3)], [(4, 6), (5, 7)], [(5, 7), (1, 2)], [(8, 11)], [(-1, 2)]])
def test_build_sample_rejects_bad_spans(spans):
    with pytest.raises(ValueError):
        build_sample(DOC, spans, M, SP)


def test_prompt_answer_sample_chatglm6b_layout_by_hand():
    # "text [gMASK] <sop>" as ChatGLM-6B's tokenizer encodes a prompt; the answer follows <sop>
    s = prompt_answer_sample([30, 31, 32, G, S], [40, 41], SP)
    assert_sample_equal(
        s,
        inp=[30, 31, 32, G, S, 40, 41],
        tgt=[X, X, X, X, 40, 41, E],
        pos=[0, 1, 2, 3, 3, 3, 3],
        blk=[0, 0, 0, 0, 1, 2, 3],
        sep=4)
    # no mask token in the prompt: [gMASK] is appended
    s = prompt_answer_sample([30, 31], [40], SP)
    assert_sample_equal(s, inp=[30, 31, G, S, 40], tgt=[X, X, X, 40, E], pos=[0, 1, 2, 2, 2],
                        blk=[0, 0, 0, 1, 2], sep=3)
    # [gMASK] is preferred over an earlier [MASK] (as ChatGLM-6B's get_position_ids)
    s = prompt_answer_sample([30, M, 31, G, S], [40], SP)
    assert s.position_ids.tolist() == [0, 1, 2, 3, 3, 3]
    assert s.sep == 4
    # only a [MASK]: its position
    s = prompt_answer_sample([30, M, 31, S], [40, 41], SP)
    assert s.input_ids.tolist() == [30, M, 31, S, 40, 41]
    assert s.position_ids.tolist() == [0, 1, 2, 1, 1, 1]
    assert s.block_position_ids.tolist() == [0, 0, 0, 1, 2, 3]


def test_sentence_bounds_by_hand():
    assert sentence_bounds([1, END, 2, 3, END, 4], [END]) == [(0, 2), (2, 5), (5, 6)]
    assert sentence_bounds([1, END, 2, END], [END]) == [(0, 2), (2, 4)]
    assert sentence_bounds([END, END, 7], {END}) == [(0, 1), (1, 2), (2, 3)]
    assert sentence_bounds([1, 2, 3], [END]) == [(0, 3)]
    assert sentence_bounds([1, 9, 2, 3], [END, 9]) == [(0, 2), (2, 4)]
    assert sentence_bounds([], [END]) == []


def test_attention_mask_two_packed_samples_and_padding_by_hand():
    a = build_sample([7, 8], [(1, 2)], M, SP)          # [7, M | S, 8]  sep 2
    b = build_sample([9], [(0, 1)], G, SP)             # [G | S, 9]     sep 1
    assert a.input_ids.tolist() == [7, M, S, 8] and b.input_ids.tolist() == [G, S, 9]
    batch = pack_rows([[a, b]], seq_len=8, pad_id=P)
    expected = np.array([
        # keys: 0  1  2  3  4  5  6  7
        [1, 1, 0, 0, 0, 0, 0, 0],    # 0  a, Part A: all of a's Part A
        [1, 1, 0, 0, 0, 0, 0, 0],    # 1  a, Part A
        [1, 1, 1, 0, 0, 0, 0, 0],    # 2  a, Part B (<sop>): Part A + itself
        [1, 1, 1, 1, 0, 0, 0, 0],    # 3  a, Part B
        [0, 0, 0, 0, 1, 0, 0, 0],    # 4  b, Part A
        [0, 0, 0, 0, 1, 1, 0, 0],    # 5  b, Part B (<sop>)
        [0, 0, 0, 0, 1, 1, 1, 0],    # 6  b, Part B
        [0, 0, 0, 0, 0, 0, 0, 1],    # 7  padding: only itself
    ], dtype=bool)
    m = batch["attention_mask"]
    assert m.dtype == torch.bool and tuple(m.shape) == (1, 1, 8, 8)
    np.testing.assert_array_equal(m[0, 0].numpy(), expected)
    # the function itself, on the same segments (padding has a unique segment, sep = its own index)
    seg = np.array([0, 0, 0, 0, 1, 1, 1, -8])
    sep = np.array([2, 2, 2, 2, 5, 5, 5, 7])
    np.testing.assert_array_equal(attention_mask(seg, sep), expected)
    assert batch["input_ids"].tolist() == [[7, M, S, 8, G, S, 9, P]]
    assert batch["targets"].tolist() == [[X, X, 8, E, X, 9, E, X]]
    assert batch["position_ids"].tolist() == [[[0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 2, 0, 1, 2, 0]]]


def test_pack_rows_shapes_padding_and_errors():
    a = build_sample(DOC, [(2, 4), (7, 8)], M, SP)      # 14 tokens
    b = build_sample(DOC, [(6, 10)], G, SP)             # 12 tokens
    c = build_sample([7, 8], [(1, 2)], M, SP)           # 4 tokens
    batch = pack_rows([[a, c], [b], []], seq_len=20, pad_id=P)
    assert set(batch) == {"input_ids", "targets", "position_ids", "attention_mask"}
    assert tuple(batch["input_ids"].shape) == (3, 20)
    assert tuple(batch["targets"].shape) == (3, 20)
    assert tuple(batch["position_ids"].shape) == (3, 2, 20)
    assert tuple(batch["attention_mask"].shape) == (3, 1, 20, 20)
    for k in ("input_ids", "targets", "position_ids"):
        assert batch[k].dtype == torch.int64
    inp, tgt, pos = batch["input_ids"], batch["targets"], batch["position_ids"]
    assert inp[0, :14].tolist() == a.input_ids.tolist() and inp[0, 14:18].tolist() == c.input_ids.tolist()
    assert inp[0, 18:].tolist() == [P, P]
    assert inp[1, :12].tolist() == b.input_ids.tolist() and inp[1, 12:].tolist() == [P] * 8
    assert inp[2].tolist() == [P] * 20
    assert tgt[0, 18:].tolist() == [X, X] and tgt[1, 12:].tolist() == [X] * 8 and tgt[2].tolist() == [X] * 20
    # positions count from each sample's own start
    assert pos[0, 0, 14:18].tolist() == c.position_ids.tolist()
    assert pos[0, 1, 14:18].tolist() == c.block_position_ids.tolist()
    # an empty (all padding) row: every position sees only itself
    assert torch.equal(batch["attention_mask"][2, 0], torch.eye(20, dtype=torch.bool))
    # a row exactly seq_len long is fine, one token more is an error
    pack_rows([[a, b]], seq_len=26, pad_id=P)
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([[a, b]], seq_len=25, pad_id=P)
    with pytest.raises(ValueError):
        pack_rows([[c], [a, b, c]], seq_len=29, pad_id=P)


def test_objective_config_parse_and_errors():
    c = ObjectiveConfig.parse("mask=0.3,gmask=0.7")
    assert (c.mask, c.smask, c.gmask) == (0.3, 0.0, 0.7)
    assert ObjectiveConfig() == c
    c = ObjectiveConfig.parse(" [sMASK] = 1 ")
    assert (c.mask, c.smask, c.gmask) == (0.0, 1.0, 0.0)
    c = ObjectiveConfig.parse("GMASK=0.5,mask=0.25,smask=0.25", gmask_min=0.6)
    assert (c.mask, c.smask, c.gmask, c.gmask_min) == (0.25, 0.25, 0.5, 0.6)
    with pytest.raises(ValueError, match="sum to 1"):
        ObjectiveConfig.parse("mask=0.5,gmask=0.7")
    with pytest.raises(ValueError, match="sum to 1"):
        ObjectiveConfig.parse("mask=0.3")
    with pytest.raises(ValueError, match="sum to 1"):
        ObjectiveConfig.parse("mask=-0.5,gmask=1.5")
    with pytest.raises(ValueError, match="unknown span kind"):
        ObjectiveConfig.parse("mask=0.3,blank=0.7")
    with pytest.raises(ValueError):
        ObjectiveConfig.parse("mask=abc")
    with pytest.raises(ValueError):
        ObjectiveConfig(gmask_min=0.0)
    with pytest.raises(ValueError):
        ObjectiveConfig(gmask_min=0.8, gmask_max=0.6)


def test_max_doc_len_by_hand_and_special_ids():
    # (64 - 2) / 1.31 = 47.3 with [MASK] in the mixture; (64 - 2) / 1.01 = 61.4 for [gMASK] alone
    assert ObjectiveConfig().max_doc_len(64) == 47
    assert ObjectiveConfig.parse("gmask=1").max_doc_len(64) == 61
    assert ObjectiveConfig.parse("smask=1").max_doc_len(2048) == 1561
    assert ObjectiveConfig().max_doc_len(3) == 1
    assert [SP.mask_id(k) for k in KINDS] == [M, SM, G]

    class Tok:
        special = {"[MASK]": 1, "[sMASK]": 2, "[gMASK]": 3, "<sop>": 4, "<eop>": 5}
        pad_id = None

    assert SpecialIds.from_tokenizer(Tok()) == SpecialIds(1, 2, 3, 4, 5, 5)
    Tok.pad_id = 0
    assert SpecialIds.from_tokenizer(Tok()).pad == 0


# ======================================================================================================
# 2. properties
# ======================================================================================================

@settings(max_examples=300, deadline=None)
@given(doc=docs, seed=seeds, kind=kinds, cfg=configs)
def test_sample_properties(doc, seed, kind, cfg):
    n = len(doc)
    s = make_sample(doc, np.random.default_rng(seed), cfg, SP, sentence_end_ids=(END,), kind=kind)
    # recoverable: by the module's inverse and by ours
    assert reconstruct(s, SP) == doc
    got, spans, mask_ids = decode(s)
    assert got == doc
    assert spans, "at least one span"
    k = len(spans)
    # one kind of mask token per sample, and the one asked for
    assert len(set(mask_ids)) == 1
    used = MASKS[mask_ids[0]]
    n_sentences = len(sentence_bounds(doc, [END]))
    if kind is None:
        assert getattr(cfg, used) > 0 or (used == "mask" and cfg.smask > 0)
    elif kind == "smask":
        assert used == ("smask" if n_sentences >= 2 else "mask")
    else:
        assert used == kind
    # spans: sorted, non-empty, non-overlapping, inside the document
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1
    assert all(0 <= a < b <= n for a, b in spans)
    covered = sum(b - a for a, b in spans)
    if used == "mask":
        assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans, spans[1:])), "[MASK] spans are not adjacent"
        if n >= 20:
            assert covered * 100 >= 15 * n
        assert covered >= 1
    elif used == "smask":
        sents = sentence_bounds(doc, [END])
        assert all(sp in sents for sp in spans), "[sMASK] spans are whole sentences"
        assert k < len(sents), "never every sentence"
        assert covered * 100 >= 15 * n or k == len(sents) - 1
    else:
        assert k == 1 and spans[0][1] == n, "[gMASK]: one suffix"
        assert math.ceil(0.5 * n) <= covered <= n
    # sizes and ids
    assert len(s) == n + 2 * k
    assert int((s.targets == E).sum()) == k
    assert int((s.input_ids[s.sep:] == S).sum()) == k
    assert s.input_ids.min() >= 0 and s.input_ids.max() < V
    t = s.targets[s.targets != IGNORE]
    assert t.min() >= 0 and t.max() < V
    # loss exactly on Part B
    assert ((s.targets == IGNORE) == (np.arange(len(s)) < s.sep)).all()


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 400), seed=seeds, lam=st.sampled_from([1.0, 3.0, 6.0]),
       ratio=st.sampled_from([0.15, 0.3, 0.5]))
def test_sample_mask_spans_properties(n, seed, lam, ratio):
    spans = sample_mask_spans(n, np.random.default_rng(seed), lam, ratio)
    assert spans
    assert all(0 <= a < b <= n for a, b in spans)
    assert all(e0 < s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))
    covered = sum(b - a for a, b in spans)
    assert covered >= min(math.ceil(ratio * n), (n + 1) // 2)
    assert len(spans) <= max(1, math.ceil(ratio * n))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), seed=seeds, lo=st.floats(0.05, 1.0))
def test_sample_gmask_span_properties(n, seed, lo):
    ((a, b),) = sample_gmask_span(n, np.random.default_rng(seed), lo, 1.0)
    assert b == n and math.ceil(lo * n) - 1 <= b - a <= n and b - a >= 1


def test_span_length_statistics():
    # Poisson(3) lengths, at least 1: mean 3 + P(0) = 3.05 (the last, shrunk spans aside)
    rng = np.random.default_rng(0)
    lengths = [b - a for _ in range(300) for a, b in sample_mask_spans(400, rng)]
    assert 2.8 < np.mean(lengths) < 3.3
    assert sample_mask_spans(0, rng) == [] and sample_gmask_span(0, rng) == []
    assert sample_sentence_spans([], rng, [END]) == []


@st.composite
def packed(draw):
    """1-2 rows, each of 1-3 samples of any kind, with 0-5 padding positions."""
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        row = []
        for _ in range(draw(st.integers(0, 3))):
            doc = draw(st.lists(token, min_size=1, max_size=25))
            if draw(st.booleans()):
                row.append(make_sample(doc, np.random.default_rng(draw(seeds)), draw(configs), SP,
                                       sentence_end_ids=(END,), kind=draw(kinds)))
            else:
                row.append(prompt_answer_sample(doc + [G, S], draw(st.lists(token, min_size=0, max_size=6)), SP))
        rows.append(row)
    T = max(sum(len(s) for s in row) for row in rows) + draw(st.integers(0, 5))
    return rows, T


@settings(max_examples=150, deadline=None)
@given(data=packed())
def test_packing_attention_properties(data):
    rows, T = data
    batch = pack_rows(rows, T, P)
    mask = batch["attention_mask"][:, 0].numpy()
    for b, row in enumerate(rows):
        m = mask[b]
        assert m.any(axis=1).all(), "every query sees at least one key"
        seg = np.full(T, -1)
        part_a = np.zeros(T, bool)
        at = 0
        for i, s in enumerate(row):
            seg[at:at + len(s)] = i
            part_a[at:at + s.sep] = True
            at += len(s)
        pad = seg < 0
        part_b = ~part_a & ~pad
        same = seg[:, None] == seg[None, :]
        # no attention across packed samples, and padding sees only itself (and is seen by nobody else)
        assert not (m & ~same & ~pad[:, None]).any()
        assert (m[pad] == np.eye(T, dtype=bool)[pad]).all()
        assert not m[:, pad][~pad].any()
        # Part A never sees Part B; Part A sees all of its own Part A
        assert not (m & part_a[:, None] & part_b[None, :]).any()
        assert (m | ~(part_a[:, None] & part_a[None, :] & same)).all()
        # Part B sees all of its own Part A, itself and earlier Part B of its sample, nothing later
        q, k = np.nonzero(part_b[:, None] & part_b[None, :] & same)
        assert (m[q, k] == (k <= q)).all()
        assert (m | ~(part_b[:, None] & part_a[None, :] & same)).all()
        # ids and targets: padding, IGNORE exactly on Part A and padding
        inp, tgt = batch["input_ids"][b].numpy(), batch["targets"][b].numpy()
        assert (inp[pad] == P).all()
        assert ((tgt == IGNORE) == (part_a | pad)).all()
        assert ((inp >= 0) & (inp < V)).all()
        # positions: each sample's own, padding 0
        pos = batch["position_ids"][b].numpy()
        at = 0
        for s in row:
            assert (pos[0, at:at + len(s)] == s.position_ids).all()
            assert (pos[1, at:at + len(s)] == s.block_position_ids).all()
            assert (inp[at:at + len(s)] == s.input_ids).all()
            at += len(s)
        assert (pos[:, pad] == 0).all()


@settings(max_examples=200, deadline=None)
@given(seq_len=st.integers(3, 400), seed=seeds, cfg=configs, ends=st.sampled_from(["none", "few", "all"]),
       data=st.data())
def test_max_doc_len_always_fits(seq_len, seed, cfg, ends, data):
    n = cfg.max_doc_len(seq_len)
    assert n >= 1
    rng = np.random.default_rng(seed)
    if ends == "all":                     # one-token sentences: as many [sMASK] spans as possible
        doc = [END] * n
    else:
        doc = rng.integers(6, 58, size=n).tolist()
        if ends == "few":
            for i in rng.choice(n, size=min(n, 3), replace=False):
                doc[i] = END
    allowed = [k for k in KINDS if getattr(cfg, k) > 0]
    kind = data.draw(st.sampled_from(allowed + [None]))
    for _ in range(3):
        s = make_sample(doc, rng, cfg, SP, sentence_end_ids=(END,), kind=kind)
        assert len(s) <= seq_len
        pack_rows([[s]], seq_len, P)


def test_max_doc_len_covers_smask_fallback_to_mask():
    """An [sMASK]-only objective with a larger [MASK] ratio: documents without two sentences fall back to
    [MASK] spans at mask_ratio, which max_doc_len ignores when the [MASK] probability is 0."""
    cfg = ObjectiveConfig(mask=0.0, smask=1.0, gmask=0.0, mask_ratio=0.5)
    seq_len = 100
    n = cfg.max_doc_len(seq_len)
    doc = list(range(6, 6 + 50)) + list(range(6, 6 + n - 50))     # no sentence end: falls back to [MASK]
    worst = max(len(make_sample(doc, np.random.default_rng(seed), cfg, SP, sentence_end_ids=(END,)))
                for seed in range(50))
    assert worst <= seq_len, f"a {n}-token document (max_doc_len({seq_len})) became a {worst}-token sample"


# ======================================================================================================
# 3. determinism
# ======================================================================================================

@settings(max_examples=60, deadline=None)
@given(docs_=st.lists(docs, min_size=1, max_size=4), seed=seeds, cfg=configs)
def test_same_seed_same_samples(docs_, seed, cfg):
    def run():
        rng = np.random.default_rng(seed)
        return [arr(make_sample(d, rng, cfg, SP, sentence_end_ids=(END,))) for d in docs_]

    assert run() == run()


def test_different_seeds_differ():
    doc = list(range(0, 50))
    got = {tuple(make_sample(doc, np.random.default_rng(seed), ObjectiveConfig(), SP).input_ids.tolist())
           for seed in range(20)}
    assert len(got) > 10


# ======================================================================================================
# 4. mixture statistics
# ======================================================================================================

def kind_of(s: Sample) -> str:
    found = {MASKS[t] for t in s.input_ids[:s.sep].tolist() if t in MASKS}
    assert len(found) == 1
    return found.pop()


def test_default_mixture_is_30_mask_70_gmask():
    rng = np.random.default_rng(1234)
    cfg = ObjectiveConfig()
    counts = {k: 0 for k in KINDS}
    for i in range(2000):
        doc = rng.integers(6, 58, size=int(rng.integers(5, 60))).tolist()
        counts[kind_of(make_sample(doc, rng, cfg, SP, sentence_end_ids=(END,)))] += 1
    assert counts["smask"] == 0
    assert abs(counts["gmask"] / 2000 - 0.7) < 0.05
    assert abs(counts["mask"] / 2000 - 0.3) < 0.05


def test_smask_only_uses_smask_when_there_are_sentences():
    rng = np.random.default_rng(5)
    cfg = ObjectiveConfig.parse("smask=1")
    for _ in range(300):
        k = int(rng.integers(2, 8))
        doc = []
        for _ in range(k):
            doc += rng.integers(6, 58, size=int(rng.integers(1, 9))).tolist() + [END]
        if rng.random() < 0.5:
            doc += [7, 8]                                # an unterminated tail sentence
        s = make_sample(doc, rng, cfg, SP, sentence_end_ids=(END,))
        a = s.input_ids[:s.sep].tolist()
        assert SM in a and M not in a and G not in a
        assert reconstruct(s, SP) == doc
    # without sentence ends it falls back to [MASK]
    s = make_sample(list(range(6, 40)), rng, cfg, SP, sentence_end_ids=(END,))
    assert kind_of(s) == "mask"


# ======================================================================================================
# 5. the masks and targets line up with the model (ChatGLM-6B architecture)
# ======================================================================================================

def chatglm6b_tiny_config() -> ModelConfig:
    # the fields of config._from_chatglm_v1 (ChatGLM-6B), at a tiny size
    return ModelConfig(
        family="chatglm", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
        ffn_hidden_size=64, max_seq_len=128, norm="layernorm", norm_eps=1e-5, activation="gelu_tanh",
        qkv_layout="per_head", qkv_bias=True, out_bias=True, mlp_bias=True, glm_residual=True, alpha_layers=28,
        prefix_lm=True, rope_2d=True, rope_dim=4, rope_interleaved=False, rope_base=10000.0,
        rope_fp16_freqs=True, mask_token_id=M, gmask_token_id=G, smask_token_id=SM, sop_token_id=S,
        eos_token_id=E, pad_token_id=P, torch_dtype="float32")


SEQ = 48


def training_rows():
    rng = np.random.default_rng(7)
    doc = lambda n: rng.integers(6, 58, size=n).tolist()    # noqa: E731
    a = make_sample(doc(14), rng, ObjectiveConfig(), SP, kind="mask")
    b = make_sample(doc(12), rng, ObjectiveConfig(), SP, kind="gmask")
    sents = doc(4) + [END] + doc(5) + [END] + doc(3) + [END]
    c = make_sample(sents, rng, ObjectiveConfig(), SP, sentence_end_ids=(END,), kind="smask")
    d = prompt_answer_sample(doc(6) + [G, S], doc(5), SP)
    assert [kind_of(x) for x in (a, b, c, d)] == ["mask", "gmask", "smask", "gmask"]
    assert len(a) + len(b) < SEQ and len(c) + len(d) < SEQ
    return [[a, b], [c, d]]


def loss_of(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE), logits


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    rows = training_rows()
    batch = pack_rows(rows, SEQ, P)
    model = GLM(chatglm6b_tiny_config()).init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: one thread is ~10x faster than two on a busy machine
    try:
        for _ in range(200):          # the loss is below 0.05 after ~100 steps, ~0.01 after 200
            loss, _ = loss_of(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model, rows, batch, losses


def test_training_on_one_batch_drives_the_loss_to_zero(trained):
    model, rows, batch, losses = trained
    assert losses[0] > 2.0
    with torch.no_grad():
        loss, logits = loss_of(model, batch)
    assert torch.isfinite(logits).all()
    assert loss.item() < 0.05, losses[::20]
    # the loss is on Part B only: the Part B targets are predicted, <eop> included
    pred = logits.argmax(-1)
    sel = batch["targets"] != IGNORE
    assert torch.equal(pred[sel], batch["targets"][sel])
    assert int((batch["targets"] == E).sum()) == sum(
        int((s.input_ids[:s.sep, None] == np.array(list(MASKS))).any(-1).sum()) for r in rows for s in r)


def test_no_leak_from_part_b(trained):
    model, rows, batch, _ = trained
    a, b = rows[0]
    j = a.sep + 1                                      # the first token of a's first Part B span
    assert a.input_ids[j] not in (S, E) and j + 1 < len(a)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, j] = (int(changed["input_ids"][0, j]) + 1 - 6) % 52 + 6
    with torch.no_grad():
        before = model(batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"])
        after = model(changed["input_ids"], position_ids=changed["position_ids"],
                      attention_mask=changed["attention_mask"])
    diff = (after - before).abs().amax(-1)             # [B, T]
    assert diff[0, :a.sep].max() <= 1e-6, "Part A of sample 1 sees its Part B"
    assert diff[0, :j].max() <= 1e-6, "an earlier Part B position sees a later one"
    assert diff[0, len(a):].max() <= 1e-6, "another packed sample (or padding) sees sample 1"
    assert diff[1].max() <= 1e-6, "another row changed"
    assert diff[0, j:len(a)].max() > 1e-3, "later Part B positions of sample 1 must see the change"

    # the check can fail: with attention over the whole sample (no Part A / Part B split), Part A moves
    seg_full = batch["attention_mask"].clone()
    seg_full[0, 0, :len(a), :len(a)] = True
    with torch.no_grad():
        leaky0 = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=seg_full)
        leaky1 = model(changed["input_ids"], position_ids=batch["position_ids"], attention_mask=seg_full)
    assert (leaky1 - leaky0).abs().amax(-1)[0, :a.sep].max() > 1e-3


# ======================================================================================================
# 6. training positions == ChatGLM-6B's generation positions
# ======================================================================================================

def _default_path_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def _cached_logits(model, sample: Sample) -> torch.Tensor:
    """Prefill Part A + <sop> with the KV cache, then feed the span one token at a time."""
    ids = sample.input_ids.tolist()
    ctx = sample.sep + 1
    from glmkit.engine import KVCache
    cache = KVCache.for_model(model, 1, 64)
    with torch.no_grad():
        prompt = torch.tensor([ids[:ctx]])
        state = model.sequence_state(prompt)
        out = [model(prompt, cache, cache_pos=torch.arange(ctx)[None], state=state, kv_len=ctx)[0]]
        for p in range(ctx, len(ids)):
            out.append(model(torch.tensor([[ids[p]]]), cache, cache_pos=torch.tensor([[p]]), state=state,
                             kv_len=p + 1)[0])
    return torch.cat(out)


@pytest.mark.parametrize("which", ["gmask", "prompt", "gmask_fresh", "single_mask"])
def test_training_positions_match_chatglm6b_inference(trained, which):
    model, rows, _, _ = trained
    rng = np.random.default_rng(3)
    if which == "gmask":
        sample = rows[0][1]
    elif which == "prompt":
        sample = rows[1][1]
    elif which == "gmask_fresh":
        sample = make_sample(rng.integers(6, 58, size=20).tolist(), rng, ObjectiveConfig(), SP, kind="gmask")
    else:                                              # ChatGLM-6B also fills a single [MASK]
        sample = build_sample(rng.integers(6, 58, size=15).tolist(), [(5, 9)], M, SP)
    assert kind_of(sample) in ("gmask", "mask")
    # training-style: packed after another sample, with padding after it
    other = rows[1][0]
    off = len(other)
    batch = pack_rows([[other, sample]], off + len(sample) + 3, P)
    with torch.no_grad():
        train_logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=batch["attention_mask"])[0, off:off + len(sample)]
    ids = sample.input_ids.tolist()
    assert ids[sample.sep] == S
    infer = _default_path_logits(model, ids)           # Part A + <sop> + span, positions derived by the model
    part_b = slice(sample.sep, len(sample))
    torch.testing.assert_close(train_logits[part_b], infer[part_b], atol=1e-5, rtol=0)
    torch.testing.assert_close(train_logits, infer, atol=1e-5, rtol=0)
    cached = _cached_logits(model, sample)
    torch.testing.assert_close(train_logits[part_b], cached[part_b], atol=1e-5, rtol=0)
    # and the trained model generates the span greedily from "Part A <sop>"
    if which in ("gmask", "prompt"):
        span = sample.targets[part_b].tolist()
        assert infer[part_b].argmax(-1).tolist() == span


def test_position_ids_are_not_the_plain_ones(trained):
    """The 2D positions matter: a forward with 1D-style positions (0..L-1, block 0) gives other logits, so
    the agreement above is a real check of the layout."""
    model, rows, _, _ = trained
    sample = rows[0][1]
    batch = pack_rows([[sample]], len(sample), P)
    wrong = torch.stack([torch.arange(len(sample)), torch.zeros(len(sample), dtype=torch.long)])[None]
    with torch.no_grad():
        good = model(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=batch["attention_mask"])
        bad = model(batch["input_ids"], position_ids=wrong, attention_mask=batch["attention_mask"])
    assert (good - bad)[0, sample.sep + 1:].abs().max() > 1e-3
