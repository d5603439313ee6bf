"""glmkit quantize: write an INT8/INT4 copy of a model folder (glmkit layout, loads with glmkit.load)."""
from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = """examples:
  glmkit quantize --model ~/models/chatglm3-6b --bits 4 --out ~/models/chatglm3-6b-int4
  glmkit quantize --model ~/models/glm-4-9b-chat --bits 8 --out ~/models/glm-4-9b-chat-int8
  glmkit chat --model ~/models/chatglm3-6b-int4

The weights are quantized tensor by tensor while the checkpoint is read, so the float model is never in memory
whole. Linear layers and the embedding are stored in blocks of --group-size weights with one fp16 scale
(int8: llama.cpp's Q8_0; int4: Q4_0 at group 32); norms stay in float. Tokenizer files are copied."""


def add_arguments(p):
    p.add_argument("--model", "-m", required=True, metavar="NAME|DIR",
                   help="float model folder (official or glmkit), or a name of the model store")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (default) or 8")
    p.add_argument("--group-size", type=int, default=32, metavar="G",
                   help="weights per scale, a multiple of 32 (default 32; 64/128 are smaller, less accurate)")
    p.add_argument("--embedding-bits", default="same", choices=["same", "4", "8", "float"],
                   help="the token embedding: same as --bits (default), 4, 8, or float")
    p.add_argument("--out", "-o", required=True, metavar="NAME|DIR2",
                   help="folder to write (created); a bare NAME (no slash) goes into the model store")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads")


def run(args) -> int:
    from ..checkpoint import load_model, save_model
    from ..quant import QuantSpec, quantized_bytes
    from ..store import out_path, resolve
    from .common import set_threads

    set_threads(args.threads)
    src, out = Path(resolve(args.model)).expanduser(), out_path(args.out)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError("--out must be a different folder than --model")
    emb = {"same": 0, "4": 4, "8": 8, "float": None}[args.embedding_bits]
    spec = QuantSpec(bits=args.bits, group_size=args.group_size, embedding_bits=emb)
    model, info = load_model(src, quantize=spec, progress=sys.stderr.isatty())
    save_model(model, out, source_dir=src)
    n = quantized_bytes(model)
    print(f"wrote {out}: int{args.bits}, group {args.group_size}, {n / 2**30:.2f} GiB "
          f"(quantized in {info.seconds:.1f} s)")
    return 0
