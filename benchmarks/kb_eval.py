"""Benchmark glmkit kb: retrieval quality on the hand-written question set, the chunking / top-k / threshold
defaults chosen by measurement, ingest throughput and search latency — each compared in the same run with the
path a Langchain-Chatchat user runs.

Quality: the 152 questions of benchmarks/data/kb_questions.jsonl over ../shared/corpora/docs (15 documents, md /
txt / html / docx / pdf, Chinese and English). A retrieved chunk is a hit when it comes from the question's
`source` and contains its `evidence` after NFKC + removing all whitespace on both sides, or (the evidence cut
between two chunks) its span in the document so normalised overlaps the evidence's (benchmarks/data/README.md).
hit@k: a hit among the first k results; MRR: mean 1/rank of the first hit in the top 10 (0 if none).

  glmkit BM25     KnowledgeBase.search (bm25s over jieba-segmented Chinese + normalised English), the default
  Chatchat BM25   the same chunks, tokenized by jieba.lcut_for_search (HMM on) and ranked by rank_bm25.BM25Okapi
                  with get_top_n: what Chatchat's BM25Retriever(preprocess_func=jieba.lcut_for_search) runs
  --embedding-model DIR (a local sentence-transformers folder; `hash` = a hashed bag of character bigrams, no
  model, only to exercise the code path): glmkit dense (the KB's vectors), glmkit hybrid (the KB's RRF mode),
  Chatchat dense (faiss-cpu IndexFlatIP over the same normalised vectors) and Chatchat hybrid (its
  EnsembleRetriever: BM25 + faiss, weights 0.5 / 0.5, weighted reciprocal rank with c = 60).

Defaults by measurement: a grid of chunk size x overlap (every size with every overlap) on the question set; the
chosen pair is the best hit@5 (then MRR, then the smaller size) among sizes up to SANE_MAX characters (a prompt
of 3 chunks of 800 Chinese characters alone fills ChatGLM-6B's 2048-token context); top-k = the smallest k whose
hit@k is within TOPK_SLACK of hit@10, at most CONTEXT_CHARS / chunk size; the score threshold = the highest that
drops at most MAX_DROPPED of the questions' correct chunks (the fraction of off-topic questions it refuses is
shown beside it).

Speed (timed parts start once the 1-minute load average is below 1.0, or after --max-wait seconds; the load is
printed with each): ingest MB/s of text (UTF-8 bytes of the text the readers extract) for BM25-only into a fresh
KB, of the docs folder and of a >= 20 MB corpus assembled from ../shared/corpora (chinese-poetry records and
english texts written out as .txt); search latency p50 / p99 of KnowledgeBase.search (defaults: top-k,
threshold; tokenizing, scoring and fetching the chunk texts from SQLite) at ~10k and ~100k chunks, KBs built
from the docs plus chinese-poetry JSON records (one chunk each) and english text, ingested through
KnowledgeBase.add — against rank_bm25 over the same chunks. KBs, the corpus and Chatchat's tokens are cached
under /tmp/glmkit-kb-bench, so reruns are fast.

Run from the repository root:
    python benchmarks/kb_eval.py                                  # everything, BM25-only
    python benchmarks/kb_eval.py --embedding-model ~/models/bge-small-zh-v1.5
    python benchmarks/kb_eval.py --sizes 10000 --max-wait 0       # quick

The last line is machine-readable: kb_hit5=F kb_mrr=F ingest_mb_s=F search_p99_ms_100k=F; the line before it has
the same keys as ratios glmkit / Chatchat path.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import glmkit.kb as kbmod  # noqa: E402
from glmkit.documents import record_text  # noqa: E402
from glmkit.kb import KnowledgeBase, readers, retrieve, split  # noqa: E402

CORPORA = (REPO_ROOT / ".." / "shared" / "corpora").resolve()
DOCS = CORPORA / "docs"
QUESTIONS = REPO_ROOT / "benchmarks" / "data" / "kb_questions.jsonl"
CACHE = Path("/tmp/glmkit-kb-bench")

GRID_SIZES = (200, 300, 400, 600, 800)
GRID_OVERLAPS = (0, 50, 100)
K_MAX = 10
SANE_MAX = 600                  # chunk sizes chosen from: 3 chunks of 800 Chinese characters alone fill ChatGLM-6B's
CONTEXT_CHARS = 2000            # 2048-token context; TOP_K x chunk size is kept within CONTEXT_CHARS
TOPK_SLACK = 0.03               # top-k: the smallest k whose hit@k is within this of hit@10
THRESHOLDS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
MAX_DROPPED = 0.01              # the threshold may drop at most this fraction of correct chunks
TARGET_HIT5, TARGET_P99_MS, TARGET_INGEST = 0.85, 50.0, 1.0
CORPUS_MIN_MB = 20

# off-topic questions: nothing in the 15 documents answers them (the threshold should refuse them)
OFF_TOPIC = [
    "今天北京的天气怎么样？", "红烧肉怎么做才好吃？", "世界上最高的山是哪座？", "唐朝的开国皇帝是谁？",
    "如何提高跑步的耐力？", "猫一天需要睡多久？", "怎样申请出国留学的签证？", "股票明天会涨吗？",
    "感冒了应该吃什么药？", "一场足球比赛踢多少分钟？", "绿萝多久浇一次水？", "地球到月球有多远？",
    "成年人怎么学会游泳？", "中国一共有多少个省份？", "哪种咖啡豆适合做意式浓缩？",
    "What is the capital of France?", "How do I bake sourdough bread at home?",
    "Who won the 2018 football World Cup?", "How far is the Moon from the Earth?",
    "What is a healthy diet for losing weight?", "How many legs does a spider have?",
    "When did the Western Roman Empire fall?", "How do I fix a flat bicycle tyre?",
    "At what temperature does water boil on Mount Everest?", "Which planet has the most moons?",
    "How often should an orchid be watered?", "What is the best way to learn the piano as an adult?",
    "How does photosynthesis work in plants?", "Who painted the Mona Lisa?", "What time zone is Tokyo in?",
]

_WS = re.compile(r"\s+")


def norm(s: str) -> str:
    """The question set's match rule: NFKC, then all whitespace removed."""
    return _WS.sub("", unicodedata.normalize("NFKC", s))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# machine, load
