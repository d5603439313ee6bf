"""Generate an answer for every example with a Pipeline, score them, write the results.

    ds = read_dataset("dev.json", "content", "summary")
    pipe = glmkit.load("chatglm3-6b")
    result = evaluate(pipe, ds.examples, batch_size=4, temperature=0, max_tokens=64)
    write_results("out", result)          # out/generated_predictions.jsonl, out/metrics.json

Batch size 1 asks pipe.chat() for each example; a larger batch runs an engine (glmkit/engine) with that many
slots on the same model, the prompts rendered as pipe.chat() renders them, so greedy answers are the same
whatever the batch size (rows never attend to each other). torch is imported by the functions, not the module.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .data import Example
from .metrics import METRICS, mean_scores, sample_scores

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"


@dataclass
class EvalResult:
    examples: list[Example]                 # the ones generated for (prompts that fit the context)
    predictions: list[str]
    scores: list[dict]                      # per example, see metrics.score_pair
    means: dict                             # rouge-1, rouge-2, rouge-l, bleu-4
    skipped: list[str] = field(default_factory=list)     # "file:line: reason": the prompt did not fit
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, file=sys.stderr, unit="ex", desc="eval", disable=not enabled, dynamic_ncols=True)


def render_prompts(pipe, examples: list[Example], params) -> tuple[list, list, list[str]]:
    """-> (examples that fit, their Prompts rendered as pipe.chat() renders them, "where: reason" for the rest).
    History turns that do not fit are dropped oldest first, as pipe.chat() does."""
    from ..chat_format import ChatFormatError, render_within

    budget = pipe.prompt_budget(params)
    kept, prompts, skipped = [], [], []
    for ex in examples:
        try:
            prompts.append(render_within(pipe.chat_format, ex.messages(), budget))
        except ChatFormatError as e:
            skipped.append(f"{ex.where}: skipped: {e}")
            continue
        kept.append(ex)
    return kept, prompts, skipped


def _generate_one_by_one(pipe, examples, sampling: dict, done: Callable[[], None]) -> list[str]:
    out = []
    for ex in examples:
        out.append(str(pipe.chat(ex.messages(), **sampling)))
        done()
    return out


def _generate_batched(pipe, examples, prompts, params, batch_size: int, done: Callable[[], None]) -> list[str]:
    """Up to batch_size sequences decode together in an engine of their own; each answer's ids become text as
    ChatRun does it (the chat format's parser, then the stop strings)."""
    from ..engine import Engine, Sequence
    from ..pipeline import AnswerText

    longest = max(len(p.ids) for p in prompts)
    max_seq = pipe.ctx
    if params.max_new_tokens is not None:        # room for the longest prompt and its answer: no answer is cut
        max_seq = min(max_seq, longest + params.max_new_tokens)   # shorter than in pipe.ctx (engine.limit)
    eng = Engine(pipe.model, max_seq, slots=batch_size, cache_mb=pipe.engine.cache_mb, ptuning=pipe.ptuning)
    stop_ids = pipe.chat_format.stop_ids
    answers: list[Optional[str]] = [None] * len(examples)
    errors: list[str] = []

    def submit(i: int):
        ans = AnswerText(pipe.tokenizer, prompts[i], params.stop)

        def emit(ev):
            if ev[0] == "token":
                ans.feed(ev[1])
                if ans.stopped:                   # a stop string: the rest is not wanted
                    seq.cancel()
            elif ev[0] == "done":
                ans.finish()
                answers[i] = ans.text
                done()
            else:
                errors.append(f"{examples[i].where}: generation failed: {ev[1]}")
                answers[i] = ""
        seq = Sequence(prompts[i].ids, params, stop_ids, emit=emit)
        eng.submit(seq)

    nxt = 0
    while nxt < len(examples) or eng.busy:
        while nxt < len(examples) and eng.queue_depth + eng.active_count < batch_size:
            submit(nxt)
            nxt += 1
        eng.step()
        if errors:
            raise RuntimeError(errors[0])
    return [a or "" for a in answers]


def evaluate(pipe, examples: list[Example], *, batch_size: int = 1, progress: bool = False,
             **sampling) -> EvalResult:
    """Answer every example with pipe (sampling: as pipe.chat(), e.g. temperature=0, max_tokens=64, top_p,
    seed) and score the answers against the responses."""
    import torch

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if not examples:
        raise ValueError("no examples to evaluate")
    t0 = time.perf_counter()
    params = pipe.sampling_params(**sampling)
    kept, prompts, skipped = render_prompts(pipe, examples, params)
    if not kept:
        raise ValueError(f"no example fits the context window of {pipe.ctx} tokens; the first: {skipped[0]}")
    bar = _progress(len(kept), progress)
    try:
        with torch.inference_mode():
            if batch_size == 1:
                preds = _generate_one_by_one(pipe, kept, sampling, lambda: bar.update(1))
            else:
                preds = _generate_batched(pipe, kept, prompts, params, batch_size, lambda: bar.update(1))
    finally:
        bar.close()
    scores = sample_scores(preds, [ex.response for ex in kept])
    used = (("temperature", "repetition_penalty", "max_new_tokens") if params.greedy else
            ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "seed"))
    settings = {"batch_size": batch_size, "greedy": params.greedy, **{k: getattr(params, k) for k in used}}
    return EvalResult(kept, preds, scores, mean_scores(scores), skipped, settings, time.perf_counter() - t0)


def write_results(out_dir, result: EvalResult, settings: Optional[dict] = None, history: bool = False,
                  unusable: int = 0) -> tuple[Path, Path]:
    """out_dir/generated_predictions.jsonl (per example: prompt, label, predict, its scores; history when asked)
    and out_dir/metrics.json (the means, the counts, the settings) -> their paths. unusable: how many examples
    of the data file were skipped while reading it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred_file, metrics_file = out / PREDICTIONS_FILE, out / METRICS_FILE
    with open(pred_file, "w", encoding="utf-8") as f:
        for ex, pred, sc in zip(result.examples, result.predictions, result.scores):
            row = {"prompt": ex.prompt, "label": ex.response, "predict": pred, **sc}
            if history:
                row["history"] = [list(t) for t in ex.history]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    doc = {**result.means, "examples": len(result.examples),
           "skipped": {"unusable": unusable, "too_long": len(result.skipped)},
           "seconds": round(result.seconds, 3), "settings": {**(settings or {}), **result.settings}}
    metrics_file.write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return pred_file, metrics_file


def format_table(means: dict) -> str:
    rows = [("metric", "score")] + [(k, f"{means[k]:.4f}") for k in METRICS]
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b:>9}" for a, b in rows)
