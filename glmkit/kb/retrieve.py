"""Retrieval: BM25 (bm25s) over jieba-segmented Chinese and normalised English, optional dense vectors fused by
reciprocal rank, all scores on one scale.

Tokens (tokenize): NFKC + lower case; line breaks inside Chinese text joined (hard-wrapped files split words);
CJK runs segmented by jieba (cut_for_search, no HMM: compound words also give their parts, e.g. 软件包 -> 软件,
软件包; done by rjieba, jieba's algorithm and dictionary in Rust with the same output, when it is installed),
Latin words kept whole and, when compound (path.join, utf-8), also as their parts, a plural "s" dropped; short
stop-word lists (the, of, 的, 如何, 什么...) left out. Each distinct run is worked out once per process (cached).
The tokens of every chunk are computed once, at ingest, and stored: the index is rebuilt from them without
re-segmenting anything.

The score, in every mode, is a number in [0, 1], higher is better; a chunk with nothing in common with the
question (score 0) is never returned, and score_threshold drops hits below it:

  BM25   score = BM25(q, chunk) / max(q), max(q) = sum over the distinct query tokens t of idf(t): the upper
         bound of BM25 (Lucene variant, k1 = 1.5, b = 0.75) for this query, which a chunk would approach by
         holding every query token infinitely often (a token the KB has never seen counts with the highest
         idf, so a question about something absent scores low). A chunk of average length that holds each
         query token once scores 1 / (1 + k1) = 0.4, twice 0.57; 0.1 is about one common word of the question.
  dense  score = clip((cos(q, chunk) - c0) / (1 - c0), 0, 1), c0 the mean cosine of random pairs of this KB's
         chunks (how similar unrelated text looks to the model): 0 = no closer than unrelated text, 1 = identical.
  hybrid (an embedding model configured): hits ordered by reciprocal rank fusion of the two rankings
         (sum of 1 / (60 + rank)), each hit's score the larger of its BM25 and dense scores above. The order is
         the fused one, so in this mode scores need not decrease down the list.

Index (one store generation) is cached on disk in KB/index/gen-N/ (bm25s's arrays, memory-mapped when loaded,
plus the chunk ids and vectors); any process that finds no cache for the current generation builds it from the
store and saves it (atomically, by renaming a finished folder), so searches from other processes never read a
half-written index. A long-lived Retriever checks the store generation before every search (one SQLite read)
and rebuilds when it changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Optional

TOP_K = 5                       # chunks given to the model (benchmarks/kb_eval.py: hit@5 0.93 vs hit@3 0.88)
SCORE_THRESHOLD = 0.08          # hits below it are dropped; when none is left, ask() refuses to answer
                                # (kb_eval.py: drops the right chunk of 1 question in 152, refuses half of
                                # off-topic ones; 0.2 dropped 29% of the right chunks)
K1, B = 1.5, 0.75               # bm25s defaults (Lucene variant)
RRF_K = 60                      # reciprocal rank fusion constant (Cormack et al. 2009)
TOKENIZER_VERSION = "1"         # part of each file's signature: a new tokenizer re-tokenizes files on next add

_CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"
_WORD = f"[^\\W_{_CJK_CHARS}]+"                # letters/digits of any script but CJK
_RUNS = re.compile(f"[{_CJK_CHARS}]+|{_WORD}(?:[._\\-+#]{_WORD})*[+#]*", re.U)
_IS_CJK = re.compile(f"[{_CJK_CHARS}]")
_WRAPPED = re.compile(f"(?<=[{_CJK_CHARS}，。、；：！？）])\\n(?=[{_CJK_CHARS}（])")
_PARTS = re.compile(r"[._\-]")

STOP_EN = frozenset("""a an and are as at be been but by can could did do does for from had has have how i if in
into is it its me my no not of on or our shall should so than that the their them then there these they this to
was we were what when where which who whom why will with would you your""".split())
STOP_ZH = frozenset("""的 了 是 在 和 与 及 或 也 都 就 而 被 把 让 对 从 到 为 以 之 其 这 那 这个 那个 这些
那些 什么 怎么 怎样 如何 为什么 吗 呢 吧 啊 哪 哪些 哪个 我 你 他 她 它 我们 你们 他们 请问 请 可以 能 会
要 有 没有 一个 一些 使用 用""".split())

_segment = None                 # CJK run -> its words (cut_for_search, no HMM), set by _segmenter()
SEGMENTER = None                # "rjieba" or "jieba": which implementation _segment uses


def need(module: str):
    """Import an optional dependency of glmkit kb, or say how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(f"glmkit kb needs the {module} package: pip install 'glmkit[kb]' "
                           "(bm25s, jieba, pypdf, python-docx)") from None


