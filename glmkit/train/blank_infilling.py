"""GLM's autoregressive blank-infilling objective, as pure functions over token ids (no model code).

A document x[0:n] becomes one training sample:

    Part A  the document with each sampled span replaced by one mask token ([MASK], [sMASK] or [gMASK]);
            read bidirectionally (every Part A token sees all of Part A).
    Part B  the spans, in shuffled order, each as inputs <sop> s1 .. sk and targets s1 .. sk <eop>; read
            causally (a Part B token sees Part A and the Part B tokens before it). Loss on Part B only.

2D positions: Part A tokens take 0..len(A)-1 with block position 0; every token of a span takes the position
of its mask token in Part A and block positions 1, 2, 3, ... (<sop> is 1). This is what ChatGLM-6B does at
inference ("text [gMASK] <sop>" then generate), so a model trained here runs under glmkit's ChatGLM-6B path.

Span kinds (one per document, chosen by ObjectiveConfig's mixture; GLM-130B: 30% [MASK] / 70% [gMASK]):
    [MASK]   span lengths ~ Poisson(lambda=3) (at least 1) until >= 15% of the tokens are covered, placed at
             random without overlap or adjacency
    [sMASK]  whole sentences (ending at a sentence-end token) until >= 15% are covered
    [gMASK]  one suffix covering 50-100% of the document

Samples are packed into rows of a fixed length; a row holds several samples whose tokens never see each
other (block-diagonal attention), each with positions counted from its own start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

IGNORE = -100            # target of positions without loss (Part A, padding)
KINDS = ("mask", "smask", "gmask")


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    smask: int
    gmask: int
    sop: int
    eop: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        s = tok.special
        pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else s["<eop>"]
        return cls(s["[MASK]"], s["[sMASK]"], s["[gMASK]"], s["<sop>"], s["<eop>"], pad)

    def mask_id(self, kind: str) -> int:
        return {"mask": self.mask, "smask": self.smask, "gmask": self.gmask}[kind]


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which spans to sample. The mixture (mask/smask/gmask probabilities) must sum to 1."""
    mask: float = 0.3
    smask: float = 0.0
    gmask: float = 0.7
    span_lambda: float = 3.0        # Poisson mean of [MASK] span lengths
    mask_ratio: float = 0.15        # fraction of tokens covered by [MASK] spans
    smask_ratio: float = 0.15       # fraction covered by [sMASK] sentences
    gmask_min: float = 0.5          # [gMASK] suffix length, as a fraction of the document
    gmask_max: float = 1.0

    def __post_init__(self):
        p = (self.mask, self.smask, self.gmask)
        if min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError(f"mask/smask/gmask probabilities must be >= 0 and sum to 1, got {p}")
        if not 0 < self.gmask_min <= self.gmask_max <= 1:
            raise ValueError("need 0 < gmask_min <= gmask_max <= 1")

    @classmethod
    def parse(cls, text: str, **kw) -> "ObjectiveConfig":
        """'mask=0.3,gmask=0.7' (kinds not named get 0) -> config."""
        probs = {k: 0.0 for k in KINDS}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, val = part.partition("=")
            name = name.strip().strip("[]").lower()
            if name not in probs:
                raise ValueError(f"unknown span kind {name!r} in {text!r}; use mask, smask, gmask")
            probs[name] = float(val)
        return cls(**probs, **kw)

    # Part A + Part B is at most n + 2 * spans tokens; [MASK] spans of length >= 1 with a gap between
    # them cover 15% with at most 0.15 n spans, so n <= seq_len / 1.3 always fits (with a margin)
    def max_doc_len(self, seq_len: int) -> int:
        # (an [sMASK] document with fewer than two sentences falls back to [MASK] spans)
        ratio = max(self.mask_ratio if (self.mask or self.smask) else 0, self.smask_ratio if self.smask else 0)
        return max(1, int((seq_len - 2) / (1 + 2 * ratio + 0.01)))


@dataclass
class Sample:
    """One document as GLM sees it. Arrays of equal length L = len(A) + len(B); sep = len(A)."""
    input_ids: np.ndarray
    targets: np.ndarray             # IGNORE on Part A
    position_ids: np.ndarray
    block_position_ids: np.ndarray
    sep: int

    def __len__(self) -> int:
        return len(self.input_ids)


# --- span sampling ------------------------------------------------------------------------------------