# ------------------------------------------------------------------------------------------------------------

def cpu_info() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    flags: set = set()
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("flags"):
                flags = set(ln.split(":", 1)[1].split())
                if not model:
                    model = "?"
                break
            if ln.startswith("model name") and not model:
                model = ln.split(":", 1)[1].strip()
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni") if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model or 'unknown CPU'}, {cores} cores usable, AVX2 {'yes' if 'avx2' in flags else 'no'}, "
            f"AVX-512 {'yes' if 'avx512f' in flags else 'no'} ({' '.join(simd) or 'none'})")


def wait_for_quiet(max_wait: float, what: str, below: float = 1.0, poll: float = 30.0) -> str:
    """Wait (up to max_wait s) until the 1-minute load average is below `below`; -> a note with the load."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        waited = time.time() - t0
        if load < below:
            return f"load {load:.2f} (waited {waited:.0f} s)"
        if waited >= max_wait:
            return f"load {load:.2f} after waiting {waited:.0f} s: the machine is shared, timings are pessimistic"
        log(f"[{what}] 1-minute load {load:.2f} >= {below}: waiting ({waited:.0f}/{max_wait:.0f} s)")
        time.sleep(min(poll, max(1.0, max_wait - waited)))


# ------------------------------------------------------------------------------------------------------------
# questions, evaluation
# ------------------------------------------------------------------------------------------------------------

def load_questions() -> list:
    qs = [json.loads(ln) for ln in QUESTIONS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    for q in qs:
        q["ev"] = norm(q["evidence"])
    return qs


_READ_CACHE: dict = {}


def cached_read_file(path, data=None):
    """readers.read_file memoised by content (the grid re-chunks the same documents 15 times)."""
    data = Path(path).read_bytes() if data is None else data
    key = (Path(path).suffix.lower(), hashlib.sha256(data).hexdigest())
    if key not in _READ_CACHE:
        _READ_CACHE[key] = readers.read_file(path, data)
    return _READ_CACHE[key]


class DocTexts:
    """Each question document's text as the KB reads it, normalised by norm(): where chunks and evidence are."""

    def __init__(self, questions):
        self.text: dict = {}
        for f in sorted({q["source"] for q in questions}):
            doc = cached_read_file(DOCS / f)
            self.text[f] = norm("".join(split.normalize(b.text, b.code) for b in doc.blocks))
        self.ev_span: dict = {}
        self.missing = []                     # evidence the reader's text does not hold (a reader problem)
        for q in questions:
            i = self.text[q["source"]].find(q["ev"])
            self.ev_span[q["id"]] = (i, i + len(q["ev"])) if i >= 0 else None
            if i < 0:
                self.missing.append(q["id"])


def chunk_info(kb, docs: DocTexts) -> dict:
    """chunk id -> (file name, normalised text, span in the normalised document or None), for the chunks of the
    question documents (the others can never be hits)."""
    info, pos = {}, {}
    for c in kb.store.iter_chunks():
        name = os.path.basename(c.source)
        if name not in docs.text or not Path(c.source).resolve().is_relative_to(DOCS):
            continue
        t = norm(c.text)
        doc = docs.text[name]
        i = doc.find(t, pos.get(name, 0))
        if i < 0:
            i = doc.find(t)
        if i >= 0:
            pos[name] = i
        info[c.id] = (name, t, (i, i + len(t)) if i >= 0 else None)
    return info


def is_hit(q, entry, docs: DocTexts, strict: bool = False) -> bool:
    if entry is None or entry[0] != q["source"]:
        return False
    if q["ev"] in entry[1]:
        return True
    if strict:
        return False
    a, b = entry[2] or (0, 0), docs.ev_span[q["id"]] or (0, 0)
    return entry[2] is not None and docs.ev_span[q["id"]] is not None and a[0] < b[1] and b[0] < a[1]


