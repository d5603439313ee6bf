"""glmkit infill: fill the [MASK]/[sMASK]/[gMASK] blanks of a text with a blank-filling GLM (the original GLM,
ChatGLM-6B)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line
from .generate import add_beam_args, beam_kwargs

EXAMPLES = """examples:
  glmkit infill --model ~/models/chatglm-6b "床前明月光，[MASK]。举头望明月，低头思故乡。"
  glmkit infill --model ~/models/chatglm-6b --show-spans "[sMASK]今天天气很好。我们去[MASK]吧。"
  echo "Ng is an adjunct professor at [MASK]." | glmkit infill --model ~/models/chatglm-6b - -t 0.9 --top-k 40

[MASK] fills a short span, [sMASK] a sentence, [gMASK] a long text (at the end: a continuation). Several masks
are filled one after another, left to right. Greedy by default, as GLM's examples fill blanks; -t 0.9 --top-k 40
samples as GLM's interactive generate_block.sh does. The original GLM (glm-10b, glm-large-chinese, ...),
ChatGLM-6B and GLM-130B fill blanks (GLM-130B as its generate.py: the [MASK]s if any, else the [sMASK]s, else a
[gMASK] appended; --beams N for its beam search); ChatGLM2/3 and GLM-4 are causal models (use `glmkit generate`):
  glmkit infill --model ~/models/glm-10b-chinese "清华大学位于[MASK]。它成立于[MASK]年。"
"""


def add_arguments(p):
    p.add_argument("text", help="the text with [MASK], [sMASK] or [gMASK] blanks ('-' reads standard input); "
                                "filled greedily unless --temperature is given")
    p.add_argument("--show-spans", action="store_true",
                   help="after the completed text, print each mask with the span generated for it")
    add_model_args(p)
    add_sampling_args(p)
    add_beam_args(p)


def run(args) -> int:
    from ..pipeline import MASK_TEXT

    text = sys.stdin.read().rstrip("\n") if args.text == "-" else args.text
    from ..sat_checkpoint import is_sat_dir

    masks = MASK_TEXT.findall(text)
    glm130b = bool(args.model) and is_sat_dir(Path(args.model).expanduser())
    if not masks and not glm130b:                  # before loading the model: a 6B load takes a while
        raise ValueError("the text has no [MASK], [sMASK] or [gMASK] to fill")
    pipe = load_pipeline(args)
    if glm130b:                                    # the masks generate.py fills: [MASK]s, else [sMASK]s, else [gMASK]
        gen = next((m for m in ("[MASK]", "[sMASK]") if m in masks), "[gMASK]")
        masks = [m for m in masks if m == gen] or ["[gMASK]"]
    if args.beams > 1:
        out = pipe.infill(text, beams=args.beams, **beam_kwargs(args))
    else:
        out = pipe.infill(text, **sampling_kwargs(args))
    print(out)
    if args.show_spans:
        for i, (mask, span) in enumerate(zip(masks, out.spans), 1):
            print(f"{mask} #{i}: {json.dumps(span, ensure_ascii=False)}")
    if args.verbose:
        for st in out.stats:
            print(stats_line(st), file=sys.stderr)
    return 0
