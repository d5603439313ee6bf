"""glmkit eval: answer every example of a dataset, score the answers (ROUGE-1/2/L, BLEU-4), write the results."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import add_model_args, load_pipeline

EXAMPLES = """examples:
  glmkit eval --model ~/models/chatglm3-6b --data AdvertiseGen/dev.json \\
      --prompt-column content --response-column summary --max-new-tokens 128 --batch-size 4
  glmkit eval --model ~/models/chatglm-6b --data chats.jsonl --prompt-column prompt --response-column response \\
      --history-column history --do-sample --seed 1 --limit 100 --out results/

Writes OUT/generated_predictions.jsonl (prompt, label, predict and the scores of each example) and
OUT/metrics.json; prints the means. The scores are computed as ChatGLM's P-tuning evaluation computes them:
ROUGE on jieba words (rouge-chinese), BLEU-4 on characters (nltk, smoothing method3), x100. Needs
`pip install jieba rouge-chinese nltk`."""

OFFICIAL_SAMPLING = {"temperature": 0.95, "top_p": 0.7}     # ChatGLM-6B ptuning/main.py evaluate()/predict()


def add_arguments(p):
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="FILE",
                   help="JSON (a list of objects) or JSON Lines (one object per line)")
    g.add_argument("--prompt-column", required=True, metavar="C", help="the column holding the question")
    g.add_argument("--response-column", required=True, metavar="C", help="the column holding the reference answer")
    g.add_argument("--history-column", default=None, metavar="C",
                   help="a column of earlier [question, answer] pairs, given to the model as earlier turns")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N usable examples")
    g.add_argument("--out", "-o", default=None, metavar="DIR", help="where to write the results "
                   "(default: ./eval-<data file name without extension>)")
    add_model_args(p)
    g = p.add_argument_group("generation (default: greedy)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=512, metavar="N",
                   help="most tokens per answer (default 512)")
    g.add_argument("--batch-size", "-b", type=int, default=1, metavar="B",
                   help="answers generated together (default 1); greedy answers do not depend on it")
    g.add_argument("--do-sample", action="store_true",
                   help="sample with the official P-tuning evaluation settings (temperature 0.95, top-p 0.7)")
    g.add_argument("--temperature", "-t", type=float, default=None,
                   help="sample at this temperature (0 = greedy); implies --do-sample")
    g.add_argument("--top-p", type=float, default=None, help="sample with this top-p; implies --do-sample")
    g.add_argument("--seed", type=int, default=None,
                   help="sample with this seed (each example starts from it: the same answers every run); "
                        "implies --do-sample")


def sampling_options(args) -> dict:
    """Greedy unless sampling is asked for; sampling starts from the official evaluation settings."""
    kw = {"max_tokens": args.max_new_tokens}
    sample = args.do_sample or args.top_p is not None or args.seed is not None or bool(args.temperature)
    if args.temperature is not None and args.temperature == 0:
        sample = False
    if not sample:
        return {**kw, "temperature": 0.0}
    kw.update(OFFICIAL_SAMPLING)
    for k in ("temperature", "top_p", "seed"):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    return kw


def _report(problems):
    for problem in problems:
        print(f"glmkit eval: {problem} (skipped)", file=sys.stderr)


def run(args) -> int:
    from ..eval import DataError, check_available, read_dataset
    from ..eval.run import evaluate, format_table, write_results

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    # everything that can fail without the model fails before it is loaded
    try:
        ds = read_dataset(args.data, args.prompt_column, args.response_column, args.history_column, args.limit)
    except DataError as e:
        _report(e.problems)
        raise
    _report(ds.problems)
    check_available()
    if args.adapter:                                  # a folder of neither kind fails before the model loads
        from ..adapters import adapter_kind
        from .common import split_adapters
        adapter_kind(split_adapters(args.adapter)[0])
    out = Path(args.out) if args.out else Path.cwd() / f"eval-{Path(args.data).stem}"
    kw = sampling_options(args)

    pipe = load_pipeline(args)
    result = evaluate(pipe, ds.examples, batch_size=args.batch_size, progress=True, **kw)
    for s in result.skipped:
        print(f"glmkit eval: {s}", file=sys.stderr)
    settings = {"model": str(pipe.path) if pipe.path else args.model,
                "adapter": str(pipe.adapter) if pipe.adapter else None,
                "data": str(args.data), "prompt_column": args.prompt_column,
                "response_column": args.response_column, "history_column": args.history_column,
                "limit": args.limit}
    pred_file, metrics_file = write_results(out, result, settings, history=bool(args.history_column),
                                            unusable=len(ds.problems))
    st = result.settings
    mode = "greedy" if st["greedy"] else (f"sampling (temperature {st['temperature']}, top-p {st['top_p']}"
                                          + (f", seed {st['seed']})" if st["seed"] is not None else ")"))
    skipped = len(ds.problems) + len(result.skipped)
    print(f"{len(result.examples)} examples from {args.data}" + (f" ({skipped} skipped)" if skipped else "")
          + f", {mode}, at most {args.max_new_tokens} new tokens, {result.seconds:.1f} s")
    print(format_table(result.means))
    print(f"wrote {pred_file} and {metrics_file}")
    return 0
