"""GLM-130B's SwissArmyTransformer (SAT) checkpoints, as released: read, join across tensor-parallel shards.

    <dir>/latest                                  the iteration, as text (e.g. "49300"; no newline)
    <dir>/<iteration>/mp_rank_XX_model_states.pt  {"module": state_dict} per tensor-parallel rank (8 released)
    <dir>/model_args.json                         optional: SAT arguments (configs/model_glm_130b.sh names);
                                                  without it the glm-130b preset (the published sizes)

A module of its own because nothing of it is a rename: the folder has no config.json, the tensors are split
across ranks by GLM-130B's tools/convert_tp.py rules (which this module knows both ways, as pure functions
over state dicts: split_tp / merge_tp), and GLM-130B's own INT8/INT4 shards (`<key>_scale`, per-row absmax,
two signed INT4 values per byte, even column in the high nibble) are converted into glmkit's block format
(quant.py's QuantLinear) without dequantizing. SAT names its tensors as ChatGLM-6B does (KEY_MAPS["sat"]).

Shards are memory-mapped and every piece is copied (or quantized) into the model a ~64 MB row slice at a time,
each slice's mapped pages dropped once copied: peak memory is the loaded model plus one slice.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .checkpoint import IGNORED_KEYS, CheckpointError, LoadInfo, _get_module, _reverse_map, resolve_dtype
from .config import GLM130B_SAT_ARGS, ConfigError, ModelConfig, from_sat_args
from .model import GLM

SHARD_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
# tools/convert_tp.py's tables, by the name with "transformer.layers.<n>." (else the first component) removed
REPLICATED = {"input_layernorm.weight", "input_layernorm.bias", "attention.dense.bias",
              "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
              "attention.rotary_emb.inv_freq", "final_layernorm.weight", "final_layernorm.bias"}
GLU = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
CAT_DIM1 = {"attention.dense.weight", "mlp.dense_4h_to_h.weight"}
QUANTIZED = {"attention.dense.weight", "attention.query_key_value.weight", "mlp.dense_h_to_4h.weight",
             "mlp.dense_4h_to_h.weight"}
COPY_CHUNK_BYTES = 64 << 20


class SATError(CheckpointError):
    """The folder is not a loadable GLM-130B SAT checkpoint; the message names the file or tensor."""


# ------------------------------------------------------------------------------------------------------------
# convert_tp.py's rules, as pure functions
# ------------------------------------------------------------------------------------------------------------

def short_name(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[3 if key.startswith("transformer.layers") else 1:])


def tp_rule(key: str) -> str:
    """How convert_tp.py treats a tensor across ranks: "replicate", "glu" (the [a | b] halves of GeGLU's
    dense_h_to_4h, each split on dim 0), "dim1" or "dim0". A quantized weight's `<key>_scale` (one per row)
    follows its weight's rows: dim0/glu like the weight, replicated for the dim-1 (row-parallel) weights."""
    if key.endswith("_scale"):
        base = tp_rule(key[:-len("_scale")])
        return "replicate" if base == "dim1" else base
    name = short_name(key)
    if name in REPLICATED:
        return "replicate"
    if name in GLU:
        return "glu"
    return "dim1" if name in CAT_DIM1 else "dim0"


def split_tensor(t: torch.Tensor, rule: str, tp: int) -> list[torch.Tensor]:
    if rule == "replicate":
        return [t] * tp
    if rule == "glu":
        c = torch.chunk(t, 2 * tp, dim=0)
        return [torch.cat((c[r], c[tp + r]), dim=0) for r in range(tp)]
    dim = 1 if rule == "dim1" else 0
    if t.shape[dim] % tp:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} does not split {tp} ways")
    return [c.clone() for c in torch.chunk(t, tp, dim=dim)]


def merge_tensors(parts: list[torch.Tensor], rule: str) -> torch.Tensor:
    if rule == "replicate":
        return parts[0]
    if rule == "glu":
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=1 if rule == "dim1" else 0)


