"""Infilling accuracy on held-out Tang poem lines, next to a unigram baseline (the numbers of glm-tiny's card).

    python benchmarks/infill_eval.py [--model DIR] [--held-out FILE] [--lines 200] [--seed 0]

With [sMASK] the blank covers the clause and its end mark, as [sMASK] spans were cut in training (with
`--extra-sentence-ends '，；'`), and one end mark at the end of the fill is set aside before comparing.
Each case is one line (a 5- or 7-character clause ending in ， or 。) of a poem from a file kept out of
training (default: 全唐诗/poet.tang.57000.json, which glm-tiny's pretraining excludes). The poem is written as
the training documents were (title line, then one line per couplet) with that clause replaced by a mask
token (--mask: [sMASK] by default, [MASK] or [gMASK]); the
model fills it greedily with Pipeline.infill. Reported:
  exact       the filled span equals the original clause
  char_acc    characters equal at the same position, over the clause's characters
  right_count the span is exactly N Chinese characters (N = the clause's length), nothing else
Unigram baseline: every character is the most frequent character of the training poems (given the right
length, so its right_count is 1.0 by construction); its char_acc is that character's share of the clause
characters. The last line is machine-readable.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POETRY = ROOT.parent / "shared" / "corpora" / "chinese-poetry"
HELD_OUT = POETRY / "全唐诗" / "poet.tang.57000.json"
CJK = re.compile(r"^[\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002ffff]+$")
CLAUSE = re.compile(r"([^，。！？；]+)([，。！？；])")


def cases(path: Path, n: int, seed: int, mask: str = "[MASK]"):
    """-> [(masked document, original clause)], n of them, one per poem at most."""
    poems = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for p in poems:
        paras = [s.strip() for s in p.get("paragraphs", []) if s.strip()]
        if len(paras) < 2:
            continue
        clauses = [(i, m) for i, para in enumerate(paras) for m in CLAUSE.finditer(para)]
        lens = {len(m.group(1)) for _, m in clauses}
        if len(clauses) < 4 or not (lens == {5} or lens == {7}) or not all(CJK.match(m.group(1)) for _, m in clauses):
            continue
        out.append((p, paras, clauses))
    rng = random.Random(seed)
    rng.shuffle(out)
    res = []
    for p, paras, clauses in out[:n]:
        i, m = rng.choice(clauses)
        # [sMASK] blanks a sentence with its end mark (how the spans were cut in training); the others the words
        end = m.end(2) if mask == "[sMASK]" else m.end(1)
        para = paras[i][:m.start(1)] + mask + paras[i][end:]
        lines = [p.get("title", "").strip()] + paras[:i] + [para] + paras[i + 1:]
        res.append(("\n".join(s for s in lines if s), m.group(1)))
    return res


def unigram_top(poetry_dir: Path, exclude: Path) -> tuple[str, float]:
    counts = collections.Counter()
    for f in sorted((poetry_dir / "全唐诗").glob("poet.tang.*.json")):
        if f.resolve() == exclude.resolve():
            continue
        for p in json.loads(f.read_text(encoding="utf-8")):
            for s in p.get("paragraphs", []):
                counts.update(c for c in s if CJK.match(c))
    c, k = counts.most_common(1)[0]
    return c, k / sum(counts.values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded glm-tiny)")
    ap.add_argument("--held-out", default=str(HELD_OUT))
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask", default="[sMASK]", choices=["[MASK]", "[sMASK]", "[gMASK]"],
                    help="the blank written for the line (default [sMASK]: GLM's sentence blank; a line of a poem "
                         "is the unit glm-tiny's [sMASK] learned)")
    ap.add_argument("--show", type=int, default=5, help="print this many examples")
    args = ap.parse_args(argv)
    import glmkit

    held = Path(args.held_out)
    if not held.is_file():
        sys.exit(f"{held} not found (needs ../shared/corpora)")
    pipe = glmkit.load(args.model)
    cs = cases(held, args.lines, args.seed, args.mask)
    top, top_share = unigram_top(held.parents[1], held)
    n_exact = n_count = 0
    char_ok = char_all = base_ok = base_exact = 0
    t0 = time.time()
    for k, (doc, want) in enumerate(cs):
        got = pipe.infill(doc, max_new_tokens=3 * len(want) + 4).spans[0]
        if args.mask == "[sMASK]" and got[-1:] in "，。！？；":     # the sentence's own end mark
            got = got[:-1]
        n_exact += got == want
        n_count += bool(CJK.match(got)) and len(got) == len(want)
        char_ok += sum(a == b for a, b in zip(got, want))
        char_all += len(want)
        base_ok += want.count(top)
        base_exact += want == top * len(want)
        if k < args.show:
            print(f"{doc.splitlines()[0]!s:<12} want {want}  got {got!r}")
    n = len(cs)
    dt = time.time() - t0
    print(f"\n{n} held-out clauses from {held.name}, each written as {args.mask} ({dt:.0f} s)")
    print("| model | exact line | char accuracy | right character count |")
    print("|---|---|---|---|")
    print(f"| {Path(pipe.path).name if pipe.path else 'model'} | {n_exact / n:.3f} | {char_ok / char_all:.3f} | "
          f"{n_count / n:.3f} |")
    print(f"| unigram baseline ('{top}', {top_share:.3f} of training characters) | {base_exact / n:.3f} | "
          f"{base_ok / char_all:.3f} | 1.000 (given) |")
    print(f"mask={args.mask} infill_exact={n_exact / n:.4f} infill_char_acc={char_ok / char_all:.4f} "
          f"infill_right_count={n_count / n:.4f} unigram_char_acc={base_ok / char_all:.4f} n={n}")


if __name__ == "__main__":
    main()
