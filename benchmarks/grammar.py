"""Grammar libraries for structured outputs, measured on this CPU with glmkit's own tokenizers: llguidance,
xgrammar and outlines-core beside glmkit's hand-written JSON grammar (benchmarks/_handwritten_grammar.py, once glmkit/constrain.py; JSON objects only).

    python benchmarks/grammar.py [--tokens 120] [--seeds 2] [--libs llguidance,xgrammar,outlines-core,handwritten]

Tokenizers: ChatGLM3-6B's SentencePiece tokenizer.model (64.8k ids, ../shared/glm/official/chatglm3-6b) and a
GLM-4-format tiktoken vocabulary (the GLM-4 file is not available here: a byte-level BPE of 8k ranks trained by
`tokenizers` on ../shared/corpora, with GLM-4's special ids and its 151,552-row embedding, padded).
Schemas: benchmarks/data/json_schemas.json (34: nested objects, arrays, enums, const, anyOf, string formats,
patterns, integer/number ranges, required/optional, strict-shaped, $defs/$ref, top-level arrays and enums).
Each library gets the same vocabulary bytes (glmkit.grammar.token_bytes) and decodes every schema from random
logits (seeded, a bias towards short tokens so that strings end) for at most --tokens tokens, without any
closing budget. Per library and tokenizer it prints:
  setup      the vocabulary set-up once per tokenizer (s)
  compile    per schema, p50 / max (ms); schemas it refused (unsupported)
  mask       per token, p50 / p99 / max (ms), as an engine pays it (the allowed-ids mask ready to apply)
  finished   outputs that reached a stop id within the budget; valid = finished outputs that parse and
             validate under jsonschema (formats checked); invalid counts are failures of the library
The hand-written grammar knows no schemas: it decodes a JSON object for every schema, so its "valid" column
says how often a schema-blind object happens to validate (the reason to replace it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
SCHEMAS = ROOT / "benchmarks" / "data" / "json_schemas.json"

from glmkit import grammar as G  # noqa: E402
from glmkit.tokenizer import load_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------------------

GLM4_SPECIALS = {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
                 "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337,
                 "<|observation|>": 151338}


def glm4_like(out: Path, ranks: int = 8000) -> Path:
    """A GLM-4-format tokenizer folder: a byte-level BPE trained on the shared corpora, as tiktoken ranks."""
    import base64

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from glmkit.tokenizer import _bytes_to_unicode

    if (out / "tokenizer.model").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    files, size = [], 0
    for p in sorted((SHARED / "corpora").rglob("*")):
        if p.suffix in (".txt", ".json", ".md") and size < 4 << 20:      # ~4 MB of text is enough for 8k ranks
            files.append(str(p))
            size += p.stat().st_size
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train(files, trainers.BpeTrainer(vocab_size=ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                        show_progress=False))
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(bytes(inv[c] for c in t)).decode()} {i}" for i, (t, _) in enumerate(vocab)]
    (out / "tokenizer.model").write_text("\n".join(lines) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": c, "special": True} for c, i in GLM4_SPECIALS.items()}}))
    return out


def tokenizers(tmp: Path) -> dict:
    return {"chatglm3 (SentencePiece 64.8k)": load_tokenizer(SHARED / "glm" / "official" / "chatglm3-6b", "chatglm3"),
            "glm4 (tiktoken, 151.5k rows)": load_tokenizer(glm4_like(tmp / "glm4"), "glm4")}


# ------------------------------------------------------------------------------------------------------------
# Libraries: set up per tokenizer; compile(schema) -> matcher; matcher.mask() -> np.bool_ [V]; accept(id)
# ------------------------------------------------------------------------------------------------------------

class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, stops):
        self.tok, self.stops = tok, stops
        G.vocab(tok, stops)

    def compile(self, schema):
        g = G.json_schema_grammar(schema)
        return G.GrammarConstraint(self.tok, g, self.stops)           # no max_tokens: no closing

    @staticmethod
    def mask(c):
        return c.allowed_np()

    @staticmethod
    def accept(c, t):
        c.advance(t)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, stops):
        import xgrammar as xgr
        self.xgr = xgr
        raw = G.token_bytes(tok)
        vocab = [b if b else b"<glmkit_special_%d>" % i for i, b in enumerate(raw)]
        self.V = len(vocab)
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=self.V, stop_token_ids=list(stops))
        self.special = np.array([not b for b in raw])
        self.stops = stops
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        cg = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False)
        m = self.xgr.GrammarMatcher(cg)
        m._bits = self.xgr.allocate_token_bitmask(1, self.V)
        m._special = self.special
        m._stops = self.stops
        return m

    def mask(self, m):
        m.fill_next_token_bitmask(m._bits)
        mask = np.unpackbits(m._bits.numpy().view(np.uint8), bitorder="little")[:self.V].view(bool).copy()
        stops = mask[list(m._stops)]                  # the library allows the stop ids once the JSON is complete
        mask[m._special] = False                      # other specials never in text
        mask[list(m._stops)] = stops
        return mask

    @staticmethod
    def accept(m, t):
        if not m.accept_token(int(t)):
            raise RuntimeError(f"xgrammar refused {t}")


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, stops):
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema
        self.oc, self.regex = oc, build_regex_from_schema
        raw = G.token_bytes(tok)
        groups: dict = {}
        for i, b in enumerate(raw):
            if b and i not in stops:
                groups.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(stops[0], groups)
        self.V, self.stops = len(raw), stops

    def compile(self, schema):
        rx = self.regex(json.dumps(schema), r"[\n ]{0,2}")
        return self.oc.Guide(self.oc.Index(rx, self.vocab))

    def mask(self, g):
        mask = np.zeros(self.V, dtype=bool)
        mask[np.fromiter(g.get_tokens(), dtype=np.int64)] = True
        if g.is_finished():
            mask[list(self.stops)] = True
        return mask

    def accept(self, g, t):
        g.advance(int(t))


class Handwritten:
    name = "handwritten (the former glmkit/constrain.py)"

    def __init__(self, tok, stops):
        import _handwritten_grammar as constrain
        self.c, self.tok, self.stops = constrain, tok, stops
        constrain.prepare(tok, constrain.JsonObjectValidator)

    def compile(self, schema):
        return self.c.json_object_constraint(self.tok, self.stops)     # schema-blind: any JSON object

    @staticmethod
    def mask(c):
        return c.allowed().numpy()

    @staticmethod
    def accept(c, t):
        c.advance(t)


LIBS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore, "handwritten": Handwritten}


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------

def format_checker():
    import jsonschema
    fc = jsonschema.FormatChecker()

    @fc.checks("date-time")
    def _dt(s):
        return not isinstance(s, str) or re.fullmatch(
            r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", s) is not None
    return fc


def validates(schema, text: str, fc) -> bool:
    import jsonschema
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    cls = jsonschema.validators.validator_for(schema)
    return not any(True for _ in cls(schema, format_checker=fc).iter_errors(value))


def decode(lib, m, tok, stops, bias, n_tokens, seed):
    """Random logits (seeded) under the library's mask -> (text, finished, mask seconds per token)."""
    g = np.random.default_rng(seed)
    ids, times = [], []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        mask = lib.mask(m)
        times.append(time.perf_counter() - t0)
        logits = g.standard_normal(len(mask)).astype(np.float32) + bias[:len(mask)]
        logits[~mask] = -np.inf
        if not np.isfinite(logits).any():
            return tok.decode(ids), False, times
        p = np.exp(logits - logits.max())
        t = int(g.choice(len(p), p=p / p.sum()))
        if t in stops:
            return tok.decode(ids), True, times
        lib.accept(m, t)
        ids.append(t)
    return tok.decode(ids), False, times