def sample_mask_spans(n: int, rng: np.random.Generator, lam: float = 3.0, ratio: float = 0.15
                      ) -> list[tuple[int, int]]:
    """Non-overlapping, non-adjacent [start, end) spans with Poisson(lam) lengths (>= 1) covering >= ratio*n
    tokens (fewer when the document is too short to hold them)."""
    if n <= 0:
        return []
    goal = max(1, math.ceil(ratio * n))
    lengths: list[int] = []
    while sum(lengths) < goal:
        lengths.append(max(1, int(rng.poisson(lam))))
    # shrink until spans + one gap between each pair fit in n
    while lengths and sum(lengths) + len(lengths) - 1 > n:
        if lengths[-1] > 1:
            lengths[-1] -= 1
        else:
            lengths.pop()
    if not lengths:
        return [(0, 1)] if n >= 1 else []
    k = len(lengths)
    free = n - sum(lengths) - (k - 1)          # unmasked tokens beyond the mandatory gaps
    # a random composition of `free` into k + 1 gaps: choose k cut points among free + k slots
    cuts = np.sort(rng.choice(free + k, size=k, replace=False)) - np.arange(k)
    gaps = np.diff(np.concatenate(([0], cuts, [free])))       # k + 1 non-negative parts
    spans, pos = [], 0
    for i, length in enumerate(lengths):
        pos += int(gaps[i]) + (1 if i else 0)
        spans.append((pos, pos + length))
        pos += length
    return spans


def sentence_bounds(ids: Sequence[int], sentence_end_ids: Iterable[int]) -> list[tuple[int, int]]:
    """[start, end) of each sentence: a run ending with (and including) a sentence-end token, or the tail."""
    ends = set(sentence_end_ids)
    out, start = [], 0
    for i, t in enumerate(ids):
        if t in ends:
            out.append((start, i + 1))
            start = i + 1
    if start < len(ids):
        out.append((start, len(ids)))
    return out


def sample_sentence_spans(ids: Sequence[int], rng: np.random.Generator, sentence_end_ids: Iterable[int],
                          ratio: float = 0.15) -> list[tuple[int, int]]:
    """Whole sentences in random order until >= ratio of the tokens are covered (at least one; never all
    sentences of a multi-sentence document, so Part A keeps some context)."""
    sents = sentence_bounds(ids, sentence_end_ids)
    if not sents:
        return []
    goal = max(1, math.ceil(ratio * len(ids)))
    order = rng.permutation(len(sents))
    chosen, covered = [], 0
    for j in order:
        if covered >= goal or (chosen and len(chosen) == len(sents) - 1):
            break
        chosen.append(sents[j])
        covered += sents[j][1] - sents[j][0]
    return sorted(chosen)


def sample_gmask_span(n: int, rng: np.random.Generator, lo: float = 0.5, hi: float = 1.0
                      ) -> list[tuple[int, int]]:
    """One suffix span of ceil(U(lo, hi) * n) tokens (at least 1)."""
    if n <= 0:
        return []
    length = min(n, max(1, math.ceil(rng.uniform(lo, hi) * n)))
    return [(n - length, n)]


# --- building samples ----------------------------------------------------------------------------------

def build_sample(ids: Sequence[int], spans: Sequence[tuple[int, int]], mask_token: int, special: SpecialIds,
                 rng: Optional[np.random.Generator] = None) -> Sample:
    """Document ids + sorted non-overlapping spans -> Sample. Part B order is shuffled when rng is given."""
    ids = list(ids)
    part_a: list[int] = []
    mask_pos: list[int] = []                     # position in Part A of each span's mask token
    prev = 0
    for s, e in spans:
        if not (prev <= s < e <= len(ids)):
            raise ValueError(f"spans must be sorted, non-empty and inside the document: {spans}")
        part_a += ids[prev:s]
        mask_pos.append(len(part_a))
        part_a.append(mask_token)
        prev = e
    part_a += ids[prev:]
    order = list(range(len(spans)))
    if rng is not None:
        order = list(rng.permutation(len(spans)))
    inp, tgt, pos, blk = list(part_a), [IGNORE] * len(part_a), list(range(len(part_a))), [0] * len(part_a)
    for j in order:
        s, e = spans[j]
        span = ids[s:e]
        inp += [special.sop] + span
        tgt += span + [special.eop]
        pos += [mask_pos[j]] * (len(span) + 1)
        blk += list(range(1, len(span) + 2))
    return Sample(np.asarray(inp, np.int64), np.asarray(tgt, np.int64), np.asarray(pos, np.int64),
                  np.asarray(blk, np.int64), len(part_a))


def choose_kind(rng: np.random.Generator, cfg: ObjectiveConfig) -> str:
    return KINDS[int(rng.choice(3, p=[cfg.mask, cfg.smask, cfg.gmask]))]


