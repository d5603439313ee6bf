"""Official checkpoint folders -> GLM modules, and our own save/load.

Never executes anything from the folder: no remote code, torch.load(weights_only=True) for pickled shards,
safetensors read through a memory map of our own. The model is built on the meta device and each tensor is
copied straight into a parameter of the target dtype/device, so no second full copy of the weights exists.

The key maps below are data: our parameter name -> official name(s), with {i} the layer index. A list of
official names means the parameter is their concatenation along dim 0 (transformers' GLM keeps q/k/v apart).
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig, from_hf, guess_family
from .model import GLM

KEY_MAPS: dict[str, dict[str, object]] = {
    "chatglm": {  # ChatGLM-6B
        "tok_embeddings.weight": "transformer.word_embeddings.weight",
        "layers.{i}.attn_norm.weight": "transformer.layers.{i}.input_layernorm.weight",
        "layers.{i}.attn_norm.bias": "transformer.layers.{i}.input_layernorm.bias",
        "layers.{i}.attn.qkv.weight": "transformer.layers.{i}.attention.query_key_value.weight",
        "layers.{i}.attn.qkv.bias": "transformer.layers.{i}.attention.query_key_value.bias",
        "layers.{i}.attn.out.weight": "transformer.layers.{i}.attention.dense.weight",
        "layers.{i}.attn.out.bias": "transformer.layers.{i}.attention.dense.bias",
        "layers.{i}.ffn_norm.weight": "transformer.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.ffn_norm.bias": "transformer.layers.{i}.post_attention_layernorm.bias",
        "layers.{i}.mlp.up.weight": "transformer.layers.{i}.mlp.dense_h_to_4h.weight",
        "layers.{i}.mlp.up.bias": "transformer.layers.{i}.mlp.dense_h_to_4h.bias",
        "layers.{i}.mlp.down.weight": "transformer.layers.{i}.mlp.dense_4h_to_h.weight",
        "layers.{i}.mlp.down.bias": "transformer.layers.{i}.mlp.dense_4h_to_h.bias",
        "norm.weight": "transformer.final_layernorm.weight",
        "norm.bias": "transformer.final_layernorm.bias",
        "output.weight": "lm_head.weight",
    },
    "chatglm2": {  # ChatGLM2-6B, ChatGLM3-6B, GLM-4-9B (chatglm layout)
        "tok_embeddings.weight": "transformer.embedding.word_embeddings.weight",
        "layers.{i}.attn_norm.weight": "transformer.encoder.layers.{i}.input_layernorm.weight",
        "layers.{i}.attn.qkv.weight": "transformer.encoder.layers.{i}.self_attention.query_key_value.weight",
        "layers.{i}.attn.qkv.bias": "transformer.encoder.layers.{i}.self_attention.query_key_value.bias",
        "layers.{i}.attn.out.weight": "transformer.encoder.layers.{i}.self_attention.dense.weight",
        "layers.{i}.attn.out.bias": "transformer.encoder.layers.{i}.self_attention.dense.bias",
        "layers.{i}.ffn_norm.weight": "transformer.encoder.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.mlp.up.weight": "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",
        "layers.{i}.mlp.up.bias": "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.bias",
        "layers.{i}.mlp.down.weight": "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
        "layers.{i}.mlp.down.bias": "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.bias",
        "norm.weight": "transformer.encoder.final_layernorm.weight",
        "output.weight": "transformer.output_layer.weight",
    },
    "glm_hf": {  # transformers GlmForCausalLM (glm-4-9b-chat-hf)
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.attn.qkv.weight": ["model.layers.{i}.self_attn.q_proj.weight",
                                       "model.layers.{i}.self_attn.k_proj.weight",
                                       "model.layers.{i}.self_attn.v_proj.weight"],
        "layers.{i}.attn.qkv.bias": ["model.layers.{i}.self_attn.q_proj.bias",
                                     "model.layers.{i}.self_attn.k_proj.bias",
                                     "model.layers.{i}.self_attn.v_proj.bias"],
        "layers.{i}.attn.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.mlp.up.weight": "model.layers.{i}.mlp.gate_up_proj.weight",
        "layers.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
}
# prefixes a layout's keys may carry in the file (GLMForConditionalGeneration / GLMForMultipleChoice: "glm.")
KEY_PREFIXES: dict[str, tuple[str, ...]] = {"glm": ("glm.",)}
# the original GLM (2021): THUDM's remote-code GLMModel, keys as published (optionally under "glm."): ChatGLM-6B's
# layer and final-norm names, its own embedding tables, no separate output (tied to the word embeddings)
KEY_MAPS["glm"] = {
    "tok_embeddings.weight": "word_embeddings.weight",
    "pos_embeddings.weight": "transformer.position_embeddings.weight",
    "block_pos_embeddings.weight": "transformer.block_position_embeddings.weight",
    **{ours: theirs for ours, theirs in KEY_MAPS["chatglm"].items() if ours.startswith(("layers.", "norm."))},
}
KEY_MAPS["sat"] = KEY_MAPS["chatglm"]   # GLM-130B's SAT checkpoints name their tensors as ChatGLM-6B (output tied)
# buffers the official code saves that we recompute (rotary inverse frequencies)
IGNORED_KEYS = [re.compile(r"(^|\.)rotary_emb\.inv_freq$"), re.compile(r"(^|\.)rotary_pos_emb\.inv_freq$")]

SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """The folder cannot be loaded; the message names the file or tensor at fault."""


@dataclass
class LoadInfo:
    path: Path
    layout: str                        # chatglm | chatglm2 | glm_hf | glmkit
    files: list[Path]
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------------
# Folder inspection
# --------------------------------------------------------------------------------------------------------

def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; point glmkit at the folder holding config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json; is it a model folder (e.g. a download of "
                              "THUDM/chatglm3-6b)?")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None


def _is_tiktoken_file(p: Path) -> bool:
    with open(p, "rb") as f:
        head = f.read(256)
    return re.match(rb"^[A-Za-z0-9+/=]+ \d+\r?\n", head) is not None


def detect_family(path: Path, cfg: dict) -> str:
    """Which generation's tokenizer and chat format the folder uses (the weights alone cannot tell 2 from 3)."""
    path = Path(path)
    if cfg.get("model_type") == "glmkit":
        return cfg["family"]
    if guess_family(cfg) == "glm":                      # the 2021 GLM (before GLM-4's model_type "glm")
        return "glm"
    if (path / "ice_text.model").is_file():
        return "chatglm"
    tok = path / "tokenizer.model"
    if tok.is_file() and _is_tiktoken_file(tok):
        return "glm4"
    if cfg.get("model_type") == "glm" or ((path / "tokenizer.json").is_file() and not tok.is_file()):
        return "glm4"
    guess = guess_family(cfg)
    if guess == "chatglm":
        return "chatglm"
    names = []
    tc = path / "tokenizer_config.json"
    if tc.is_file():
        try:
            names.append(str(json.loads(tc.read_text(encoding="utf-8")).get("name_or_path", "")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    names.append(str(cfg.get("_name_or_path", "")))
    code = path / "tokenization_chatglm.py"
    if code.is_file():                                  # read as text only, never imported
        text = code.read_text(encoding="utf-8", errors="replace")
        if "<|observation|>" in text:
            names.append("chatglm3")
        elif "SPTokenizer" in text:
            names.append("chatglm2")
    names.append(path.name)
    for h in names:
        h = h.lower()
        if "chatglm3" in h:
            return "chatglm3"
        if "chatglm2" in h or "codegeex2" in h:
            return "chatglm2"
        if "glm-4" in h or "glm4" in h:
            return "glm4"
    return guess or "chatglm3"


def weight_files(path: Path) -> list[Path]:
    """The shard files of a folder, safetensors preferred, each checked to exist."""
    path = Path(path)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            try:
                wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index} is not a valid weight index: {e}") from None
            files = sorted(set(wm.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists {missing[0]}, which is not in {path}"
                                      + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else ""))
            return [path / f for f in files]
        if (path / single).is_file():
            return [path / single]
    shards = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise CheckpointError(f"{path} has no weights: expected model.safetensors[.index.json] or "
                          "pytorch_model.bin[.index.json]")


# --------------------------------------------------------------------------------------------------------
# Tensor readers
# --------------------------------------------------------------------------------------------------------

class SafetensorsFile:
    """A .safetensors file read through a memory map; tensors are zero-copy views until copied out."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is truncated ({size} bytes): no safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{self.path} is truncated or not a safetensors file "
                                      f"(header of {n} bytes in a file of {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path} has a corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries = header
        for name, e in header.items():
            end = self.base + e["data_offsets"][1]
            if end > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name} ends at byte {end} but the file "
                                      f"has {size}")
            if e["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        self._f = open(self.path, "rb")
        # ACCESS_COPY: private, writable mapping (torch.frombuffer wants a writable buffer); never written
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

    def keys(self):
        return self.entries.keys()

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        start, end = e["data_offsets"]
        shape = tuple(e["shape"])
        count = end - start
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._mm, dtype=dtype, count=count // dtype.itemsize, offset=self.base + start)
        return t.view(shape)

    def release(self, name: str, lo: int = 0, hi: Optional[int] = None):
        """Drop the mapped pages of bytes [lo, hi) of a tensor already copied out, so they do not pile up
        in RSS. Only whole pages inside the range go (a page shared with a neighbour stays until it goes)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, end = self.entries[name]["data_offsets"]
        page = mmap.PAGESIZE
        a = (self.base + start + lo) // page * page
        b = self.base + (end if hi is None else start + hi)
        if b <= a:
            return
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)
        except (OSError, ValueError):
            pass

    def close(self):
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:      # a tensor view is still alive; the map closes when it is collected
                pass
        self._f.close()


