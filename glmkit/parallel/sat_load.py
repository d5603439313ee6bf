"""Tensor-parallel loading straight from GLM-130B's SAT folder (sat_checkpoint.py): each rank reads only the
mp_rank_XX shards that hold its slices and joins them by tools/convert_tp.py's rules.

SAT's split is the tensor-parallel plan's (plan.py): shard s of S holds heads s*H/S.. of the per-head QKV
rows, rows s*F/S.. of each GeGLU half ([a_s; b_s]), input columns s*(H*D)/S.. / s*F/S.. of the row-parallel
weights and vocabulary rows s*V/S..; norms and the row-parallel biases whole. So at TP N:

    S % N == 0   rank r reads shards r*S/N .. (r+1)*S/N - 1 and joins them (GeGLU halves regrouped)
    N % S == 0   rank r reads shard r // (N/S) and keeps its (r % (N/S))-th piece of every split tensor
    otherwise    refused (re-split the checkpoint with tools/convert_tp.py, or pick such an N)

Either way no rank builds a whole tensor it does not hold: the shards are memory-mapped and copied into the
local layers a ~64 MB row slice at a time (sat_checkpoint.Joined), the read pages dropped."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..checkpoint import IGNORED_KEYS, LoadInfo, _reverse_map
from ..model import GLM
from ..sat_checkpoint import (Joined, SATError, _bits_of, _load_shard, fill_and_tie, loaded_model, open_sat,
                              quant_setup, tp_rule)
from .layers import locate
from .load import localize
from .plan import make_plan


def rank_shards(sat_degree: int, rank: int, world: int) -> tuple[list[int], int, int]:
    """(the SAT shards rank reads, m, j): the rank keeps piece j of m of what those shards join into."""
    if sat_degree % world == 0:
        k = sat_degree // world
        return list(range(rank * k, (rank + 1) * k)), 1, 0
    if world % sat_degree == 0:
        m = world // sat_degree
        return [rank // m], m, rank % m
    raise SATError(f"a SAT checkpoint split {sat_degree} ways loads at a --tp that divides {sat_degree} or that "
                   f"{sat_degree} divides, not {world} (re-split it with GLM-130B's tools/convert_tp.py)")


def _local_parts(sds: list[dict], key: str, m: int, j: int) -> tuple[list[torch.Tensor], str]:
    """The rank's parts of one SAT tensor and the rule that joins them (views: nothing copied)."""
    rule = tp_rule(key)
    if m == 1 or rule == "replicate":
        return [sd[key] for sd in sds], rule
    t = sds[0][key]
    if rule == "glu":                          # [a_s; b_s] -> [a_s piece j; b_s piece j], joined along rows
        a, b = t.chunk(2, dim=0)
        return [a.chunk(m, dim=0)[j], b.chunk(m, dim=0)[j]], "dim0"
    dim = 1 if rule == "dim1" else 0
    if t.shape[dim] % m:
        raise SATError(f"tensor {key} ({tuple(t.shape)}) does not split {m} ways along dim {dim}")
    return [t.chunk(m, dim=dim)[j]], rule


def _join_local(model: GLM, plan, sds: list[dict], files: list[Path], bits: int, m: int, j: int, mapped: bool):
    """our name -> Joined of the rank's parts, checked against the plan's local shapes; and unexpected keys."""
    rev = _reverse_map("sat", model)
    params = dict(model.named_parameters())
    joined = {}
    for key, (ours, _, _) in rev.items():
        for sd, f in zip(sds, files):
            if key not in sd:
                raise SATError(f"{f} is missing tensor {key}")
        parts, rule = _local_parts(sds, key, m, j)
        scales = _local_parts(sds, key + "_scale", m, j)[0] if key + "_scale" in sds[0] else None
        jt = Joined(key, parts, rule, scales, bits if scales else 0, mapped)
        full = tuple(params[ours].shape)
        shard, _ = plan.shard_of(ours)
        want = full if shard.dim is None else full[:shard.dim] + (shard.size,) + full[shard.dim + 1:]
        if jt.shape != want:
            raise SATError(f"tensor {key} of {', '.join(f.name for f in files)} gives rank {plan.rank} of "
                           f"{plan.world} the shape {jt.shape}, expected {want} for these SAT arguments")
        joined[ours] = jt
    unexpected = [k for k in sds[0] if k not in rev and not k.endswith("_scale")
                  and not any(rx.search(k) for rx in IGNORED_KEYS)]
    return joined, unexpected


def load_sharded_sat(path, rank: int, world: int, dtype=None, device: str = "cpu",
                     quantize=None) -> tuple[GLM, LoadInfo]:
    """Rank `rank` of a tensor-parallel group of `world`: its part of the GLM-130B SAT checkpoint in `path`
    (float, glmkit's quantization while loading, or GLM-130B's own INT8/INT4 shards), reading only its shards."""
    t0 = time.perf_counter()
    path = Path(path)
    files, args, cfg = open_sat(path)
    plan = make_plan(cfg, rank, world)
    mine, m, j = rank_shards(len(files), rank, world)
    files = [files[s] for s in mine]
    loaded = [_load_shard(f) for f in files]
    sds, mapped = [sd for sd, _ in loaded], all(mp for _, mp in loaded)
    bits = _bits_of(sds, args, cfg.hidden_size, files[0])
    with torch.device("meta"):
        model = GLM(cfg)
    joined, unexpected = _join_local(model, plan, sds, files, bits, m, j, mapped)
    spec, dt = quant_setup(model, cfg, joined, bits, quantize, dtype, device, path)
    localize(model, cfg, plan)
    fill_and_tie(model, joined, spec, dt, device, model.output.inner, model.tok_embeddings.inner, locate=locate)
    del joined, sds, loaded
    return loaded_model(model, spec, device, LoadInfo(path=path, layout="sat", files=files, unexpected=unexpected),
                        t0)
