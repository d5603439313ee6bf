"""Multiple-choice scoring (GLM's cloze NLU): every choice packed after one context in a single forward.

As GLM's build_inputs_for_multiple_choice lays them out: the context, then for each choice a block
`<sop> choice[:-1]` whose logits predict `choice`; each block sees the whole context and itself causally, never
another choice. Positions:

    blank-filling GLMs (original GLM, ChatGLM-6B; 2D positions): every block token at the mask's position,
                    block positions 1, 2, ... (the context: 0..L-1 and block position 0)
    causal GLMs (ChatGLM2/3, GLM-4): each block continues the prompt's positions L, L+1, ... (the choice is
                    scored as the answer to the prompt; the block starts with the choice's first token
                    predicted by the prompt's last position, so no <sop> is inserted)

A choice's score is the summed log-probability of its tokens (optionally divided by their number).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .model import GLM


class Packed(NamedTuple):
    ids: torch.Tensor              # [1, T]
    position_ids: torch.Tensor     # [1, 2, T] (2D models) or [1, T]
    mask: torch.Tensor             # [1, 1, T, T] bool, True = visible
    rows: list                     # per choice: the positions whose logits predict its tokens
    targets: list                  # per choice: its token ids


def pack(ctx: Sequence[int], choices: Sequence[Sequence[int]], sop: int, mask_pos: int, two_d: bool) -> Packed:
    """ctx ids (for 2D models: [CLS] ... <eos> without <sop>; for causal ones the whole prompt) and each choice's
    ids -> the packed forward. mask_pos: the index positions of the blocks point to (2D models)."""
    L = len(ctx)
    if not choices:
        raise ValueError("no choices to score")
    ids, pos, block = list(ctx), list(range(L)), [0] * L
    spans, rows, targets = [], [], []
    for j, ch in enumerate(choices):
        ch = list(ch)
        if not ch:
            raise ValueError(f"choice {j} encodes to no tokens")
        start = len(ids)
        if two_d:
            ids += [sop] + ch[:-1]
            pos += [mask_pos] * len(ch)
            block += list(range(1, len(ch) + 1))
            rows.append(list(range(start, start + len(ch))))
        else:
            ids += ch[:-1]
            pos += list(range(L, L + len(ch) - 1))
            rows.append([L - 1] + list(range(start, start + len(ch) - 1)))
        spans.append((start, len(ids)))
        targets.append(ch)
    T = len(ids)
    m = torch.zeros(T, T, dtype=torch.bool)
    m[:L, :L] = True if two_d else torch.tril(torch.ones(L, L, dtype=torch.bool))   # the context
    for s, e in spans:                  # a block: all of the context, itself causally
        m[s:e, :L] = True
        m[s:e, s:e] = torch.tril(torch.ones(e - s, e - s, dtype=torch.bool))
    p = torch.tensor([[pos, block]]) if two_d else torch.tensor([pos])
    return Packed(torch.tensor([ids]), p, m[None, None], rows, targets)


@torch.inference_mode()
def score(model: GLM, packed: Packed, length_normalize: bool = False) -> list[float]:
    """One forward over a Packed -> each choice's summed (or mean) log-probability."""
    dev = model.device
    logits = model(packed.ids.to(dev), position_ids=packed.position_ids.to(dev),
                   attention_mask=packed.mask.to(dev))[0].float()
    out = []
    for rows, tg in zip(packed.rows, packed.targets):
        lp = torch.log_softmax(logits[torch.tensor(rows, device=dev)], dim=-1)
        s = float(lp.gather(1, torch.tensor(tg, device=dev)[:, None]).sum())
        out.append(s / len(tg) if length_normalize else s)
    return out