def evaluate(questions, search, info, docs, k=K_MAX) -> list:
    """search(question text) -> [(chunk id, score)] best first; -> per question {rank, score, strict, lang}."""
    out = []
    for q in questions:
        found = search(q["question"])[:k]
        rank = next((i + 1 for i, (cid, _) in enumerate(found) if is_hit(q, info.get(cid), docs)), None)
        strict = next((i + 1 for i, (cid, _) in enumerate(found) if is_hit(q, info.get(cid), docs, True)), None)
        out.append({"id": q["id"], "lang": q["lang"], "rank": rank, "strict": strict,
                    "score": found[rank - 1][1] if rank else None})
    return out


def metrics(per: list, key: str = "rank") -> dict:
    n = max(len(per), 1)
    m = {f"hit@{k}": sum(1 for p in per if p[key] and p[key] <= k) / n for k in range(1, K_MAX + 1)}
    m["mrr"] = sum(1.0 / p[key] for p in per if p[key]) / n
    for lang in ("zh", "en"):
        sub = [p for p in per if p["lang"] == lang]
        m[f"{lang}_hit@5"] = sum(1 for p in sub if p[key] and p[key] <= 5) / max(len(sub), 1)
    return m


def glmkit_search(kb, k=K_MAX):
    return lambda q: [(h.chunk_id, h.score) for h in kb.search(q, top_k=k, score_threshold=0)]


# ------------------------------------------------------------------------------------------------------------
# the Chatchat path
# ------------------------------------------------------------------------------------------------------------

def _jieba():
    import logging

    import jieba
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


class ChatchatBM25:
    """Chatchat's BM25Retriever.from_documents(docs, preprocess_func=jieba.lcut_for_search): rank_bm25.BM25Okapi
    over jieba search-mode tokens (HMM on, nothing lower-cased or dropped), get_top_n = argsort of all scores."""

    def __init__(self, ids, texts, tokens=None):
        from rank_bm25 import BM25Okapi

        self.cut = _jieba().lcut_for_search
        self.ids = np.asarray(ids)
        self.tokens = tokens if tokens is not None else [self.cut(t) for t in texts]
        t0 = time.perf_counter()
        self.bm25 = BM25Okapi(self.tokens)
        self.build_s = time.perf_counter() - t0

    def search(self, q, k=K_MAX):
        scores = self.bm25.get_scores(self.cut(q))
        top = np.argsort(scores)[::-1][:k]
        return [(int(self.ids[i]), float(scores[i])) for i in top]


def chatchat_tokens(kb, tag: str) -> tuple:
    """(ids, texts, jieba tokens) of every chunk of kb; the tokens cached under CACHE (they take minutes)."""
    chunks = list(kb.store.iter_chunks())
    ids, texts = [c.id for c in chunks], [c.text for c in chunks]
    h = hashlib.sha256()
    for i, t in zip(ids, texts):
        h.update(f"{i}\x00{t}\x01".encode())
    import jieba
    path = CACHE / f"chatchat-tokens-{tag}-{h.hexdigest()[:16]}-jieba{jieba.__version__}.pkl"
    if path.exists():
        try:
            with open(path, "rb") as f:
                return ids, texts, pickle.load(f), 0.0
        except (OSError, pickle.PickleError, EOFError):
            pass
    cut = _jieba().lcut_for_search
    t0 = time.perf_counter()
    toks = [cut(t) for t in texts]
    secs = time.perf_counter() - t0
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(toks, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return ids, texts, toks, secs


# ------------------------------------------------------------------------------------------------------------
# dense (only with --embedding-model)
# ------------------------------------------------------------------------------------------------------------

class HashEmbedder:
    """`--embedding-model hash`: normalised bag of character bigrams hashed into 256 dimensions. Not a model: it
    only exercises the dense / hybrid / faiss code paths on a machine without one."""
    name = "hash-bigram-256"

    def encode(self, texts):
        import zlib

        out = np.zeros((len(texts), 256), dtype=np.float32)
        for i, t in enumerate(texts):
            t = unicodedata.normalize("NFKC", t).lower()
            for a, b in zip(t, t[1:]):
                out[i, zlib.crc32((a + b).encode()) % 256] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def load_embedder(spec):
    """-> (embedder or None, note)."""
    if not spec:
        return None, ("dense / hybrid: skipped (no --embedding-model DIR given; no embedding model is on this "
                      "machine)")
    if spec == "hash":
        return HashEmbedder(), "dense / hybrid with the `hash` stand-in (hashed character bigrams, NOT a model)"
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return None, f"dense / hybrid: skipped ({spec}: no such folder)"
    emb, note = retrieve.load_embedder(str(folder))
    if emb is None:
        return None, f"dense / hybrid: skipped ({note})"
    return emb, f"dense / hybrid with {folder}"


def faiss_flat(vectors):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])         # Chatchat: FAISS(normalize_L2=True, inner product)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def ensemble(lists, weights=(0.5, 0.5), c=60, k=K_MAX):
    """langchain's EnsembleRetriever: weighted reciprocal rank fusion of ranked [(id, score)] lists."""
    fused: dict = {}
    for w, lst in zip(weights, lists):
        for rank, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + w / (rank + c)
    return sorted(fused.items(), key=lambda kv: -kv[1])[:k]


# ------------------------------------------------------------------------------------------------------------
# corpora
# ------------------------------------------------------------------------------------------------------------

