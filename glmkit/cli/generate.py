"""glmkit generate: continue a raw prompt."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line

EXAMPLES = """examples:
  glmkit generate --model ~/models/chatglm3-6b --prompt "The capital of France is" -n 32 -t 0
  echo "床前明月光，" | glmkit generate --model ~/models/chatglm-6b --prompt - --seed 1
  glmkit generate --model ~/models/glm-4-9b-chat --prompt "A user record as JSON: " --json-schema user.json -n 200
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
    p.add_argument("--json-schema", metavar="FILE", help="the continuation is JSON valid under this JSON Schema "
                                                         "(a .json file), decoded under a grammar")
    p.add_argument("--json", action="store_true", help="the continuation is a JSON object (any)")
    add_model_args(p)
    add_sampling_args(p)
    add_beam_args(p)


def read_schema(path: str) -> dict:
    """--json-schema FILE -> the schema (checked before any model is loaded)."""
    import json
    from pathlib import Path

    from ..grammar import check_schema

    f = Path(path).expanduser()
    try:
        schema = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--json-schema {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema {path} is not JSON: {e}") from None
    check_schema(schema, f"--json-schema {path}")
    return schema


def run(args) -> int:
    schema = read_schema(args.json_schema) if args.json_schema else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    pipe = load_pipeline(args)
    if args.beams > 1:
        print(pipe.beam_search(prompt, args.beams, **beam_kwargs(args))[0])
        return 0
    run_ = pipe.start_generate(prompt, schema=schema, json=args.json, **sampling_kwargs(args))
    for piece in run_:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(stats_line(run_.stats), file=sys.stderr)
    if (schema is not None or args.json) and run_.stats.finish_reason == "length":
        print("glmkit generate: the JSON was cut by --max-new-tokens (finish_reason length)", file=sys.stderr)
        return 3
    return 0