def _segmenter():
    """-> segment(run): jieba's cut_for_search(run, HMM=False) of a CJK run, as a list. rjieba (jieba-rs: jieba's
    dictionary and algorithm in Rust, word for word the same output, about 7x faster) when it is installed, else
    jieba itself; GLMKIT_KB_SEGMENTER=jieba forces jieba."""
    global _segment, SEGMENTER
    if _segment is None:
        if os.environ.get("GLMKIT_KB_SEGMENTER", "").lower() != "jieba":
            try:
                import rjieba
            except ImportError:
                rjieba = None
            if rjieba is not None:
                cut = rjieba.cut_for_search
                _segment, SEGMENTER = (lambda run: cut(run, False)), "rjieba"
                return _segment
        import logging

        jieba = need("jieba")
        jieba.setLogLevel(logging.WARNING)         # "Building prefix dict..." on every first use
        jieba.initialize()
        dt = jieba.dt
        _segment, SEGMENTER = (lambda run: list(dt.cut_for_search(run, HMM=False))), "jieba"
    return _segment


def _stem(w: str) -> str:
    """A plural's singular, conservatively (files -> file, libraries -> library; class, status, this kept)."""
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")) and w[-2].isalpha():
        return w[:-1]
    return w


# A run (a CJK run between punctuation, or a Latin word) -> its tokens. Runs repeat a lot in real text (and every
# overlap repeats whole sentences), so each is worked out once: CJK runs in one cache (bounded: mostly distinct),
# words of other scripts in another (a vocabulary: small, and hot).
_CJK_CACHE: dict = {}
_CJK_CACHE_MAX = 200_000
_WORD_CACHE: dict = {}
_WORD_CACHE_MAX = 500_000


def _word_tokens(s: str) -> list:
    """A word of letters/digits (maybe compound: path.join, utf-8) -> its tokens: itself and its parts, stop
    words and single letters left out, plurals stemmed."""
    parts = _PARTS.split(s) if _PARTS.search(s) else ()
    return [_stem(w) for w in (s, *parts) if w and w not in STOP_EN and (len(w) > 1 or w.isdigit())]


# The full-width punctuation of Chinese text that NFKC rewrites (chunks come from split.normalize with everything
# else already in NFKC): replaced first, the text usually passes NFKC's quick check and is not normalised again.
# Replacing a character by its compatibility decomposition does not change what NFKC makes of the text.
_FULLWIDTH = (("，", ","), ("：", ":"), ("；", ";"), ("！", "!"), ("？", "?"), ("（", "("), ("）", ")"), ("…", "..."))


def _nfkc(text: str) -> str:
    if text.isascii() or unicodedata.is_normalized("NFKC", text):      # NFKC leaves ASCII as it is
        return text
    for a, b in _FULLWIDTH:
        text = text.replace(a, b)
    return text if unicodedata.is_normalized("NFKC", text) else unicodedata.normalize("NFKC", text)


def _learn(s: str) -> tuple:
    """The tokens of a run not seen before, cached (tuples: the garbage collector stops tracking them)."""
    if _IS_CJK.match(s):
        cut = (_segment or _segmenter())(s) if len(s) > 1 else (s,)
        toks = tuple(cut) if STOP_ZH.isdisjoint(cut) else tuple(w for w in cut if w not in STOP_ZH)
        if len(_CJK_CACHE) >= _CJK_CACHE_MAX:
            _CJK_CACHE.clear()
        _CJK_CACHE[s] = toks
    else:
        toks = tuple(_word_tokens(s))
        if len(_WORD_CACHE) >= _WORD_CACHE_MAX:
            _WORD_CACHE.clear()
        _WORD_CACHE[s] = toks
    return toks


def tokenize(text: str) -> list:
    """Text -> BM25 tokens (see the module docstring). The same function for chunks and queries."""
    text = _nfkc(text).lower()
    if "\n" in text:
        text = _WRAPPED.sub("", text)
    words, cjk = _WORD_CACHE, _CJK_CACHE
    out: list = []
    for s in _RUNS.findall(text):
        toks = words.get(s)
        if toks is None:
            toks = cjk.get(s)
            if toks is None:
                toks = _learn(s)
        out += toks
    return out


# ------------------------------------------------------------------------------------------------------------
# Embeddings (optional)
# ------------------------------------------------------------------------------------------------------------