def short_bias(tok) -> np.ndarray:
    raw = G.token_bytes(tok)
    return np.array([-1.5 * len(b) if b else 0.0 for b in raw], dtype=np.float32)


def ms(xs, q):
    return 1000 * float(np.quantile(xs, q)) if xs else float("nan")


def run_lib(cls, tok, stops, schemas, n_tokens, seeds, fc, bias) -> dict:
    t0 = time.perf_counter()
    lib = cls(tok, stops)
    setup = time.perf_counter() - t0
    compile_s, mask_s, refused, finished, valid, invalid, total = [], [], [], 0, 0, [], 0
    for e in schemas:
        for seed in range(seeds):
            t0 = time.perf_counter()
            try:
                m = lib.compile(e["schema"])
            except Exception as ex:                           # noqa: BLE001 - an unsupported schema
                refused.append(f"{e['name']}: {str(ex).splitlines()[0][:80]}")
                break
            if seed == 0:
                compile_s.append(time.perf_counter() - t0)
            total += 1
            try:
                text, done, times = decode(lib, m, tok, stops, bias, n_tokens, 1000 + seed)
            except Exception as ex:                           # noqa: BLE001 - a library error mid-answer
                invalid.append(f"{e['name']}: error {str(ex).splitlines()[0][:80]}")
                continue
            mask_s += times
            if done:
                finished += 1
                if validates(e["schema"], text, fc):
                    valid += 1
                else:
                    invalid.append(f"{e['name']}: {text[:60]!r}")
    return {"setup": setup, "compile": compile_s, "mask": mask_s, "refused": refused, "finished": finished,
            "valid": valid, "invalid": invalid, "total": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core,handwritten")
    ap.add_argument("--schemas", type=int, default=0, help="only the first N schemas (0: all)")
    args = ap.parse_args(argv)
    schemas = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    if args.schemas:
        schemas = schemas[:args.schemas]
    fc = format_checker()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        toks = tokenizers(Path(tmp))
        print(f"{len(schemas)} schemas x {args.seeds} seeds, at most {args.tokens} tokens each, random logits", flush=True)
        summary = {}
        for tname, tok in toks.items():
            stops = tuple(tok.chat_format.stop_ids)
            bias = short_bias(tok)
            for name in args.libs.split(","):
                try:
                    r = run_lib(LIBS[name], tok, stops, schemas, args.tokens, args.seeds, fc, bias)
                except ImportError as ex:
                    print(f"{name}: not installed ({ex})")
                    continue
                summary[(name, tname)] = r
                c = r["compile"]
                print(f"{name:34s} {tname:30s} setup {r['setup']:.2f} s | compile p50 {ms(c, .5):.1f} max "
                      f"{ms(c, 1):.1f} ms, refused {len(r['refused'])} | mask p50 {ms(r['mask'], .5):.3f} p99 "
                      f"{ms(r['mask'], .99):.2f} max {ms(r['mask'], 1):.1f} ms | finished {r['finished']}/"
                      f"{r['total']} valid {r['valid']} invalid {len(r['invalid'])}", flush=True)
                for x in r["refused"] + r["invalid"][:6]:
                    print("    ", x)
    for (name, tname), r in summary.items():
        print(f"grammar lib={name.split()[0]} tok={tname.split()[0]} compile_ms_p50={ms(r['compile'], .5):.2f} "
              f"mask_ms_p50={ms(r['mask'], .5):.3f} mask_ms_p99={ms(r['mask'], .99):.2f} "
              f"valid_of_finished={r['valid']}/{r['finished']} refused={len(r['refused'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