def load_pickled_shard(path: Path) -> dict:
    """A pytorch_model*.bin shard, with weights_only=True (no code runs), memory-mapped when possible."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors, which could run code "
            f"when unpickled ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {str(e).splitlines()[0]}") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path, callable]]:
    """(name, tensor, file, release) for every tensor of every shard; release(lo=0, hi=None) frees the
    mapped pages of bytes [lo, hi) of the tensor (all of it by default)."""
    for f in files:
        if f.suffix == ".safetensors":
            st = SafetensorsFile(f)
            try:
                for name in list(st.keys()):
                    yield name, st.get(name), f, (lambda lo=0, hi=None, n=name: st.release(n, lo, hi))
            finally:
                st.close()
        else:
            sd = load_pickled_shard(f)
            for name in list(sd.keys()):
                t = sd.pop(name)
                if not isinstance(t, torch.Tensor):
                    continue
                yield name, t, f, (lambda lo=0, hi=None: None)
            del sd


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------

def layout_of(cfg_dict: dict) -> str:
    mt = cfg_dict.get("model_type")
    if mt == "glmkit":
        return "glmkit"
    if guess_family(cfg_dict) == "glm":
        return "glm"
    if mt == "glm":
        return "glm_hf"
    if "position_encoding_2d" in cfg_dict or "inner_hidden_size" in cfg_dict or "max_sequence_length" in cfg_dict:
        return "chatglm"
    return "chatglm2"


def _reverse_map(layout: str, model: GLM) -> dict[str, tuple[str, int, int]]:
    """official name -> (our name, part index, number of parts)."""
    ours = [n for n, _ in model.named_parameters()]
    if layout == "glmkit":
        return {n: (n, 0, 1) for n in ours}
    table = KEY_MAPS[layout]
    rev: dict[str, tuple[str, int, int]] = {}
    pat = {re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"): k for k in table}
    for name in ours:
        for rx, key in pat.items():
            m = rx.match(name)
            if m:
                src = table[key]
                srcs = src if isinstance(src, list) else [src]
                for j, s in enumerate(srcs):
                    s = s.replace("{i}", m.group(1)) if m.groups() else s
                    rev[s] = (name, j, len(srcs))
                break
        else:
            raise CheckpointError(f"no {layout} checkpoint key maps to parameter {name}")
    return rev


def _unprefixed(name: str, layout: str, rev: dict) -> str:
    """A file key without the wrapper prefix its layout may carry ("glm." of GLMForConditionalGeneration)."""
    for p in KEY_PREFIXES.get(layout, ()):
        if name.startswith(p) and name not in rev and name[len(p):] in rev:
            return name[len(p):]
    return name


def _part_rows(cfg: ModelConfig, name: str, n_parts: int) -> list[int]:
    if n_parts == 1:
        return []
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        return [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
    raise CheckpointError(f"don't know how to assemble {name} from {n_parts} parts")


def _get_module(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def resolve_dtype(dtype, cfg: ModelConfig, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
        return DTYPES[dtype]
    dev = torch.device(device).type
    if dev == "cuda":
        return torch.bfloat16 if (cfg.torch_dtype == "bfloat16" and torch.cuda.is_bf16_supported()) \
            else torch.float16
    if dev == "mps":
        return torch.float16
    # CPU: fp32 is exact and fastest for small models; big ones take half the memory in bf16
    return torch.float32 if cfg.num_params() < 1_000_000_000 else torch.bfloat16


COPY_CHUNK_BYTES = 64 << 20


def _copy_releasing(dst: torch.Tensor, src: torch.Tensor, release) -> None:
    """dst.copy_(src) in row chunks of ~64 MB, dropping each chunk's mapped source pages once copied:
    peak memory is the loaded model plus one chunk, not plus the largest tensor (the 0.5 GB embedding)."""
    row_bytes = src[0].numel() * src.element_size() if src.dim() > 1 and src.shape[0] else 0
    if not row_bytes or src.numel() * src.element_size() <= COPY_CHUNK_BYTES:
        dst.copy_(src)
        release()
        return
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for r in range(0, src.shape[0], step):
        dst[r:r + step].copy_(src[r:r + step])
        release(r * row_bytes, min(r + step, src.shape[0]) * row_bytes)


def _quantize_releasing(targets, r0: int, src: torch.Tensor, release) -> None:
    """Quantize src's rows into rows r0.. of each target (QuantLinear/QuantEmbedding) in ~64 MB slices,
    dropping each slice's mapped source pages once done (peak: the quantized model plus one slice)."""
    row_bytes = src[0].numel() * src.element_size() if src.shape[0] else 1
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for r in range(0, src.shape[0], step):
        for t in targets:
            t.set_rows(r0 + r, src[r:r + step])
        release(r * row_bytes, min(r + step, src.shape[0]) * row_bytes)
    release()


