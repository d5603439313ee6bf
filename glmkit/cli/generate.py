"""glmkit generate: continue a raw prompt."""
from __future__ import annotations

import sys

from .common import add_model_args, add_sampling_args, load_pipeline, sampling_kwargs, stats_line

EXAMPLES = """examples:
  glmkit generate --model ~/models/chatglm3-6b --prompt "The capital of France is" -n 32 -t 0
  echo "床前明月光，" | glmkit generate --model ~/models/chatglm-6b --prompt - --seed 1
  glmkit generate --model ~/models/glm-4-9b-chat --prompt "A user record as JSON: " --json-schema user.json -n 200"""


def add_arguments(p):
    p.add_argument("--prompt", "-p", required=True, help="the text to continue ('-' reads standard input)")
    p.add_argument("--json-schema", metavar="FILE", help="the continuation is JSON valid under this JSON Schema "
                                                         "(a .json file), decoded under a grammar")
    p.add_argument("--json", action="store_true", help="the continuation is a JSON object (any)")
    add_model_args(p)
    add_sampling_args(p)


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