def make_sample(ids: Sequence[int], rng: np.random.Generator, cfg: ObjectiveConfig, special: SpecialIds,
                sentence_end_ids: Iterable[int] = (), kind: Optional[str] = None) -> Sample:
    """Sample a span kind (or use `kind`), its spans, and build the Sample. A document without sentence ends
    asked for [sMASK] falls back to [MASK]."""
    kind = kind or choose_kind(rng, cfg)
    n = len(ids)
    if kind == "smask":
        spans = sample_sentence_spans(ids, rng, sentence_end_ids, cfg.smask_ratio)
        if len(sentence_bounds(ids, sentence_end_ids)) < 2:
            kind, spans = "mask", None
    if kind == "mask":
        spans = sample_mask_spans(n, rng, cfg.span_lambda, cfg.mask_ratio)
    elif kind == "gmask":
        spans = sample_gmask_span(n, rng, cfg.gmask_min, cfg.gmask_max)
    return build_sample(ids, spans, special.mask_id(kind), special, rng)


def prompt_answer_sample(prompt_ids: Sequence[int], answer_ids: Sequence[int], special: SpecialIds) -> Sample:
    """Supervised pair in ChatGLM-6B's chat layout: Part A = the prompt ids as the tokenizer encodes them
    (ending "[gMASK] <sop>"; the <sop> is taken as Part B's first input), Part B = answer + <eop>."""
    p = list(prompt_ids)
    if p and p[-1] == special.sop:
        p = p[:-1]
    if special.gmask not in p and special.mask not in p and special.smask not in p:
        p.append(special.gmask)
    # the answer's position is the mask token's, chosen as ChatGLM-6B does: first [gMASK], else [MASK], [sMASK]
    mpos = next(p.index(m) for m in (special.gmask, special.mask, special.smask) if m in p)
    a = list(answer_ids)
    inp = p + [special.sop] + a
    tgt = [IGNORE] * len(p) + a + [special.eop]
    pos = list(range(len(p))) + [mpos] * (len(a) + 1)
    blk = [0] * len(p) + list(range(1, len(a) + 2))
    return Sample(np.asarray(inp, np.int64), np.asarray(tgt, np.int64), np.asarray(pos, np.int64),
                  np.asarray(blk, np.int64), len(p))


def reconstruct(sample: Sample, special: SpecialIds) -> list[int]:
    """Inverse of build_sample: Part A with each mask token replaced by its span from Part B."""
    a = sample.input_ids[:sample.sep].tolist()
    spans: dict[int, list[int]] = {}
    b_in = sample.input_ids[sample.sep:].tolist()
    b_pos = sample.position_ids[sample.sep:].tolist()
    b_blk = sample.block_position_ids[sample.sep:].tolist()
    for t, p, k in zip(b_in, b_pos, b_blk):
        if k == 1:                                # <sop>: a new span starts
            spans[p] = []
        else:
            spans[p].append(t)
    masks = {special.mask, special.smask, special.gmask}
    out = []
    for i, t in enumerate(a):
        out += spans[i] if (t in masks and i in spans) else [t]
    return out


# --- packing -------------------------------------------------------------------------------------------

def attention_mask(segment: np.ndarray, sep: np.ndarray) -> np.ndarray:
    """[T] segment id and absolute Part A end of each position -> [T, T] bool (True = query row sees key).

    A query sees keys of its own segment that are in Part A or not after it; padding positions carry unique
    segment ids and so see only themselves (an all-False row would make softmax NaN)."""
    T = len(segment)
    q = np.arange(T)[:, None]
    k = np.arange(T)[None, :]
    return (segment[:, None] == segment[None, :]) & ((k < sep[:, None]) | (k <= q))


def pack_rows(rows: Sequence[Sequence[Sample]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples (each row's total length <= seq_len) -> a batch:
    input_ids, targets [B, T]; position_ids [B, 2, T]; attention_mask [B, 1, T, T] bool."""
    B, T = len(rows), seq_len
    inp = np.full((B, T), pad_id, np.int64)
    tgt = np.full((B, T), IGNORE, np.int64)
    pos = np.zeros((B, 2, T), np.int64)
    mask = np.zeros((B, 1, T, T), bool)
    for b, row in enumerate(rows):
        seg = -1 - np.arange(T)                  # padding: a segment of its own
        sep = np.arange(T)
        at = 0
        for i, s in enumerate(row):
            L = len(s)
            if at + L > T:
                raise ValueError(f"row {b} holds {at + L} tokens, more than seq_len={T}")
            inp[b, at:at + L] = s.input_ids
            tgt[b, at:at + L] = s.targets
            pos[b, 0, at:at + L] = s.position_ids
            pos[b, 1, at:at + L] = s.block_position_ids
            seg[at:at + L] = i
            sep[at:at + L] = at + s.sep
            at += L
        mask[b, 0] = attention_mask(seg, sep)
    return {"input_ids": torch.from_numpy(inp), "targets": torch.from_numpy(tgt),
            "position_ids": torch.from_numpy(pos), "attention_mask": torch.from_numpy(mask)}