def read_model_config(path: Path, family=None, quantize=None):
    """A folder's config.json -> (ModelConfig, the raw dict, QuantSpec or None, whether the folder itself is
    quantized); quantize= of an already quantized folder must be its own spec (CheckpointError otherwise)."""
    from . import quant

    cfg_dict = read_config(path)
    try:
        cfg = from_hf(cfg_dict, family=family or detect_family(path, cfg_dict))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'config.json'} lacks or mistypes a required field: {e}") from None
    spec, prequantized = None, bool(cfg.quantization)
    try:
        if prequantized:
            spec = quant.QuantSpec.from_dict(cfg.quantization)
            if quantize is not None and quant.QuantSpec.parse(quantize) != spec:
                raise CheckpointError(f"{path} is already quantized ({spec.to_dict()}); load it without "
                                      "quantize=, or quantize the float checkpoint it came from")
        elif quantize is not None:
            spec = quant.QuantSpec.parse(quantize)
    except quant.QuantError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    return cfg, cfg_dict, spec, prequantized


def load_model(path, dtype=None, device: str = "cpu", family: Optional[str] = None,
               progress: bool = False, quantize=None) -> tuple[GLM, LoadInfo]:
    """Load a checkpoint folder (official layouts or ours) into a GLM in `dtype` on `device`.

    quantize ("int4", "int8", "int4:g64" or a quant.QuantSpec): quantize while loading, tensor by tensor, so
    the float model never exists whole (peak: the quantized model plus the float tensors of one layer).
    A folder written by `glmkit quantize` loads quantized by itself (its config.json says how).
    """
    import time

    from . import quant

    t0 = time.perf_counter()
    path = Path(path)
    from . import sat_checkpoint
    if sat_checkpoint.is_sat_dir(path):          # GLM-130B's SwissArmyTransformer layout: no config.json
        return sat_checkpoint.load_sat(path, dtype=dtype, device=device, progress=progress, quantize=quantize)
    cfg, cfg_dict, spec, prequantized = read_model_config(path, family, quantize)
    layout = layout_of(cfg_dict)
    files = weight_files(path)
    if spec is not None:
        if torch.device(device).type != "cpu" and dtype is None:
            dtype = "float16"
        dt = resolve_dtype(dtype or "float32", cfg, device)
        cfg.quantization = spec.to_dict()
    else:
        dt = resolve_dtype(dtype, cfg, device)

    with torch.device("meta"):
        model = GLM(cfg)
    tied = cfg.tie_word_embeddings
    params = dict(model.named_parameters())           # float names and shapes (before any swap)
    buffer_names: set[str] = set()
    if prequantized:
        quant.quant_skeleton(model, spec, act_dtype=dt)
        # our layout, quantized: every parameter and buffer is stored under its own name
        rev = {n: (n, 0, 1) for n, _ in list(model.named_parameters()) + list(model.named_buffers())}
        params = dict(model.named_parameters()) | dict(model.named_buffers())
        buffer_names = {n for n, _ in model.named_buffers()}
    else:
        rev = _reverse_map(layout, model)
        if spec is not None:
            quant.quant_skeleton(model, spec, act_dtype=dt)
    if tied:
        rev = {k: v for k, v in rev.items() if v[0] != "output.weight"}
    filled: dict[str, list[bool]] = {}
    info = LoadInfo(path=path, layout=layout, files=files)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rev), unit="tensor", desc=f"loading {path.name}", leave=False, file=sys.stderr)

    with torch.no_grad():
        for name, src, fpath, release in iter_tensors(files):
            name = _unprefixed(name, layout, rev)
            if name not in rev:
                if not any(rx.search(name) for rx in IGNORED_KEYS):
                    info.unexpected.append(name)
                continue
            ours, part, n_parts = rev[name]
            meta = params[ours]
            rows = _part_rows(cfg, ours, n_parts)
            want = (rows[part],) + tuple(meta.shape[1:]) if n_parts > 1 else tuple(meta.shape)
            if tuple(src.shape) != want:
                raise CheckpointError(f"tensor {name} in {fpath.name} has shape {tuple(src.shape)}, expected "
                                      f"{want} for this config.json")
            mod, leaf = _get_module(model, ours)
            to_quantize = not prequantized and isinstance(mod, (quant.QuantLinear, quant.QuantEmbedding))
            if ours not in filled:
                filled[ours] = [False] * n_parts
                if to_quantize and leaf == "weight":       # quantized in row slices straight from the file
                    mod.alloc_weight()
                    if tied and ours == "tok_embeddings.weight" and isinstance(model.output, quant.QuantLinear):
                        model.output.alloc_weight()
                elif to_quantize:                          # a quantized layer's bias: fp32 buffer
                    mod.bias = torch.empty(meta.shape, dtype=torch.float32, device=device)
                elif ours in buffer_names:
                    if src.dtype != meta.dtype:
                        raise CheckpointError(f"tensor {name} in {fpath.name} is {src.dtype}, expected "
                                              f"{meta.dtype} for this quantization")
                    setattr(mod, leaf, torch.empty(meta.shape, dtype=meta.dtype, device=device))
                else:
                    setattr(mod, leaf, nn.Parameter(torch.empty(meta.shape, dtype=dt, device=device),
                                                    requires_grad=False))
            r0 = sum(rows[:part]) if n_parts > 1 else 0
            if to_quantize and leaf == "weight":
                # no float copy of the weight ever exists whole: quantize ~64 MB of rows at a time
                targets = [mod]
                if tied and ours == "tok_embeddings.weight" and isinstance(model.output, quant.QuantLinear):
                    targets.append(model.output)
                    filled["output.weight"] = [True]
                _quantize_releasing(targets, r0, src, release)
            else:
                full = getattr(mod, leaf)
                dst = full if n_parts == 1 else full[r0:][:rows[part]]
                _copy_releasing(dst, src, release)
            filled[ours][part] = True
            if bar:
                bar.update(1)
    if bar:
        bar.close()

    missing = []
    for ours in params:
        if tied and ours == "output.weight":
            continue
        if ours not in filled:
            missing += [k for k, v in rev.items() if v[0] == ours]
        elif not all(filled[ours]):
            missing += [k for k, v in rev.items() if v[0] == ours and not filled[ours][v[1]]]
    if missing:
        raise CheckpointError(f"{path} is missing tensor {missing[0]}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if tied and not isinstance(model.output, quant.QuantLinear):
        model.output.weight = model.tok_embeddings.weight
    if spec is not None and device != "cpu":
        model.to(device)
    model.eval()
    info.seconds = time.perf_counter() - t0
    return model, info


# --------------------------------------------------------------------------------------------------------
# Saving (our layout: config.json with model_type "glmkit" + model.safetensors, tokenizer files copied)
# --------------------------------------------------------------------------------------------------------

TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "cog-pretrain.model", "added_tokens.json", "vocab.json", "merges.txt",        # original GLM
                   "generation_config.json", "special_tokens_map.json", "MODEL_LICENSE", "LICENSE")


def save_model(model: GLM, out_dir, source_dir=None, max_shard_bytes: int = 4 << 30):
    """Write `model` in our layout; copy tokenizer/licence files from `source_dir` when given."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    cfg = model.config
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    adapted = next((k for k in sd if ".adapters." in k or k.endswith(".base.weight")), None)
    if adapted is not None:
        raise CheckpointError(f"the model holds LoRA adapters ({adapted}): merge them first (glmkit merge) or "
                              "save the adapter on its own (glmkit.adapters.peft_format.save_peft_lora)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tie_word_embeddings:
        sd.pop("output.weight", None)
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    meta = {"format": "pt", "producer": "glmkit"}
    if len(shards) == 1:
        _atomic_save(save_file, shards[0], out / "model.safetensors", meta)
    else:
        wm = {}
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(save_file, sh, out / fname, meta)
            wm.update({k: fname for k in sh})
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
             "weight_map": wm}, indent=2))
    d = cfg.to_dict()
    d["torch_dtype"] = str(model.dtype).replace("torch.", "")     # of the float tensors (norms if quantized)
    (out / "config.json").write_text(json.dumps(d, indent=2, ensure_ascii=False))
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    return out


def _atomic_save(save_file, tensors, path: Path, meta):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
