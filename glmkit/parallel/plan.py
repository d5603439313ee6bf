"""Which part of every weight a tensor-parallel rank holds: rules per layout, as data over the model's
parameter names (model.py knows nothing of them).

A Shard says: along `dim` of the full tensor, this rank holds the concatenation of `ranges` (dim None:
replicated). Rules (H query heads, G key/value groups, D head dim, F MLP width, V vocabulary, N ranks,
rank r; Hl = H/N, Fl = F/N, Vl = V/N):

  attn.qkv     column-parallel, per qkv_layout:
                 per_head (ChatGLM-6B, GLM-130B): rows [H, (q, k, v), D] -> heads r*Hl..: one row range
                 grouped  (GLM2+ [q | k | v]):    q rows of heads r*Hl.., k and v rows of the rank's groups:
                          G % N == 0 -> groups r*G/N..; N % G == 0 -> the one group its query heads use
                          (replicated on N/G ranks)
  attn.out     row-parallel: input columns of heads r*Hl..; partial sums all-reduced, bias added once
  mlp.up       column-parallel; gated activations (swiglu, geglu) hold [gate | up]: the rank's rows of each
               half, so the local layer is again [gate_l | up_l]
  mlp.down     row-parallel: input columns r*Fl..; all-reduced, bias added once
  tok_embeddings, output   vocabulary-parallel: rows r*Vl.. (a lookup outside them gives 0, then all-reduce;
               the head's logits are all-gathered)
  norms        replicated

Quantized weights (quant.py, blocks of `group` consecutive inputs per row) split the same way: a row range is
rows of qweight/scales; an input-column range must start and end on a group boundary and becomes the bytes
(int4: 2 values a byte; int8: 1) and scale columns of those groups.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from ..config import ModelConfig

GATED = ("swiglu", "geglu")            # activations whose dense_h_to_4h holds two halves [gate | up]


class ShardError(ValueError):
    """The model cannot be split this many ways (sizes that do not divide), with the reason."""


@dataclass(frozen=True)
class Shard:
    dim: Optional[int]                                  # None: replicated
    ranges: tuple[tuple[int, int], ...] = ()            # along dim, concatenated in this order

    @property
    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def scaled(self, num: int, den: int) -> "Shard":
        """The same ranges in units of num/den (int4 bytes: 1/2; scale columns: 1/group)."""
        return Shard(self.dim, tuple((a * num // den, b * num // den) for a, b in self.ranges))


REPLICATED = Shard(None)


@dataclass(frozen=True)
class Plan:
    """The rank's shards of one model, and its local head counts."""
    rank: int
    world: int
    heads: int                      # query heads on this rank
    kv_heads: int                   # key/value groups on this rank
    vocab: tuple[int, int]          # rows of the vocabulary on this rank
    rules: tuple[tuple[str, Shard, str], ...]   # (regex over our parameter names, shard, kind)

    def shard_of(self, name: str) -> tuple[Shard, str]:
        """-> (Shard, kind) for a parameter/buffer name (kind: column | row | row_bias | vocab | replicated)."""
        base = re.sub(r"\.(weight|bias|qweight|scales)$", "", name)
        leaf = name[len(base) + 1:]
        for rx, shard, kind in self.rules:
            if re.fullmatch(rx, base):
                if kind == "row" and leaf == "bias":        # a row-parallel layer's bias: whole, added once
                    return REPLICATED, "row_bias"
                return shard, kind
        return REPLICATED, "replicated"


def _split(n: int, world: int, what: str) -> int:
    if n % world:
        raise ShardError(f"{what} = {n} is not divisible by --tp {world}")
    return n // world


def make_plan(cfg: ModelConfig, rank: int, world: int) -> Plan:
    """The shard rules of cfg's layout for `rank` of `world`; ShardError when a size does not divide."""
    if not 0 <= rank < world:
        raise ShardError(f"rank {rank} is outside a tensor-parallel group of {world}")
    H, G, D, F, V = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    Hl = _split(H, world, "num_heads (query heads)")
    Fl = _split(F, world, "ffn_hidden_size")
    Vl = _split(V, world, "vocab_size")
    if cfg.qkv_layout == "per_head":
        if G != H:
            raise ShardError(f"a per_head qkv layout with {G} key/value groups for {H} heads is not supported")
        Gl = Hl
        qkv = Shard(0, ((rank * Hl * 3 * D, (rank + 1) * Hl * 3 * D),))
    elif cfg.qkv_layout == "grouped":
        if G % world == 0:
            Gl, g0 = G // world, rank * (G // world)
        elif world % G == 0:
            Gl, g0 = 1, rank * Hl // (H // G)       # the group this rank's query heads share
        else:
            raise ShardError(f"{G} key/value groups (multi_query_group_num) cannot be split over --tp {world}: "
                             f"use a tensor-parallel degree that divides {G} or that {G} divides")
        q0, k0, v0 = 0, H * D, (H + G) * D
        qkv = Shard(0, ((q0 + rank * Hl * D, q0 + (rank + 1) * Hl * D),
                        (k0 + g0 * D, k0 + (g0 + Gl) * D), (v0 + g0 * D, v0 + (g0 + Gl) * D)))
    else:
        raise ShardError(f"no tensor-parallel rule for qkv_layout {cfg.qkv_layout!r}")
    if cfg.activation in GATED:
        up = Shard(0, ((rank * Fl, (rank + 1) * Fl), (F + rank * Fl, F + (rank + 1) * Fl)))
    else:
        up = Shard(0, ((rank * Fl, (rank + 1) * Fl),))
    vocab = Shard(0, ((rank * Vl, (rank + 1) * Vl),))
    rules = (
        (r"layers\.\d+\.attn\.qkv", qkv, "column"),
        (r"layers\.\d+\.attn\.out", Shard(1, ((rank * Hl * D, (rank + 1) * Hl * D),)), "row"),
        (r"layers\.\d+\.mlp\.up", up, "column"),
        (r"layers\.\d+\.mlp\.down", Shard(1, ((rank * Fl, (rank + 1) * Fl),)), "row"),
        (r"tok_embeddings", vocab, "vocab"),
        (r"output", vocab, "vocab"),
        (r"(layers\.\d+\.(attn_norm|ffn_norm)|norm)", REPLICATED, "replicated"),
    )
    return Plan(rank, world, Hl, Gl, (rank * Vl, (rank + 1) * Vl), rules)
