"""Beam search as GLM-130B's BeamSearchStrategy (generation/strategies.py) runs it, over any step function.

    beam_search(step, prompt, max_new_tokens, BeamParams(num_beams=4, ...)) -> [Beam(tokens, score), ...]

`step(parents, tokens)` is the model: called first with (None, None) it returns the logits [1, V] after the
prompt; then with, for each of the n live beams, the row of the previous call it continues (`parents`: the
caller reorders its KV cache rows) and the token it appends, it returns the logits [n, V] after them.
beam_search knows no model, cache or tokenizer, so it serves every model; CachedStep below is that step for a
GLM with a KV cache of num_beams rows (what Pipeline.beam_search and `glmkit generate --beams N` use).

GLM-130B's rules: each step takes the (number of end tokens + 1) x num_beams best continuations of all beams
by summed log-probability, best first; a continuation ending in an end token becomes a finished beam (scored
score / ((5 + length) / 6) ** length_penalty, length = prompt + generated tokens, OpenNMT's penalty), the
others fill the num_beams live beams. End tokens are banned for the first min_gen_length steps; with
no_repeat_ngram_size n, a token that would repeat an n-gram of the beam's own sequence (prompt included) is
banned. Search stops when num_beams beams have finished and none of the live ones can beat the worst of
them, or after max_new_tokens; then the live beams count as finished (consider_end=True, as generate.py
uses it). BeamSearchStrategy draws its candidates by multinomial sampling unless `deterministic`; here
the candidates are the top ones unless sample=True.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..model import SeqState
from .cache import KVCache

BANNED = -65504.0           # what GLM-130B writes into banned logits (the fp16 minimum)


@dataclass
class BeamParams:
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_gen_length: int = 0
    end_tokens: Sequence[int] = field(default_factory=tuple)
    sample: bool = False                 # GLM-130B's default (deterministic=False): candidates by multinomial

    def validate(self) -> "BeamParams":
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0 or self.min_gen_length < 0:
            raise ValueError("no_repeat_ngram_size and min_gen_length must be >= 0")
        return self


@dataclass
class Beam:
    tokens: list                         # generated tokens, without the end token
    score: float                         # length-penalised summed log-probability
    ended: bool                          # finished with an end token (else cut at max_new_tokens)


def _penalised(score: float, length: int, lp: float) -> float:
    return score / ((5.0 + length) / 6) ** lp


def _ban(x: torch.Tensor, seqs: list, bans: list, p: BeamParams, t: int) -> torch.Tensor:
    if p.min_gen_length > t:
        for e in p.end_tokens:
            x[:, e] = BANNED
    n = p.no_repeat_ngram_size
    if n > 0 and len(seqs[0]) > n:
        for i, s in enumerate(seqs):
            for tok in bans[i].get(tuple(s[len(s) - (n - 1):]), ()):
                x[i, tok] = BANNED
    return x


def beam_search(step: Callable, prompt: Sequence[int], max_new_tokens: int, params: BeamParams,
                generator: Optional[torch.Generator] = None) -> list[Beam]:
    """-> up to num_beams Beams, best first (see the module docstring)."""
    p = params.validate()
    nb, ends, n = p.num_beams, set(int(e) for e in p.end_tokens), p.no_repeat_ngram_size
    seqs, bans = [list(prompt)], [{}]
    scores = torch.zeros(1)
    finished: list[tuple[float, list, bool]] = []          # (penalised score, sequence, ended), best first

    def finish(score: float, seq: list, ended: bool):
        s = _penalised(score, len(seq), p.length_penalty)
        i = len(finished)
        while i > 0 and s >= finished[i - 1][0]:
            i -= 1
        finished.insert(i, (s, seq, ended))
        del finished[nb:]

    logits = step(None, None)
    done = False
    for t in range(max_new_tokens):
        x = _ban(logits.float().clone(), seqs, bans, p, t)
        total = F.log_softmax(x, dim=-1) + scores[:, None]
        V = total.shape[-1]
        flat = total.reshape(-1)
        k = min((max(1, len(ends)) + 1) * nb, flat.numel())
        if p.sample:
            idx = torch.multinomial(flat.softmax(-1), k, generator=generator)
        else:
            idx = torch.topk(flat, k).indices
        cand = flat[idx]
        cand, order = torch.sort(cand, descending=True)
        idx = idx[order]
        new_seqs, new_scores, new_bans, parents, toks = [], [], [], [], []
        for j, sc in zip(idx.tolist(), cand.tolist()):
            parent, tok = divmod(j, V)
            beam = seqs[parent] + [tok]
            if tok in ends:
                finish(sc, beam, True)
            elif len(new_seqs) < nb:
                new_seqs.append(beam)
                new_scores.append(sc)
                parents.append(parent)
                toks.append(tok)
                if n > 0:
                    b = dict(bans[parent])
                    key = tuple(seqs[parent][len(seqs[parent]) - (n - 1):])
                    b[key] = b.get(key, ()) + (tok,)
                    new_bans.append(b)
            else:
                break
        seq_len = len(seqs[0])
        if not new_seqs:
            done = True
            break
        seqs, scores, bans = new_seqs, torch.tensor(new_scores), (new_bans if n > 0 else [{}] * len(new_seqs))
        if len(finished) == nb and finished[-1][0] >= _penalised(float(scores.max()), seq_len + 1,
                                                                  p.length_penalty):
            done = True
            break
        if t + 1 < max_new_tokens:
            logits = step(parents, toks)
    if not done:
        for sc, s in zip(scores.tolist(), seqs):
            finish(sc, s, False)
    L = len(prompt)
    return [Beam(s[L:len(s) - 1] if ended else s[L:], score, ended) for score, s, ended in finished]


class CachedStep:
    """The step function of beam_search for a GLM: the prompt read once into cache row 0 (with its SeqState:
    ChatGLM-6B / GLM-130B positions and bidirectional context), then each step's rows gathered from their
    parents' rows and one token each decoded at the next position."""

    def __init__(self, model, prompt: Sequence[int], num_beams: int, max_new_tokens: int,
                 state: Optional[SeqState] = None):
        self.model, self.prompt = model, list(prompt)
        n = len(self.prompt)
        self.cache = KVCache.for_model(model, slots=num_beams, max_seq=min(model.config.max_seq_len,
                                                                            n + max_new_tokens + 1))
        dev = model.device
        ids = torch.tensor([self.prompt], device=dev)
        self.state = (model.sequence_state(ids) if state is None
                      else SeqState(*(t.to(dev) for t in state)))
        self.pos = n

    @torch.inference_mode()
    def __call__(self, parents, tokens) -> torch.Tensor:
        m, dev, n = self.model, self.model.device, len(self.prompt)
        if parents is None:
            ids = torch.tensor([self.prompt], device=dev)
            logits = m(ids, self.cache, cache_pos=torch.arange(n, device=dev)[None], kv_len=n, state=self.state,
                       last_only=True)
            return logits[:, -1]
        B, P = len(parents), self.cache.prefix_len + self.pos
        idx = torch.tensor(parents, device=dev)
        for k, v in zip(self.cache.k, self.cache.v):
            k[:B, :, :P] = k[idx, :, :P]
            v[:B, :, :P] = v[idx, :, :P]
        state = SeqState(self.state.ctx_len.expand(B), self.state.mask_pos.expand(B))
        logits = m(torch.tensor(tokens, device=dev)[:, None], self.cache,
                   cache_pos=torch.full((B, 1), self.pos, device=dev), kv_len=self.pos + 1, state=state)
        self.pos += 1
        return logits[:, -1]
