"""glmkit export-gguf: write a model as a GGUF file for llama.cpp (architecture "chatglm")."""
from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = """examples:
  glmkit export-gguf --model ~/models/chatglm3-6b --type q4_0 --out chatglm3-6b-q4_0.gguf
  glmkit export-gguf --model ~/models/glm-4-9b-chat --type q8_0 --out glm-4-9b-chat-q8_0.gguf
  glmkit export-gguf --model ~/models/chatglm3-6b-int4 --type q4_0 --out chatglm3-6b-q4_0.gguf
  llama-cli -m chatglm3-6b-q4_0.gguf -cnv                  # then run it with llama.cpp

Supported: ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B (official folders in either layout, or folders written by
glmkit). ChatGLM-6B (v1) is refused: llama.cpp has no architecture for it.

Types: norms and biases are always F32; --type applies to every 2D weight, the embedding and the output layer
included. A weight whose input size is not a multiple of 32 cannot be Q4_0/Q8_0 and is written F16.
A folder written by `glmkit quantize` (int4 / int8) is repacked bit-exactly to Q4_0 / Q8_0 (no second rounding).
The tokenizer goes in too: SentencePiece for ChatGLM2/3, byte-level BPE for GLM-4, plus a chat template and the
stop tokens (eos, <|user|> as eot, <|observation|> as eom). Tensors are converted one at a time, so memory stays
near the size of the largest tensor. Needs the `gguf` package: pip install 'glmkit[gguf]'."""


def add_arguments(p):
    p.add_argument("--model", "-m", required=True, metavar="DIR",
                   help="model folder: official ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B download, or one written by "
                        "glmkit (float or quantized)")
    p.add_argument("--type", "-t", dest="qtype", default="f16", choices=["q4_0", "q8_0", "f16", "f32"],
                   help="type of the 2D weights: q4_0 (~4.5 bits/weight), q8_0 (~8.5), f16 (default), f32")
    p.add_argument("--out", "-o", required=True, metavar="FILE.gguf", help="file to write (replaced if it exists)")
    p.add_argument("--name", default=None, help="general.name written into the file (default: the model's name)")


def run(args) -> int:
    from ..gguf_export import export_gguf

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name such as {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise ValueError(f"the folder of --out ({out.parent}) does not exist")
    from ..store import resolve

    res = export_gguf(Path(resolve(args.model)).expanduser(), out, qtype=args.qtype, progress=sys.stderr.isatty(),
                      name=args.name)
    print(res.summary())
    return 0
