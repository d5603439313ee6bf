"""glmkit generate: continue a raw prompt."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line

EXAMPLES = """examples:
  glmkit generate --model ~/models/chatglm3-6b --prompt "The capital of France is" -n 32 -t 0
  echo "床前明月光，" | glmkit generate --model ~/models/chatglm-6b --prompt - --seed 1
  glmkit generate --model ~/models/glm-130b --prompt "Who is the greatest artist?" --beams 4 \
      --no-repeat-ngram-size 3 -n 64                     # GLM-130B's BeamSearchStrategy (any model)"""


def add_beam_args(p):
    g = p.add_argument_group("beam search (GLM-130B's BeamSearchStrategy; --beams 1 = sampling as usual)")
    g.add_argument("--beams", type=int, default=1, help="number of beams (default 1: no beam search)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="finished beams scored score / ((5 + length) / 6) ** this (default 1.0)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram of this size")
    g.add_argument("--min-gen-length", type=int, default=0, help="no end token before this many new tokens")


def beam_kwargs(args) -> dict:
    n = args.max_new_tokens if getattr(args, "max_new_tokens", None) else None
    return {"length_penalty": args.length_penalty, "no_repeat_ngram_size": args.no_repeat_ngram_size,
            "min_gen_length": args.min_gen_length, "max_new_tokens": n, "seed": getattr(args, "seed", None)}


def add_arguments(p):
    p.add_argument("--prompt", "-p", required=True, help="the text to continue ('-' reads standard input)")
    add_model_args(p)
    add_sampling_args(p)
    add_beam_args(p)


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = load_pipeline(args)
    if args.beams > 1:
        print(pipe.beam_search(prompt, args.beams, **beam_kwargs(args))[0])
        return 0
    run_ = pipe.start_generate(prompt, **sampling_kwargs(args))
    for piece in run_:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(stats_line(run_.stats), file=sys.stderr)
    return 0
