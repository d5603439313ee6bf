"""Train a ChatGLM-6B-style SentencePiece tokenizer (ice_text.model + tokenizer_config.json) on your own corpus.

train_tokenizer(inputs, out_dir, vocab_size) reads the documents (glmkit.documents.iter_documents: text,
JSONL and chinese-poetry JSON; bad data is reported to on_error and skipped), pre-processes them exactly as
ChatGLM6BTokenizer does before SentencePiece sees them ("\\n" -> <n>, "\\t" -> <|tab|>, runs of 2..80 spaces
-> <|blank_N|>), cuts long documents into bounded sentences and trains a unigram model with SentencePiece.

The model follows the official ice_text.model's conventions, so `glmkit.tokenizer.load_tokenizer(out_dir,
"chatglm")` (and a model folder holding it: `glmkit.load`) reads it as the ChatGLM-6B tokenizer:

  <unk>=0 <s>=1 </s>=2 <pad>=3, <n>=4 (user-defined), the control symbols [MASK] [gMASK] [sMASK] <unused_0>
  <sop> <eop> <ENC> <dBLOCK>, the user-defined <|tab|> <|blank_2|> .. <|blank_80|>, the 256 byte pieces
  <0x00>..<0xFF> (byte fallback: no character is ever <unk>), then the learned pieces; digits are split one
  by one. vocab_size is the TOTAL number of pieces (tokenizer.vocab_size == vocab_size).

Unlike the official ice_text.model (nmt_nfkc normaliser) the text is NOT normalised (SentencePiece's
"identity" rule), so the tokenizer is lossless: decode(encode_plain(x)) == x for any text (full-width
punctuation such as "，" stays full-width, NFKC would turn it into ","), except text that already contains
the markers <n>, <|tab|>, <|blank_N|> (decoded as the whitespace they stand for, as with the official
tokenizer) or SentencePiece's "▁" (U+2581, decoded as a space). Control symbols are never matched in text:
"[MASK]" written in encode_plain's input stays text; encode() recognises it as ChatGLM6BTokenizer does.

Training is deterministic: the same inputs, vocab_size and seed give a byte-identical ice_text.model.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

from ..tokenizer import ChatGLM6BTokenizer
from ..documents import expand_paths, iter_documents

MAX_SENTENCE_CHARS = 2000            # longer documents are cut into sentences of at most this many characters
CONTROL_SYMBOLS = list(ChatGLM6BTokenizer.SPECIALS)
USER_SYMBOLS = ["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, ChatGLM6BTokenizer.MAX_BLANK + 1)]
META = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
TOKENIZER_CONFIG = {
    "name_or_path": "glmkit-train-tokenizer",
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "gmask_token": "[gMASK]",
    "mask_token": "[MASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "num_image_tokens": 0,
}

# ChatGLM6BTokenizer._pre only reads the class constant MAX_BLANK: an instance without a SentencePiece model
# (no __init__) runs it as is, so the training text is pre-processed by the very code that encodes.
preprocess: Callable[[str], str] = ChatGLM6BTokenizer.__new__(ChatGLM6BTokenizer)._pre

_UNCLOSED_MARKER = re.compile(r"<(?:\|[^>]*)?$")     # "<" or "<|blank_1" at the end


def _cut_line(line: str, max_chars: int) -> Iterator[str]:
    """One line longer than max_chars -> pieces: at the last single space (dropped, as SentencePiece's dummy
    prefix stands for it) or, without one, at max_chars but never inside a <|tab|>/<|blank_N|> marker."""
    while len(line) > max_chars:
        window = line[:max_chars]
        cut = window.rfind(" ")
        if cut > max_chars // 4:
            yield window[:cut]
            line = line[cut + 1:]
            continue
        m = _UNCLOSED_MARKER.search(window)
        cut = m.start() if m and m.start() > 0 else max_chars
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> Iterator[str]:
    """A pre-processed document -> training sentences of at most max_chars characters.

    Short documents stay whole (the <n> markers inside, as encode sees them). Long ones are cut before an
    <n>, so each piece after the first starts with <n> and the line after it is, as in encode(), not preceded
    by SentencePiece's word-start mark "▁"; a single line that is still too long is cut at spaces.
    """
    if len(text) <= max_chars:
        if text.strip():
            yield text
        return
    cur = ""
    for k, line in enumerate(text.split("<n>")):
        part = line if k == 0 else "<n>" + line
        if len(cur) + len(part) <= max_chars:
            cur += part
            continue
        if cur.strip():
            yield cur
        cur = ""
        if len(part) <= max_chars:
            cur = part
        else:
            yield from (p for p in _cut_line(part, max_chars) if p.strip())
    if cur.strip():
        yield cur


def _default_on_error(msg: str):
    print(f"warning: {msg}", file=sys.stderr)


def _reorder_model(model: bytes) -> bytes:
    """Move <n> right after <pad> (id 4, as in the official ice_text.model); SentencePiece puts the control
    symbols before the user-defined ones."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(model)
    pieces = list(m.pieces)
    names = [p.piece for p in pieces]
    i = names.index("<n>")
    pieces.insert(4, pieces.pop(i))
    copies = [pb.ModelProto.SentencePiece() for _ in pieces]
    for c, p in zip(copies, pieces):
        c.CopyFrom(p)
    del m.pieces[:]
    m.pieces.extend(copies)
    return m.SerializeToString()


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _sample_sentences(files, on_error, max_sentences: int, seed: int, bar: bool):
    """Read, pre-process and cut every document -> (at most max_sentences sentences, counts).

    Uniform reservoir sampling (algorithm R) with random.Random(seed): the same files and seed give the same
    sample, in the same order."""
    rng = random.Random(seed)
    sample: list[Optional[str]] = []
    stats = {"docs": 0, "sentences": 0}
    pbar = None
    if bar:
        from tqdm import tqdm
        pbar = tqdm(unit=" docs", desc="reading", file=sys.stderr, mininterval=0.5)
    try:
        for doc in iter_documents(files, on_error):
            stats["docs"] += 1
            if pbar is not None:
                pbar.update(1)
            for s in sentences(preprocess(doc.text)):
                n = stats["sentences"]
                stats["sentences"] = n + 1
                if n < max_sentences:
                    sample.append(s)
                else:
                    j = rng.randrange(n + 1)
                    if j < max_sentences:
                        sample[j] = s
    finally:
        if pbar is not None:
            pbar.close()
    return sample, stats


