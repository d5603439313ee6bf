"""P-tuning v2 as the official ChatGLM code does it: `pre_seq_len` virtual tokens whose keys and values are
trained directly, per layer, in front of every sequence.

The prefix encoder maps the virtual token ids 0..P-1 to one vector of 2 x layers x kv_width each (the past
keys/values themselves), optionally through an MLP (prefix_projection: embedding -> Linear -> Tanh -> Linear).
Its output, viewed [P, 2 * layers, G, D], gives layer i its keys (slot 2i) and values (slot 2i + 1); they get no
rotary, take no position (the sequence's positions start at 0 as without the prefix) and every token attends
to them. In training the official code applies dropout 0.1 to them.

    ChatGLM-6B, no projection:   embedding [P, 2L * hidden]
    ChatGLM-6B, projection:      embedding [P, hidden] -> trans.0 [hidden -> hidden] -> tanh -> trans.2 [hidden -> 2L * hidden]
    ChatGLM2/3, no projection:   embedding [P, 2L * G * D]
    ChatGLM2/3, projection:      embedding [P, 2L * G * D] -> trans.0 [-> hidden] -> tanh -> trans.2 [hidden -> 2L * G * D]

Official folders (ptuning/main.py, finetune_chatmodel_demo) hold config.json (the base config with
`pre_seq_len`, `prefix_projection`) and pytorch_model.bin or model.safetensors with only the
`transformer.prefix_encoder.*` tensors; glmkit reads and writes exactly that. Which MLP exists is decided the way
the official code decides: by the truth value of `prefix_projection` in config.json (a one-element list is
true), checked against the tensors in the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig

PREFIX = "transformer.prefix_encoder."


class AdapterError(ValueError):
    """An adapter folder that cannot be used with this base; the message names the file or tensor."""


def kv_width(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads * cfg.head_dim


class PrefixEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, pre_seq_len: int, projection: bool = False):
        super().__init__()
        if pre_seq_len < 1:
            raise AdapterError(f"pre_seq_len must be at least 1, got {pre_seq_len}")
        self.cfg, self.pre_seq_len, self.projection = cfg, pre_seq_len, projection
        out = 2 * cfg.num_layers * kv_width(cfg)
        if projection and cfg.family == "chatglm":            # ChatGLM-6B: the MLP starts from hidden_size
            self.embedding = nn.Embedding(pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, out))
        elif projection:                                      # ChatGLM2/3: from the full key/value width
            self.embedding = nn.Embedding(pre_seq_len, out)
            self.trans = nn.Sequential(nn.Linear(out, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, out))
        else:
            self.embedding = nn.Embedding(pre_seq_len, out)
            self.trans = None

    def forward(self) -> torch.Tensor:
        """-> [P, 2 * layers, G, D]"""
        x = self.embedding.weight
        if self.trans is not None:
            x = self.trans(x)
        cfg = self.cfg
        return x.view(self.pre_seq_len, 2 * cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    def kv(self) -> torch.Tensor:
        """The prefix keys/values as the engine's KVCache takes them: [layers, 2, G, P, D]."""
        x = self.forward()                                    # [P, 2L, G, D]
        L = self.cfg.num_layers
        return x.view(self.pre_seq_len, L, 2, *x.shape[2:]).permute(1, 2, 3, 0, 4).contiguous()

    def prefix_kv(self, batch: int, dropout: float = 0.0) -> "PrefixKV":
        """For a full forward of `batch` rows (training): model(ids, PrefixKV, cache_pos=...)."""
        kv = self.kv()
        if dropout and self.training:
            kv = nn.functional.dropout(kv, dropout, training=True)
        return PrefixKV(kv, batch)


class PrefixKV:
    """The KV-cache protocol of model.py for a forward with no cache but a P-tuning prefix: each layer's keys and
    values are the prefix's, then the tokens' own (nothing is stored)."""

    def __init__(self, kv: torch.Tensor, batch: int):
        self.kv, self.batch = kv, batch                       # [layers, 2, G, P, D]
        self.prefix_len = kv.shape[3]

    def update(self, layer: int, k, v, cache_pos, kv_len, row0=0):
        B = k.shape[0]
        pk = self.kv[layer, 0].to(k.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        pv = self.kv[layer, 1].to(v.dtype).unsqueeze(0).expand(B, -1, -1, -1)
        return torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)


# --- official folders ------------------------------------------------------------------------------------

def is_ptuning_folder(folder: Path) -> bool:
    f = Path(folder) / "config.json"
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("pre_seq_len") is not None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _read_weights(folder: Path) -> tuple[dict, Path]:
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st)), st
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True), pt
    raise AdapterError(f"{folder}: a P-tuning v2 folder needs model.safetensors or pytorch_model.bin "
                       "(holding transformer.prefix_encoder.*)")


def load_ptuning(folder, cfg: ModelConfig) -> PrefixEncoder:
    """An official P-tuning v2 output folder -> its PrefixEncoder (float32) for a base of config cfg."""
    folder = Path(folder)
    conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    P = conf.get("pre_seq_len")
    if not isinstance(P, int) or P < 1:
        raise AdapterError(f"{folder / 'config.json'}: pre_seq_len must be a positive integer, got {P!r}")
    weights, path = _read_weights(folder)
    prefix = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    if not prefix:
        raise AdapterError(f"{path}: no transformer.prefix_encoder.* tensors (keys: {', '.join(list(weights)[:5])}"
                           f"{'...' if len(weights) > 5 else ''}): not a P-tuning v2 checkpoint")
    projection = bool(conf.get("prefix_projection", False))          # the official code's truth test
    has_trans = any(k.startswith("trans.") for k in prefix)
    if projection != has_trans:
        raise AdapterError(f"{folder}: config.json says prefix_projection={conf.get('prefix_projection')!r} but "
                           f"{path.name} {'has' if has_trans else 'has no'} prefix_encoder.trans.* weights")
    enc = PrefixEncoder(cfg, P, projection)
    want = enc.state_dict()
    for name, t in want.items():
        if name not in prefix:
            raise AdapterError(f"{path}: {PREFIX}{name} is missing")
        if tuple(prefix[name].shape) != tuple(t.shape):
            raise AdapterError(f"{path}: {PREFIX}{name} has shape {tuple(prefix[name].shape)}, but this base "
                               f"({cfg.family}, {cfg.num_layers} layers, key/value width {kv_width(cfg)}, hidden "
                               f"{cfg.hidden_size}) needs {tuple(t.shape)}: made for another base?")
    extra = sorted(set(prefix) - set(want))
    if extra:
        raise AdapterError(f"{path}: unexpected tensor {PREFIX}{extra[0]}")
    enc.load_state_dict({k: v.float() for k, v in prefix.items()})
    return enc.float().eval()


def save_ptuning(enc: PrefixEncoder, folder, base_config: Optional[dict] = None, safetensors: bool = False):
    """Write `enc` as the official trainers do: config.json (the base's official config with pre_seq_len and
    prefix_projection) and pytorch_model.bin (or model.safetensors) with transformer.prefix_encoder.* in
    float32, so the official evaluation scripts and glmkit.load(base, adapter=folder) both read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    conf = dict(base_config or {})
    conf.update(pre_seq_len=enc.pre_seq_len, prefix_projection=enc.projection)
    (folder / "config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sd = {PREFIX + k: v.detach().float().contiguous().cpu() for k, v in enc.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file
        save_file(sd, str(folder / "model.safetensors"))
    else:
        torch.save(sd, folder / "pytorch_model.bin")
