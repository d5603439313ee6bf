"""glmkit choose: rank the choices for a cloze prompt's blank (GLM's multiple-choice scoring)."""
from __future__ import annotations

import json
import sys

from .common import add_model_args, load_pipeline

EXAMPLES = """examples:
  glmkit choose --model ~/models/glm-10b-chinese "清华大学位于[MASK]。" --choice 北京 --choice 上海 --choice 广州
  glmkit choose --model ~/models/glm-10b "Tsinghua University is located in [MASK]." --choice " Beijing" \\
      --choice " Shanghai" --length-normalize
  glmkit choose --model ~/models/chatglm3-6b "1+1=?" --choice 2 --choice 3 --json

Every choice is scored in one forward (all packed after the context, each causal within its own block): the
summed log-probability of its tokens in the blank (original GLM, ChatGLM-6B: the first mask; [gMASK] appended
when the text has none) or as the answer to the text (ChatGLM2/3, GLM-4). Prints the choices best first."""


def add_arguments(p):
    p.add_argument("text", help="the context, with a [MASK] where the choice goes ('-' reads standard input)")
    p.add_argument("--choice", "-c", action="append", required=True, metavar="TEXT",
                   help="a candidate for the blank (repeat for each choice)")
    p.add_argument("--length-normalize", action="store_true",
                   help="rank by the mean log-probability per token instead of the sum")
    p.add_argument("--json", action="store_true", help="print [{choice, score, rank}] as JSON")
    add_model_args(p)


def run(args) -> int:
    text = sys.stdin.read().rstrip("\n") if args.text == "-" else args.text
    if len(args.choice) < 2:
        raise ValueError("give at least two --choice options to rank")
    pipe = load_pipeline(args)
    scores = pipe.score_choices(text, args.choice, length_normalize=args.length_normalize)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if args.json:
        print(json.dumps([{"choice": args.choice[i], "score": scores[i], "rank": r + 1}
                          for r, i in enumerate(order)], ensure_ascii=False))
        return 0
    for r, i in enumerate(order, 1):
        print(f"{r}. {scores[i]:10.4f}  {json.dumps(args.choice[i], ensure_ascii=False)}")
    return 0
