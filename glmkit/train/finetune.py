"""glmkit finetune: LoRA (also on a frozen INT8/INT4 base), P-tuning v2 and full fine-tuning on chat data, through
the same training loop as pretraining (loop.py: warmup + cosine, gradient accumulation, atomic checkpoints with
exact resume, torchrun DDP, skipped non-finite steps).

    data (finetune_data.py: four formats -> the base's own chat format, loss on assistant turns)
      -> ExampleBatcher (a seeded order per epoch, --mix general data interleaved at --mix-ratio)
      -> Tuned (the base with its adapter: LoRA modules inside it, or P-tuning's prefix encoder beside it)
      -> loop.Trainer -> OUT/adapter (PEFT LoRA or official P-tuning folder) or OUT/model (full)

What is saved loads back in the tools people use: a LoRA as PEFT writes it on the official modeling code (or on
transformers' GlmForCausalLM), a P-tuning prefix as the official ptuning scripts write it; glmkit.load(base,
adapter=OUT/adapter) and `--adapter` read both.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .blank_infilling import IGNORE


# --- the trained module -----------------------------------------------------------------------------------

class Tuned(nn.Module):
    """A GLM and its adapter as one module for the training loop: LoRA lives inside the GLM's layers, P-tuning's
    prefix encoder beside it (its keys/values, with the official dropout 0.1 in training, in front of every
    row). forward(input_ids[, position_ids, attention_mask]) -> logits."""

    def __init__(self, glm: nn.Module, prefix_encoder: Optional[nn.Module] = None, prefix_dropout: float = 0.1):
        super().__init__()
        self.glm, self.prefix_encoder, self.prefix_dropout = glm, prefix_encoder, prefix_dropout

    @property
    def config(self):
        return self.glm.config

    def forward(self, input_ids: torch.Tensor, position_ids=None, attention_mask=None) -> torch.Tensor:
        if self.prefix_encoder is None:
            return self.glm(input_ids, position_ids=position_ids, attention_mask=attention_mask)
        B, T = input_ids.shape
        kv = self.prefix_encoder.prefix_kv(B, dropout=self.prefix_dropout)
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.glm(input_ids, kv, cache_pos=pos, kv_len=T, position_ids=position_ids,
                        attention_mask=attention_mask)


# --- batches of examples ----------------------------------------------------------------------------------

class ExampleBatcher:
    """Rows are examples (input_ids, labels with IGNORE off the trained tokens), one per row, padded to the
    longest of their micro-batch. The order is a seeded permutation per epoch, the cursor (epoch, index) is the
    whole data position (saved in checkpoints); with `mix` examples and ratio r, each row is drawn from `mix`
    with probability r (a seeded coin per row, so resume and every rank see the same rows)."""

    def __init__(self, examples: Sequence, seed: int = 0, shuffle: bool = True, mix: Sequence = (),
                 mix_ratio: float = 0.0):
        if not examples:
            raise ValueError("no training examples")
        if mix_ratio and not mix:
            raise ValueError("--mix-ratio needs --mix data")
        if not 0 <= mix_ratio < 1:
            raise ValueError(f"--mix-ratio must be in [0, 1), got {mix_ratio}")
        self.examples, self.mix, self.mix_ratio = list(examples), list(mix), mix_ratio
        self.seed, self.shuffle = seed, shuffle
        self.pos = {"main": [0, 0], "mix": [0, 0]}              # stream -> [epoch, index]
        self.rows_drawn = 0

    def state(self) -> dict:
        return {"pos": {k: list(v) for k, v in self.pos.items()}, "rows": self.rows_drawn}

    def load_state(self, st: dict):
        self.pos = {k: list(v) for k, v in st["pos"].items()}
        self.rows_drawn = int(st["rows"])

    def _take(self, stream: str):
        data = self.examples if stream == "main" else self.mix
        epoch, index = self.pos[stream]
        if index >= len(data):
            epoch, index = epoch + 1, 0
        order = (np.random.default_rng([self.seed, epoch, stream == "mix"]).permutation(len(data))
                 if self.shuffle else np.arange(len(data)))
        self.pos[stream] = [epoch, index + 1]
        return data[int(order[index])]

    def next_rows(self, n: int) -> list:
        rows = []
        for _ in range(n):
            coin = np.random.default_rng([self.seed, 7, self.rows_drawn]).random() if self.mix_ratio else 1.0
            rows.append(self._take("mix" if coin < self.mix_ratio else "main"))
            self.rows_drawn += 1
        return rows

    @property
    def epoch(self) -> float:
        e, i = self.pos["main"]
        return e + i / len(self.examples)

    @staticmethod
    def collate(rows: list, pad_id: int) -> dict:
        """-> input_ids [B, T] (right-padded with pad_id), targets [B, T]: targets[t] is the label of t + 1."""
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        for r, (ids, labels) in enumerate(rows):
            x[r, :len(ids)] = torch.tensor(ids)
            y[r, :len(ids) - 1] = torch.tensor(labels[1:])
        return {"input_ids": x, "targets": y}

    @staticmethod
    def count(rows: list) -> tuple[int, int]:
        return sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in rows), sum(len(i) for i, _ in rows)
