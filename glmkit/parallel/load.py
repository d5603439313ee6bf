"""Loading a checkpoint shard by shard: each tensor-parallel rank reads only its slices of each tensor from
the memory-mapped files (safetensors through checkpoint.SafetensorsFile, pickled shards through
torch.load(mmap=True)), copies or quantizes them ~64 MB at a time, and drops the mapped pages it read. No
rank ever holds the whole model: peak memory is the rank's part plus what one file's read pages cost until
they are dropped (a pickled shard's pages go when the shard is closed)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import quant
from ..checkpoint import (IGNORED_KEYS, CheckpointError, LoadInfo, _part_rows, _reverse_map, iter_tensors, layout_of,
                          read_model_config, resolve_dtype, weight_files)
from ..model import GLM
from .layers import locate, shard_modules
from .plan import Shard, make_plan

CHUNK_BYTES = 64 << 20


def _pieces(shard: Shard, src: torch.Tensor, p0: int) -> list[tuple[torch.Tensor, int, int]]:
    """(view of src, first local row, first local column) for every piece of src (rows p0.. of the full
    tensor along dim 0: a part of a concatenated parameter, else p0 = 0) that this rank holds."""
    n = src.shape[0]
    if shard.dim is None:
        return [(src, p0, 0)]
    out, o = [], 0
    for a, b in shard.ranges:
        if shard.dim == 0:
            x, y = max(a, p0), min(b, p0 + n)
            if x < y:
                out.append((src[x - p0:y - p0], o + x - a, 0))
        else:
            out.append((src[:, a:b], p0, o))
        o += b - a
    return out


def _chunks(view: torch.Tensor):
    """Row slices of a view of ~CHUNK_BYTES each."""
    row = (view[0].numel() if view.dim() > 1 else 1) * view.element_size()
    step = max(1, CHUNK_BYTES // max(1, row)) if view.dim() > 1 else max(1, CHUNK_BYTES // view.element_size())
    for r in range(0, view.shape[0], step):
        yield r, view[r:r + step]


def _drop(release, base: torch.Tensor, chunk: torch.Tensor):
    """Drop the mapped pages under a chunk (a view of base) once it is copied."""
    if chunk.numel() == 0:
        return
    lo = (chunk.data_ptr() - base.data_ptr())
    span = ((chunk.shape[0] - 1) * chunk.stride(0) + (chunk[0].numel() if chunk.dim() > 1 else 1)) \
        * chunk.element_size()
    release(lo, lo + span)


def _quant_shard(shard: Shard, leaf: str, mod) -> Shard:
    """A float weight's shard in the units of a quantized buffer (qweight bytes, scale columns)."""
    if shard.dim != 1 or leaf not in ("qweight", "scales"):
        return shard
    if any(a % mod.group or b % mod.group for a, b in shard.ranges):
        raise CheckpointError(f"a rank's input columns {shard.ranges} are not whole groups of {mod.group}")
    return shard.scaled(1, mod.group) if leaf == "scales" else shard.scaled(1, 2 if mod.bits == 4 else 1)


