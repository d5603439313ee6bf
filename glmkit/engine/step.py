"""The step function: every forward the engine makes goes through Stepper, whichever path runs it.

    decode(seqs)          one token of each decoding sequence, each at its own position in its own cache slot
                          -> logits [n, V]: the fused step (fast_decode.py) for quantized models on CPU, else one
                          model.forward over the slot range that holds them (rows in that range that are not
                          decoding get a dummy token written at the cache's scratch position max_seq - 1)
    prefill(seq, chunk)   the next piece of a prompt: `chunk` tokens through all layers, or -- for ChatGLM-6B's
                          bidirectional context, where every position depends on all the others and a token
                          chunk would change the result -- the whole context through chunk * layers / context
                          layers (at least one), holding the hidden states in between. -> the last logits [V]
                          once the prompt is read, else None.
    both(seqs, seq, chunk)  on the fused path, the two in one step: the prompt's next `chunk` tokens ride in the
                          decode step's matrix multiplies (seqs may be empty; a ChatGLM-6B context when the rest
                          of its prompt fits the chunk, read whole), so the weights are read once
                          instead of twice -> (decode logits, prefill logits or None). Measured with
                          benchmarks/prefill_chunk.py (ChatGLM3-6B INT4, 512-token prompt beside 7 decoding
                          rows, chunk 32): the prompt read in 24.7-26.4 s instead of 29.1-30.3 s; alone, at the
                          speed of model.forward (24-25 tok/s).
All write keys/values into the engine's KVCache; none knows about scheduling.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..model import GLM, SeqState
from .cache import KVCache
from .fast_decode import FastDecoder, fast_decoder, why_not


class Prefill:
    """Where the reading of one prompt stands."""

    def __init__(self, ids: torch.Tensor, state: SeqState, ctx_len: int, start: int):
        self.ids = ids                  # [1, n] the prompt
        self.state = state              # its SeqState (ChatGLM-6B positions and context)
        self.ctx_len = ctx_len          # bidirectional context length (0 for causal models)
        self.next = start               # first position not yet computed
        self.begun = False              # the engine has looked for a reusable prefix
        self.hidden: Optional[torch.Tensor] = None     # context phase: [1, ctx, C] after self.layer layers
        self.inputs = None              # context phase: (rope, mask, cache_pos) of the context
        self.layer = 0


class Stepper:
    def __init__(self, model: GLM, cache: KVCache):
        self.model, self.cache = model, cache
        self.fast: Optional[FastDecoder] = fast_decoder(model, cache)

    def _adapters(self, rows):
        """A context in which each batch row uses its sequence's LoRA adapter, when any row names one (rows:
        Sequences, or None for the dummy rows of a slot range; adapters/lora.py applies them per row, unmerged)."""
        names = [s.adapter if s is not None else None for s in rows]
        if not any(n is not None for n in names):
            return contextlib.nullcontext()
        from ..adapters.lora import row_adapters
        return row_adapters(self.model, names)

    def _forward(self, rows, *args, **kw):
        with self._adapters(rows):
            return self.model(*args, **kw)

    @property
    def decode_path(self) -> str:
        return "fused" if self.fast is not None else f"model.forward ({why_not(self.model, self.cache)})"

    # --- decode ----------------------------------------------------------------------------------------------
    def decode(self, seqs) -> torch.Tensor:
        """seqs: Sequences with .slot, .pos, .next_tok (and .state for ChatGLM-6B) -> logits [len(seqs), V]."""
        if self.fast is not None:
            self.fast = fast_decoder(self.model, self.cache, self.fast)
        if self.fast is not None:
            ctx, mpos = self._prefix_lm(seqs)
            return self.fast.step([s.next_tok for s in seqs], [s.pos for s in seqs], [s.slot for s in seqs],
                                  ctx=ctx, mask_pos=mpos)
        model, dev = self.model, self.model.device
        lo = min(s.slot for s in seqs)
        B = max(s.slot for s in seqs) + 1 - lo
        ids = torch.zeros(B, 1, dtype=torch.long)
        pos = torch.full((B, 1), self.cache.max_seq - 1, dtype=torch.long)       # scratch for idle rows
        for s in seqs:
            ids[s.slot - lo, 0], pos[s.slot - lo, 0] = s.next_tok, s.pos
        state = None
        cfg = model.config
        if cfg.rope_2d or cfg.prefix_lm:
            ctx, mpos = torch.zeros(B, dtype=torch.long), torch.full((B,), -1, dtype=torch.long)
            for s in seqs:
                ctx[s.slot - lo], mpos[s.slot - lo] = int(s.state.ctx_len[0]), int(s.state.mask_pos[0])
            state = SeqState(ctx.to(dev), mpos.to(dev))
        kv_len = max(s.pos for s in seqs) + 1
        at = {s.slot - lo: s for s in seqs}
        logits = self._forward([at.get(r) for r in range(B)], ids.to(dev), self.cache, cache_pos=pos.to(dev),
                               kv_len=kv_len, row0=lo, state=state)
        return logits[torch.tensor([s.slot - lo for s in seqs], device=dev), -1]

    def _prefix_lm(self, seqs):
        """ChatGLM-6B on the fused path: each sequence's (context length, mask position); else (None, None)."""
        if not self.fast.v1:
            return None, None
        return [int(s.state.ctx_len[0]) for s in seqs], [int(s.state.mask_pos[0]) for s in seqs]

    # --- a prompt chunk and a decode step together (fused path) ----------------------------------------------
    def can_merge(self, seq, chunk: int = 0) -> bool:
        """On the fused path; a ChatGLM-6B context (read whole) only when the rest of the prompt fits the chunk
        (longer ones go a layer range at a time through prefill())."""
        pf: Prefill = seq.prefill
        return self.fast is not None and (pf.next >= pf.ctx_len or pf.ids.shape[1] - pf.next <= chunk)

    def both(self, seqs, seq, chunk: int):
        pf: Prefill = seq.prefill
        n = pf.ids.shape[1]
        s, e = pf.next, min(pf.next + chunk, n)
        toks = [x.next_tok for x in seqs] + pf.ids[0, s:e].tolist()
        pos = [x.pos for x in seqs] + list(range(s, e))
        rows = [x.slot for x in seqs] + [seq.slot] * (e - s)
        want = list(range(len(seqs))) + ([len(toks) - 1] if e == n else [])
        ctx, mpos = self._prefix_lm(seqs)
        if ctx is not None:
            ctx += [pf.ctx_len] * (e - s)
            mpos += [int(pf.state.mask_pos[0])] * (e - s)
        logits = self.fast.step(toks, pos, rows, logits_for=want, ctx=ctx, mask_pos=mpos)
        pf.next = seq.pos = e
        return logits[:len(seqs)], (logits[-1] if e == n else None)

    # --- prefill ---------------------------------------------------------------------------------------------
    def prefill(self, seq, chunk: int) -> Optional[torch.Tensor]:
        pf: Prefill = seq.prefill
        n = pf.ids.shape[1]
        if pf.hidden is not None or (pf.next < pf.ctx_len and n - pf.next > chunk):
            return self._context_layers(seq, chunk)
        s, e = pf.next, min(pf.next + chunk, n)
        if s < pf.ctx_len:                # a bidirectional context is read whole: the rest fits this chunk
            e = n
        pos = torch.arange(s, e, device=pf.ids.device)[None]
        logits = self._forward([seq], pf.ids[:, s:e], self.cache, cache_pos=pos, kv_len=e, row0=seq.slot,
                               state=pf.state, last_only=True)
        pf.next = seq.pos = e
        return logits[0, -1] if e == n else None

    def _context_layers(self, seq, chunk: int) -> Optional[torch.Tensor]:
        """A layer range of a ChatGLM-6B context too long for one chunk (positions [0, ctx) of every layer)."""
        model, pf = self.model, seq.prefill
        T, L = pf.ctx_len, model.config.num_layers
        if pf.hidden is None:
            ids = pf.ids[:, :T]
            pf.inputs = model.attention_inputs(ids, torch.arange(T, device=ids.device)[None], T, pf.state,
                                               prefix_len=self.cache.prefix_len)
            pf.hidden, pf.layer = model.embed(ids, pf.inputs[0]), 0
        stop = min(L, pf.layer + max(1, chunk * L // T))
        rope, mask, cpos = pf.inputs
        with self._adapters([seq]):
            pf.hidden = model.blocks(pf.hidden, rope, mask, self.cache, cpos, T, seq.slot, pf.layer, stop)
            pf.layer = stop
            if stop < L:
                return None
            pf.next = seq.pos = T
            x, pf.hidden, pf.inputs = pf.hidden, None, None
            return model.head(x[:, -1:])[0, -1] if T == pf.ids.shape[1] else None
