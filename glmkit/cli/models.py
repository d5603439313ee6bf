"""glmkit models: what the local model store ($GLMKIT_MODELS, default ~/.glmkit/models) holds."""
from __future__ import annotations

import json

EXAMPLES = """examples:
  glmkit models                                      # name, kind, generation, size, quantization, adapters
  glmkit quantize --model ~/models/chatglm3-6b --bits 4 --out chatglm3-6b-int4    # a bare name: into the store
  glmkit finetune --model chatglm3-6b-int4 --method lora --data train.json --out my-lora
  glmkit chat --model chatglm3-6b-int4 --adapter my-lora      # names of the store, before paths
  GLMKIT_MODELS=/data/models glmkit models --json

A store entry is a folder STORE/NAME: a model folder (an official download copied or linked there, or one
written by glmkit quantize/merge), an adapter folder (PEFT LoRA, P-tuning v2), or a glmkit finetune run
(NAME/adapter or NAME/model). --model NAME and --adapter NAME look there before reading NAME as a path."""


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="one JSON object per entry, one per line")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def run(args) -> int:
    from ..store import list_models, models_dir

    entries = list_models()
    if args.json:
        for e in entries:
            print(json.dumps(e.to_dict(), ensure_ascii=False))
        return 0
    root = models_dir()
    if not entries:
        print(f"no models in {root} (set $GLMKIT_MODELS, or write one there: glmkit quantize ... --out NAME)")
        return 0
    rows = [("NAME", "KIND", "GENERATION", "SIZE", "QUANTIZATION", "ADAPTERS / BASE")]
    for e in entries:
        extra = ", ".join(e.adapters) if e.kind == "model" else (f"base: {e.base}" if e.base else "")
        rows.append((e.name, e.kind, e.generation or "?", _size(e.size_bytes), e.quantization or "float"
                     if e.kind == "model" else "", extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    print(f"{root}:")
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0
