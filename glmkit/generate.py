"""Token-id streams over the static KV cache: prefill the prompt, then decode one token per step.

Knows ids, not text: stop *strings* are the caller's business (pipeline.py), stop *ids* are handled here.
For causal models (GLM2+) the cache keeps the ids it holds, and a new prompt that shares a prefix with them
(the next turn of a chat) only prefills what is new.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from .fast_decode import FastDecoder, fast_decoder
from .model import GLM, SeqState
from .sampling import SamplingParams, sample


class ContextOverflow(ValueError):
    pass


def default_prefill_chunk(model: GLM) -> int:
    """Prompt tokens per forward. Quantized models take 128: their matrix multiplies run 256 rows at a time in
    the kernels anyway, and the activations of 512 tokens (0.2 GB for ChatGLM3-6B's MLP) would be most of what
    a 4 GB budget leaves after the weights."""
    return 128 if model.config.quantization else 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0            # prompt tokens whose keys/values were already cached
    new_tokens: int = 0
    t_start: float = 0.0
    t_first: float = 0.0              # first new token available
    t_end: float = 0.0
    finish_reason: str = ""           # stop | length | (set by the caller) stop_string, cancelled
    nonfinite_logits: bool = False

    @property
    def ttft(self) -> float:
        return self.t_first - self.t_start if self.t_first else 0.0

    @property
    def decode_tps(self) -> float:
        n = self.new_tokens - 1
        dt = self.t_end - self.t_first
        return n / dt if n > 0 and dt > 0 else 0.0

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.ttft if self.ttft > 0 else 0.0


class SamplerState:
    """What sampling one sequence keeps between steps: its RNG (seed), the tokens seen by prompt and answer
    (repetition penalty) and the answer's token counts (presence/frequency penalties); None where unused."""

    def __init__(self, params: SamplingParams, prompt: Sequence[int], vocab: int, device):
        self.params = params
        self.gen = (torch.Generator(device=device).manual_seed(int(params.seed))
                    if params.seed is not None else None)
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(list(prompt), device=device).clamp_(0, vocab - 1)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(1, vocab, dtype=torch.float32, device=device)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalties: the token is the argmax of the logits alone."""
        return self.params.greedy and self.seen is None and self.counts is None

    def sample(self, logits: torch.Tensor, fallback: int) -> int:
        """logits [V] or [1, V] -> the next token id."""
        return int(sample(logits.reshape(1, -1), self.params, self.gen, self.seen, self.counts,
                          fallback=fallback)[0])

    def observe(self, tok: int):
        if self.seen is not None:
            self.seen[0, tok] = True
        if self.counts is not None:
            self.counts[0, tok] += 1


def prefill(model: GLM, ids: torch.Tensor, state, start: int, chunk: int, row: int = 0,
            cancelled=lambda: False) -> Optional[torch.Tensor]:
    """Run prompt ids [1, T] from position `start` through the model in chunks into cache row `row`
    -> last logits [1, V], or None when `cancelled()` turned true between chunks."""
    T = ids.shape[1]
    logits = None
    for s in range(start, T, chunk):
        if cancelled():
            return None
        e = min(s + chunk, T)
        pos = torch.arange(s, e, device=ids.device)[None]
        logits = model(ids[:, s:e], cache_pos=pos, state=state, kv_len=e, last_only=True, cache_row0=row)[:, -1]
    return logits


class TokenStream:
    """Iterator of generated ids; .stats filled as it runs (finish_reason once exhausted)."""

    def __init__(self, it: Iterator[int], stats: GenerationStats):
        self._it, self.stats = it, stats

    def __iter__(self):
        return self

    def __next__(self) -> int:
        return next(self._it)

    def close(self, reason: Optional[str] = None):
        self._it.close()
        if reason:
            self.stats.finish_reason = reason
        if not self.stats.t_end:
            self.stats.t_end = time.perf_counter()


class Generator:
    """Single-sequence generation with one cache row (terminal chat, Pipeline). The server batches elsewhere."""

    def __init__(self, model: GLM, max_seq: Optional[int] = None, prefill_chunk: Optional[int] = None):
        self.model = model
        cfg = model.config
        self.max_seq = min(max_seq or cfg.max_seq_len, cfg.max_seq_len)
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(model)
        self.cached: list[int] = []               # ids whose keys/values sit in cache row 0, in order
        self._fast: Optional[FastDecoder] = None

    @property
    def device(self):
        return self.model.device

    def _ensure_cache(self):
        m = self.model
        if m.cache_batch < 1 or m.cache_len != self.max_seq:
            m.setup_cache(1, self.max_seq)
            self.cached = []

    def reset(self):
        self.cached = []

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams,
               stop_ids: Iterable[int] = (), state: Optional[SeqState] = None) -> TokenStream:
        """state: the prompt's SeqState where it is not the one model.sequence_state derives (infilling a mask
        other than the first [gMASK]/[MASK]); None derives it."""
        params.validate()
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_seq:
            raise ContextOverflow(f"prompt of {len(prompt)} tokens does not fit the context window of "
                                  f"{self.max_seq} tokens (one position is needed for the answer)")
        stats = GenerationStats(prompt_tokens=len(prompt), t_start=time.perf_counter())
        return TokenStream(self._run(prompt, params, set(int(s) for s in stop_ids), stats, state), stats)

    @torch.inference_mode()
    def _run(self, prompt: list[int], params: SamplingParams, stop_ids: set, stats: GenerationStats,
             state: Optional[SeqState] = None):
        model, dev = self.model, self.device
        cfg = model.config
        self._ensure_cache()
        fast = self._fast = fast_decoder(model, self._fast)
        sampler = SamplerState(params, prompt, cfg.vocab_size, dev)
        fallback = cfg.eos_token_id if cfg.eos_token_id is not None else next(iter(stop_ids), 0)

        ids_t = torch.tensor([prompt], device=dev)
        state = model.sequence_state(ids_t) if state is None else SeqState(*(t.to(dev) for t in state))

        # --- prefill (reusing the cached prefix when the model is causal) ---
        start = 0
        if not cfg.prefix_lm:
            n = 0
            for a, b in zip(self.cached, prompt):
                if a != b:
                    break
                n += 1
            start = min(n, len(prompt) - 1)
        stats.reused_tokens = start
        self.cached = self.cached[:start]
        chunk = len(prompt) if cfg.prefix_lm else self.prefill_chunk   # prefix attention needs all at once
        logits = prefill(model, ids_t, state, start, chunk)
        self.cached = list(prompt)

        limit = self.max_seq - len(prompt)
        if params.max_new_tokens is not None:
            limit = min(limit, params.max_new_tokens)
        pos = len(prompt)
        try:
            for i in range(limit):
                tok = sampler.sample(logits, fallback)
                if not torch.isfinite(logits).all():
                    stats.nonfinite_logits = True
                if i == 0:
                    stats.t_first = time.perf_counter()
                if tok in stop_ids:
                    stats.finish_reason = "stop"
                    return
                stats.new_tokens += 1
                yield tok
                if i == limit - 1:
                    break
                sampler.observe(tok)
                if fast is not None:
                    logits = fast.step([tok], [pos])
                else:
                    logits = model(torch.tensor([[tok]], device=dev), cache_pos=torch.tensor([[pos]], device=dev),
                                   state=state, kv_len=pos + 1)[:, -1]
                self.cached.append(tok)
                pos += 1
            stats.finish_reason = "length"
        finally:
            stats.t_end = time.perf_counter()
