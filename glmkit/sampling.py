"""Sampling: pure functions over logits [..., V]. Order as in transformers' generate (which the official chat()
uses): sanitise -> logit bias -> repetition / presence / frequency penalties -> temperature -> top-k -> top-p -> sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 (anything below 1e-5) -> greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 -> off
    repetition_penalty: float = 1.0   # transformers' (>1 discourages tokens already in prompt or answer)
    presence_penalty: float = 0.0     # OpenAI's (subtracted once per token present in the answer)
    frequency_penalty: float = 0.0    # OpenAI's (subtracted per occurrence in the answer)
    max_new_tokens: Optional[int] = None   # None -> until a stop id or the context is full
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)   # text stops, applied where tokens become text
    logit_bias: Mapping[int, float] = field(default_factory=dict)   # OpenAI's: token id -> added to its logit

    def validate(self) -> "SamplingParams":
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not -(1 << 63) <= int(self.seed) < (1 << 64):
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        bias = {}
        for k, v in dict(self.logit_bias or {}).items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {k!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ValueError(f"logit_bias values must be numbers from -100 to 100, got {v!r} for token {k}")
            bias[k] = float(v)
        self.logit_bias = bias
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits: NaN -> -inf (never chosen), +inf -> 1e30 (that token wins; still finite after dividing
    by any temperature >= 1e-5), so softmax and multinomial never see NaN."""
    return torch.nan_to_num(logits, nan=float("-inf"), posinf=1e30, neginf=float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' rule for every token already seen (seen: bool [..., V]): logit < 0 -> logit * penalty,
    else logit / penalty."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def seen_mask(ids: Sequence[int], vocab: int) -> torch.Tensor:
    m = torch.zeros(vocab, dtype=torch.bool)
    if len(ids):
        m[torch.as_tensor(list(ids), dtype=torch.long)] = True
    return m


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's rule: logit -= count * frequency + (count > 0) * presence. counts [..., V]."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: bias[id] added to that token's logit (ids beyond the vocabulary are ignored; the
    server refuses them before they get here)."""
    V = logits.shape[-1]
    items = [(i, b) for i, b in bias.items() if i < V]
    if not items:
        return logits
    ids = torch.tensor([i for i, _ in items], device=logits.device)
    vals = torch.tensor([b for _, b in items], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out[..., ids] += vals
    return out


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits if t in (0, 1.0) else logits / t


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability first exceeds 1 - (1 - p) from below:
    as transformers' TopPLogitsWarper, drop tokens while the mass of the less likely ones is <= 1 - p."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = False                     # always keep the most likely token
    return logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def process(logits: torch.Tensor, params: SamplingParams, seen: Optional[torch.Tensor] = None,
            counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All logit processing of one step: [..., V] logits -> float processed logits (-inf = never chosen).
    seen: bool [..., V] tokens of prompt and answer (repetition penalty); counts [..., V] of the answer."""
    x = sanitize(logits.float())
    if params.logit_bias:
        x = apply_logit_bias(x, params.logit_bias)
    if seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if counts is not None:
        x = apply_presence_frequency(x, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return x
    x = apply_temperature(x, params.temperature)
    x = top_k_filter(x, params.top_k)
    return top_p_filter(x, params.top_p)


def probabilities(logits: torch.Tensor, params: SamplingParams, seen=None, counts=None) -> torch.Tensor:
    """The distribution the next token is drawn from (one-hot for greedy)."""
    x = process(logits, params, seen, counts)
    if params.greedy:
        return torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float()
    return torch.softmax(x, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None,
           fallback: int = 0) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. A row with no finite logit at all yields `fallback` (end of answer)."""
    x = process(logits, params, seen, counts)
    finite = torch.isfinite(x).any(-1)
    if params.greedy:
        tok = x.argmax(-1)
    else:
        probs = torch.softmax(x, dim=-1)
        probs = torch.where(finite[:, None], probs, torch.ones_like(probs))
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return torch.where(finite, tok, torch.full_like(tok, fallback))
