"""Tensor-parallel layers, swapped into a loaded GLM's module tree (model.py is not aware of them):
a column-parallel layer is the plain layer with fewer output rows (no communication); RowParallel sums the
ranks' partial products (all-reduce) and adds the bias once; VocabEmbedding / VocabHead split the vocabulary.
Each wraps an nn.Linear / nn.Embedding or their quantized forms (quant.py) holding only the rank's slice."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..quant import QuantEmbedding, QuantError, QuantLinear
from . import dist
from .plan import Plan, ShardError


class RowParallel(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b: W_local the rank's input columns, b (replicated) added once."""

    def __init__(self, inner: nn.Module, bias: bool, out_features: int):
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x).contiguous()
        if dist.world_size() > 1:
            dist.all_reduce_(y)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class VocabEmbedding(nn.Module):
    """The rank's rows [lo, hi) of the embedding; other ids give zeros; the ranks' lookups are summed."""

    def __init__(self, inner: nn.Module, lo: int, hi: int):
        super().__init__()
        self.inner, self.lo, self.hi = inner, lo, hi

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.lo
        inside = (local >= 0) & (local < self.hi - self.lo)
        y = self.inner(local.clamp(0, self.hi - self.lo - 1))
        y = y.masked_fill(~inside.unsqueeze(-1), 0).contiguous()
        if dist.world_size() > 1:
            dist.all_reduce_(y)
        return y


class VocabHead(nn.Module):
    """Logits of the rank's vocabulary rows, gathered from every rank into the full [..., V]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return dist.all_gather_last(y) if dist.world_size() > 1 else y


def _linear_like(mod: nn.Module, name: str, in_f: int, out_f: int, bias: bool) -> nn.Module:
    if type(mod) is nn.Linear:
        return nn.Linear(in_f, out_f, bias=bias, device="meta")
    if type(mod) is QuantLinear:
        try:
            return QuantLinear(in_f, out_f, bias, mod.bits, mod.group, device="meta")
        except QuantError:
            raise ShardError(f"{name}: a rank's {in_f} input columns are not whole quantization groups of "
                             f"{mod.group} (int{mod.bits}); use a smaller --tp or a smaller --group-size") from None
    raise ShardError(f"{name} is a {type(mod).__name__}: tensor parallelism splits nn.Linear and QuantLinear "
                     "layers only (no adapters)")


def _embedding_like(mod: nn.Module, name: str, rows: int) -> nn.Module:
    if type(mod) is nn.Embedding:
        return nn.Embedding(rows, mod.embedding_dim, device="meta")
    if type(mod) is QuantEmbedding:
        return QuantEmbedding(rows, mod.embedding_dim, mod.bits, mod.group, mod.out_dtype, device="meta")
    raise ShardError(f"{name} is a {type(mod).__name__}, not an embedding tensor parallelism can split")


def shard_modules(model: nn.Module, plan: Plan) -> None:
    """Swap the modules of a GLM on the meta device (float or quant_skeleton'd) for the rank's local ones,
    by the plan's rules; every layer holding a weight must have a rule."""
    covered = set()
    for name, mod in list(model.named_modules()):
        if not name or any(name == c or name.startswith(c + ".") for c in covered):
            continue
        shard, kind = plan.shard_of(name + ".weight")
        if kind == "replicated":
            if isinstance(mod, (nn.Linear, nn.Embedding, QuantLinear, QuantEmbedding)):
                raise ShardError(f"no tensor-parallel rule for layer {name} ({type(mod).__name__})")
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        has_bias = getattr(mod, "bias", None) is not None
        if kind == "column":
            new = _linear_like(mod, name, mod.in_features, shard.size, has_bias)
        elif kind == "row":
            new = RowParallel(_linear_like(mod, name, shard.size, mod.out_features, False), has_bias,
                              mod.out_features)
        elif kind == "vocab" and leaf == "output":
            new = VocabHead(_linear_like(mod, name, mod.in_features, shard.size, has_bias))
        else:
            new = VocabEmbedding(_embedding_like(mod, name, shard.size), *plan.vocab)
        setattr(parent, leaf, new)
        covered.add(name)


def locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Our (global) parameter/buffer name -> (the local module holding it, attribute)."""
    path, _, leaf = name.rpartition(".")
    mod = model.get_submodule(path)
    if isinstance(mod, RowParallel) and leaf == "bias":
        return mod, leaf
    if isinstance(mod, (RowParallel, VocabEmbedding, VocabHead)):
        return mod.inner, leaf
    return mod, leaf
