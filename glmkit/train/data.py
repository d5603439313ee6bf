"""Training data: documents -> a token cache on disk -> deterministic packed batches with a resumable cursor.

build_cache() streams the documents once (iter_documents: plain text, JSONL, chinese-poetry JSON; bad data
reported with file and line and skipped), tokenizes them and appends the ids to `tokens.bin` (uint32), cut into
units of at most `max_unit` tokens; `units.npy` holds [start, length, split] per unit (split = prompt length of a
chat pair, -1 for plain text). Memory stays flat whatever the corpus size; the cache is reused while its
manifest (inputs, sizes, tokenizer, settings) matches.

Batcher turns units into packed rows. Everything is a function of (seed, epoch, unit): the order of an epoch is
a seeded permutation and each unit's spans come from its own seeded generator, so the whole position in the data
is the cursor (epoch, index) — saved in checkpoints, and the same on every data-parallel rank.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .blank_infilling import (IGNORE, ObjectiveConfig, Sample, SpecialIds, make_sample, pack_rows,
                              prompt_answer_sample)
from ..documents import expand_paths, iter_documents

VAL_EPOCH = 10 ** 6          # validation spans come from their own "epoch", never one that training reaches

# sentence ends for [sMASK]: Chinese and Western full stops, question and exclamation marks, and newlines
SENTENCE_END_TEXT = ("。", "！", "？", ".", "!", "?", "\n")


def sentence_end_ids(tok, extra: str = "") -> list[int]:
    """Ids of the tokens that are exactly a sentence end (as encode_plain writes them without a prefix).
    `extra`: more end characters, e.g. "，；" to make each line (句) of classical poetry an [sMASK] unit."""
    out = set()
    for s in SENTENCE_END_TEXT + tuple(extra):
        ids = tok.encode_plain(s, dummy_prefix=False) if tok.family == "chatglm" else tok.encode_plain(s)
        if len(ids) == 1:
            out.add(ids[0])
    return sorted(out)


def _file_fingerprint(paths: Sequence[Path]) -> list:
    return [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in paths]


def _tokenizer_fingerprint(tok) -> str:
    path = getattr(tok, "path", None)
    if path is not None and Path(path).is_file():
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return f"{tok.family}-{tok.vocab_size}"


# --- chat pairs (supervised fine-tuning data) ------------------------------------------------------------

def chat_pairs(paths, on_error=None, replacements: Optional[dict] = None):
    """Instruction JSON/JSONL ({instruction, input, output}, or {messages|conversations} with one user and one
    assistant turn) -> (source, index, question, answer). {{name}}-style placeholders are replaced."""
    replacements = replacements or {}

    def fill(s: str) -> str:
        for k, v in replacements.items():
            s = s.replace("{{" + k + "}}", v)
        return s

    for p in expand_paths(paths):
        try:
            if p.suffix == ".jsonl":
                rows = []
                for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            on_error and on_error(f"{p}:{i}: not JSON ({e.msg}), line skipped")
                            rows.append(None)
            else:
                rows = json.loads(p.read_text(encoding="utf-8"))
                rows = rows if isinstance(rows, list) else [rows]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            on_error and on_error(f"{p}: cannot read ({e}), file skipped")
            continue
        for i, r in enumerate(rows):
            q = a = None
            if isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("output"), str):
                q = r["instruction"] + (("\n" + r["input"]) if isinstance(r.get("input"), str) and r["input"] else "")
                a = r["output"]
            elif isinstance(r, dict):
                turns = r.get("messages") or r.get("conversations")
                if isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, dict) for t in turns):
                    q = turns[0].get("content", turns[0].get("value"))
                    a = turns[1].get("content", turns[1].get("value"))
            if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
                if r is not None:
                    on_error and on_error(f"{p}: record {i}: not a single-turn instruction pair, skipped")
                continue
            yield str(p), i, fill(q), fill(a)


# --- the cache ---------------------------------------------------------------------------------------------

@dataclass
class TokenCache:
    tokens: np.ndarray          # uint32 memmap
    units: np.ndarray           # [N, 3] int64: start, length, split
    folder: Path

    def unit(self, i: int) -> np.ndarray:
        s, n, _ = self.units[i]
        return self.tokens[s:s + n]

    def __len__(self) -> int:
        return len(self.units)

    @property
    def num_tokens(self) -> int:
        return int(self.units[:, 1].sum()) if len(self.units) else 0


def build_cache(paths, tok, folder, max_unit: int, chat: bool = False, replacements: Optional[dict] = None,
                on_error: Optional[Callable[[str], None]] = None, progress: bool = True,
                exclude: Sequence[str] = (), mix_paths: Sequence = (), mix_units: int = 0,
                mix_max_unit: int = 0, seed: int = 0) -> TokenCache:
    """Tokenize `paths` into `folder` (reused when its manifest matches). chat=True reads instruction pairs
    and stores prompt (rendered in the model's chat format) + answer per unit. mix_paths: plain documents
    added to chat data (a seeded choice of `mix_units` units of at most `mix_max_unit` tokens), so fine-tuning
    keeps practising blank infilling instead of forgetting it."""
    folder = Path(folder)
    files = expand_paths(paths, exclude)
    mix_files = expand_paths(mix_paths, exclude) if mix_paths else []
    manifest = {"files": _file_fingerprint(files), "tokenizer": _tokenizer_fingerprint(tok),
                "max_unit": max_unit, "chat": chat, "replacements": replacements or {}, "version": 1}
    if mix_files:
        manifest["mix"] = {"files": _file_fingerprint(mix_files), "units": mix_units, "max_unit": mix_max_unit,
                           "seed": seed}
    mf = folder / "manifest.json"
    if mf.is_file() and (folder / "tokens.bin").is_file() and (folder / "units.npy").is_file():
        try:
            if json.loads(mf.read_text()) == manifest:
                return open_cache(folder)
        except json.JSONDecodeError:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("manifest.json", "units.npy"):
        (folder / f).unlink(missing_ok=True)
    from tqdm import tqdm

    t0 = time.time()
    units: list[tuple[int, int, int]] = []
    pos = 0
    tmp = folder / "tokens.bin.tmp"
    with open(tmp, "wb") as out:
        def put(ids: list[int], split: int = -1, limit: int = max_unit):
            """Append ids; a chat pair is one unit (dropped if over `limit`), a document is cut into units."""
            nonlocal pos
            if not ids:
                return
            out.write(np.asarray(ids, np.uint32).tobytes())
            if split >= 0:
                if len(ids) <= limit:
                    units.append((pos, len(ids), split))
            else:
                for s in range(0, len(ids), limit):
                    units.append((pos + s, min(limit, len(ids) - s), -1))
            pos += len(ids)

        bar = tqdm(desc="tokenizing", unit=" docs", disable=not progress, file=sys.stderr)
        if chat:
            for _src, _i, q, a in chat_pairs(files, on_error, replacements):
                p_ids = tok.apply_chat_template([{"role": "user", "content": q}])
                a_ids = tok.encode(a, add_special_tokens=False)
                put(p_ids + a_ids, split=len(p_ids))
                bar.update()
        else:
            for doc in iter_documents(files, on_error):
                ids = tok.encode(doc.text, add_special_tokens=False)
                put(ids)
                bar.update()
        if mix_files:
            n_chat = len(units)
            for doc in iter_documents(mix_files, on_error):
                put(tok.encode(doc.text, add_special_tokens=False), limit=mix_max_unit or max_unit)
                bar.update()
            plain = units[n_chat:]
            keep = np.random.default_rng([seed, 104729]).permutation(len(plain))[:mix_units]
            units = units[:n_chat] + [plain[i] for i in sorted(keep)]
        bar.close()
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, folder / "tokens.bin")
    np.save(folder / "units.npy", np.asarray(units, np.int64).reshape(-1, 3))
    mf.write_text(json.dumps(manifest))
    if progress:
        print(f"tokenized {len(units)} units, {pos} tokens in {time.time() - t0:.1f}s -> {folder}",
              file=sys.stderr)
    return open_cache(folder)


def open_cache(folder) -> TokenCache:
    folder = Path(folder)
    units = np.load(folder / "units.npy")
    size = (folder / "tokens.bin").stat().st_size
    tokens = (np.memmap(folder / "tokens.bin", dtype=np.uint32, mode="r") if size
              else np.zeros(0, np.uint32))
    return TokenCache(tokens, units, folder)


def split_units(n: int, val_units: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train unit ids, held-out unit ids), a seeded choice."""
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    val_units = min(val_units, n // 10)
    return np.sort(perm[val_units:]), np.sort(perm[:val_units])


# --- batches ---------------------------------------------------------------------------------------------

class Batcher:
    """Deterministic packed rows from cache units. state() / load_state() are the data position."""

    def __init__(self, cache: TokenCache, unit_ids: np.ndarray, seq_len: int, objective: ObjectiveConfig,
                 special: SpecialIds, sentence_ends: Sequence[int], seed: int, shuffle: bool = True):
        if len(unit_ids) == 0:
            raise ValueError("no training data: every input was empty or skipped")
        self.cache, self.unit_ids, self.seq_len = cache, np.asarray(unit_ids), seq_len
        self.objective, self.special, self.sentence_ends = objective, special, list(sentence_ends)
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, st: dict):
        self.epoch, self.index = int(st["epoch"]), int(st["index"])

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.unit_ids)
                           if self.shuffle else self.unit_ids)
            self._order_epoch = self.epoch
        return self._order

    def sample(self, unit: int, epoch: int) -> Sample:
        ids = self.cache.unit(unit).astype(np.int64).tolist()
        split = int(self.cache.units[unit, 2])
        if split >= 0:
            return prompt_answer_sample(ids[:split], ids[split:], self.special)
        rng = np.random.default_rng([self.seed, epoch, int(unit)])
        return make_sample(ids, rng, self.objective, self.special, self.sentence_ends)

    def next_row(self) -> list[Sample]:
        row, used = [], 0
        while True:
            order = self.order()
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                continue
            s = self.sample(order[self.index], self.epoch)
            if len(s) > self.seq_len:           # cannot happen for units <= max_unit; skip defensively
                self.index += 1
                continue
            if used + len(s) > self.seq_len:
                return row
            row.append(s)
            used += len(s)
            self.index += 1

    def next_rows(self, n: int) -> list[list[Sample]]:
        return [self.next_row() for _ in range(n)]

    # --- the training loop's batch-source protocol (see loop.py) ---
    def collate(self, rows: list[list[Sample]], pad_id: int) -> dict:
        return pack_rows(rows, self.seq_len, pad_id)

    @staticmethod
    def count(rows: list[list[Sample]]) -> tuple[int, int]:
        """(target tokens, input tokens) of rows."""
        return (sum(int((s.targets != IGNORE).sum()) for row in rows for s in row),
                sum(len(s) for row in rows for s in row))

    def all_rows(self) -> list[list[Sample]]:
        """Every unit once, in order (validation)."""
        rows, row, used = [], [], 0
        for u in self.unit_ids:
            s = self.sample(u, VAL_EPOCH)
            if used + len(s) > self.seq_len and row:
                rows.append(row)
                row, used = [], 0
            row.append(s)
            used += len(s)
        if row:
            rows.append(row)
        return rows