def poetry_json_files() -> list:
    """Smallest first: a synthetic KB then stops close to its target."""
    root = CORPORA / "chinese-poetry"
    return sorted(root.rglob("*.json"), key=lambda p: (p.stat().st_size, str(p))) if root.is_dir() else []


def english_files() -> list:
    root = CORPORA / "english"
    return [root / n for n in ("wiki_demo.txt", "tinyshakespeare.txt", "c4_demo.jsonl") if (root / n).is_file()]


def text_corpus() -> tuple:
    """The >= 20 MB text corpus for ingest throughput: every chinese-poetry JSON file written out as a .txt (one
    paragraph per record: its title and lines, by glmkit.documents.record_text) and the english texts (C4's JSONL
    records as paragraphs). Written once under CACHE -> (folder, [files], total MB)."""
    out = CACHE / "corpus-text"
    done = out / ".complete"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in poetry_json_files():
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            texts = [t for t in map(record_text, data if isinstance(data, list) else [data]) if t]
            if texts:
                name = "poetry-" + "-".join(f.relative_to(CORPORA / "chinese-poetry").with_suffix("").parts)
                (out / f"{name}.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
        for f in english_files():
            if f.suffix == ".jsonl":
                recs = [json.loads(ln) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
                (out / f"english-{f.stem}.txt").write_text("\n\n".join(r["text"] for r in recs) + "\n",
                                                           encoding="utf-8")
            else:
                shutil.copy(f, out / f"english-{f.name}")
        done.write_text("ok")
    files = sorted(p for p in out.iterdir() if p.suffix == ".txt")
    return out, files, sum(p.stat().st_size for p in files) / 1e6


def text_mb(paths) -> float:
    """MB (10^6 bytes, UTF-8) of the text the readers extract from these files/folders."""
    files, _ = readers.collect([str(p) for p in paths])
    total = 0
    for _, f in files:
        if f.suffix.lower() in (".txt", ".text"):
            total += len(f.read_bytes().removeprefix(b"\xef\xbb\xbf"))
            continue
        try:
            total += sum(len(b.text.encode("utf-8")) for b in cached_read_file(f).blocks)
        except readers.ReadError:
            pass
    return total / 1e6


def english_parts(part_bytes: int = 64_000) -> list:
    """The english texts cut (at paragraph ends) into .txt files of about part_bytes, written once under CACHE:
    fillers small enough that a synthetic KB stops close to its target."""
    out = CACHE / "english-parts"
    if not (out / ".complete").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        n = 0
        for f in english_files():
            if f.suffix == ".jsonl":
                paras = [json.loads(ln)["text"] for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            else:
                paras = re.split(r"\n\s*\n", f.read_text(encoding="utf-8"))
            cur: list = []
            for p in paras + [None]:
                if p is not None:
                    cur.append(p)
                if cur and (p is None or sum(len(x) for x in cur) >= part_bytes):
                    (out / f"{f.stem}-{n:03d}.txt").write_text("\n\n".join(cur) + "\n", encoding="utf-8")
                    n, cur = n + 1, []
        (out / ".complete").write_text("ok")
    return sorted(p for p in out.iterdir() if p.suffix == ".txt")


def fillers() -> list:
    """chinese-poetry JSON files (each record a chunk) with an english part after each, then the other parts."""
    poems, english = poetry_json_files(), english_parts()
    out = []
    for i, p in enumerate(poems):
        out.append(p)
        if i < len(english):
            out.append(english[i])
    return out + english[len(poems):]


def synthetic_kb(target: int, cs: int, co: int) -> tuple:
    """A KB of at least `target` chunks: the docs, then fillers() file by file until the target is reached;
    cached under CACHE. -> (KnowledgeBase, note)."""
    tag = f"kb-{target // 1000}k-s{cs}-o{co}-split{split.SPLIT_VERSION}-tok{retrieve.TOKENIZER_VERSION}"
    path = CACHE / tag
    t0 = time.perf_counter()
    kb = KnowledgeBase.open(path)
    kb.add([str(DOCS)], chunk_size=cs, chunk_overlap=co, progress=False)
    total = sum(rec.chunks for rec in kb.files())
    for f in fillers():
        if total >= target:
            break
        kb.add([str(f)], progress=False)
        total = sum(rec.chunks for rec in kb.files())
    kb.build_index()
    return kb, f"{total} chunks, {len(kb.files())} files (ready in {time.perf_counter() - t0:.0f} s, {path})"


def latency_queries(kb, questions, n_extra: int, seed: int = 0) -> list:
    """The question set plus snippets of the KB's own chunks (a line of a poem, a phrase of an English text)."""
    rng = random.Random(seed)
    ids = [i for i in kb.store.index_data().ids]
    picks = rng.sample(ids, min(n_extra * 2, len(ids)))
    extra = []
    for c in kb.store.chunks(picks):
        lines = [ln.strip() for ln in c.text.split("\n") if len(ln.strip()) >= 8]
        if not lines:
            continue
        ln = rng.choice(lines)
        width = rng.randint(8, 24) if not ln.isascii() else rng.randint(20, 60)
        start = rng.randint(0, max(0, len(ln) - width))
        extra.append(ln[start:start + width])
        if len(extra) >= n_extra:
            break
    return [q["question"] for q in questions] + extra


def timed(fn, queries, repeats=1) -> np.ndarray:
    for q in queries[:10]:                     # warm-up: caches, the segmenter's dictionary
        fn(q)
    out = []
    for _ in range(repeats):
        for q in queries:
            t = time.perf_counter()
            fn(q)
            out.append((time.perf_counter() - t) * 1000)
    return np.asarray(out)


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------

def fmt(x, nd=3):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embedding-model", metavar="DIR", default=None,
                    help="a local sentence-transformers folder (or `hash`: a stand-in without a model)")
    ap.add_argument("--sizes", default="10000,100000", help="synthetic KB sizes for search latency (chunks)")
    ap.add_argument("--max-wait", type=float, default=600,
                    help="seconds to wait for a 1-minute load below 1.0 before each timed part")
    ap.add_argument("--extra-queries", type=int, default=248, help="corpus snippets added to the 152 questions")
    ap.add_argument("--skip-ingest", action="store_true")
    args = ap.parse_args(argv)

    if not DOCS.is_dir():
        print(f"kb_eval: {DOCS} is absent", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    retrieve._segmenter()
    import bm25s
    import jieba
    versions = [f"bm25s {bm25s.__version__}", f"jieba {jieba.__version__}",
                f"segmenter {retrieve.SEGMENTER}"]
    try:
        import rank_bm25  # noqa: F401
        from importlib.metadata import version
        versions.append(f"rank_bm25 {version('rank_bm25')}")
    except ImportError:
        print("kb_eval: the Chatchat path needs rank_bm25 (pip install rank_bm25)", file=sys.stderr)
        return 2
    embedder, dense_note = load_embedder(args.embedding_model)
    if embedder is not None:
        import faiss
        versions.append(f"faiss {faiss.__version__}")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    report: list = []

    def say(s=""):
        report.append(s)
        print(s, flush=True)

    say("## glmkit kb benchmark")
    say()
    say(f"- CPU: {cpu_info()}")
    say(f"- Python {sys.version.split()[0]}; {', '.join(versions)}")
    say(f"- module defaults now: CHUNK_SIZE={split.CHUNK_SIZE} CHUNK_OVERLAP={split.CHUNK_OVERLAP} "
        f"TOP_K={retrieve.TOP_K} SCORE_THRESHOLD={retrieve.SCORE_THRESHOLD}")
    say(f"- {dense_note}")

    questions = load_questions()
    docs = DocTexts(questions)
    say(f"- {len(questions)} questions ({sum(q['lang'] == 'zh' for q in questions)} zh, "
        f"{sum(q['lang'] == 'en' for q in questions)} en) over {len(docs.text)} documents; evidence not in the "
        f"KB's text of its document: {len(docs.missing)} {docs.missing or ''}")

    # --- grid: chunk size x overlap ------------------------------------------------------------------------
    log("grid: chunk size x overlap ...")
    real_read = kbmod.read_file
    kbmod.read_file = cached_read_file                 # the grid re-chunks the same files: read them once
    grid = {}
    gdir = Path(tempfile.mkdtemp(prefix="grid-", dir=CACHE))
    try:
        for cs in GRID_SIZES:
            for co in GRID_OVERLAPS:
                kb = KnowledgeBase.open(gdir / f"s{cs}-o{co}")
                kb.add([str(DOCS)], chunk_size=cs, chunk_overlap=co, progress=False)
                info = chunk_info(kb, docs)
                per = evaluate(questions, glmkit_search(kb), info, docs)
                lens = [len(t) for _, t, _ in info.values()]
                grid[(cs, co)] = {"m": metrics(per), "per": per, "chunks": len(info),
                                  "avg": sum(lens) / max(len(lens), 1)}
                kb.close()
                log(f"  {cs}/{co}: hit@5 {grid[(cs, co)]['m']['hit@5']:.3f} mrr {grid[(cs, co)]['m']['mrr']:.3f}")
    finally:
        kbmod.read_file = real_read
        shutil.rmtree(gdir, ignore_errors=True)

    # choose: the best hit@5, then MRR, then the smaller size, among sizes whose top-k chunks fit the prompt
    def topk_for(cs, m):
        k = next(k for k in range(1, K_MAX + 1) if m[f"hit@{k}"] >= m[f"hit@{K_MAX}"] - TOPK_SLACK)
        return max(1, min(k, CONTEXT_CHARS // cs))

    cands = [key for key in grid if key[0] <= SANE_MAX] or list(grid)
    best = max(cands, key=lambda key: (round(grid[key]["m"]["hit@5"], 4), round(grid[key]["m"]["mrr"], 4),
                                       -key[0], -key[1]))
    cs_best, co_best = best
    m_best = grid[best]["m"]
    k_best = topk_for(cs_best, m_best)

    say()
    say("### Chunking grid (glmkit BM25, docs folder; hit@k / MRR over the top 10)")
    say()
    rows = []
    for (cs, co), g in sorted(grid.items()):
        m = g["m"]
        mark = " **chosen**" if (cs, co) == best else ("" if cs <= SANE_MAX else " (over the size limit)")
        rows.append([f"{cs}/{co}{mark}", g["chunks"], f"{g['avg']:.0f}", m["hit@1"], m["hit@3"], m["hit@5"],
                     m["hit@10"], m["mrr"], m["zh_hit@5"], m["en_hit@5"], topk_for(cs, m)])
    say(table(["size/overlap", "chunks", "avg chars", "hit@1", "hit@3", "hit@5", "hit@10", "MRR", "zh hit@5",
               "en hit@5", "top-k*"], rows))
    say()
    say(f"Chosen: the best hit@5, then MRR, then the smaller size, among sizes <= {SANE_MAX} characters (3 chunks of "
        f"800 Chinese characters alone fill ChatGLM-6B's 2048-token context). *top-k: the smallest k with hit@k >= "
        f"hit@10 - {TOPK_SLACK}, at most {CONTEXT_CHARS} characters / size.")
    say()
    say(f"### Top-k at {cs_best}/{co_best}")
    say()
    say(table(["k"] + [str(k) for k in range(1, K_MAX + 1)],
              [["hit@k"] + [m_best[f"hit@{k}"] for k in range(1, K_MAX + 1)]]))
    say()

    # --- the chosen configuration: threshold, Chatchat, dense ----------------------------------------------
    kdir = Path(tempfile.mkdtemp(prefix="docs-", dir=CACHE))
    results = {}
    try:
        kbmod.read_file = cached_read_file
        kb = KnowledgeBase.open(kdir / "bm25")
        kb.add([str(DOCS)], chunk_size=cs_best, chunk_overlap=co_best, progress=False)
        kbmod.read_file = real_read
        info = chunk_info(kb, docs)
        per = evaluate(questions, glmkit_search(kb), info, docs)
        results["glmkit BM25 (default)"] = (metrics(per), metrics(per, "strict"))
        off = [glmkit_search(kb)(q) for q in OFF_TOPIC]
        thr_rows = []
        chosen_thr = 0.0
        for thr in THRESHOLDS:
            dropped = sum(1 for p in per if p["rank"] and p["score"] < thr) / len(per)
            refused = sum(1 for hits in off if not hits or hits[0][1] < thr) / len(off)
            if dropped <= MAX_DROPPED:
                chosen_thr = thr
            thr_rows.append([thr, dropped, refused])
        thr_rows = [[f"{r[0]:.2f}" + (" **chosen**" if r[0] == chosen_thr else ""), r[1], r[2]] for r in thr_rows]
        scores = sorted(p["score"] for p in per if p["rank"])
        cur_thr = retrieve.SCORE_THRESHOLD
        # what ask() gets with the defaults: top-k chunks above the threshold
        k_ask = retrieve.TOP_K if (cs_best, co_best) == (split.CHUNK_SIZE, split.CHUNK_OVERLAP) else k_best
        ask_hit = sum(1 for p in per if p["rank"] and p["rank"] <= k_ask and p["score"] >= cur_thr) / len(per)

        ids, texts, toks, _ = chatchat_tokens(kb, "docs")
        cc = ChatchatBM25(ids, texts, toks)
        per_cc = evaluate(questions, cc.search, info, docs)
        results["Chatchat BM25: jieba + rank_bm25"] = (metrics(per_cc), metrics(per_cc, "strict"))

        if embedder is not None:
            log("dense: embedding the chunks ...")
            kbd = KnowledgeBase.open(kdir / "dense", embedder=embedder)
            kbmod.read_file = cached_read_file
            kbd.add([str(DOCS)], chunk_size=cs_best, chunk_overlap=co_best, progress=False)
            kbmod.read_file = real_read
            infod = chunk_info(kbd, docs)
            idx = kbd.retriever.index()

            def dense(q, idx=idx):            # as the KB scores it: a chunk at or below its baseline is never shown
                s = idx.dense_scores(embedder.encode([q])[0])
                return [(int(idx.ids[i]), float(s[i])) for i in retrieve._top(s, K_MAX) if s[i] > 0]

            per_d = evaluate(questions, dense, infod, docs)
            results["glmkit dense (scores > 0: above the KB's unrelated-pair baseline)"] = (
                metrics(per_d), metrics(per_d, "strict"))
            per_h = evaluate(questions, glmkit_search(kbd), infod, docs)
            results["glmkit hybrid (BM25 + dense, RRF)"] = (metrics(per_h), metrics(per_h, "strict"))
            fx = faiss_flat(np.asarray(idx.vectors))

            def fdense(q, idx=idx, fx=fx):
                d, i = fx.search(embedder.encode([q])[:1].astype(np.float32), K_MAX)
                return [(int(idx.ids[j]), float(s)) for j, s in zip(i[0], d[0]) if j >= 0]

            per_f = evaluate(questions, fdense, infod, docs)
            results["Chatchat dense: faiss IndexFlatIP"] = (metrics(per_f), metrics(per_f, "strict"))
            ids_d, texts_d, toks_d, _ = chatchat_tokens(kbd, "docs")
            ccd = ChatchatBM25(ids_d, texts_d, toks_d)
            per_e = evaluate(questions, lambda q: ensemble([ccd.search(q), fdense(q)]), infod, docs)
            results["Chatchat hybrid: EnsembleRetriever(BM25, faiss)"] = (metrics(per_e), metrics(per_e, "strict"))
            kbd.close()
        kb.close()
    finally:
        kbmod.read_file = real_read
        shutil.rmtree(kdir, ignore_errors=True)

    say(f"### Score threshold at {cs_best}/{co_best} (glmkit BM25 scores, 0..1)")
    say()
    say(table(["threshold", "answerable: correct chunk dropped", f"off-topic ({len(OFF_TOPIC)}): refused"],
              thr_rows))
    say()
    say(f"Correct chunks' scores: min {scores[0]:.3f}, 5th percentile {np.percentile(scores, 5):.3f}, median "
        f"{np.median(scores):.3f}. Chosen: the highest threshold dropping <= {MAX_DROPPED:.0%} of correct chunks. "
        f"With the module's TOP_K={retrieve.TOP_K}, SCORE_THRESHOLD={cur_thr}: the correct chunk is among what "
        f"ask() gives the model for {ask_hit:.3f} of the questions.")
    say()

    # --- ingest --------------------------------------------------------------------------------------------
    ingest_rows, ingest_mb_s = [], None
    if not args.skip_ingest:
        corpus_dir, corpus_files, corpus_mb = text_corpus()
        docs_text = text_mb([DOCS])
        corpus_text = text_mb([corpus_dir])
        note = wait_for_quiet(args.max_wait, "ingest")
        idir = Path(tempfile.mkdtemp(prefix="ingest-", dir=CACHE))
        try:
            kb = KnowledgeBase.open(idir / "kb")
            tot_mb = tot_s = 0.0
            for label, path, tmb in (("docs folder (15 documents, 3 PDFs)", DOCS, docs_text),
                                     (f"text corpus ({len(corpus_files)} .txt files)", corpus_dir, corpus_text)):
                gc.collect()
                r = kb.add([str(path)], chunk_size=cs_best, chunk_overlap=co_best, progress=False)
                ingest_rows.append([label, r.added, r.bytes / 1e6, tmb, r.chunks, r.seconds, tmb / r.seconds,
                                    r.bytes / 1e6 / r.seconds])
                tot_mb += tmb
                tot_s += r.seconds
            ingest_rows.append(["**both**", "", "", tot_mb, "", tot_s, tot_mb / tot_s, ""])
            ingest_mb_s = tot_mb / tot_s
            kb.close()
        finally:
            shutil.rmtree(idir, ignore_errors=True)
        say(f"### Ingest, BM25-only, into a fresh KB ({note}; segmenter {retrieve.SEGMENTER})")
        say()
        say(table(["what", "files", "file MB", "text MB", "chunks", "seconds", "text MB/s", "file MB/s"],
                  [[r[0], r[1], *(fmt(x, 2) if isinstance(x, float) else x for x in r[2:])] for r in ingest_rows]))
        say()

    # --- search latency at 10k / 100k ----------------------------------------------------------------------
    lat = {}
    for n in sizes:
        log(f"synthetic KB of {n} chunks ...")
        kb, note = synthetic_kb(n, cs_best, co_best)
        real_n = kb.store.index_data().ids
        real_n = len(real_n)
        info = chunk_info(kb, docs)
        queries = latency_queries(kb, questions, args.extra_queries)
        per = evaluate(questions, glmkit_search(kb), info, docs)
        ids, texts, toks, tok_s = chatchat_tokens(kb, f"{n // 1000}k")
        cc = ChatchatBM25(ids, texts, toks)
        load = wait_for_quiet(args.max_wait, f"latency {n}")
        gc.collect()
        ours = timed(lambda q: kb.search(q), queries, repeats=2)
        cc_ms: list = []

        def cc_timed(q, cc=cc, cc_ms=cc_ms):        # Chatchat: timed while it answers the questions (~1 s each)
            t = time.perf_counter()
            r = cc.search(q)
            cc_ms.append((time.perf_counter() - t) * 1000)
            return r

        cc.search(questions[0]["question"])
        per_cc = evaluate(questions, cc_timed, info, docs)
        theirs = np.asarray(cc_ms)
        dense_row = None
        if embedder is not None:
            dim = len(embedder.encode(["x"])[0])
            rng = np.random.default_rng(0)
            vec = rng.standard_normal((real_n, dim), dtype=np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            idx = retrieve.Index(0, np.arange(real_n), None, vec, 0.0)
            fx = faiss_flat(vec)
            qv = [embedder.encode([q])[0] for q in queries[:100]]
            dense_ours = timed(lambda v: retrieve._top(idx.dense_scores(v), retrieve.TOP_K), qv)
            dense_faiss = timed(lambda v: fx.search(v[None].astype(np.float32), retrieve.TOP_K), qv)
            dense_row = (dim, dense_ours, dense_faiss)
        lat[n] = {"n": real_n, "note": note, "load": load, "ours": ours, "cc": theirs, "m": metrics(per),
                  "m_cc": metrics(per_cc), "cc_build": cc.build_s, "cc_tok": tok_s, "dense": dense_row,
                  "queries": len(queries)}
        kb.close()
        del cc
        gc.collect()

    if lat:
        say("### Search latency (ms per query, one process, defaults: top-k "
            f"{retrieve.TOP_K}, threshold {retrieve.SCORE_THRESHOLD})")
        say()
        rows = []
        for n, L in lat.items():
            o, c = L["ours"], L["cc"]
            rows.append([f"{L['n']}", "glmkit KnowledgeBase.search", len(o), np.percentile(o, 50),
                         np.percentile(o, 99), L["m"]["hit@5"], L["m"]["mrr"], L["load"]])
            rows.append([f"{L['n']}", "Chatchat jieba + rank_bm25 get_top_n", len(c), np.percentile(c, 50),
                         np.percentile(c, 99), L["m_cc"]["hit@5"], L["m_cc"]["mrr"],
                         f"index build {L['cc_build']:.1f} s" + (f", jieba {L['cc_tok']:.0f} s" if L['cc_tok'] else
                                                                 " (tokens cached)")])
            if L["dense"]:
                dim, do, df = L["dense"]
                rows.append([f"{L['n']}", f"glmkit dense scan (random {dim}-d vectors)", len(do),
                             np.percentile(do, 50), np.percentile(do, 99), None, None, ""])
                rows.append([f"{L['n']}", f"faiss IndexFlatIP (random {dim}-d vectors)", len(df),
                             np.percentile(df, 50), np.percentile(df, 99), None, None, ""])
        say(table(["chunks", "path", "queries", "p50 ms", "p99 ms", "hit@5 (questions, distractors)", "MRR",
                   "note"], [[r[0], r[1], r[2], fmt(r[3], 2), fmt(r[4], 2), *r[5:]] for r in rows]))
        say()
        for n, L in lat.items():
            say(f"- {n // 1000}k KB: {L['note']}; glmkit timed twice over {L['queries']} queries (the "
                f"{len(questions)} questions + corpus snippets), Chatchat (top 10) over the {len(questions)} questions")
        say()

    # --- summary -------------------------------------------------------------------------------------------
    say("### Retrieval quality on the question set (top 10; hit rule of benchmarks/data/README.md)")
    say()
    rows = []
    for name, (m, ms) in results.items():
        rows.append([name, m["hit@1"], m["hit@3"], m["hit@5"], m["hit@10"], m["mrr"], m["zh_hit@5"], m["en_hit@5"],
                     ms["hit@5"]])
    if embedder is None:
        rows.append(["glmkit dense / hybrid, Chatchat faiss", "skipped: no --embedding-model", "", "", "", "", "",
                     "", ""])
    say(table(["path", "hit@1", "hit@3", "hit@5", "hit@10", "MRR", "zh hit@5", "en hit@5",
               "hit@5 (whole evidence in one chunk)"], rows))
    say()
    ours_m = results["glmkit BM25 (default)"][0]
    cc_m = results["Chatchat BM25: jieba + rank_bm25"][0]
    big = lat.get(100000) or (lat[max(lat)] if lat else None)
    p99 = float(np.percentile(big["ours"], 99)) if big else float("nan")
    p99_cc = float(np.percentile(big["cc"], 99)) if big else float("nan")
    defaults_ok = (cs_best, co_best, k_best, chosen_thr) == (split.CHUNK_SIZE, split.CHUNK_OVERLAP, retrieve.TOP_K,
                                                            retrieve.SCORE_THRESHOLD)
    say(f"Chosen defaults: CHUNK_SIZE={cs_best} CHUNK_OVERLAP={co_best} TOP_K={k_best} SCORE_THRESHOLD={chosen_thr}"
        f" — {'the module constants' if defaults_ok else 'NOT the module constants: update split.py / retrieve.py'}")
    big_n = big["n"] if big else 0
    checks = [("hit@5 >= %.2f" % TARGET_HIT5, ours_m["hit@5"] >= TARGET_HIT5),
              (f"search p99 <= {TARGET_P99_MS:.0f} ms at {big_n} chunks", big is not None and p99 <= TARGET_P99_MS),
              (f"ingest >= {TARGET_INGEST:.0f} MB/s", ingest_mb_s is not None and ingest_mb_s >= TARGET_INGEST)]
    say("Targets: " + "; ".join(f"{what}: {'met' if ok else 'NOT met'}" for what, ok in checks))
    say()
    if big is not None and big_n < 100000:
        log(f"note: search_p99_ms_100k is measured at {big_n} chunks")
    print(f"vs_chatchat kb_hit5={ours_m['hit@5'] / max(cc_m['hit@5'], 1e-9):.3f} "
          f"kb_mrr={ours_m['mrr'] / max(cc_m['mrr'], 1e-9):.3f} "
          f"search_p99_ms_100k={p99 / p99_cc:.4f}  (glmkit / Chatchat path; p99 {p99:.2f} vs {p99_cc:.1f} ms)")
    print(f"kb_hit5={ours_m['hit@5']:.3f} kb_mrr={ours_m['mrr']:.3f} "
          f"ingest_mb_s={(ingest_mb_s if ingest_mb_s is not None else float('nan')):.2f} "
          f"search_p99_ms_100k={p99:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