def split_tp(sd: dict, tp: int) -> list[dict]:
    """One rank's state dict -> tp state dicts, as tools/convert_tp.py splits them (1 -> tp). Also for
    GLM-130B's quantized state dicts: a row-parallel weight's per-row scale stays whole on every rank."""
    out: list[dict] = [{} for _ in range(tp)]
    for k, v in sd.items():
        for r, part in enumerate(split_tensor(v, tp_rule(k), tp)):
            out[r][k] = part
    return out


def merge_tp(sds: list[dict]) -> dict:
    """tp state dicts -> one, as tools/convert_tp.py merges them (tp -> 1). Quantized row-parallel weights
    cannot be merged into one per-row scale: each rank scaled its own columns (load_sat keeps them apart)."""
    out = {}
    for k in sds[0]:
        rule = tp_rule(k)
        if k.endswith("_scale") and rule == "replicate" and len(sds) > 1 \
                and not all(torch.equal(s[k], sds[0][k]) for s in sds[1:]):
            raise ValueError(f"{k}: the ranks' per-row scales differ; a quantized row-parallel weight cannot be "
                             "merged into one per-row scale")
        out[k] = merge_tensors([s[k] for s in sds], rule)
    return out


# ------------------------------------------------------------------------------------------------------------
# GLM-130B's quantized format <-> glmkit's block format
# ------------------------------------------------------------------------------------------------------------

