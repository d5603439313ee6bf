"""PEFT LoRA folders (adapter_config.json + adapter_model.safetensors / .bin), read and written in the official
key names of a layout, so that peft, LLaMA-Factory and the official fine-tuning scripts load ours and we theirs.

Keys: `base_model.model.<official module path>.lora_A.weight` / `.lora_B.weight` (the prefix and an adapter
name after lora_A / lora_B, e.g. `.lora_A.default.weight`, may be absent). The official module path is found in
lora.official_modules(model, layout), which reads checkpoint.KEY_MAPS (our.weight -> official.weight): no second
table. Examples:

    chatglm   (ChatGLM-6B)          transformer.layers.{i}.attention.query_key_value      -> layers.{i}.attn.qkv
                                    transformer.layers.{i}.attention.dense                -> layers.{i}.attn.out
    chatglm2  (ChatGLM2/3, GLM-4)   transformer.encoder.layers.{i}.self_attention.query_key_value  -> ...attn.qkv
                                    transformer.encoder.layers.{i}.mlp.dense_h_to_4h      -> layers.{i}.mlp.up
    glm_hf    (GlmForCausalLM)      model.layers.{i}.self_attn.q_proj / k_proj / v_proj   -> rows of attn.qkv
                                    model.layers.{i}.mlp.gate_up_proj                     -> layers.{i}.mlp.up

The layer computes W x + (lora_alpha / r) * B (A x) (rank_pattern / alpha_pattern per module, as PEFT).
chatglm2 and glm_hf name the same modules of the same row layout (GLM-4 is published in both), so an adapter in
either naming loads on a model of the other (shapes still checked); ChatGLM-6B's names are its own.

Saving converts between our parts and the layout's modules exactly: an adapter on our whole qkv becomes
q_proj / k_proj / v_proj with the same A and B's rows split (rank unchanged); q/k/v parts saved for a layout
with one query_key_value become one LoRA of rank r_q + r_k + r_v (A stacked, B block-diagonal, scales folded
into B, written with rank_pattern / alpha_pattern).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .lora import (FULL, LoRAError, Slot, lora_modules, mark_trainable, official_layout, official_modules,
                   set_active, wrap)

ADAPTER_CONFIG = "adapter_config.json"
SAFE_WEIGHTS = "adapter_model.safetensors"
BIN_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
KEY_RX = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
COMPATIBLE = {"chatglm2": ("glm_hf",), "glm_hf": ("chatglm2",)}    # same modules, same rows: other spellings

# options whose effect glmkit does not implement: refused when set (value -> why)
UNSUPPORTED = {
    "fan_in_fan_out": "stores weights transposed for GPT-2 style Conv1D layers; GLM layers are nn.Linear",
    "use_rslora": "rank-stabilised LoRA scales by lora_alpha / sqrt(r), not lora_alpha / r",
    "use_dora": "DoRA adds a learned magnitude vector per output",
    "modules_to_save": "full trained copies of whole modules are not LoRA weights",
    "layer_replication": "it rebuilds the base with repeated layers",
    "lora_bias": "it trains a bias in lora_B",
    "use_qalora": "QA-LoRA pools the input groups",
    "target_parameters": "LoRA on raw nn.Parameters",
    "trainable_token_indices": "it trains embedding rows",
    "alora_invocation_tokens": "activated LoRA switches on mid-sequence",
    "use_bdlora": "block-diagonal LoRA",
}
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "eva")


@dataclass
class LoRAInfo:
    """What load_peft_lora loaded."""
    name: str
    folder: Path
    file: Path
    r: int
    alpha: float
    dropout: float
    base_model: str
    layout: str                               # the key naming the file used
    modules: list[str] = field(default_factory=list)     # "layers.0.attn.qkv" / "layers.0.attn.qkv:q" ...
    config: dict = field(default_factory=dict)


def is_peft_folder(folder) -> bool:
    """A folder with adapter_config.json and adapter_model.safetensors or adapter_model.bin."""
    f = Path(folder)
    return f.is_dir() and (f / ADAPTER_CONFIG).is_file() and (
        (f / SAFE_WEIGHTS).is_file() or (f / BIN_WEIGHTS).is_file())


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def read_adapter_config(folder) -> dict:
    """adapter_config.json, checked to be a LoRA glmkit can apply exactly (else LoRAError naming the option)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoRAError(f"adapter folder {folder} does not exist" if not folder.exists()
                        else f"{folder} is not a folder; point at the folder holding {ADAPTER_CONFIG}")
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise LoRAError(f"{folder} has no {ADAPTER_CONFIG}: not a PEFT adapter folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"{path} does not hold a JSON object")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise LoRAError(f"{path}: peft_type is {cfg.get('peft_type')!r}, not 'LORA'; glmkit loads LoRA adapters "
                        "from PEFT folders")
    for opt, why in UNSUPPORTED.items():
        if cfg.get(opt):
            raise LoRAError(f"{path}: {opt}={json.dumps(cfg[opt])} is not supported ({why}); glmkit applies plain "
                            "LoRA, W x + (lora_alpha / r) * B A x")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise LoRAError(f"{path}: bias={bias!r} is not supported (trained biases of the base layers); only "
                        "bias 'none'")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise LoRAError(f"{path}: init_lora_weights={init!r} changes the base weights at initialisation, so this "
                        "adapter only works on that modified base; convert it to plain LoRA with PEFT first "
                        "(save_pretrained(path_initial_model_for_weight_conversion=...))")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAError(f"{path}: r must be a positive integer, not {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise LoRAError(f"{path}: lora_alpha must be a positive number, not {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise LoRAError(f"{path}: {key} must be an object")
    return cfg


def _pattern(patterns: dict, module: str):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", module), else None."""
    for k in patterns:
        if re.match(rf"(.*\.)?({k})$", module):
            return patterns[k]
    return None


def _weights_file(folder: Path) -> Path:
    for name in (SAFE_WEIGHTS, BIN_WEIGHTS):
        if (folder / name).is_file():
            return folder / name
    raise LoRAError(f"{folder} has {ADAPTER_CONFIG} but neither {SAFE_WEIGHTS} nor {BIN_WEIGHTS}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of adapter_model.safetensors / .bin (torch.load weights_only=True), copied out."""
    from ..checkpoint import CheckpointError, SafetensorsFile, load_pickled_shard

    try:
        if path.suffix == ".safetensors":
            st = SafetensorsFile(path)
            try:
                return {k: st.get(k).clone() for k in st.keys()}
            finally:
                st.close()
        return {k: v for k, v in load_pickled_shard(path).items() if isinstance(v, torch.Tensor)}
    except CheckpointError as e:
        raise LoRAError(str(e)) from None


def _table(model, layout: str) -> dict[str, tuple[Slot, str]]:
    """official module path -> (Slot, layout), the layout's own names first, then its compatible spellings."""
    out = {p: (s, layout) for p, s in official_modules(model, layout).items()}
    for other in COMPATIBLE.get(layout, ()):
        for p, s in official_modules(model, other).items():
            out.setdefault(p, (s, other))
    return out


def _layout_of_key(model, module: str) -> Optional[str]:
    from ..checkpoint import KEY_MAPS
    for lay in KEY_MAPS:
        if module in official_modules(model, lay):
            return lay
    # a layer index the model does not have: compare the key's shape with each layout's
    shape = re.sub(r"\.\d+\.", ".{i}.", module)
    for lay, table in KEY_MAPS.items():
        for src in table.values():
            for s in (src if isinstance(src, list) else [src]):
                if s == shape + ".weight":
                    return lay
    return None


def load_peft_lora(model, folder, layout: Optional[str] = None, name: str = "default", *,
                   trainable: bool = False, dtype=torch.float32) -> LoRAInfo:
    """Load a PEFT LoRA folder into `model` as adapter `name` and make it the active one. layout: the key
    naming of the base's checkpoint (LoadInfo.layout: chatglm, chatglm2, glm_hf; "glmkit" or None: see
    lora.official_layout). Everything is checked before the model changes: an unknown key, a tensor whose shape
    does not fit this base, a missing lora_A / lora_B, an unsupported option: LoRAError naming it.
    trainable: keep training it (only its parameters require grad). The LoRA weights are kept in `dtype`."""
    folder = Path(folder)
    layout = official_layout(model, layout)
    cfg = read_adapter_config(folder)
    wfile = _weights_file(folder)
    tensors = read_weights(wfile)
    if not tensors:
        raise LoRAError(f"{wfile} holds no tensors")
    table = _table(model, layout)
    r0, a0 = cfg["r"], float(cfg.get("lora_alpha", 8))
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    namings: set[str] = set()
    adapters_seen: set[str] = set()
    for key, t in tensors.items():
        m = KEY_RX.match(key)
        if m is None:
            if "lora_embedding_" in key:
                why = "LoRA on the embedding is not supported"
            elif "lora_magnitude_vector" in key:
                why = "a DoRA magnitude vector: DoRA is not supported"
            elif re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", key):
                why = "a lora_B bias (lora_bias) is not supported"
            else:
                why = "not a LoRA weight (…lora_A.weight / …lora_B.weight)"
            raise LoRAError(f"{wfile.name}: key {key}: {why}")
        if m["adapter"]:
            adapters_seen.add(m["adapter"])
        mod = m["mod"]
        if mod not in table:
            lay = _layout_of_key(model, mod)
            if lay is not None and lay != layout:
                hint = f"it is a module of the {lay} layout, and this base is {layout}: an adapter for another model?"
            else:
                hint = f"this {layout} base has no such module (layers 0..{model.config.num_layers - 1})"
            raise LoRAError(f"{wfile.name}: key {key} matches no module of the model: {hint}")
        pairs.setdefault(mod, {})[m["ab"]] = (key, t)
        namings.add(table[mod][1])
    if len(adapters_seen) > 1:
        raise LoRAError(f"{wfile.name} holds several adapters ({', '.join(sorted(adapters_seen))}); glmkit loads "
                        "one per folder")

    rank_of = {n: i for i, (n, _) in enumerate(model.named_modules())}
    plan = []            # (slot, A, B, alpha, official module), checked in model order
    for mod, ab in sorted(pairs.items(), key=lambda kv: (rank_of.get(table[kv[0]][0].module, 0),
                                                         table[kv[0]][0].lo)):
        for need in ("A", "B"):
            if need not in ab:
                other = next(iter(ab.values()))[0]
                raise LoRAError(f"{wfile.name}: {other} has no matching lora_{need} tensor")
        slot, _ = table[mod]
        base = model.get_submodule(slot.module)
        K = base.in_features
        r = _pattern(rank_pat, mod)
        r = int(r) if r is not None else r0
        alpha = _pattern(alpha_pat, mod)
        alpha = float(alpha) if alpha is not None else a0
        (ka, A), (kb, B) = ab["A"], ab["B"]
        for key, t, want, what in ((ka, A, (r, K), f"[r={r}, in_features {K}]"),
                                   (kb, B, (slot.hi - slot.lo, r), f"[{slot.hi - slot.lo} output rows, r={r}]")):
            if tuple(t.shape) != want:
                raise LoRAError(f"{wfile.name}: tensor {key} has shape {list(t.shape)}, expected {list(want)} "
                                f"{what} for {slot.module} of this base: made for another base?")
            if not t.dtype.is_floating_point:
                raise LoRAError(f"{wfile.name}: tensor {key} is {t.dtype}, not a float tensor")
            if not torch.isfinite(t).all():
                raise LoRAError(f"{wfile.name}: tensor {key} holds NaN or infinite values")
        plan.append((slot, A, B, alpha, mod))

    for path, mod in lora_modules(model).items():
        if name in mod.adapters:
            raise LoRAError(f"the model already has an adapter named {name!r} (at {path}); load under another name")
    done = []
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    for slot, A, B, alpha, _ in plan:
        wrap(model, slot.module).add_part(name, slot.label, A.shape[0], alpha, slot.lo, slot.hi, dropout, dtype,
                                          A=A, B=B, trainable=trainable)
        done.append(slot.module if slot.label == FULL else f"{slot.module}:{slot.label}")
    set_active(model, name)
    if trainable:
        mark_trainable(model, name)
    return LoRAInfo(name=name, folder=folder, file=wfile, r=r0, alpha=a0, dropout=dropout,
                    base_model=str(cfg.get("base_model_name_or_path") or ""),
                    layout=namings.pop() if len(namings) == 1 else layout, modules=done,
                    config=cfg)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------

def _export(model, layout: str, name: str) -> list[tuple[str, torch.Tensor, torch.Tensor, int, float]]:
    """(official module, A, B, r, alpha) for every official module of `layout` that adapter `name` touches."""
    by_module: dict[str, list[tuple[str, Slot]]] = {}
    for path, slot in official_modules(model, layout).items():
        by_module.setdefault(slot.module, []).append((path, slot))
    out = []
    for mpath, mod in lora_modules(model).items():
        if name not in mod.adapters or not mod.adapters[name].A:
            continue
        ad = mod.adapters[name]
        if mpath not in by_module:
            raise LoRAError(f"{mpath} has no module in the {layout} layout to save its LoRA under")
        for off, o in by_module[mpath]:
            parts = [(lab, ad.rows[lab]) for lab in ad.A if ad.rows[lab][0] < o.hi and o.lo < ad.rows[lab][1]]
            if not parts:
                continue
            rows = o.hi - o.lo
            if len(parts) == 1:
                lab, (lo, hi) = parts[0]
                r, alpha = ad.rank(lab), ad.alpha[lab]
                A = ad.A[lab].detach().float().cpu().clone()    # own storage: one A may serve q, k and v
                B = torch.zeros((rows, r), dtype=torch.float32)
                a, b = max(lo, o.lo), min(hi, o.hi)
                B[a - o.lo:b - o.lo] = ad.B[lab].detach().float()[a - lo:b - lo].cpu()
            else:        # several of our parts in one official module: stack A, B block-diagonal, scales in B
                r = sum(ad.rank(lab) for lab, _ in parts)
                alpha = float(r)
                A = torch.cat([ad.A[lab].detach().float().cpu() for lab, _ in parts])
                B = torch.zeros((rows, r), dtype=torch.float32)
                c = 0
                for lab, (lo, hi) in parts:
                    k = ad.rank(lab)
                    a, b = max(lo, o.lo), min(hi, o.hi)
                    B[a - o.lo:b - o.lo, c:c + k] = ad.B[lab].detach().float().cpu()[a - lo:b - lo] * ad.scale(lab)
                    c += k
            out.append((off, A.cpu().contiguous(), B.contiguous(), r, alpha))
    if not out:
        raise LoRAError(f"adapter {name!r} has no LoRA weights to save")
    return out


def _escape(module: str) -> str:
    """A rank_pattern / alpha_pattern key for one module, matched the same by PEFT 0.11 (r'.*\\.{key}$') and
    newer (r'(.*\\.)?({key})$'): the path without its first component, dots escaped."""
    return re.escape(module.split(".", 1)[1] if "." in module else module)


def save_peft_lora(model, folder, layout: Optional[str] = None, base_name: Optional[str] = None,
                   name: Optional[str] = None, task_type: str = "CAUSAL_LM") -> Path:
    """Write adapter `name` (default: the active one) as a PEFT folder in `layout`'s key names:
    adapter_config.json as PEFT writes it and adapter_model.safetensors (float32). base_name: the hub id or
    path of the base, written as base_model_name_or_path (PeftModel.from_pretrained loads onto the model you
    give it; AutoPeftModel resolves this name). layout None / "glmkit": lora.official_layout. Returns the
    folder."""
    from safetensors.torch import save_file

    from .lora import _require

    layout = official_layout(model, layout)
    name = _require(model, name)
    entries = _export(model, layout, name)
    counts = Counter((r, alpha) for _, _, _, r, alpha in entries)
    (r0, a0), _ = counts.most_common(1)[0]
    rank_pattern = {_escape(off): r for off, _, _, r, _ in entries if r != r0}
    alpha_pattern = {_escape(off): alpha for off, _, _, r, alpha in entries if alpha != a0}
    # target_modules: the official leaf names, where the adapter covers every module of that name; else paths
    table = official_modules(model, layout)
    saved = {off for off, *_ in entries}
    leaves: dict[str, list[str]] = {}
    for off in table:
        leaves.setdefault(off.rsplit(".", 1)[-1], []).append(off)
    targets = []
    for leaf, offs in sorted(leaves.items()):
        hit = [o for o in offs if o in saved]
        if hit:
            targets += [leaf] if len(hit) == len(offs) else hit
    ads = [m.adapters[name] for m in lora_modules(model).values() if name in m.adapters]
    dropout = max((a.p for a in ads), default=0.0)
    config = {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": base_name,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": int(a0) if float(a0).is_integer() else a0,
        "lora_dropout": dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r0,
        "rank_pattern": rank_pattern,
        "revision": None,
        "target_modules": targets,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": False,
    }
    tensors = {}
    for off, A, B, _, _ in entries:
        tensors[f"{PREFIX}{off}.lora_A.weight"] = A
        tensors[f"{PREFIX}{off}.lora_B.weight"] = B
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SAFE_WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / SAFE_WEIGHTS)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