def localize(model: GLM, cfg, plan) -> None:
    """Swap the meta model's layers for the rank's local ones and give it the local head counts."""
    shard_modules(model, plan)
    local = cfg.replace(num_heads=plan.heads, num_kv_heads=plan.kv_heads)
    local.extra = {**cfg.extra, "tensor_parallel": {"rank": plan.rank, "world": plan.world,
                                                    "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads}}
    model.config = local
    for layer in model.layers:
        layer.attn.cfg = local
    model.tp = plan


def load_sharded(path, rank: int, world: int, dtype=None, device: str = "cpu", family: Optional[str] = None,
                 progress: bool = False, quantize=None) -> tuple[GLM, LoadInfo]:
    """This rank's part of the model in `path` for a tensor-parallel group of `world` (glmkit/parallel/plan.py):
    a GLM whose layers hold only the rank's slices (layers.py), reading only those slices from the files.
    quantize as checkpoint.load_model (quantized slice by slice while loading; a quantized folder is split
    along its blocks). plan.ShardError when the model's sizes do not divide by `world`."""
    t0 = time.perf_counter()
    path = Path(path)
    from ..sat_checkpoint import is_sat_dir
    if is_sat_dir(path):                    # GLM-130B's SAT folder: each rank reads only its mp_rank shards
        from .sat_load import load_sharded_sat
        return load_sharded_sat(path, rank, world, dtype=dtype, device=device, quantize=quantize)
    cfg, cfg_dict, spec, pre = read_model_config(path, family, quantize)
    layout, files = layout_of(cfg_dict), weight_files(path)
    if spec is not None:
        dt = resolve_dtype(dtype or ("float16" if torch.device(device).type != "cpu" else "float32"), cfg, device)
        cfg.quantization = spec.to_dict()
    else:
        dt = resolve_dtype(dtype, cfg, device)
    plan = make_plan(cfg, rank, world)
    with torch.device("meta"):
        model = GLM(cfg)
    tied = cfg.tie_word_embeddings
    if pre:
        quant.quant_skeleton(model, spec, act_dtype=dt)
        shapes = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
        rev = {n: (n, 0, 1) for n in shapes}
    else:
        shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
        rev = _reverse_map(layout, model)
        if spec is not None:
            quant.quant_skeleton(model, spec, act_dtype=dt)
    if tied:
        rev = {k: v for k, v in rev.items() if v[0] != "output.weight"}
    localize(model, cfg, plan)

    filled: dict[str, set] = {}
    info = LoadInfo(path=path, layout=layout, files=files)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rev), unit="tensor", desc=f"loading {path.name} (rank {rank}/{world})", leave=False,
                   file=sys.stderr)
    with torch.no_grad():
        for name, src, fpath, release in iter_tensors(files):
            if name not in rev:
                if not any(rx.search(name) for rx in IGNORED_KEYS):
                    info.unexpected.append(name)
                continue
            ours, part, n_parts = rev[name]
            rows = _part_rows(cfg, ours, n_parts)
            want = (rows[part],) + shapes[ours][1:] if n_parts > 1 else shapes[ours]
            if tuple(src.shape) != want:
                raise CheckpointError(f"tensor {name} in {fpath.name} has shape {tuple(src.shape)}, expected "
                                      f"{want} for this config.json")
            _fill(model, ours, src, release, sum(rows[:part]) if n_parts > 1 else 0, plan, shapes, filled,
                  quantizing=spec is not None and not pre, prequantized=pre, dt=dt, device=device, tied=tied)
            filled.setdefault(ours, set()).add(part)
            release()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    missing = [k for k, (ours, part, _) in rev.items() if part not in filled.get(ours, ())]
    if missing:
        raise CheckpointError(f"{path} is missing tensor {missing[0]}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if tied and not isinstance(model.output.inner, quant.QuantLinear):
        model.output.inner.weight = model.tok_embeddings.inner.weight
    if spec is not None and device != "cpu":
        model.to(device)
    model.eval()
    info.seconds = time.perf_counter() - t0
    return model, info


def _fill(model, ours: str, src: torch.Tensor, release, p0: int, plan, shapes, filled, *, quantizing: bool,
          prequantized: bool, dt, device, tied: bool):
    """Copy (or quantize) this rank's pieces of one checkpoint tensor into its local parameter/buffer."""
    shard, kind = plan.shard_of(ours)
    mod, leaf = locate(model, ours)
    is_q = isinstance(mod, (quant.QuantLinear, quant.QuantEmbedding))
    if is_q and prequantized:
        shard = _quant_shard(shard, leaf, mod)
    if quantizing and is_q and leaf == "weight":
        targets = [mod]
        if tied and ours == "tok_embeddings.weight" and isinstance(model.output.inner, quant.QuantLinear):
            targets.append(model.output.inner)
        if ours not in filled:
            for t in targets:
                t.alloc_weight()
        for view, r0, c0 in _pieces(shard, src, p0):
            for r, chunk in _chunks(view):
                for t in targets:
                    t.set_rows(r0 + r, chunk.contiguous())
                _drop(release, src, chunk)
        return
    if ours not in filled:
        full = shapes[ours]
        lshape = full if shard.dim is None else full[:shard.dim] + (shard.size,) + full[shard.dim + 1:]
        if leaf in mod._parameters:
            setattr(mod, leaf, nn.Parameter(torch.empty(lshape, dtype=dt, device=device), requires_grad=False))
        else:                                   # a buffer: a quantized layer's qweight/scales, or its fp32 bias
            bdt = src.dtype if prequantized and leaf != "bias" else torch.float32
            if prequantized and src.dtype != getattr(mod, leaf).dtype:
                raise CheckpointError(f"tensor {ours} is {src.dtype}, expected {getattr(mod, leaf).dtype} for "
                                      "this quantization")
            setattr(mod, leaf, torch.empty(lshape, dtype=bdt, device=device))
    dst = getattr(mod, leaf)
    for view, r0, c0 in _pieces(shard, src, p0):
        for r, chunk in _chunks(view):
            d = dst[r0 + r:r0 + r + chunk.shape[0]]
            if chunk.dim() > 1:
                d = d[:, c0:c0 + chunk.shape[1]]
            d.copy_(chunk)
            _drop(release, src, chunk)
