"""The inference worker: one thread owns the model and decodes many sequences together.

llama.cpp's server rule: HTTP handlers parse, validate, render and tokenize; they hand the worker native
objects (EngineRequest: prompt ids + sampling params) and receive token ids back through a callback. The worker
knows ids, never text.

Continuous batching over a static KV cache of `parallel` rows:
    * the active sequences occupy cache rows 0..n-1 (row i = self.active[i]);
    * between decode steps, waiting requests are admitted into free rows: their prompt is prefilled alone
      (B = 1, at cache row n), which also yields their first token;
    * one decode step runs every active sequence in one forward: ids [n, 1] at per-row positions [n, 1],
      attention over cache slots [0, max position], each row masked to its own length;
    * a finished, cancelled or timed-out sequence leaves at the next step boundary; the last row is moved into
      its place (one copy of that row's cached keys/values), so active rows stay contiguous.
A greedy request gets the same tokens alone or beside others: rows never attend to each other (the mask is
per row), and only the matrix-multiply blocking, not the arithmetic of a row, depends on the batch.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import torch

from ..fast_decode import fast_decoder
from ..generate import GenerationStats, SamplerState, default_prefill_chunk, prefill
from ..model import GLM, SeqState
from ..sampling import SamplingParams, sanitize

log = logging.getLogger("glmkit.server")


class QueueFull(RuntimeError):
    pass


class EngineRequest:
    """One sequence to generate. `emit(event)` is called from the worker thread with:
        ("token", id, logprob)   logprob: None, or (chosen logprob, [(id, logprob), ...] top alternatives)
        ("done", finish_reason)  stop | length | cancelled  (stats are final)
        ("error", message)
    """

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, stop_ids: Sequence[int],
                 emit: Callable[[tuple], None], *, constraint=None, logprobs: Optional[int] = None,
                 deadline: Optional[float] = None):
        self.prompt = [int(i) for i in prompt_ids]
        self.params = params
        self.stop_ids = set(int(i) for i in stop_ids)
        self.emit = emit
        self.constraint = constraint          # .mask_logits(logits [V]) -> [V] and .advance(id), or None
        self.logprobs = logprobs              # None: off; k >= 0: the chosen token's and k alternatives
        self.deadline = deadline              # time.monotonic() after which the answer ends ("length")
        self.cancelled = False
        self.stats = GenerationStats(prompt_tokens=len(self.prompt), t_start=time.perf_counter())
        self.t_submit = time.monotonic()
        # worker-owned state
        self.finished: Optional[str] = None
        self.pos = 0                          # cache position the next token goes to
        self.next_tok = 0
        self.state: Optional[SeqState] = None
        self.sampler: Optional[SamplerState] = None
        self.limit = 0

    def cancel(self):
        """Thread-safe: the worker frees the row before its next step."""
        self.cancelled = True


class Engine:
    def __init__(self, model: GLM, max_seq: int, parallel: int = 4, max_queue: int = 64,
                 prefill_chunk: Optional[int] = None, on_step: Optional[Callable[[int, float], None]] = None):
        self.model = model
        self.max_seq = max_seq
        self.parallel = parallel
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(model)
        self.on_step = on_step                # (tokens decoded in the step, seconds) for metrics
        self.cfg = model.config
        self.queue: collections.deque[EngineRequest] = collections.deque()
        self.active: list[EngineRequest] = []
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="glmkit-worker", daemon=True)
        model.setup_cache(parallel, max_seq)
        self._fast = fast_decoder(model)               # None: decode steps run model.forward

    # --- called from other threads -----------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def shutdown(self, timeout: float = 5.0):
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def submit(self, req: EngineRequest):
        with self.cond:
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are waiting (--max-queue {self.max_queue})")
            self.queue.append(req)
            self.cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def active_count(self) -> int:
        return len(self.active)

    # --- worker thread -----------------------------------------------------------------------------------
    def _loop(self):
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self._stop and not self.queue and not self.active:
                    self.cond.wait()
                if self._stop:
                    break
                admit = []
                while self.queue and len(self.active) + len(admit) < self.parallel:
                    admit.append(self.queue.popleft())
            try:
                with torch.inference_mode():
                    for req in admit:
                        self._admit(req)
                    self._retire()
                    if self.active:
                        self._decode_step()
                        self._retire()
            except Exception as e:              # a failing forward must not take the server down
                log.exception("inference step failed")
                for req in self.active:
                    self._fail(req, f"inference failed: {type(e).__name__}: {e}")
                self.active = []
        for req in list(self.active) + list(self.queue):
            self._fail(req, "server shutting down")

    def _fail(self, req: EngineRequest, message: str):
        req.finished = "error"
        req.stats.t_end = time.perf_counter()
        try:
            req.emit(("error", message))
        except Exception:
            log.exception("emit failed")

    def _finish(self, req: EngineRequest, reason: str):
        if req.finished is None:
            req.finished = reason
            req.stats.finish_reason = reason
            req.stats.t_end = time.perf_counter()
            req.emit(("done", reason))

    def _admit(self, req: EngineRequest):
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        if req.deadline is not None and time.monotonic() > req.deadline:   # timed out while waiting
            self._finish(req, "length")
            return
        if len(req.prompt) >= self.max_seq:             # the edge checks this; never trust it blindly
            self._fail(req, f"prompt of {len(req.prompt)} tokens does not fit the context of {self.max_seq}")
            return
        model, cfg = self.model, self.cfg
        row = len(self.active)
        self.active.append(req)
        dev = model.device
        req.sampler = SamplerState(req.params, req.prompt, cfg.vocab_size, dev)
        req.limit = self.max_seq - len(req.prompt)
        if req.params.max_new_tokens is not None:
            req.limit = min(req.limit, req.params.max_new_tokens)
        ids = torch.tensor([req.prompt], device=dev)
        req.state = model.sequence_state(ids)
        n = len(req.prompt)
        chunk = n if cfg.prefix_lm else self.prefill_chunk   # prefix attention needs the context at once
        logits = prefill(model, ids, req.state, 0, chunk, row=row, cancelled=lambda: req.cancelled)
        if logits is None:
            self._finish(req, "cancelled")
            return
        req.pos = n
        self._pick(req, logits[0])

    def _decode_step(self):
        act = self.active
        dev = self.model.device
        t0 = time.perf_counter()
        if self._fast is not None:
            self._fast = fast_decoder(self.model, self._fast)
        if self._fast is not None:                     # quantized GLM2+ on CPU: the fused path (fast_decode.py)
            logits = self._fast.step([r.next_tok for r in act], [r.pos for r in act])
        else:
            ids = torch.tensor([[r.next_tok] for r in act], device=dev)
            pos = torch.tensor([[r.pos] for r in act], device=dev)
            state = SeqState(torch.cat([r.state.ctx_len for r in act]), torch.cat([r.state.mask_pos for r in act]))
            kv_len = max(r.pos for r in act) + 1
            logits = self.model(ids, cache_pos=pos, state=state, kv_len=kv_len)[:, -1]     # [n, V]
        # plain greedy rows (no penalties, grammar or logprobs) are chosen in one argmax over the batch
        plain = [i for i, r in enumerate(act)
                 if r.sampler.plain_greedy and r.constraint is None and r.logprobs is None]
        fast = {}
        if len(plain) > 1:
            sub = logits[plain].float()
            best = sanitize(sub).argmax(-1).tolist()
            ok = torch.isfinite(sub).all(-1).tolist()      # rows with non-finite logits take the full path
            fast = {i: best[j] for j, i in enumerate(plain) if ok[j]}
        for i, r in enumerate(act):
            r.pos += 1
            if i in fast:
                self._accept(r, fast[i])
            else:
                self._pick(r, logits[i])
        if self.on_step:
            self.on_step(len(act), time.perf_counter() - t0)

    def _pick(self, req: EngineRequest, logits: torch.Tensor):
        """Choose the next token of one sequence from its logits [V]; emit it or finish."""
        if not torch.isfinite(logits).all():
            req.stats.nonfinite_logits = True
        x = logits.float()
        if req.constraint is not None:
            x = req.constraint.mask_logits(x)
        self._accept(req, req.sampler.sample(x, fallback=next(iter(req.stop_ids), 0)), logits)

    def _accept(self, req: EngineRequest, tok: int, logits: Optional[torch.Tensor] = None):
        """The chosen token: finish on a stop id, else emit it; finish at the length or time limit."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return
        st = req.stats
        if not st.t_first:
            st.t_first = time.perf_counter()
        if tok in req.stop_ids:
            self._finish(req, "stop")
            return
        if req.constraint is not None:
            req.constraint.advance(tok)
        lp = None
        if req.logprobs is not None:         # of the model's distribution (before penalties and temperature)
            ls = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(ls, req.logprobs) if req.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            lp = (float(ls[tok]), alts)
        st.new_tokens += 1
        req.emit(("token", tok, lp))
        req.sampler.observe(tok)
        if st.new_tokens >= req.limit or (req.deadline is not None and time.monotonic() > req.deadline):
            self._finish(req, "length")
            return
        req.next_tok = tok

    def _retire(self):
        """Drop finished and cancelled rows; move the last row into each hole (rows stay 0..n-1)."""
        act = self.active
        for r in act:
            if r.finished is None and r.cancelled:
                self._finish(r, "cancelled")
        for i in range(len(act) - 1, -1, -1):
            if act[i].finished is None:
                continue
            last = len(act) - 1
            if i != last:
                self.model.move_cache_row(last, i, act[last].pos)
                act[i] = act[last]
            act.pop()
