"""One sequence being generated, as the engine sees it: ids in, ids out, never text.

Sequence holds what the caller asked for (prompt ids, sampling parameters, stop ids, an optional grammar
constraint, logprobs, a deadline) and what the engine keeps while it runs (its cache slot, how much of the
prompt is prefilled, how much came from the prefix cache, its sampler state, its statistics). Results go out
through `emit(event)`, called on the engine's thread:
    ("token", id, logprob)   logprob: None, or (chosen logprob, [(id, logprob), ...] top alternatives)
    ("done", finish_reason)  stop | length | cancelled  (stats are final)
    ("error", message)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence as Seq

import torch

from ..model import SeqState
from ..sampling import SamplingParams, sample


class ContextOverflow(ValueError):
    pass


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0            # prompt tokens whose keys/values came from a cache (usage: cached_tokens)
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

    def __init__(self, params: SamplingParams, prompt: Seq[int], vocab: int, device):
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
        """Greedy with no penalties or logit bias: the token is the argmax of the logits alone."""
        return self.params.greedy and self.seen is None and self.counts is None and not self.params.logit_bias

    def sample(self, logits: torch.Tensor, fallback: int) -> int:
        """logits [V] or [1, V] -> the next token id."""
        return int(sample(logits.reshape(1, -1), self.params, self.gen, self.seen, self.counts,
                          fallback=fallback)[0])

    def observe(self, tok: int):
        if self.seen is not None:
            self.seen[0, tok] = True
        if self.counts is not None:
            self.counts[0, tok] += 1


class Sequence:
    """One generation request. Thread-safe from outside: cancel(); everything else belongs to the engine."""

    def __init__(self, prompt_ids: Seq[int], params: SamplingParams, stop_ids: Seq[int] = (),
                 emit: Optional[Callable[[tuple], None]] = None, *, state: Optional[SeqState] = None,
                 constraint=None, logprobs: Optional[int] = None, deadline: Optional[float] = None,
                 adapter: Optional[str] = None):
        self.prompt = [int(i) for i in prompt_ids]
        if not self.prompt:
            raise ValueError("empty prompt")
        self.params = params.validate()
        self.stop_ids = tuple(dict.fromkeys(int(i) for i in stop_ids))   # in order, without repeats
        self.emit = emit or (lambda ev: None)
        self.state = state                    # the prompt's SeqState where it is not the derived one (infill)
        self.constraint = constraint          # .mask_logits(logits [V]) -> [V] and .advance(id), or None
        self.logprobs = logprobs              # None: off; k >= 0: the chosen token's and k alternatives
        self.deadline = deadline              # time.monotonic() after which the answer ends ("length")
        self.adapter = adapter                # a LoRA adapter of the model by name; None: the model as loaded
        self.cancelled = False
        self.stats = GenerationStats(prompt_tokens=len(self.prompt), t_start=time.perf_counter())
        # the engine's
        self.ids = list(self.prompt)          # prompt + the answer so far
        self.slot: Optional[int] = None
        self.pos = 0                          # positions [0, pos) of the slot hold this sequence's keys/values
        self.prefill = None                   # engine/step.py's Prefill while the prompt is being read
        self.next_tok = 0                     # the token the next decode step feeds (at position pos)
        self.sampler: Optional[SamplerState] = None
        self.limit = 0                        # most answer tokens (max_new_tokens, the context left)
        self.finished: Optional[str] = None

    def cancel(self):
        """Thread-safe: the engine stops the sequence and frees its slot at its next step."""
        self.cancelled = True

    @property
    def decoding(self) -> bool:
        return self.slot is not None and self.prefill is None and self.finished is None

    def fallback_token(self, eos_id: Optional[int]) -> int:
        """The token a step with no finite logit yields: an end of the answer (the model's eos when it is one of
        the stop ids, else the first stop id), so the sequence ends instead of emitting garbage."""
        if eos_id is not None and (eos_id in self.stop_ids or not self.stop_ids):
            return eos_id
        return self.stop_ids[0] if self.stop_ids else 0
