"""LoRA on our modules: y = W x + (alpha / r) * B (A dropout(x)), W frozen (float nn.Linear or glmkit's INT8/INT4
QuantLinear, which stays quantized: QLoRA-style), A [r, in] and B [rows, r] trained.

One module, several adapters, output slices:

    LoRALinear(base)                    wraps one of our layers (layers.{i}.attn.qkv / attn.out / mlp.up /
      .base                             mlp.down / output); its parameters stay where the base had them
      .adapters[name]                   LoRAAdapter: one or more *parts*, each a LoRA on rows [lo, hi) of the
        .A[label], .B[label]            output. A fused layer of ours carries the adapters of several official
        .rows[label], .alpha[label]     modules: GlmForCausalLM's q_proj / k_proj / v_proj are parts "q", "k",
                                        "v" of our attn.qkv; an adapter trained on our qkv is one part "full".
      .active                           the adapter a plain forward applies (None: the bare base)

A plain forward applies `.active` (one or a few small matmuls, nothing per row). Serving several adapters in one
batch: set_row_adapters(model, ["a", None, "b", ...]) names an adapter (or none) per batch row (dim 0) for the
forwards that follow; each module then adds each adapter's delta to its own rows only (unmerged, so any mix of
adapters shares the one base). clear_row_adapters(model) (or the row_adapters context manager) goes back.

Targets (apply_lora): our names qkv, out, up, down, output (or a dotted suffix such as layers.0.attn.qkv), the
official module names of the layouts in checkpoint.KEY_MAPS (ChatGLM-6B / ChatGLM2/3 / GLM-4: query_key_value,
dense, dense_h_to_4h, dense_4h_to_h, lm_head / output_layer; GlmForCausalLM: q_proj, k_proj, v_proj, o_proj,
gate_up_proj, down_proj, lm_head), derived from that map, or "all" (every linear layer of the blocks, as
PEFT's "all-linear" and LLaMA-Factory's "all": the output head only when asked for by name).

Quantized base: QuantLinear itself passes gradients to its input (quant.py: grad_x = grad_y @ W with W
dequantized a row slice at a time; no float copy of a weight ever exists whole), so adapters below a bare
quantized layer get theirs.

Merging (merge_lora) folds scale * B @ A into a float weight and unwraps the modules. It refuses a quantized base:
adding a delta to INT4 weights and requantizing would lose most of the delta to rounding, so `glmkit merge`
loads the base in float, merges, saves, and the result can then be quantized (glmkit quantize).
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QuantLinear
from .ptuning import AdapterError

ALL_TARGETS = ("qkv", "out", "up", "down")      # "all": every linear layer of the blocks (not the output head)
PART_LABELS = {"qkv": ("q", "k", "v")}          # names of the parts of our fused layers (checkpoint._part_rows)
FULL = "full"


class LoRAError(AdapterError):
    """A LoRA cannot be applied, loaded, saved or merged; the message names the module, tensor or option.
    (An AdapterError, hence a ValueError, like P-tuning's.)"""


# --------------------------------------------------------------------------------------------------------
# Gradient through a frozen quantized base
# --------------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------

class LoRAAdapter(nn.Module):
    """One adapter of one LoRALinear: parts (label -> A [r, in], B [hi - lo, r], rows [lo, hi), alpha)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        self.rows: dict[str, tuple[int, int]] = {}
        self.alpha: dict[str, float] = {}
        self.p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def add_part(self, label: str, A: torch.Tensor, B: torch.Tensor, lo: int, hi: int, alpha: float,
                 trainable: bool):
        if label in self.A:
            raise LoRAError(f"part {label!r} is already in this adapter")
        for other, (a, b) in self.rows.items():
            if lo < b and a < hi:
                raise LoRAError(f"rows {lo}:{hi} of part {label!r} overlap rows {a}:{b} of part {other!r}")
        self.A[label] = nn.Parameter(A, requires_grad=trainable)
        self.B[label] = nn.Parameter(B, requires_grad=trainable)
        self.rows[label] = (int(lo), int(hi))
        self.alpha[label] = float(alpha)

    def rank(self, label: str) -> int:
        return self.A[label].shape[0]

    def scale(self, label: str) -> float:
        return self.alpha[label] / self.rank(label)

    def deltas(self, x: torch.Tensor):
        """(lo, hi, delta [..., hi - lo]) per part, in A's dtype."""
        xd = self.dropout(x)
        for label, A in self.A.items():
            lo, hi = self.rows[label]
            xa = xd if xd.dtype == A.dtype else xd.to(A.dtype)
            yield lo, hi, F.linear(F.linear(xa, A), self.B[label]) * self.scale(label)

    def delta_weight(self, label: str) -> torch.Tensor:
        """scale * B @ A [hi - lo, in] in fp32."""
        return (self.B[label].float() @ self.A[label].float()) * self.scale(label)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{k}: rows {lo}:{hi} r={self.rank(k)} alpha={self.alpha[k]:g}"
                          for k, (lo, hi) in self.rows.items())
        return f"{parts}, dropout={self.p:g}"


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or QuantLinear) plus named LoRA adapters; see the module docstring."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise LoRAError(f"LoRA wraps nn.Linear or QuantLinear, not {type(base).__name__}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.row_groups: Optional[tuple[int, list]] = None   # set_row_adapters: (rows, [(name, row index)])

    # the base's shape and weights, for code that inspects a layer
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    @property
    def quantized(self) -> bool:
        return isinstance(self.base, QuantLinear)

    @property
    def device(self) -> torch.device:
        if self.quantized:                    # without unpacking a prepared weight (the kernels' copy is on CPU)
            q = self.base._buffers.get("qweight")
            return q.device if q is not None else torch.device("cpu")
        return self.base.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.row_groups is not None:
            return self._per_row(x, y)
        ad = self.adapters[self.active] if self.active is not None and self.active in self.adapters else None
        if ad is None:
            return y
        N = y.shape[-1]
        track = torch.is_grad_enabled()          # autograd: out-of-place adds (inference: in place, no copies)
        for lo, hi, d in ad.deltas(x):
            d = d.to(y.dtype)
            if lo == 0 and hi == N:
                y = y + d if track else y.add_(d)
            elif track:
                y = y.slice_scatter(y[..., lo:hi] + d, dim=-1, start=lo, end=hi)
            else:
                y[..., lo:hi] += d
        return y

    def _per_row(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows, groups = self.row_groups
        if x.shape[0] != rows:
            raise LoRAError(f"row adapters were set for {rows} rows, but this batch has {x.shape[0]}")
        N = y.shape[-1]
        for name, sel in groups:
            if name not in self.adapters:
                continue
            xs = x.index_select(0, sel)
            full = torch.zeros(xs.shape[:-1] + (N,), dtype=y.dtype, device=y.device)
            for lo, hi, d in self.adapters[name].deltas(xs):
                full[..., lo:hi] += d.to(y.dtype)
            y = y.index_add(0, sel, full)
        return y

    # --- adapters -------------------------------------------------------------------------------------
    def adapter(self, name: str, dropout: float = 0.0) -> LoRAAdapter:
        """The adapter `name`, created (empty) if absent."""
        if name not in self.adapters:
            self.adapters[name] = LoRAAdapter(dropout).train(self.training)   # eval model: dropout off
        return self.adapters[name]

    def add_part(self, name: str, label: str, rank: int, alpha: float, lo: int = 0, hi: Optional[int] = None,
                 dropout: float = 0.0, dtype=torch.float32, generator: Optional[torch.Generator] = None,
                 A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None, trainable: bool = True):
        """A LoRA on output rows [lo, hi) (all by default). A/B given: used (copied); else PEFT's init: A
        kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros, so a fresh part is a no-op."""
        hi = self.out_features if hi is None else hi
        if not (0 <= lo < hi <= self.out_features):
            raise LoRAError(f"rows {lo}:{hi} outside a layer of {self.out_features} outputs")
        dev = self.device
        if A is None:
            A = torch.empty((rank, self.in_features), dtype=torch.float32)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        if B is None:
            B = torch.zeros((hi - lo, rank), dtype=torch.float32)
        A = A.detach().to(device=dev, dtype=dtype).clone()
        B = B.detach().to(device=dev, dtype=dtype).clone()
        self.adapter(name, dropout).add_part(label, A, B, lo, hi, alpha, trainable)
        if self.active is None:
            self.active = name

    def merge(self, name: str):
        """Fold adapter `name` into the (float) base weight in place."""
        ad = self.adapters[name]
        if not ad.A:
            return
        if self.quantized:
            raise LoRAError(
                f"cannot merge a LoRA into a quantized (int{self.base.bits}) layer: merging needs the float base; "
                "load the base in float (glmkit merge does), merge, then quantize the merged model")
        w = self.base.weight
        with torch.no_grad():
            for label in ad.A:
                lo, hi = ad.rows[label]
                w[lo:hi] = (w[lo:hi].float() + ad.delta_weight(label).to(w.device)).to(w.dtype)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


# --------------------------------------------------------------------------------------------------------
# Where the official module names land in our model (derived from checkpoint.KEY_MAPS)
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """An official linear module seen from our side: our module path and its output rows [lo, hi)."""
    module: str          # e.g. "layers.0.attn.qkv"
    label: str           # part label: "full", or "q" / "k" / "v" for one of several official modules in ours
    lo: int
    hi: int
    short: str           # our short name: qkv, out, up, down, output


def _linear_like(mod) -> bool:
    return isinstance(mod, (nn.Linear, QuantLinear, LoRALinear))


def _get(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def official_modules(model: nn.Module, layout: str) -> dict[str, Slot]:
    """official module path (e.g. "transformer.encoder.layers.0.self_attention.query_key_value") -> Slot, for
    every linear layer of `model`, read off checkpoint.KEY_MAPS[layout] (our.weight -> official.weight; a list
    is the concatenation of several official modules' rows, sized as checkpoint._part_rows sizes them)."""
    from ..checkpoint import KEY_MAPS, _part_rows

    if layout not in KEY_MAPS:
        raise LoRAError(f"unknown layout {layout!r}; known: {', '.join(KEY_MAPS)}")
    cfg = model.config
    out: dict[str, Slot] = {}
    for ours, src in KEY_MAPS[layout].items():
        if not ours.endswith(".weight"):
            continue
        tmpl = ours[:-len(".weight")]
        srcs = src if isinstance(src, list) else [src]
        for i in (range(cfg.num_layers) if "{i}" in tmpl else [None]):
            def fill(s, i=i):
                return s if i is None else s.replace("{i}", str(i))
            path = fill(tmpl)
            mod = _get(model, path)
            if not _linear_like(mod):
                continue
            short = path.rsplit(".", 1)[-1]
            sizes = _part_rows(cfg, fill(ours), len(srcs)) or [mod.out_features]
            labels = PART_LABELS.get(short, ()) if len(srcs) > 1 else (FULL,)
            lo = 0
            for j, s in enumerate(srcs):
                label = labels[j] if j < len(labels) else f"part{j}"
                out[fill(s)[:-len(".weight")]] = Slot(path, label, lo, lo + sizes[j], short)
                lo += sizes[j]
    return out


def _layouts():
    from ..checkpoint import KEY_MAPS
    return list(KEY_MAPS)


def official_layout(model: nn.Module, layout: Optional[str] = None) -> str:
    """The official key naming to use for `model`: `layout` when it is one (LoadInfo.layout of an official
    folder); for our own layout ("glmkit", e.g. a `glmkit quantize` folder) or None: the layout recorded in the
    config (extra["source_layout"]) if any, else ChatGLM-6B's for family chatglm, GlmForCausalLM's for a GLM-4
    named "...-hf", else chatglm2 (whose names also load glm_hf keys and vice versa)."""
    if layout is not None and layout != "glmkit":
        if layout not in _layouts():
            raise LoRAError(f"unknown layout {layout!r}; known: {', '.join(_layouts())}")
        return layout
    cfg = model.config
    src = (cfg.extra or {}).get("source_layout")
    if src in _layouts():
        return src
    if cfg.family == "chatglm":
        return "chatglm"
    if cfg.family == "glm4" and str(cfg.name).lower().endswith("-hf"):
        return "glm_hf"
    return "chatglm2"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _by_leaf(model: nn.Module, layout: str) -> dict[str, list[Slot]]:
    """official target name (last path component, as PEFT's target_modules) -> its Slots in every layer."""
    out: dict[str, list[Slot]] = {}
    for path, slot in official_modules(model, layout).items():
        out.setdefault(path.rsplit(".", 1)[-1], []).append(slot)
    return out


def _full_slot(model: nn.Module, path: str) -> Slot:
    mod = model.get_submodule(path)
    return Slot(path, FULL, 0, mod.out_features, path.rsplit(".", 1)[-1])


def resolve_targets(model: nn.Module, targets, layout: Optional[str] = None) -> list[Slot]:
    """targets -> the Slots (our module, part rows) they name, in model order. See apply_lora."""
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    targets = [str(t).strip() for t in targets]
    if not targets:
        raise LoRAError("no LoRA target modules given")
    found = {slot.module for lay in _layouts() for slot in official_modules(model, lay).values()}
    linear = [n for n, _ in model.named_modules() if n in found]        # our linear layers, in model order
    order = {p: i for i, p in enumerate(linear)}
    ours_short = sorted({p.rsplit(".", 1)[-1] for p in linear},
                        key=lambda s: (ALL_TARGETS.index(s) if s in ALL_TARGETS else len(ALL_TARGETS), s))
    official: dict[str, list[Slot]] = {}
    other: dict[str, str] = {}                     # official names of the layouts not asked for (messages)
    for lay in _layouts():
        for name, slots in _by_leaf(model, lay).items():
            if layout is None or lay == layout:
                key = [(s.module, s.lo, s.hi) for s in slots]
                if name in official and [(s.module, s.lo, s.hi) for s in official[name]] != key:
                    raise LoRAError(f"target {name!r} means different modules in different layouts; say which "
                                    "layout the names are in (layout=...)")
                official[name] = slots
            else:
                other.setdefault(name, lay)
    picked: dict[tuple[str, int, int], Slot] = {}
    for t in targets:
        if t in ("all", "all-linear"):
            hits = [_full_slot(model, p) for p in linear if p.rsplit(".", 1)[-1] in ALL_TARGETS]
        elif t in official and t not in ours_short:
            hits = [s if s.label != FULL else _full_slot(model, s.module) for s in official[t]]
        else:
            hits = [_full_slot(model, p) for p in linear if p == t or p.endswith("." + t)]
        if not hits:
            valid = ", ".join(ours_short) + "; official: " + ", ".join(
                n for n in sorted(official) if n not in ours_short) + "; or all"
            hint = f" ({t!r} is a module of the {other[t]} layout, not of {layout})" if t in other else ""
            raise LoRAError(f"unknown LoRA target module {t!r}{hint}; valid targets: {valid}")
        for h in hits:
            picked[(h.module, h.lo, h.hi)] = h
    slots = sorted(picked.values(), key=lambda h: (order[h.module], h.lo))
    for a, b in zip(slots, slots[1:]):             # "qkv" and "q_proj" together: one LoRA per row, not two
        if a.module == b.module and b.lo < a.hi:
            raise LoRAError(f"targets overlap on {a.module}: {a.label} (rows {a.lo}:{a.hi}) and {b.label} "
                            f"(rows {b.lo}:{b.hi}); name the whole layer or its parts, not both")
    return slots


# --------------------------------------------------------------------------------------------------------
# Model-level operations
# --------------------------------------------------------------------------------------------------------

def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, leaf = path.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


def wrap(model: nn.Module, path: str) -> LoRALinear:
    """The LoRALinear at `path`, wrapping the layer there first if needed."""
    mod = model.get_submodule(path)
    if isinstance(mod, LoRALinear):
        return mod
    if not isinstance(mod, (nn.Linear, QuantLinear)):
        raise LoRAError(f"{path} is a {type(mod).__name__}, not a linear layer LoRA can wrap")
    parent, leaf = _parent(model, path)
    new = LoRALinear(mod).train(mod.training)
    setattr(parent, leaf, new)
    return new


def _check_name(name: str):
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise LoRAError(f"adapter name {name!r}: use letters, digits, '_' and '-'")


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: Union[str, Iterable[str]] = "all", *, layout: Optional[str] = None, name: str = "default",
               dtype=torch.float32, seed: Optional[int] = None, trainable: bool = True) -> list[str]:
    """Add a fresh LoRA adapter `name` (a no-op until trained) and make it the active one.

    targets: our names (qkv, out, up, down, output, or a dotted suffix like layers.3.mlp.up), the official
    module names of `layout` (chatglm / chatglm2 / glm_hf; None: any layout's, which never disagree), or
    "all" (qkv, out, up, down: every linear layer of the blocks). An official name that is part of one of our
    fused layers (GlmForCausalLM's q_proj / k_proj / v_proj) adapts only its rows of our qkv.
    trainable: only the LoRA parameters require grad afterwards (every base parameter is frozen); on a
    quantized base the QuantLinear layers are made differentiable in their input.
    Returns "module" or "module:part" for every part added."""
    _check_name(name)
    if not (isinstance(rank, int) and rank >= 1):
        raise LoRAError(f"LoRA rank must be a positive integer, not {rank!r}")
    if not (alpha > 0):
        raise LoRAError(f"LoRA alpha must be positive, not {alpha!r}")
    if not (0 <= dropout < 1):
        raise LoRAError(f"LoRA dropout must be in [0, 1), not {dropout!r}")
    for path, mod in lora_modules(model).items():
        if name in mod.adapters:
            raise LoRAError(f"the model already has an adapter named {name!r} (at {path}); pick another name")
    slots = resolve_targets(model, targets, layout)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    done = []
    for slot in slots:
        wrap(model, slot.module).add_part(name, slot.label, rank, alpha, slot.lo, slot.hi, dropout, dtype, gen,
                                          trainable=trainable)
        done.append(slot.module if slot.label == FULL else f"{slot.module}:{slot.label}")
    set_active(model, name)
    if trainable:
        mark_trainable(model, name)
    return done


def adapter_names(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for mod in lora_modules(model).values():
        for n in mod.adapters:
            seen[n] = None
    return list(seen)


def _require(model: nn.Module, name: Optional[str]) -> str:
    names = adapter_names(model)
    if name is None:
        actives = {m.active for m in lora_modules(model).values() if m.adapters} - {None}
        if len(actives) == 1:
            return actives.pop()
        if len(names) == 1:
            return names[0]
        raise LoRAError(f"say which adapter: the model has {', '.join(names) or 'none'}")
    if name not in names:
        raise LoRAError(f"no adapter named {name!r} (the model has {', '.join(names) or 'none'})")
    return name


def set_active(model: nn.Module, name: Optional[str]):
    """Make adapter `name` the one plain forwards apply (None: none, the bare base)."""
    if name is not None:
        _require(model, name)
    for mod in lora_modules(model).values():
        mod.active = name


def disable_lora(model: nn.Module):
    set_active(model, None)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    before = {p: m.active for p, m in lora_modules(model).items()}
    set_active(model, None)
    try:
        yield model
    finally:
        for p, m in lora_modules(model).items():
            m.active = before.get(p)


def set_row_adapters(model: nn.Module, names: Sequence[Optional[str]]):
    """Per batch row (dim 0 of the forwards that follow), the adapter it uses (None: the bare base)."""
    known = set(adapter_names(model))
    bad = [n for n in names if n is not None and n not in known]
    if bad:
        raise LoRAError(f"no adapter named {bad[0]!r} (the model has {', '.join(sorted(known)) or 'none'})")
    mods = lora_modules(model)
    dev = next(iter(mods.values())).device if mods else torch.device("cpu")
    groups = []
    for n in dict.fromkeys(n for n in names if n is not None):
        groups.append((n, torch.tensor([i for i, m in enumerate(names) if m == n], dtype=torch.long, device=dev)))
    for mod in mods.values():
        mod.row_groups = (len(names), groups)


def clear_row_adapters(model: nn.Module):
    for mod in lora_modules(model).values():
        mod.row_groups = None


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: Sequence[Optional[str]]):
    set_row_adapters(model, names)
    try:
        yield model
    finally:
        clear_row_adapters(model)


def mark_trainable(model: nn.Module, name: Optional[str] = None) -> int:
    """Freeze every parameter of the model except adapter `name`'s (default: the active one). Returns the number
    of trainable values."""
    name = _require(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for mod in lora_modules(model).values():
        if name in mod.adapters:
            for p in mod.adapters[name].parameters():
                p.requires_grad_(True)
                n += p.numel()
    return n


def lora_parameters(model: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    name = _require(model, name)
    return [p for m in lora_modules(model).values() if name in m.adapters for p in m.adapters[name].parameters()]


def lora_state(model: nn.Module, name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under our names, e.g. "layers.0.attn.qkv.A.full" / ".B.full" (detached)."""
    name = _require(model, name)
    out = {}
    for path, mod in lora_modules(model).items():
        if name in mod.adapters:
            ad = mod.adapters[name]
            for label in ad.A:
                out[f"{path}.A.{label}"] = ad.A[label].detach()
                out[f"{path}.B.{label}"] = ad.B[label].detach()
    return out


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], name: Optional[str] = None):
    """Copy tensors from lora_state() back into an adapter of the same targets and ranks."""
    name = _require(model, name)
    mods = lora_modules(model)
    with torch.no_grad():
        for key, t in state.items():
            path, ab, label = key.rsplit(".", 2)
            ad = mods[path].adapters[name] if path in mods and name in mods[path].adapters else None
            if ad is None or ab not in ("A", "B") or label not in ad.A:
                raise LoRAError(f"{key}: no such LoRA tensor in adapter {name!r}")
            dst = getattr(ad, ab)[label]
            if tuple(dst.shape) != tuple(t.shape):
                raise LoRAError(f"{key}: shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(t)


def _unwrap_all(model: nn.Module):
    for path in sorted(lora_modules(model), key=len, reverse=True):
        parent, leaf = _parent(model, path)
        setattr(parent, leaf, getattr(parent, leaf).base)


def merge_lora(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Fold adapter `name` (default: the active one) into the weights and remove every LoRA module (other
    adapters are dropped). The base must be in float: see the module docstring. A LoRA on a tied output
    layer unties it from the embedding first (config.tie_word_embeddings becomes False)."""
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapter to merge")
    name = _require(model, name)
    for path, mod in mods.items():                       # check everything before changing anything
        if name in mod.adapters and mod.adapters[name].A and mod.quantized:
            raise LoRAError(
                f"{path} is quantized (int{mod.base.bits}): merging needs the float base; load the base in float "
                "(glmkit merge does), merge, then quantize the merged model")
    emb = getattr(model, "tok_embeddings", None)
    for path, mod in mods.items():
        if name not in mod.adapters:
            continue
        if emb is not None and isinstance(mod.base, nn.Linear) and mod.base.weight is getattr(emb, "weight", None):
            mod.base.weight = nn.Parameter(mod.base.weight.detach().clone(), requires_grad=False)
            cfg = getattr(model, "config", None)
            if cfg is not None:
                cfg.tie_word_embeddings = False
        mod.merge(name)
    _unwrap_all(model)
    return model


def remove_lora(model: nn.Module, name: Optional[str] = None) -> nn.Module:
    """Drop adapter `name` (None: all of them, and the LoRA modules with them)."""
    if name is None:
        _unwrap_all(model)
        return model
    name = _require(model, name)
    for mod in lora_modules(model).values():
        if name in mod.adapters:
            del mod.adapters[name]
        if mod.active == name:
            mod.active = None
    return model


def describe(model: nn.Module, name: Optional[str] = None) -> dict:
    """{"parts": n, "params": n, "ranks": {r: count}, "targets": [short names]} of adapter `name`."""
    name = _require(model, name)
    ranks: Counter = Counter()
    shorts: dict[str, None] = {}
    n_params = n_parts = 0
    for path, mod in lora_modules(model).items():
        if name in mod.adapters:
            ad = mod.adapters[name]
            for label in ad.A:
                ranks[ad.rank(label)] += 1
                n_parts += 1
                n_params += ad.A[label].numel() + ad.B[label].numel()
                shorts[path.rsplit(".", 1)[-1] + ("" if label == FULL else f":{label}")] = None
    return {"parts": n_parts, "params": n_params, "ranks": dict(ranks), "targets": list(shorts)}