def quantize_sat(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> GLM-130B's (weight int8 [N, K] or [N, K/2], scale fp16 [N]), as convert_tp.py writes it:
    scale = absmax of the row / (2^(bits-1) - 1), q = round(w / scale); int4: byte = q[2j] << 4 | q[2j+1] & 15."""
    w = w.float()
    scale = (w.abs().amax(-1) / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale.float().clamp_min(1e-30)[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2].to(torch.int16) << 4) | (q[:, 1::2].to(torch.int16) & 15)).to(torch.uint8).view(torch.int8)
    return q, scale


def sat_to_block(qw: torch.Tensor, scale: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-130B's per-row format -> glmkit's canonical block format (quant.py) with the same values:
    int8 q as is; int4 signed nibble q -> u = q + 8 in ggml's nibble order; the row scale in every group."""
    N = qw.shape[0]
    if bits == 8:
        q = qw.view(torch.int8)
        K = q.shape[1]
    else:
        b = qw.view(torch.int8).to(torch.int16)
        hi, lo = b >> 4, ((b & 15) ^ 8) - 8                  # signed nibbles: even column high, odd low
        K = b.shape[1] * 2
        u = (torch.stack((hi, lo), dim=-1).view(N, K) + 8).to(torch.uint8).view(N, K // 32, 2, 16)
        q = u[:, :, 0] | (u[:, :, 1] << 4)
        q = q.reshape(N, K // 2)
    if K % group:
        raise ValueError(f"width {K} is not a multiple of the group size {group}")
    return q.contiguous(), scale.to(torch.float16)[:, None].expand(N, K // group).contiguous()


def dequantize_sat(qw: torch.Tensor, scale: torch.Tensor, bits: int, dtype=torch.float32) -> torch.Tensor:
    """GLM-130B's quantized weight -> float (q * scale), as its extract_weight_to_half kernels compute it."""
    if bits == 8:
        q = qw.view(torch.int8).to(dtype)
    else:
        b = qw.view(torch.int8).to(torch.int16)
        q = torch.stack((b >> 4, ((b & 15) ^ 8) - 8), dim=-1).view(b.shape[0], -1).to(dtype)
    return q * scale.to(dtype)[:, None]


# ------------------------------------------------------------------------------------------------------------
# The folder
# ------------------------------------------------------------------------------------------------------------

def is_sat_dir(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "latest").is_file() and not (p / "config.json").is_file()


def shard_files(path: Path) -> tuple[str, list[Path]]:
    """(iteration, [mp_rank_00.., mp_rank_01.., ...]) of a SAT checkpoint folder, checked complete."""
    raw = (path / "latest").read_text(encoding="utf-8", errors="replace")
    it = raw if (path / raw).is_dir() else raw.strip()
    d = path / it
    if not it or not d.is_dir():
        raise SATError(f"{path / 'latest'} names iteration {raw!r}, but {d} is not a folder")
    ranks = {}
    for f in d.iterdir():
        m = SHARD_RE.match(f.name)
        if m:
            ranks[int(m.group(1))] = f
    if not ranks:
        raise SATError(f"{d} holds no mp_rank_XX_model_states.pt shards")
    tp = max(ranks) + 1
    missing = [r for r in range(tp) if r not in ranks]
    if missing:
        raise SATError(f"{d} lacks mp_rank_{missing[0]:02d}_model_states.pt of a {tp}-way split")
    return it, [ranks[r] for r in range(tp)]


def read_args(path: Path) -> tuple[dict, str]:
    """SAT arguments: model_args.json beside the checkpoint (or in the iteration folder), else the preset."""
    for f in (path / "model_args.json", path.parent / "model_args.json"):
        if f.is_file():
            try:
                d = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SATError(f"{f} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise SATError(f"{f} does not hold a JSON object of SAT arguments")
            return {str(k).replace("_", "-"): v for k, v in d.items()}, str(f)
    return dict(GLM130B_SAT_ARGS), "glm-130b preset"


def _load_shard(f: Path) -> tuple[dict, bool]:
    """{"module": state_dict} -> (state_dict, memory-mapped?), read with weights_only=True (no code runs)."""
    import pickle
    mapped = True
    try:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            obj, mapped = torch.load(f, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as e:
        raise SATError(f"refusing to load {f}: it holds pickled objects other than tensors "
                       f"({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SATError(f"{f} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        raise SATError(f"{f} is not a SAT shard: expected a dict with a 'module' state dict")
    return obj["module"], mapped


_LIBC = []


def _drop_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a memory-mapped (read-only use, private) tensor's bytes (the
    pages are the file's, unmodified: a later read faults them in again)."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    libc = _LIBC[0]
    if libc is None or not hasattr(mmap, "MADV_DONTNEED") or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    a = -(-t.data_ptr() // page) * page               # a strided view (a rank's columns): its whole span
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    b = (t.data_ptr() + (last + 1) * t.element_size()) // page * page
    if b > a:
        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), mmap.MADV_DONTNEED)


@dataclass
class Joined:
    """One tensor of the whole model as the ranks hold it: parts (one per rank), the rule that joins them
    and, for GLM-130B's quantized weights, the per-row scales and bit width."""
    key: str
    parts: list
    rule: str
    scales: Optional[list] = None
    bits: int = 0
    mapped: bool = True

    def part_shape(self, r: int) -> tuple:
        s = tuple(self.parts[r].shape)
        return (s[0], s[1] * 2) + s[2:] if self.bits == 4 else s

    @property
    def shape(self) -> tuple:
        s0 = self.part_shape(0)
        if self.rule == "replicate":
            return s0
        tp = len(self.parts)
        if self.rule == "dim1":
            return (s0[0], s0[1] * tp) + s0[2:]
        return (s0[0] * tp,) + s0[1:]

    def segments(self):
        """(first row in the whole tensor, rank, first row in the part, rows) of a dim-0 / glu / replicated tensor."""
        if self.rule == "replicate":
            return [(0, 0, 0, self.parts[0].shape[0])]
        n, tp = self.parts[0].shape[0], len(self.parts)
        if self.rule == "dim0":
            return [(r * n, r, 0, n) for r in range(tp)]
        h = n // 2                                       # glu: rank r holds [a_r; b_r]
        return [(r * h, r, 0, h) for r in range(tp)] + [(tp * h + r * h, r, h, h) for r in range(tp)]

    def _float(self, r: int, a: int, b: int, dtype) -> torch.Tensor:
        p = self.parts[r][a:b]
        return dequantize_sat(p, self.scales[r][a:b], self.bits, dtype) if self.bits else p

    def _done(self, r: int, a: int, b: int) -> None:
        if self.mapped and self.parts[r].dim() > 0:
            _drop_pages(self.parts[r][a:b])

    def row_chunks(self, dtype=torch.float32):
        """(first row, float rows) over the whole tensor, ~64 MB a piece; each piece's mapped pages dropped
        once the caller has used it (the generator resumes)."""
        if self.parts[0].dim() == 1:
            if self.rule == "replicate":
                yield 0, self.parts[0]
            else:
                yield 0, merge_tensors(list(self.parts), self.rule)
            return
        width = self.shape[1]
        step = max(1, COPY_CHUNK_BYTES // max(1, width * 4))
        if self.rule == "dim1":
            for a in range(0, self.shape[0], step):
                b = min(a + step, self.shape[0])
                yield a, torch.cat([self._float(r, a, b, dtype) for r in range(len(self.parts))], dim=1)
                for r in range(len(self.parts)):
                    self._done(r, a, b)
            return
        for f0, r, p0, n in self.segments():
            for a in range(p0, p0 + n, step):
                b = min(a + step, p0 + n)
                yield f0 + a - p0, self._float(r, a, b, dtype)
                self._done(r, a, b)

    def into_block(self, qweight: torch.Tensor, scales: torch.Tensor, group: int) -> None:
        """Convert the quantized parts into a QuantLinear's canonical buffers (same values, no float copy)."""
        rows = 4096
        if self.rule == "dim1":
            c0 = 0
            for r in range(len(self.parts)):
                k = self.part_shape(r)[1]
                for a in range(0, self.shape[0], rows):
                    q, s = sat_to_block(self.parts[r][a:a + rows], self.scales[r][a:a + rows], self.bits, group)
                    qb = c0 if self.bits == 8 else c0 // 2
                    qweight[a:a + rows, qb:qb + q.shape[1]] = q
                    scales[a:a + rows, c0 // group:(c0 + k) // group] = s
                    self._done(r, a, a + rows)
                c0 += k
            return
        for f0, r, p0, n in self.segments():
            for a in range(p0, p0 + n, rows):
                b = min(a + rows, p0 + n)
                q, s = sat_to_block(self.parts[r][a:b], self.scales[r][a:b], self.bits, group)
                qweight[f0 + a - p0:f0 + b - p0] = q
                scales[f0 + a - p0:f0 + b - p0] = s
                self._done(r, a, b)

    def segment_widths(self) -> list[int]:
        """Input widths that share one scale per row: each rank's columns for dim-1 weights, else the whole."""
        if self.rule == "dim1":
            return [self.part_shape(r)[1] for r in range(len(self.parts))]
        return [self.shape[1]]


# ------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------

def _bits_of(sds: list[dict], args: dict, hidden: int, f: Path) -> int:
    """0 for a float checkpoint, else the bit width of GLM-130B's quantized shards."""
    key = "transformer.layers.0.attention.query_key_value.weight"
    if key + "_scale" not in sds[0]:
        return 0
    w = sds[0][key]
    if w.dtype not in (torch.int8, torch.uint8):
        raise SATError(f"{f}: {key} has a _scale but is {w.dtype}, not int8")
    bits = {hidden: 8, hidden // 2: 4}.get(w.shape[1])
    declared = int(args.get("quantization-bit-width") or 0)
    if bits is None or (declared and declared != bits):
        raise SATError(f"{f}: {key} of shape {tuple(w.shape)} is neither INT8 nor INT4 of hidden size {hidden}"
                       + (f" (the arguments say {declared} bits)" if declared else ""))
    return bits


def _sat_spec(joined: dict, bits: int):
    """The QuantSpec that holds GLM-130B's quantized layers as they are: the largest group (128, 64, 32) that
    every rank's column range divides; layers whose ranges no group fits stay in float (their values exact),
    and so do the embedding and the tied output, which GLM-130B never quantizes."""
    from .quant import QuantSpec

    def fits(j, g):
        return all(w % g == 0 for w in j.segment_widths())
    q = {ours: j for ours, j in joined.items() if j.bits}
    skip = sorted(ours.rsplit(".", 1)[0] for ours, j in q.items() if not fits(j, 32))
    rest = [j for j in q.values() if fits(j, 32)]
    group = next(g for g in (128, 64, 32) if all(fits(j, g) for j in rest))
    return QuantSpec(bits=bits, group_size=group, embedding_bits=None, skip=tuple(["output"] + skip))


def _join_all(model: GLM, sds: list[dict], files: list[Path], bits: int, mapped: bool) -> tuple[dict, list]:
    """our parameter name -> Joined, checked against the model's shapes; and the unexpected keys."""
    rev = _reverse_map("sat", model)                   # SAT name -> (our name, 0, 1); tied: no output key
    params = dict(model.named_parameters())
    joined = {}
    for key, (ours, _, _) in rev.items():
        for sd, f in zip(sds, files):
            if key not in sd:
                raise SATError(f"{f} is missing tensor {key}")
        sc = [sd[key + "_scale"] for sd in sds] if key + "_scale" in sds[0] else None
        j = Joined(key, [sd[key] for sd in sds], tp_rule(key), sc, bits if sc else 0, mapped)
        if j.shape != tuple(params[ours].shape):
            raise SATError(f"tensor {key} joined from {len(files)} shard(s) ({files[0].name}: "
                           f"{tuple(sds[0][key].shape)}) has shape {j.shape}, expected {tuple(params[ours].shape)} "
                           "for these SAT arguments")
        joined[ours] = j
    unexpected = [k for k in sds[0] if k not in rev and not k.endswith("_scale")
                  and not any(rx.search(k) for rx in IGNORED_KEYS)]
    return joined, unexpected


def _fill(model: GLM, joined: dict, dt: torch.dtype, device, locate=_get_module) -> None:
    """Copy (or quantize, or convert) every joined tensor into the model built on the meta device.
    locate(model, our name) -> (module, attribute) holding it (a tensor-parallel model's local layers)."""
    from .quant import QuantEmbedding, QuantLinear
    head = locate(model, "output.weight")[0]
    for ours, j in joined.items():
        mod, leaf = locate(model, ours)
        extra = [head] if ours == "tok_embeddings.weight" and isinstance(head, QuantLinear) else []
        if isinstance(mod, (QuantLinear, QuantEmbedding)) and leaf == "weight":
            mod.alloc_weight()
            if j.bits:
                j.into_block(mod.qweight, mod.scales, mod.group)
                continue
            targets = [mod]
        elif isinstance(mod, QuantLinear):             # a quantized layer's bias: an fp32 buffer
            mod.bias = torch.empty(j.shape, dtype=torch.float32)
            targets = [mod.bias]
        else:
            setattr(mod, leaf, nn.Parameter(torch.empty(j.shape, dtype=dt, device=device), requires_grad=False))
            targets = [getattr(mod, leaf)]
        for t in extra:
            t.alloc_weight()
        for r0, rows in j.row_chunks():
            for t in targets + extra:
                if isinstance(t, torch.Tensor):
                    t[r0:r0 + rows.shape[0]].copy_(rows)
                else:
                    t.set_rows(r0, rows)


def load_sat(path, dtype=None, device: str = "cpu", progress: bool = False, quantize=None) -> tuple[GLM, LoadInfo]:
    """A GLM-130B SAT checkpoint folder (any number of ranks, float or GLM-130B's INT8/INT4) -> (GLM, LoadInfo).

    quantize ("int4", "int8", ...): glmkit's block quantization while loading, a slice at a time, of a float
    checkpoint. GLM-130B's own quantized shards load as quantized layers holding exactly their values."""

    t0 = time.perf_counter()
    path = Path(path)
    files, args, cfg = open_sat(path)
    loaded = [_load_shard(f) for f in files]
    sds, mapped = [sd for sd, _ in loaded], all(m for _, m in loaded)
    bits = _bits_of(sds, args, cfg.hidden_size, files[0])
    with torch.device("meta"):
        model = GLM(cfg)
    joined, unexpected = _join_all(model, sds, files, bits, mapped)
    spec, dt = quant_setup(model, cfg, joined, bits, quantize, dtype, device, path)
    fill_and_tie(model, joined, spec, dt, device, model.output, model.tok_embeddings)
    del joined, sds, loaded
    return loaded_model(model, spec, device, LoadInfo(path=path, layout="sat", files=files, unexpected=unexpected), t0)


def open_sat(path: Path) -> tuple[list, dict, ModelConfig]:
    """A SAT folder -> (its iteration's mp_rank shard files, the SAT arguments, the ModelConfig), the shard
    count checked against model-parallel-size (shared by the whole and the per-rank loads)."""
    it, files = shard_files(path)
    args, args_src = read_args(path)
    try:
        cfg = from_sat_args(args)
    except (ConfigError, TypeError, ValueError) as e:
        raise SATError(f"{args_src}: {e}") from None
    if args_src != "glm-130b preset" and int(args.get("model-parallel-size", len(files))) != len(files):
        raise SATError(f"{args_src} says model-parallel-size {args['model-parallel-size']}, but {path / it} "
                       f"holds {len(files)} shard(s)")
    return files, args, cfg


def fill_and_tie(model: GLM, joined: dict, spec, dt, device, output, embedding, locate=_get_module) -> None:
    """The joined tensors into the meta-built model (quantized ones on the CPU first), then the output layer
    tied to the embedding as GLM-130B has it (unless the output was quantized on its own)."""
    from . import quant
    with torch.no_grad():
        _fill(model, joined, dt, "cpu" if spec is not None else device, locate=locate)
        if not isinstance(output, quant.QuantLinear):
            output.weight = embedding.weight


def loaded_model(model: GLM, spec, device, info: LoadInfo, t0: float) -> tuple[GLM, LoadInfo]:
    """A quantized model built on the CPU moved to `device`, eval mode, the load's seconds in info."""
    if spec is not None and torch.device(device).type != "cpu":
        model.to(device)
    model.eval()
    info.seconds = time.perf_counter() - t0
    return model, info


def quant_setup(model, cfg, joined: dict, bits: int, quantize, dtype, device, path):
    """The quantization a SAT load ends in (its own INT8/INT4 shards, or quantize= of a float checkpoint) ->
    (QuantSpec or None, activation dtype); a quantized model gets its QuantLinear skeleton and cfg.quantization."""
    from . import quant
    spec = None
    try:
        if bits:
            spec = _sat_spec(joined, bits)
            if quantize is not None and quant.QuantSpec.parse(quantize).bits != bits:
                raise SATError(f"{path} holds GLM-130B's own INT{bits} weights; load it without quantize= "
                               f"(or load a float checkpoint to quantize it to {quantize})")
        elif quantize is not None:
            spec = quant.QuantSpec.parse(quantize)
    except quant.QuantError as e:
        raise SATError(f"quantize={quantize!r}: {e}") from None
    if spec is None:
        return None, resolve_dtype(dtype, cfg, device)
    dt = resolve_dtype(dtype or "float32", cfg, device)
    cfg.quantization = spec.to_dict()
    quant.quant_skeleton(model, spec, act_dtype=dt)
    return spec, dt
