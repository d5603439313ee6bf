"""ROUGE-1/2/L and BLEU-4 as ChatGLM's P-tuning evaluation computes them (ChatGLM-6B ptuning/main.py,
compute_metrics), with the libraries it uses:

    per pair   ROUGE: jieba words of prediction and reference, joined by spaces, rouge_chinese
                      Rouge().get_scores(...)[0][k]["f"] * 100 for k in rouge-1, rouge-2, rouge-l
               BLEU-4: nltk sentence_bleu([list(reference)], list(prediction),
                      smoothing_function=SmoothingFunction().method3) * 100 (characters, not words)
               each rounded to 4 decimal places
    overall    the arithmetic mean of the rounded per-pair scores (numpy.mean, not rounded)

One change, LLaMA-Factory's guard: a prediction or reference with no words (empty or only whitespace) scores 0
on every metric, where the official code raises rouge's "Hypothesis is empty".

jieba, rouge-chinese and nltk are imported on first use, so importing glmkit (or glmkit.eval) never loads them.
jieba builds its prefix dictionary from the dictionary file inside its package (no network) and caches it in
the temporary directory (tempfile.gettempdir()/jieba.cache); its log lines are silenced.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Sequence

METRICS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
INSTALL_HINT = "pip install jieba rouge-chinese nltk"


class MetricsUnavailable(RuntimeError):
    """jieba, rouge-chinese or nltk is not installed."""


_LIBS = None


def _libs():
    """-> (jieba.cut, Rouge instance, sentence_bleu, smoothing function); imported and initialized once."""
    global _LIBS
    if _LIBS is None:
        try:
            import jieba
            from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
            from rouge_chinese import Rouge
        except ImportError as e:
            raise MetricsUnavailable(f"ROUGE and BLEU need jieba, rouge-chinese and nltk, and {e.name or e} is "
                                     f"not installed: {INSTALL_HINT}") from e
        jieba.setLogLevel(logging.WARNING)          # no "Building prefix dict ..." lines
        dt = jieba.dt
        if dt.tmp_dir is None and dt.cache_file is None:
            try:
                tempfile.gettempdir()
            except OSError:                         # no usable temporary directory: build the dictionary each
                dt.tmp_dir = os.curdir              # run (the cache write fails quietly; jieba logs it)
        jieba.initialize()
        _LIBS = (jieba.cut, Rouge(), sentence_bleu, SmoothingFunction().method3)
    return _LIBS


def check_available():
    """Raise MetricsUnavailable (with the pip command) unless the metric libraries import; warms jieba up."""
    _libs()


def _zero() -> dict:
    return dict.fromkeys(METRICS, 0.0)


def score_pair(prediction: str, reference: str) -> dict:
    """One pair -> {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}, each x100 and rounded to 4 places."""
    for name, s in (("prediction", prediction), ("reference", reference)):
        if not isinstance(s, str):
            raise TypeError(f"the {name} must be a str, not {type(s).__name__}")
    cut, rouge, sentence_bleu, smoothing = _libs()
    hypothesis = " ".join(cut(prediction))
    ref_words = " ".join(cut(reference))
    if not hypothesis.split() or not ref_words.split():
        return _zero()
    scores = rouge.get_scores(hypothesis, ref_words)[0]
    out = {k: round(scores[k]["f"] * 100, 4) for k in METRICS[:3]}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
    out["bleu-4"] = round(bleu * 100, 4)
    return out


def _pairs(predictions: Sequence[str], references: Sequence[str]) -> tuple[list, list]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references are lists of strings (one string each was given: wrap "
                        "them in lists)")
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references: they must pair up one to one")
    if not preds:
        raise ValueError("no predictions to score (both lists are empty)")
    return preds, refs


def sample_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict]:
    """The per-pair scores (see score_pair) of each prediction against its reference, in order."""
    preds, refs = _pairs(predictions, references)
    out = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        try:
            out.append(score_pair(p, r))
        except TypeError as e:
            raise TypeError(f"pair {i}: {e}") from None
    return out


def mean_scores(scores: Sequence[dict]) -> dict:
    """Per-pair scores -> their means per metric (not rounded), as compute_metrics' float(np.mean(v))."""
    import numpy as np

    if not scores:
        raise ValueError("no scores to average")
    return {k: float(np.mean([s[k] for s in scores])) for k in METRICS}


def rouge_bleu(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """predictions[i] scored against references[i] -> the means {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    (0-100), computed as ChatGLM's P-tuning compute_metrics does (module docstring). ValueError when the lists
    differ in length or are empty."""
    return mean_scores(sample_scores(predictions, references))
