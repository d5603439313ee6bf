"""The local model store: models (and adapters) by name in one folder, $GLMKIT_MODELS (default ~/.glmkit/models).

An entry is a folder STORE/NAME holding one of:
  a model folder          config.json + weights (official download, or written by glmkit quantize/merge)
  an adapter folder       a PEFT LoRA (adapter_config.json) or an official P-tuning v2 folder
  a glmkit finetune run   NAME/model (full fine-tuning: the entry is that model) or NAME/adapter (the adapter)
`--model NAME` / `--adapter NAME` (a bare name: no slash) resolve to STORE/NAME before being read as a path, and
`--out NAME` of quantize, merge and finetune writes STORE/NAME. list_models() is what `glmkit models` prints;
held() is what a server lists (GET /v1/models, and ollama's /api/tags). Nothing here imports torch unless an
official folder's generation must be told from its tokenizer files.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ENV = "GLMKIT_MODELS"
DEFAULT = "~/.glmkit/models"


class StoreError(ValueError):
    pass


def models_dir() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT).expanduser()


def is_name(s) -> bool:
    """A bare store name: no path separator, not '.'/'..', not '~...'."""
    s = str(s)
    return bool(s) and "/" not in s and os.sep not in s and s not in (".", "..") and not s.startswith("~")


@dataclass
class Entry:
    name: str
    path: str                       # the folder to load (NAME, or NAME/model / NAME/adapter of a run)
    kind: str                       # "model" or "adapter"
    generation: Optional[str]       # chatglm / chatglm2 / chatglm3 / glm4 (None: unknown)
    size_bytes: int                 # on disk, the whole entry folder
    quantization: Optional[str]     # "int4", "int8:g64", ...; None: float
    adapters: list = field(default_factory=list)    # a model: the store's adapters made for it
    base: Optional[str] = None      # an adapter: the base model it was trained on (as recorded)
    modified: float = 0.0           # mtime of the entry folder (seconds since the epoch)

    def to_dict(self) -> dict:
        return asdict(self)


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _loadable(folder: Path) -> Optional[tuple[str, Path]]:
    """(kind, folder to load) of a store entry, or None when it is neither a model nor an adapter."""
    if (folder / "adapter_config.json").is_file():
        return "adapter", folder
    cfg = folder / "config.json"
    if cfg.is_file():                   # an official P-tuning v2 folder: the base's config with pre_seq_len, no tokenizer
        tokenizer = any((folder / n).is_file() for n in ("tokenizer.model", "ice_text.model", "tokenizer.json"))
        return ("adapter" if _json(cfg).get("pre_seq_len") and not tokenizer else "model"), folder
    for sub, kind in (("model", "model"), ("adapter", "adapter")):
        if (folder / sub).is_dir() and _loadable(folder / sub):
            return kind, folder / sub
    return None


def _generation(folder: Path, cfg: dict) -> Optional[str]:
    if cfg.get("model_type") == "glmkit":
        return cfg.get("family")
    if not cfg:
        return None
    from .checkpoint import detect_family          # official folders: the tokenizer files decide (imports torch)
    try:
        return detect_family(folder, cfg)
    except (OSError, ValueError, KeyError):
        return None


def _quantization(cfg: dict) -> Optional[str]:
    q = cfg.get("quantization")
    if isinstance(q, dict) and q.get("bits"):
        g = q.get("group_size", 32)
        return f"int{q['bits']}" + (f":g{g}" if g != 32 else "")
    if cfg.get("quantization_bit"):
        return f"int{cfg['quantization_bit']} (official)"
    return None


def _base_of(entry_dir: Path, folder: Path) -> Optional[str]:
    """The base an adapter was made for: PEFT's base_model_name_or_path, or the finetune run's --model."""
    base = _json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        base = (_json(entry_dir / "run.json").get("args") or {}).get("model")
    return str(base) if base else None


def describe(folder, name: Optional[str] = None) -> Entry:
    """An Entry for a model or adapter folder (in the store or not)."""
    folder = Path(folder).expanduser()
    found = _loadable(folder)
    if found is None:
        raise StoreError(f"{folder} is neither a model folder (config.json + weights) nor an adapter folder")
    kind, load = found
    cfg = _json(load / "config.json")
    base = _base_of(folder, load) if kind == "adapter" else None
    gen = _generation(load, cfg) if kind == "model" else None
    try:
        mtime = folder.stat().st_mtime
    except OSError:
        mtime = 0.0
    return Entry(name=name or folder.name, path=str(load), kind=kind, generation=gen, size_bytes=_size(folder),
                 quantization=_quantization(cfg) if kind == "model" else None, base=base, modified=mtime)


def _same(base: Optional[str], model: Entry, root: Path) -> bool:
    if not base:
        return False
    if base == model.name:
        return True
    p = Path(base).expanduser()
    cands = {Path(model.path).resolve(), (root / model.name).resolve()}
    try:
        return p.resolve() in cands
    except OSError:
        return False


def list_models(root=None) -> list[Entry]:
    """Every entry of the store, by name; a model's .adapters are the store's adapters made for it."""
    root = Path(root).expanduser() if root else models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and _loadable(d):
            out.append(describe(d, d.name))
    for m in out:
        if m.kind == "model":
            m.adapters = [a.name for a in out if a.kind == "adapter" and _same(a.base, m, root)]
    for a in out:
        if a.kind == "adapter" and a.base:
            a.generation = next((m.generation for m in out if m.kind == "model" and _same(a.base, m, root)), None)
    return out


def resolve(value, kind: str = "model") -> str:
    """--model / --adapter value -> the folder to read: a bare NAME in the store first, then the path as given.
    A bare name that is neither raises StoreError naming both places."""
    if value is None or not is_name(value):
        return value
    entry = models_dir() / str(value)
    if entry.is_dir():
        found = _loadable(entry)
        if found is not None:
            return str(found[1])
        if not Path(value).exists():
            raise StoreError(f"--{kind} {value}: the store's folder {entry} holds neither a model (config.json + "
                             "weights) nor an adapter (nor a finetune run's model/ or adapter/)")
    if Path(value).exists():
        return value
    raise StoreError(f"--{kind} {value}: no {kind} named {value!r} in the store {models_dir()} (${ENV}; "
                     f"`glmkit models` lists it) and no folder {value!r} here")


def out_path(value) -> Path:
    """--out of quantize / merge / finetune: a bare NAME goes into the store (created), anything else is a path."""
    if is_name(value):
        root = models_dir()
        root.mkdir(parents=True, exist_ok=True)
        return root / str(value)
    return Path(value).expanduser()


def held(model_id: str, model_path, adapters: Optional[dict] = None) -> list[dict]:
    """What a server holds: the model it loaded (as model_id) and the LoRAs beside it ({name: folder}), each
    an Entry's dict with "id" (the name clients send) and, for an adapter, "parent"; for GET /v1/models and
    ollama's GET /api/tags."""
    out = []
    try:
        e = describe(model_path, model_id).to_dict() if model_path else {"name": model_id}
    except StoreError:
        e = {"name": model_id}
    out.append({**e, "id": model_id})
    for name, folder in (adapters or {}).items():
        try:
            a = describe(folder, name).to_dict()
        except StoreError:
            a = {"name": name}
        out.append({**a, "id": name, "parent": model_id, "generation": e.get("generation")})
    return out
