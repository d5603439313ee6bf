"""glmkit generate: continue a raw prompt."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line

EXAMPLES = """examples:
  glmkit generate --model ~/models/chatglm3-6b --prompt "The capital of France is" -n 32 -t 0
  echo "床前明月光，" | glmkit generate --model ~/models/chatglm-6b --prompt - --seed 1"""


def add_arguments(p):
    p.add_argument("--prompt", "-p", required=True, help="the text to continue ('-' reads standard input)")
    add_model_args(p)
    add_sampling_args(p)


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = load_pipeline(args)
    run_ = pipe.start_generate(prompt, **sampling_kwargs(args))
    for piece in run_:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(stats_line(run_.stats), file=sys.stderr)
    return 0