class Embedder:
    """A local sentence-transformers folder, loaded offline; encode(texts) -> float32 [n, D], L2-normalised."""

    def __init__(self, folder):
        folder = Path(folder).expanduser()
        if not folder.is_dir() or not ((folder / "modules.json").is_file() or (folder / "config.json").is_file()):
            raise ValueError(f"--embedding-model {folder}: not a sentence-transformers model folder "
                             "(no modules.json or config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may reach a model hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.name = str(folder)
        self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    def encode(self, texts):
        import numpy as np

        v = self.model.encode(list(texts), batch_size=32, normalize_embeddings=True, show_progress_bar=False,
                              convert_to_numpy=True)
        return np.asarray(v, dtype=np.float32)


def load_embedder(folder) -> tuple:
    """-> (Embedder or None, a note saying what the retrieval mode is and why)."""
    if not folder:
        return None, "BM25 only (no --embedding-model given)"
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return None, (f"BM25 only: the embedding model {folder} needs sentence-transformers, which is not "
                      "installed (pip install sentence-transformers)")
    return Embedder(folder), f"hybrid: BM25 + dense vectors of {folder}, fused by reciprocal rank"


# ------------------------------------------------------------------------------------------------------------
# Index: one generation of the store
# ------------------------------------------------------------------------------------------------------------

class Index:
    """BM25 over the chunks of one store generation, plus their vectors when the KB has them.
    ids[i] is the chunk id of document i."""

    def __init__(self, generation: int, ids, bm25=None, vectors=None, baseline: float = 0.0,
                 with_vectors: bool = False):
        import numpy as np

        self.generation, self.ids, self.bm25 = generation, ids, bm25
        self.vectors, self.baseline = vectors, baseline
        self.with_vectors = with_vectors or vectors is not None     # built with the store's vectors read
        self.n = len(ids)
        self.df = np.diff(bm25.scores["indptr"]) if bm25 is not None else None    # documents per token id

    @classmethod
    def build(cls, data) -> "Index":
        """From a store's IndexData (generation, ids, tokens, vectors)."""
        import numpy as np

        bm25s = need("bm25s")
        ids = np.asarray(data.ids, dtype=np.int64)
        bm25, corpus = None, [t.split() for t in data.tokens]
        if any(corpus):                                   # bm25s cannot index documents without a token
            bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
            bm25.index(corpus, show_progress=False)
        vectors, baseline = None, 0.0
        if data.vectors and any(v is not None for v in data.vectors):
            dim = next(len(v) for v in data.vectors if v is not None) // 4
            vectors = np.zeros((len(ids), dim), dtype=np.float32)
            for i, v in enumerate(data.vectors):
                if v is not None and len(v) == dim * 4:
                    vectors[i] = np.frombuffer(v, dtype=np.float32)
            baseline = _baseline(vectors)
        return cls(data.generation, ids, bm25, vectors, baseline, data.vectors is not None)

    # --- disk cache --------------------------------------------------------------------------------------
    def save(self, cache_dir: Path, replace: bool = False) -> None:
        """Into cache_dir/gen-N (written aside, then renamed: readers see a whole folder or none; replace: over a
        cache of the same generation built without vectors); older generations are removed. Errors (read-only
        KB, a concurrent writer) are ignored: the cache is optional."""
        import numpy as np

        final = cache_dir / f"gen-{self.generation}"
        tmp = cache_dir / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            if self.bm25 is not None:
                self.bm25.save(str(tmp / "bm25"), show_progress=False)
            np.save(tmp / "ids.npy", self.ids)
            if self.vectors is not None:
                np.save(tmp / "vectors.npy", self.vectors)
            meta = {"generation": self.generation, "tokenizer": TOKENIZER_VERSION, "baseline": self.baseline,
                    "with_vectors": self.with_vectors}
            (tmp / "meta.json").write_text(json.dumps(meta))
            if replace and final.exists():
                trash = tmp.with_name(tmp.name + "-old")
                os.rename(final, trash)            # a reader loading it now falls back to building its own
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        for old in cache_dir.glob("gen-*"):
            if old.name != final.name and old.name[4:].isdigit() and int(old.name[4:]) < self.generation:
                shutil.rmtree(old, ignore_errors=True)
        for junk in cache_dir.glob(".tmp-*"):               # left by a process killed while saving
            try:
                if time.time() - junk.stat().st_mtime > 600:
                    shutil.rmtree(junk, ignore_errors=True)
            except OSError:
                pass

    @classmethod
    def load(cls, cache_dir: Path, generation: int) -> Optional["Index"]:
        """The cached index of this generation, or None (absent, stale tokenizer, removed while loading)."""
        import numpy as np

        bm25s = need("bm25s")
        folder = cache_dir / f"gen-{generation}"
        try:
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("tokenizer") != TOKENIZER_VERSION or meta.get("generation") != generation:
                return None
            ids = np.load(folder / "ids.npy")
            bm25 = (bm25s.BM25.load(str(folder / "bm25"), mmap=True, show_progress=False)
                    if (folder / "bm25").is_dir() else None)
            vectors = np.load(folder / "vectors.npy", mmap_mode="r") if (folder / "vectors.npy").exists() else None
        except (OSError, ValueError, KeyError):
            return None
        return cls(generation, ids, bm25, vectors, float(meta.get("baseline", 0.0)), bool(meta.get("with_vectors")))

    # --- scoring -----------------------------------------------------------------------------------------
    def bm25_scores(self, tokens: list) -> tuple:
        """-> (raw BM25 [n], normalised scores [n] in 0..1; see the module docstring)."""
        import numpy as np

        if self.bm25 is None:
            zeros = np.zeros(self.n, dtype=np.float32)
            return zeros, zeros
        uniq = list(dict.fromkeys(tokens))
        vocab = self.bm25.vocab_dict
        known = [vocab[t] for t in uniq if t in vocab]
        raw = self.bm25.get_scores_from_ids(known) if known else np.zeros(self.n, dtype=np.float32)
        df = np.array([self.df[vocab[t]] if t in vocab else 0 for t in uniq], dtype=np.float64)
        upper = float(np.log1p((self.n - df + 0.5) / (df + 0.5)).sum())       # each term scores < its idf
        return raw, (raw / upper if upper > 0 else np.zeros(self.n, dtype=np.float32))

    def dense_scores(self, qvec):
        import numpy as np

        cos = self.vectors @ np.asarray(qvec, dtype=np.float32)
        return np.clip((cos - self.baseline) / (1 - self.baseline), 0.0, 1.0)


def _baseline(vectors, pairs: int = 2000) -> float:
    """Mean cosine of random pairs of distinct chunks: what 'unrelated' looks like to this embedding model."""
    import numpy as np

    n = len(vectors)
    if n < 2:
        return 0.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = a != b
    cos = np.einsum("ij,ij->i", vectors[a[keep]], vectors[b[keep]])
    return float(min(max(cos.mean(), 0.0), 0.95)) if len(cos) else 0.0


def _top(values, k: int):
    """Indices of the k largest values, largest first."""
    import numpy as np

    k = min(k, len(values))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.argsort(-values[part], kind="stable")]


