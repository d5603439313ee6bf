"""glmkit train-tokenizer: train a ChatGLM-6B-style SentencePiece tokenizer (ice_text.model) on your corpus."""
from __future__ import annotations

import sys

EXAMPLES = """examples:
  glmkit train-tokenizer --input ~/corpora/chinese-poetry ~/corpora/english --vocab-size 32000 --out ~/tok32k
  glmkit train-tokenizer --input wiki.txt chat.jsonl --vocab-size 8192 --out tok8k --seed 1

Inputs: *.txt (one document per blank-line-separated block), *.jsonl (one {"text"} / {"content"} /
instruction record per line) and *.json (a list of records, chinese-poetry poems included); a folder stands
for every such file under it. Bad data (an empty file, bytes that are not UTF-8, a JSONL line that does not
parse) is reported as a warning "file:line: what" and skipped.

Writes OUT/ice_text.model and OUT/tokenizer_config.json in ChatGLM-6B's conventions, so glmkit reads the
folder (or a model folder holding these two files) as a ChatGLM-6B tokenizer:
  - SentencePiece unigram model with --vocab-size pieces IN TOTAL: <unk>=0 <s>=1 </s>=2 <pad>=3 <n>=4, the
    control symbols [MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> (never matched in text),
    the markers <|tab|> <|blank_2|>..<|blank_80|>, 256 byte pieces, then the learned pieces
  - text is pre-processed as ChatGLM-6B does: newline -> <n>, tab -> <|tab|>, 2..80 spaces -> <|blank_N|>
  - no normalisation (the official model uses NFKC): lossless, decode(encode(text)) == text, full-width
    punctuation stays full-width; characters outside the vocabulary fall back to UTF-8 bytes (never <unk>);
    digits are split one by one
  - tokenizer_config.json: bos <sop>, eos <eop>, [gMASK]/[MASK]/<pad>/<unk>, no remote code
The same inputs, --vocab-size and --seed give a byte-identical ice_text.model."""


def add_arguments(p):
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE",
                   help="text/JSONL/JSON files or folders to train on")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="pieces in the model, the 349 special, marker and byte pieces included (e.g. 32000; "
                        "ChatGLM-6B has 130344)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="sentence sampling seed (default 0)")
    p.add_argument("--max-sentences", type=int, default=2_000_000, metavar="N",
                   help="train on at most N sentences, sampled uniformly (default 2000000)")
    p.add_argument("--character-coverage", type=float, default=0.9995, metavar="F",
                   help="share of the corpus' characters that get a piece of their own; the rarest others "
                        "are written as bytes (default 0.9995; lowered, with a warning, when those characters "
                        "would not fit in --vocab-size, as with a CJK corpus and a small vocabulary)")


MAX_WARNINGS = 20          # printed one by one; the rest are counted per file


def run(args) -> int:
    from ..train.tokenizer import train_tokenizer

    shown: list[str] = []
    hidden: dict[str, int] = {}

    def warn(msg: str):
        if len(shown) < MAX_WARNINGS:
            shown.append(msg)
            print(f"warning: {msg}", file=sys.stderr)
        else:
            f = msg.split(":", 1)[0]
            hidden[f] = hidden.get(f, 0) + 1

    try:
        out = train_tokenizer(args.input, args.out, args.vocab_size, seed=args.seed,
                              max_sentences=args.max_sentences, character_coverage=args.character_coverage,
                              progress=True, on_error=warn)
    finally:
        if hidden:
            top = sorted(hidden.items(), key=lambda kv: -kv[1])
            where = ", ".join(f"{f} ({n})" for f, n in top[:5]) + (", ..." if len(top) > 5 else "")
            print(f"warning: {sum(hidden.values())} more input problems not shown: {where}", file=sys.stderr)
    n = len(shown) + sum(hidden.values())
    print(f"wrote {out / 'ice_text.model'} and {out / 'tokenizer_config.json'} ({args.vocab_size} pieces"
          + (f"; {n} input problems skipped, see the warnings" if n else "") + ")")
    return 0