def fit_coverage(sample: list, coverage: float, vocab_size: int, n_meta: int, share: float = 0.75
                 ) -> tuple[float, int]:
    """-> (character coverage to train with, characters it needs).

    SentencePiece fails when the characters needed to reach `coverage` do not fit in the vocabulary. Then the
    coverage is lowered to what the `share` most frequent part of the learnable pieces covers (the other
    characters fall back to bytes), which leaves room for pieces longer than one character."""
    counts = Counter()
    for s in sample:
        counts.update(s)
    total = sum(counts.values())
    freqs = sorted(counts.values(), reverse=True)
    cum, needed = 0, len(freqs)
    for k, f in enumerate(freqs, 1):
        cum += f
        if cum >= coverage * total:
            needed = k
            break
    learnable = vocab_size - n_meta
    if needed <= learnable:
        return coverage, needed
    keep = max(1, int(share * learnable))
    covered = sum(freqs[:keep]) / total
    return math.floor(covered * 1e6) / 1e6, keep


def train_tokenizer(inputs: Iterable[Union[str, Path]], out_dir, vocab_size: int, *, seed: int = 0,
                    max_sentences: int = 2_000_000, character_coverage: float = 0.9995, progress: bool = True,
                    on_error: Optional[Callable[[str], None]] = None) -> Path:
    """Train a ChatGLM-6B-style tokenizer on the documents of `inputs` (files or folders) -> out_dir.

    Writes out_dir/ice_text.model (SentencePiece unigram, `vocab_size` pieces in total, identity
    normalisation: lossless, decode(encode_plain(x)) == x; the official model uses nmt_nfkc, identity keeps
    full-width punctuation; byte fallback; digits split) and out_dir/tokenizer_config.json (bos <sop>,
    eos <eop>, [gMASK]/[MASK]/<pad>/<unk>, num_image_tokens 0, no remote code). Both are written to temporary
    names and renamed. Load the result with glmkit.tokenizer.load_tokenizer(out_dir, "chatglm").

    seed: the sampling of sentences (Python's random.Random, as SentencePiece's own sampler ignores
    set_random_generator_seed; SentencePiece is seeded too); same inputs + seed -> identical model.
    max_sentences: at most this many sentences (uniformly sampled when there are more) are trained on.
    character_coverage: share of the characters (by count) the vocabulary must hold as pieces; the rarest
    characters outside it are written as UTF-8 byte pieces. When the characters this needs do not fit in
    vocab_size (a CJK corpus and a small vocabulary), it is lowered so that they take 3/4 of the learnable
    pieces, with a warning on stderr (see fit_coverage).
    progress: a bar over the documents (when stderr is a terminal) and a summary on stderr.
    on_error: called with "file:line: what" for every bad input that is skipped (default: printed to stderr
    as a warning).
    Raises ValueError for a missing input, no text at all, or a vocab_size the corpus cannot fill.
    """
    import sentencepiece as spm

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not inputs:
        raise ValueError("no input files given")
    n_meta = len(META) + len(CONTROL_SYMBOLS) + len(USER_SYMBOLS) + 256
    if vocab_size <= n_meta:
        raise ValueError(f"vocab_size={vocab_size} is too small: the special, marker and byte pieces alone "
                         f"take {n_meta}")
    if max_sentences < 1:
        raise ValueError(f"max_sentences={max_sentences} must be at least 1")
    if not 0 < character_coverage <= 1:
        raise ValueError(f"character_coverage={character_coverage} must be in (0, 1]")
    try:
        files = expand_paths(inputs)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if not files:
        raise ValueError(f"no .txt/.jsonl/.json files in {', '.join(map(str, inputs))}")
    on_error = on_error or _default_on_error
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")

    t0 = time.perf_counter()
    sample, stats = _sample_sentences(files, on_error, max_sentences, seed, bar=progress and sys.stderr.isatty())
    t_read = time.perf_counter() - t0
    if not sample:
        raise ValueError(f"no text was read from {len(files)} input file(s)")
    n_chars = sum(map(len, sample))
    coverage, n_required = fit_coverage(sample, character_coverage, vocab_size, n_meta)
    if coverage != character_coverage:
        print(f"warning: character_coverage {character_coverage} needs more characters than {vocab_size} pieces "
              f"can hold; lowered to {coverage} (the {n_required} most frequent characters get pieces, the "
              "rarer ones are written as UTF-8 bytes). Raise vocab_size to keep more.", file=sys.stderr)

    def drain() -> Iterator[str]:
        # hand the sentences over one by one, dropping ours, so they are not held twice
        for i in range(len(sample)):
            s, sample[i] = sample[i], None
            yield s

    if progress:
        print(f"read {stats['docs']} documents ({stats['sentences']} sentences) from {len(files)} files in "
              f"{t_read:.1f} s; training {vocab_size} pieces on {len(sample)} sentences ({n_chars} characters)",
              file=sys.stderr)
    spm.set_random_generator_seed(seed)
    model = bytearray()

    class _Writer:
        def write(self, b):
            model.extend(b)

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=drain(),
            model_writer=_Writer(),
            model_type="unigram",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            byte_fallback=True,
            split_digits=True,
            character_coverage=coverage,
            # we sampled already (SentencePiece's own reservoir sampling ignores the seed); with at most
            # max_sentences sentences it keeps them all
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,      # bytes; a character is at most 4
            num_threads=2,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=META["unk"], bos_piece=META["bos"], eos_piece=META["eos"], pad_piece=META["pad"],
            control_symbols=CONTROL_SYMBOLS,
            user_defined_symbols=USER_SYMBOLS,
            hard_vocab_limit=True,
            minloglevel=1,
        )
    except RuntimeError as e:
        msg = str(e).strip()
        msg = msg.split("] ", 1)[1] if msg.startswith("INTERNAL:") and "] " in msg else msg
        if "Vocabulary size" in msg:
            raise ValueError(f"SentencePiece cannot make {vocab_size} pieces from {len(sample)} sentences "
                             f"({n_chars} characters) at character_coverage={coverage}: "
                             f"{msg}") from None
        raise RuntimeError(f"SentencePiece training failed: {msg}") from None
    finally:
        del sample[:]
    if not model:
        raise RuntimeError("SentencePiece returned no model")

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(TOKENIZER_CONFIG)
    _write_atomic(out / "ice_text.model", _reorder_model(bytes(model)))
    _write_atomic(out / "tokenizer_config.json",
                  (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    if progress:
        total = time.perf_counter() - t0
        print(f"trained in {total - t_read:.1f} s; wrote {out / 'ice_text.model'} ({total:.1f} s in all)",
              file=sys.stderr)
    return out