class Retriever:
    """Searches one store: keeps the Index of the store's current generation (from the disk cache, or built)."""

    def __init__(self, store, cache_dir: Optional[Path] = None, embedder=None):
        self.store, self.cache_dir, self.embedder = store, cache_dir, embedder
        self._index: Optional[Index] = None

    def index(self) -> Index:
        gen = self.store.generation()
        if self._index is not None and self._index.generation == gen:
            return self._index
        dense = self.embedder is not None
        idx = Index.load(self.cache_dir, gen) if self.cache_dir else None
        stale = idx is not None and dense and not idx.with_vectors     # cached by a BM25-only process
        if idx is None or stale:
            idx = Index.build(self.store.index_data(with_vectors=dense))
            if self.cache_dir:
                idx.save(self.cache_dir, replace=stale)
        self._index = idx
        return idx

    def search(self, query: str, top_k: int = TOP_K, score_threshold: float = SCORE_THRESHOLD) -> list:
        """-> [(chunk id, score)] best first: at most top_k, each with score >= score_threshold and > 0."""
        import numpy as np

        idx = self.index()
        if idx.n == 0 or top_k <= 0:
            return []
        raw, s_bm25 = idx.bm25_scores(tokenize(query))
        if self.embedder is not None and idx.vectors is not None:
            s_dense = idx.dense_scores(self.embedder.encode([query])[0])
            pool = max(50, 5 * top_k)
            fused: dict = {}
            for ranking, ok in ((_top(raw, pool), s_bm25), (_top(s_dense, pool), s_dense)):
                for rank, i in enumerate(ranking):
                    if ok[i] > 0:
                        fused[int(i)] = fused.get(int(i), 0.0) + 1.0 / (RRF_K + rank + 1)
            order = sorted(fused, key=lambda i: -fused[i])
            score = np.maximum(s_bm25, s_dense)
        else:
            order, score = _top(raw, top_k), s_bm25              # score rises with raw: same order
        hits = [(int(idx.ids[i]), float(score[i])) for i in order
                if score[i] > 0 and score[i] >= (score_threshold or 0.0)]
        return hits[:top_k]
