"""The engine: one scheduler over token ids for the terminal, the Pipeline (one slot) and the server (many).

It owns the KV cache object (cache.py: `slots` rows of `max_seq` positions), the prefix cache
(prefix_cache.py) and the sequences (sequence.py), and runs them through one step function (step.py).
One iteration, step():
    1. admit waiting sequences into free slots (first come, first served), each into the free slot whose
       previous content shares the longest prefix with its prompt;
    2. prefill one chunk of the oldest sequence still reading its prompt: at its first chunk it takes the
       longest prefix it can reuse -- what its own slot still holds, what another slot holds (a sequence
       running there, or one that ran there), or blocks of the prefix cache -- copied into its slot; what its
       slot held beyond that is saved to the prefix cache first (the prefix cache keeps what leaves the slots);
    3. one decode step for every sequence past its prompt, all rows together (on the fused path the prompt
       chunk of step 2 rides in this step's matrix multiplies);
    4. finished, cancelled and timed-out sequences leave; their slot keeps their keys/values for the next one.
So a decoding stream waits at most one prefill chunk plus one step for its next token, whoever joins.

Two drivers: the server calls start() (a worker thread owns the model and loops step()) and submit(); the
Pipeline and the terminal call generate() -> TokenStream, which runs step() on the caller's thread.
A greedy sequence gets the same tokens alone or beside others, with its prefix reused or recomputed, in chunks
or whole: rows never attend to each other, reused keys/values are the ones the same positions computed, and
only float summation order (never the arithmetic of a row) depends on the batch.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence as Seq

import torch

from ..model import GLM, SeqState
from ..sampling import SamplingParams, sanitize
from .cache import KVCache
from .prefix_cache import PrefixCache
from .sequence import ContextOverflow, GenerationStats, SamplerState, Sequence
from .step import Prefill, Stepper

log = logging.getLogger("glmkit.engine")

DEFAULT_CACHE_MB = 1024          # prefix cache budget unless --cache-mb says otherwise
PREFIX_BLOCK = 16                # tokens per prefix-cache block
SAVE_MIN = 4                     # a slot's leftover shorter than this is not saved (a chat's next turn often
                                 # differs from the last one's tokens only in its last few: the same answer
                                 # text tokenized again), so a one-slot chat does not copy its history each turn


def default_prefill_chunk(model: GLM) -> int:
    """Prompt tokens per prefill step: 32 on CPU, 512 elsewhere.

    Measured (benchmarks/prefill_chunk.py, ChatGLM3-6B INT4, 2 threads, AMD EPYC Zen3 AVX2, a 512-token prompt
    joining 7 decoding rows): with chunks of 8 / 16 / 32 / 64 / 128 tokens the prompt was read in 37.8 / 34.1 /
    27.4 / 22.5 / 22.2 s while each decoding stream waited 0.58 / 0.99 / 1.67 / 2.81 / 5.48 s between tokens.
    The matrix multiplies are compute-bound from ~16 rows on, so bigger chunks mostly save the per-step weight
    reads: 32 is the knee (twice the chunk reads 15-20% faster for 1.7x the wait). On a GPU a step of 512
    tokens costs little more than one of 32 (not measured here: no GPU), so the usual 512 is kept there."""
    return 32 if model.device.type == "cpu" else 512


ALONE_CHUNK_CPU = 128


def default_alone_chunk(model: GLM, chunk: int) -> int:
    """Prompt tokens per prefill step while no other sequence is decoding (nobody waits on the step, so only
    the prompt's own speed counts): 128 on CPU, where the float and quantized matrix multiplies run at their
    best from ~128 rows (each step reads all the weights once; benchmarks/float_gemm.py: the bf16 kernel at 32 /
    128 rows, 4 of ChatGLM3-6B's layers through the engine, 2 threads, AMD EPYC Zen3: 68-73 / 82-85 prompt
    tok/s), and never less than `chunk`."""
    return max(chunk, ALONE_CHUNK_CPU) if model.device.type == "cpu" else chunk


class QueueFull(RuntimeError):
    pass


@dataclass
class EngineStats:
    """Counters for /metrics and benchmarks (written by the engine's thread only)."""
    steps: int = 0
    step_tokens: int = 0
    step_seconds: float = 0.0
    step_max: float = 0.0
    chunks: int = 0
    chunk_tokens: int = 0
    chunk_seconds: float = 0.0
    chunk_max: float = 0.0
    prompts: int = 0                  # sequences that began reading their prompt
    prompt_tokens: int = 0            # their prompt tokens
    cached_tokens: int = 0            # of which reused (from a slot or the prefix cache)
    from_slots: int = 0               # of which copied from another slot
    from_prefix_cache: int = 0        # of which copied in from the prefix cache

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class TokenStream:
    """Iterator of generated ids from Engine.generate(); .stats filled as it runs (finish_reason once exhausted);
    .logprobs: (id, logprob, alternatives) per token when logprobs were asked for."""

    def __init__(self, engine: "Engine", seq: Sequence):
        self.engine, self.seq = engine, seq
        self.events: collections.deque = collections.deque()
        self.logprobs: list = []
        seq.emit = self.events.append
        self._done = False

    @property
    def stats(self) -> GenerationStats:
        return self.seq.stats

    def __iter__(self):
        return self

    def __next__(self) -> int:
        while not self._done:
            while self.events:
                ev = self.events.popleft()
                if ev[0] == "token":
                    if ev[2] is not None:
                        self.logprobs.append((ev[1], *ev[2]))
                    return ev[1]
                self._done = True
                if ev[0] == "error":
                    raise RuntimeError(ev[1])
                raise StopIteration
            self.engine.step()
        raise StopIteration

    def close(self, reason: Optional[str] = None):
        """Stop generating (the slot is freed now); `reason` overrides the finish reason."""
        if self.seq.finished is None:
            self.seq.cancel()
            self.engine.sweep()
        self._done = True
        if reason:
            self.stats.finish_reason = reason
        if not self.stats.t_end:
            self.stats.t_end = time.perf_counter()


class Engine:
    def __init__(self, model: GLM, max_seq: int, slots: int = 1, *, cache_mb: Optional[float] = None,
                 prefill_chunk: Optional[int] = None, max_queue: int = 64, ptuning: Optional[torch.Tensor] = None,
                 kv_dtype=None, prefill_chunk_alone: Optional[int] = None):
        """ptuning: P-tuning v2 keys/values [layers, 2, G, P, D] in front of every sequence (adapters/ptuning.py).
        kv_dtype: the KV cache's (KVCache.for_model: None = fp16 for quantized models, else theirs; "int8").
        prefill_chunk: prompt tokens per step beside decoding sequences; prefill_chunk_alone: per step while
        none decodes (default: prefill_chunk when that is given, else default_alone_chunk)."""
        cfg = model.config
        self.model = model
        self.max_seq = min(max_seq, cfg.max_seq_len)
        self.slots = slots
        self.cache_mb = DEFAULT_CACHE_MB if cache_mb is None else cache_mb
        if getattr(model, "tp", None) is not None:     # tensor parallel (glmkit/parallel/): the other ranks
            self.cache_mb = 0                          # mirror model calls, not copies between cache rows
        self.reuse = self.cache_mb > 0                 # 0: no prefix is reused, not even a slot's own
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(model)
        self.prefill_chunk_alone = prefill_chunk_alone or (
            prefill_chunk if prefill_chunk else default_alone_chunk(model, self.prefill_chunk))
        self.max_queue = max_queue
        self.ptuning = ptuning
        self.kv_dtype = kv_dtype
        self.stats = EngineStats()
        self.cache: Optional[KVCache] = None           # allocated at the first step (a Pipeline that only
        self.prefix: Optional[PrefixCache] = None      # hands its model to a server never allocates its own)
        self.stepper: Optional[Stepper] = None
        self.queue: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []             # sequences holding a slot, in admission order
        self.owner: list[Optional[Sequence]] = [None] * slots
        self.resident: list[tuple] = [(None, [])] * slots   # per free slot: (tag, ids its positions 0.. hold)
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self._stop = False

    # --- setup ------------------------------------------------------------------------------------------------
    def ensure_cache(self) -> KVCache:
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, self.slots, self.max_seq, dtype=self.kv_dtype,
                                            prefix=self.ptuning)
            self.prefix = PrefixCache(int(self.cache_mb * 2**20), self.cache.bytes_per_token, PREFIX_BLOCK)
            self.stepper = Stepper(self.model, self.cache)
        return self.cache

    @property
    def decode_path(self) -> str:
        self.ensure_cache()
        return self.stepper.decode_path

    def reset(self):
        """Forget every cached prefix (slots and prefix cache); running sequences are not touched."""
        self.resident = [(None, [])] * self.slots
        if self.prefix is not None:
            self.prefix.clear()

    # --- submitting (any thread) -------------------------------------------------------------------------------
    def submit(self, seq: Sequence):
        if len(seq.prompt) >= self.max_seq:
            raise ContextOverflow(f"prompt of {len(seq.prompt)} tokens does not fit the context window of "
                                  f"{self.max_seq} tokens (one position is needed for the answer)")
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (--max-queue {self.max_queue})")
            self.queue.append(seq)
            self.cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def active_count(self) -> int:
        return len(self.running)

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    # --- the caller's-thread driver (Pipeline, terminal) -------------------------------------------------------
    def generate(self, prompt_ids: Seq[int], params: SamplingParams, stop_ids: Iterable[int] = (),
                 state: Optional[SeqState] = None, constraint=None, logprobs: Optional[int] = None,
                 adapter: Optional[str] = None) -> TokenStream:
        """One sequence, generated as the returned TokenStream is iterated. One generation at a time: a stream
        still open is cancelled. state: the prompt's SeqState where it is not the one model.sequence_state
        derives (infilling a mask other than the first [gMASK]/[MASK])."""
        if self.thread is not None:
            raise RuntimeError("this engine runs on its worker thread: submit() to it")
        for s in list(self.running) + list(self.queue):
            s.cancel()
        self.sweep()
        seq = Sequence(prompt_ids, params, stop_ids, state=state, constraint=constraint, logprobs=logprobs,
                       adapter=adapter)
        stream = TokenStream(self, seq)
        self.submit(seq)
        return stream

    # --- the worker-thread driver (server) ---------------------------------------------------------------------
    def start(self) -> "Engine":
        self.ensure_cache()
        self.thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
        self.thread.start()
        return self

    def shutdown(self, timeout: float = 5.0):
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self._stop and not self.busy:
                    self.cond.wait()
                if self._stop:
                    break
            self.step()
        for seq in list(self.running) + list(self.queue):
            self._fail(seq, "server shutting down")

    # --- one iteration -----------------------------------------------------------------------------------------
    def step(self):
        """Admit, one prefill chunk, one decode step, retire (see the module docstring). A failing forward fails
        the sequences in flight, not the engine."""
        self.ensure_cache()
        try:
            with torch.inference_mode():
                self._admit()
                self.sweep()
                reading = next((s for s in self.running if s.prefill is not None), None)
                decoding = [s for s in self.running if s.decoding]
                if reading is not None and not reading.prefill.begun:
                    self._begin(reading)
                chunk = self.prefill_chunk if decoding else max(self.prefill_chunk, self.prefill_chunk_alone)
                if reading is not None and self.stepper.can_merge(reading, chunk):
                    self._prefill_and_decode(reading, decoding, chunk)    # one step on the fused path
                else:
                    if reading is not None:
                        self._prefill_chunk(reading, chunk)
                    decoding = [s for s in self.running if s.decoding]
                    if decoding:
                        self._decode(decoding)
                self.sweep()
        except Exception as e:                          # noqa: BLE001 - reported to every sequence in flight
            log.exception("inference step failed")
            for seq in list(self.running):
                self._fail(seq, f"inference failed: {type(e).__name__}: {e}")

    def _admit(self):
        with self.cond:
            while self.queue and None in self.owner:
                seq = self.queue.popleft()
                if seq.cancelled:
                    self._finish(seq, "cancelled")
                elif seq.deadline is not None and time.monotonic() > seq.deadline:   # timed out waiting
                    self._finish(seq, "length")
                else:
                    self._place(seq)

    def _place(self, seq: Sequence):
        free = [i for i, o in enumerate(self.owner) if o is None]
        if self.reuse:        # the free slot whose content gives the most; else the one holding the least
            seq.slot = max(free, key=lambda i: (len(self._reusable(seq, *self.resident[i])),
                                                -len(self.resident[i][1])))
        else:
            seq.slot = free[0]
        self.owner[seq.slot] = seq
        self.running.append(seq)
        seq.sampler = SamplerState(seq.params, seq.prompt, self.model.config.vocab_size, self.model.device)
        seq.limit = self.max_seq - len(seq.prompt)
        if seq.params.max_new_tokens is not None:
            seq.limit = min(seq.limit, seq.params.max_new_tokens)
        ids = torch.tensor([seq.prompt], device=self.model.device)
        if seq.state is None:
            seq.state = self.model.sequence_state(ids)
        else:
            seq.state = SeqState(*(t.to(self.model.device) for t in seq.state))
        seq.prefill = Prefill(ids, seq.state, self._ctx_len(seq), start=0)

    # --- prefix reuse ------------------------------------------------------------------------------------------
    def _ctx_len(self, seq: Sequence) -> int:
        return int(seq.state.ctx_len[0]) if self.model.config.prefix_lm else 0

    def _tag(self, seq: Sequence):
        """What keys/values depend on besides the tokens: the sequence's LoRA adapter, and ChatGLM-6B's context
        length and mask position -> (adapter, (ctx_len, mask_pos) or None), or None for a causal model's base."""
        ctx = None
        if self.model.config.prefix_lm or self.model.config.rope_2d:
            ctx = (int(seq.state.ctx_len[0]), int(seq.state.mask_pos[0])) if seq.state is not None else "?"
        return None if seq.adapter is None and ctx is None else (seq.adapter, ctx)

    def _reusable(self, seq: Sequence, tag, ids: list) -> list:
        """The prefix of seq's prompt that content (tag, ids) can give: the common prefix, at most all but the
        last prompt token (its logits are needed), and for a prefix LM all of the context or nothing."""
        if seq.state is None and (self.model.config.prefix_lm or self.model.config.rope_2d):
            seq.state = self.model.sequence_state(torch.tensor([seq.prompt], device=self.model.device))
        if tag != self._tag(seq):
            return []
        n = 0
        for a, b in zip(ids, seq.prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(seq.prompt) - 1)
        return seq.prompt[:n] if n >= self._ctx_len(seq) else []

    def _content(self, i: int) -> tuple:
        """(tag, ids) whose keys/values slot i holds at positions 0..: its sequence's so far, or (until that one
        starts reading its prompt) its last one's."""
        s = self.owner[i]
        if s is None or (s.prefill is not None and not s.prefill.begun):
            return self.resident[i]
        return self._tag(s), s.ids[:s.pos]

    def _begin(self, seq: Sequence):
        """At the first chunk: take the longest reusable prefix from the slots or the prefix cache."""
        n = 0
        if self.reuse:
            slot = seq.slot
            tag, held = self.resident[slot]
            n = len(self._reusable(seq, tag, held))                       # what the slot itself still holds
            others = [(len(self._reusable(seq, *self._content(i))), i) for i in range(self.slots) if i != slot]
            k, src = max(others, default=(0, None))
            chain, m = self.prefix.match(seq.prompt, head=self._ctx_len(seq) or None, tag=self._tag(seq))
            m = len(self._reusable(seq, self._tag(seq), seq.prompt[:m]))
            if len(held) - n >= SAVE_MIN:               # what the slot held beyond n is about to be overwritten
                self._save(slot, tag, held)
            if k > n:                                   # another slot holds more: copy its rows
                self.cache.copy(src, slot, n, k)
                self.stats.from_slots += k - n
                n = k
            if m > n:                                   # the prefix cache holds more still
                for node in chain:
                    a, b = max(node.start, n), min(node.stop, m)
                    if a < b:
                        self.cache.write(slot, a, node.kv_of(a, b))
                self.stats.from_prefix_cache += m - n
                n = m
        self.resident[seq.slot] = (None, [])            # the slot is being overwritten from n on
        seq.prefill.begun = True
        seq.prefill.next = seq.pos = n
        seq.stats.reused_tokens = n
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(seq.prompt)
        self.stats.cached_tokens += n

    def _save(self, slot: int, tag, ids: list):
        """Keep what slot holds (tag, ids) in the prefix cache before it is overwritten."""
        if ids and self.prefix.enabled:
            ctx = tag[1] if tag is not None else None
            head = ctx[0] if isinstance(ctx, tuple) and ctx[0] else None     # a prefix LM's context
            self.prefix.insert(ids, len(ids), lambda a, b: self.cache.read(slot, a, b), head=head, tag=tag)

    # --- prefill and decode ------------------------------------------------------------------------------------
    def _prefill_chunk(self, seq: Sequence, chunk: int):
        t0, before = time.perf_counter(), seq.prefill.next
        logits = self.stepper.prefill(seq, chunk)
        self._chunk_done(seq, logits, seq.prefill.next - before, time.perf_counter() - t0)

    def _chunk_done(self, seq: Sequence, logits: Optional[torch.Tensor], tokens: int, dt: float):
        st = self.stats
        st.chunks += 1
        st.chunk_tokens += tokens
        st.chunk_seconds += dt
        st.chunk_max = max(st.chunk_max, dt)
        if logits is not None:
            seq.prefill = None
            self._pick(seq, logits)

    def _prefill_and_decode(self, seq: Sequence, seqs: list[Sequence], chunk: int):
        """A prompt chunk riding in the decode step of seqs (none: a chunk alone); its time counts as the
        chunk's (the gap a decoding stream sees)."""
        t0, before = time.perf_counter(), seq.prefill.next
        logits, first = self.stepper.both(seqs, seq, chunk)
        self._decoded(seqs, logits)
        self._chunk_done(seq, first, seq.prefill.next - before, time.perf_counter() - t0)
        self.stats.step_tokens += len(seqs)

    def _decode(self, seqs: list[Sequence]):
        t0 = time.perf_counter()
        self._decoded(seqs, self.stepper.decode(seqs))
        dt = time.perf_counter() - t0
        st = self.stats
        st.steps += 1
        st.step_tokens += len(seqs)
        st.step_seconds += dt
        st.step_max = max(st.step_max, dt)

    def _decoded(self, seqs: list[Sequence], logits: torch.Tensor):
        """Logits [n, V] of a decode step -> each sequence's next token."""
        for s in seqs:                                                 # its fed token's keys/values are in
            s.pos += 1
        # plain greedy rows (no penalties, grammar or logprobs) are chosen in one argmax over the batch
        plain = [i for i, s in enumerate(seqs) if s.sampler.plain_greedy and s.constraint is None
                 and s.logprobs is None]
        best = {}
        if len(plain) > 1:
            sub = logits[plain].float()
            top = sanitize(sub).argmax(-1).tolist()
            ok = torch.isfinite(sub).all(-1).tolist()                 # rows with non-finite logits: full path
            best = {i: top[j] for j, i in enumerate(plain) if ok[j]}
        for i, s in enumerate(seqs):
            if i in best:
                self._accept(s, best[i])
            else:
                self._pick(s, logits[i])

    def _pick(self, seq: Sequence, logits: torch.Tensor):
        """Choose the next token of one sequence from its logits [V]."""
        if not torch.isfinite(logits).all():
            seq.stats.nonfinite_logits = True
        x = logits.float()
        if seq.constraint is not None:
            x = seq.constraint.mask_logits(x)
        tok = seq.sampler.sample(x, fallback=seq.fallback_token(self.model.config.eos_token_id))
        self._accept(seq, tok, logits)

    def _accept(self, seq: Sequence, tok: int, logits: Optional[torch.Tensor] = None):
        """The chosen token: finish on a stop id, else emit it; finish at the length or time limit."""
        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        st = seq.stats
        if not st.t_first:
            st.t_first = time.perf_counter()
        if tok in seq.stop_ids:
            self._finish(seq, "stop")
            return
        if seq.constraint is not None:
            seq.constraint.advance(tok)
        lp = None
        if seq.logprobs is not None:        # of the model's distribution (before penalties and temperature)
            ls = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(ls, seq.logprobs) if seq.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lp = (float(ls[tok]), alts)
        st.new_tokens += 1
        seq.ids.append(tok)
        seq.emit(("token", tok, lp))
        seq.sampler.observe(tok)
        if st.new_tokens >= seq.limit or (seq.deadline is not None and time.monotonic() > seq.deadline):
            self._finish(seq, "length")
            return
        seq.next_tok = tok

    # --- leaving -----------------------------------------------------------------------------------------------
    def sweep(self):
        """Finish cancelled and timed-out sequences; free the slots of finished ones."""
        now = time.monotonic()
        for seq in list(self.running):
            if seq.finished is None and seq.cancelled:
                self._finish(seq, "cancelled")
            elif seq.finished is None and seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "length")
        with self.cond:
            for seq in list(self.queue):
                if seq.cancelled:
                    self.queue.remove(seq)
                    self._finish(seq, "cancelled")

    def _release(self, seq: Sequence):
        if seq.slot is None or self.owner[seq.slot] is not seq:
            return
        pf = seq.prefill
        if seq.finished == "error":                      # what the failed step wrote is unknown
            self.resident[seq.slot] = (None, [])
        elif pf is None or (pf.begun and pf.hidden is None):     # (a half-done context phase holds nothing)
            self.resident[seq.slot] = (self._tag(seq), seq.ids[:seq.pos])
        self.owner[seq.slot] = None
        self.running.remove(seq)

    def _finish(self, seq: Sequence, reason: str):
        if seq.finished is None:
            seq.finished = reason
            seq.stats.finish_reason = reason
            seq.stats.t_end = time.perf_counter()
            self._release(seq)
            try:
                seq.emit(("done", reason))
            except Exception:                       # noqa: BLE001 - a broken consumer must not stop the engine
                log.exception("emit failed")

    def _fail(self, seq: Sequence, message: str):
        if seq.finished is None:
            seq.finished = "error"
            seq.stats.t_end = time.perf_counter()
            self._release(seq)
            try:
                seq.emit(("error", message))
            except Exception:                       # noqa: BLE001
                log.exception("emit failed")
