"""Evaluation of generated answers against references: ROUGE-1/2/L and BLEU-4 exactly as ChatGLM's P-tuning
evaluation computes them (metrics.py), reading JSON / JSON Lines data (data.py) and generating with a Pipeline
(run.py; `glmkit eval` on the command line).

    from glmkit.eval import rouge_bleu
    rouge_bleu(["这款连衣裙很显瘦"], ["这款连衣裙显瘦又百搭"])
    # -> {"rouge-1": ..., "rouge-2": ..., "rouge-l": ..., "bleu-4": ...}: means over the pairs, 0-100

Importing this package loads neither torch nor jieba, rouge-chinese or nltk: they are imported when first used.
"""
from .data import DataError, Dataset, Example, read_dataset
from .metrics import METRICS, MetricsUnavailable, check_available, mean_scores, rouge_bleu, sample_scores, score_pair

__all__ = ["rouge_bleu", "sample_scores", "score_pair", "mean_scores", "check_available", "METRICS",
           "MetricsUnavailable", "read_dataset", "Dataset", "Example", "DataError"]
