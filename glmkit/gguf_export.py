"""Export a GLM model to GGUF for llama.cpp (architecture "chatglm").

llama.cpp's LLM_ARCH_CHATGLM is the ChatGLM2/ChatGLM3/GLM-4-9B layout: RMSNorm, fused [q | k | v] projection with
bias, grouped key/value heads, rotary on the first head_dim/2 dims in interleaved pairs (its rope type NORM),
SwiGLU with the gate in the first half of ffn_up, no output-projection or MLP biases. ChatGLM-6B (v1: 2D rotary
positions, prefix attention, LayerNorm, GLM residuals) has no llama.cpp architecture and is refused.

    export_gguf("~/models/chatglm3-6b", "chatglm3-6b-q4_0.gguf", qtype="q4_0")

What goes into the file
  tensors      token_embd, blk.N.{attn_norm, attn_qkv (+bias), attn_output, ffn_norm, ffn_up, ffn_down},
               output_norm, output (left out when the embedding is tied; llama.cpp then reuses token_embd).
  types        norms and biases: F32. Every 2D weight (embedding and output included) in the asked type:
               f32 | f16 | q8_0 | q4_0. A weight whose input size is not a multiple of 32 cannot be Q8_0/Q4_0
               and is written F16 (as llama.cpp's own converter does); ExportResult.fallbacks lists them.
               A quantized glmkit model (int4/int8) is repacked bit-exactly when the type matches
               (int4 -> Q4_0, int8 -> Q8_0, any group size: a scale repeats per 32-block); otherwise its
               weights are dequantized and converted.
  tokenizer    ChatGLM2/3: SentencePiece as tokenizer.ggml.model "llama" (scores, piece types; the special
               tokens after the SentencePiece vocabulary as CONTROL, the embedding's padding rows as UNUSED
               "[PAD<id>]"). GLM-4: byte-level BPE "gpt2" with pre-tokenizer "chatglm-bpe" (what llama.cpp's
               converter writes for glm-4-9b-chat) and merges rebuilt from the tiktoken ranks.
               add_bos_token = false (prompts start with [gMASK] sop, written by the chat template).
               eos = </s> (ChatGLM2/3) or <|endoftext|> (GLM-4); eot = <|user|> and eom = <|observation|>
               (ChatGLM3, GLM-4), so llama.cpp stops where the official chat() stops.
  hparams      chatglm.{context_length, embedding_length, feed_forward_length, block_count,
               attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon,
               rope.dimension_count (= head_dim / 2), rope.freq_base (10000 * rope_ratio)}.

Memory: tensors are read one at a time (memory-mapped from the checkpoint, or from a loaded model), converted
and appended to the file; the header is written first from shapes known in advance, so there is never a second
copy of the model in memory.

`gguf` (pip install 'glmkit[gguf]') is imported only here, and only when exporting; q4_0_blocks / q8_0_blocks
need numpy alone.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

QTYPES = ("f32", "f16", "q8_0", "q4_0")
QK = 32                                   # ggml block size of Q4_0 / Q8_0
Q4_0_BLOCK_BYTES = 2 + QK // 2            # fp16 scale + 16 bytes of nibbles
Q8_0_BLOCK_BYTES = 2 + QK                 # fp16 scale + 32 int8

CHUNK_ELEMS = 16 << 20                    # float elements converted at a time (64 MB of fp32)


class GGUFExportError(ValueError):
    """The model cannot be written as a GGUF file llama.cpp loads (the message says why)."""


# ------------------------------------------------------------------------------------------------------------
# Canonical glmkit quantized storage -> ggml blocks
# ------------------------------------------------------------------------------------------------------------

def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(t)


def _block_scales(scales: np.ndarray, K: int, group: int) -> np.ndarray:
    """scales fp16 [N, K // group] -> [N, K // 32, 2] bytes: one scale per 32-block (repeated for group > 32)."""
    if group % QK or K % group:
        raise GGUFExportError(f"group size {group} must be a multiple of {QK} dividing the input size {K}")
    s = scales.astype(np.float16, copy=False)
    if s.shape[1] != K // group:
        raise GGUFExportError(f"scales of shape {s.shape} do not fit K={K}, group={group}")
    if group != QK:
        s = np.repeat(s, group // QK, axis=1)
    return s.view(np.uint8).reshape(s.shape[0], K // QK, 2)


def q4_0_blocks(qweight, scales, group: int = 32) -> np.ndarray:
    """glmkit INT4 (qweight uint8 [N, K/2] in ggml nibble order, scales fp16 [N, K/group]) -> GGUF Q4_0 bytes
    uint8 [N, (K/32) * 18]: per 32-block the fp16 scale then its 16 bytes of nibbles. Exact (no rounding):
    dequantizing the blocks gives (u - 8) * scale as glmkit does."""
    q = _np(qweight)
    if q.dtype != np.uint8 or q.ndim != 2:
        raise GGUFExportError(f"int4 qweight must be uint8 [N, K/2], got {q.dtype} {q.shape}")
    N, K = q.shape[0], q.shape[1] * 2
    if K % QK:
        raise GGUFExportError(f"input size {K} is not a multiple of {QK}")
    d = _block_scales(_np(scales), K, group)
    return np.concatenate([d, q.reshape(N, K // QK, QK // 2)], axis=-1).reshape(N, -1)


def q8_0_blocks(qweight, scales, group: int = 32) -> np.ndarray:
    """glmkit INT8 (qweight int8 [N, K], scales fp16 [N, K/group]) -> GGUF Q8_0 bytes uint8 [N, (K/32) * 34]:
    per 32-block the fp16 scale then the 32 int8 values. Exact."""
    q = _np(qweight)
    if q.dtype != np.int8 or q.ndim != 2:
        raise GGUFExportError(f"int8 qweight must be int8 [N, K], got {q.dtype} {q.shape}")
    N, K = q.shape
    if K % QK:
        raise GGUFExportError(f"input size {K} is not a multiple of {QK}")
    d = _block_scales(_np(scales), K, group)
    return np.concatenate([d, q.view(np.uint8).reshape(N, K // QK, QK)], axis=-1).reshape(N, -1)


# ------------------------------------------------------------------------------------------------------------
# Result
# ------------------------------------------------------------------------------------------------------------

@dataclass
class ExportResult:
    path: Path
    qtype: str
    n_tensors: int = 0
    types: dict = field(default_factory=dict)        # ggml type name -> number of tensors
    fallbacks: list = field(default_factory=list)    # gguf names written F16 instead of the asked type
    repacked: list = field(default_factory=list)     # gguf names copied bit-exactly from glmkit int4/int8
    nbytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.types.items()))
        s = (f"wrote {self.path} ({self.nbytes / 2**20:.1f} MiB, {self.n_tensors} tensors: {kinds}) "
             f"in {self.seconds:.1f} s")
        if self.repacked:
            s += f"; {len(self.repacked)} weights repacked from glmkit's quantized storage"
        if self.fallbacks:
            s += (f"; {len(self.fallbacks)} weights kept F16 (input size not a multiple of {QK}): "
                  + ", ".join(self.fallbacks[:4]) + (" ..." if len(self.fallbacks) > 4 else ""))
        return s


# ------------------------------------------------------------------------------------------------------------
# Tensor sources: a checkpoint folder (memory-mapped, tensor by tensor) or a loaded model
# ------------------------------------------------------------------------------------------------------------

class _Source:
    cfg = None
    tokenizer = None
    name = ""

    def module_kind(self, mod: str) -> str:
        """'float' | 'int4' | 'int8' for a Linear/Embedding module name (ours, e.g. layers.0.attn.qkv)."""
        return "float"

    def float_tensor(self, name: str) -> torch.Tensor:           # our parameter name
        raise NotImplementedError

    def quantized(self, mod: str):                                # -> (qweight, scales, bits, group)
        raise NotImplementedError

    def done(self, name: str):                                    # pages of this tensor may be dropped
        pass

    def close(self):
        pass


class _ModelSource(_Source):
    def __init__(self, model, tokenizer, name: str = ""):
        self.model, self.cfg, self.tokenizer, self.name = model, model.config, tokenizer, name or model.config.name
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters()) | dict(model.named_buffers())

    def module_kind(self, mod):
        m = self.modules.get(mod)
        if m is not None and hasattr(m, "qweight") and hasattr(m, "bits"):
            return f"int{m.bits}"
        return "float"

    def float_tensor(self, name):
        mod, _, leaf = name.rpartition(".")
        m = self.modules.get(mod)
        if m is not None and leaf == "weight" and hasattr(m, "qweight"):
            return m.weight                                       # dequantized (fp32)
        t = self.params.get(name)
        if t is None and m is not None:
            t = getattr(m, leaf, None)
        if t is None:
            raise GGUFExportError(f"the model has no tensor {name}")
        return t.detach()

    def quantized(self, mod):
        m = self.modules[mod]
        return m.qweight, m.scales, m.bits, m.group


class _FolderSource(_Source):
    """Tensors read on demand from the checkpoint's shards (safetensors memory-mapped; .bin via torch.load with
    mmap), mapped to our names with checkpoint.KEY_MAPS; glm_hf's separate q/k/v are concatenated."""

    def __init__(self, path: Path):
        from .checkpoint import (CheckpointError, SafetensorsFile, _reverse_map, detect_family, layout_of,
                                 load_pickled_shard, read_config, weight_files)
        from .config import ConfigError, from_hf
        from .model import GLM
        from .tokenizer import load_tokenizer

        self.path = path
        d = read_config(path)
        try:
            self.cfg = from_hf(d, family=detect_family(path, d))
        except ConfigError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path / 'config.json'} lacks or mistypes a required field: {e}") from None
        self.layout = layout_of(d)
        self.name = self.cfg.name or path.name
        _check_supported(self.cfg)                   # before reading any weights or the tokenizer
        self.tokenizer = load_tokenizer(path, self.cfg.family)
        self.quant = None
        if self.cfg.quantization:
            from .quant import QuantSpec
            self.quant = QuantSpec.from_dict(self.cfg.quantization)
        # where every stored tensor lives
        self.handles, self.where = [], {}
        for f in weight_files(path):
            h = SafetensorsFile(f) if f.suffix == ".safetensors" else load_pickled_shard(f)
            self.handles.append(h)
            for k in h.keys():
                self.where[k] = h
        if self.layout == "glmkit":
            self.rev = None
        else:
            with torch.device("meta"):
                skeleton = GLM(self.cfg)
            rev = _reverse_map(self.layout, skeleton)              # official -> (ours, part, parts)
            self.rev = {}
            for official, (ours, part, n) in rev.items():
                self.rev.setdefault(ours, [None] * n)[part] = official

    def _get(self, key: str) -> torch.Tensor:
        h = self.where.get(key)
        if h is None:
            raise GGUFExportError(f"{self.path} is missing tensor {key}")
        return h.get(key) if hasattr(h, "entries") else h[key]

    def module_kind(self, mod):
        if self.quant is not None and f"{mod}.qweight" in self.where:
            return "int8" if self._get(f"{mod}.qweight").dtype == torch.int8 else "int4"
        return "float"

    def float_tensor(self, name):
        if self.rev is None:                                      # our own layout
            if name in self.where:
                return self._get(name)
            mod, _, leaf = name.rpartition(".")
            if leaf == "weight" and f"{mod}.qweight" in self.where:
                from .quant import dequantize_tensor
                q, s, bits, group = self.quantized(mod)
                return dequantize_tensor(q, s, bits, group)
            raise GGUFExportError(f"{self.path} is missing tensor {name}")
        keys = self.rev.get(name)
        if not keys:
            raise GGUFExportError(f"no {self.layout} checkpoint key maps to {name}")
        parts = [self._get(k) for k in keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def quantized(self, mod):
        q, s = self._get(f"{mod}.qweight"), self._get(f"{mod}.scales")
        bits = 8 if q.dtype == torch.int8 else 4
        K = q.shape[1] * (1 if bits == 8 else 2)
        return q, s, bits, K // s.shape[1]

    def done(self, name):
        keys = [name] if self.rev is None else (self.rev.get(name) or [])
        if self.rev is None:
            mod = name.rpartition(".")[0]
            keys += [f"{mod}.qweight", f"{mod}.scales"]
        for k in keys:
            h = self.where.get(k)
            if h is not None and hasattr(h, "release"):
                h.release(k)

    def close(self):
        for h in self.handles:
            if hasattr(h, "close"):
                h.close()
        self.handles, self.where = [], {}


# ------------------------------------------------------------------------------------------------------------
# What llama.cpp can load
# ------------------------------------------------------------------------------------------------------------

def _check_supported(cfg):
    from .config import FAMILY_NAMES

    fam = FAMILY_NAMES.get(cfg.family, cfg.family)
    if cfg.family == "chatglm" or cfg.rope_2d or cfg.prefix_lm or cfg.glm_residual:
        raise GGUFExportError(
            f"{fam} cannot be exported to GGUF: llama.cpp has no architecture for ChatGLM-6B (v1) — its "
            "'chatglm' architecture is the ChatGLM2/ChatGLM3/GLM-4 layout, and ChatGLM-6B's 2D rotary positions, "
            "bidirectional prefix attention, LayerNorm and scaled residuals are not implemented there. Run it "
            "with glmkit (optionally `glmkit quantize`) instead")
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm} (llama.cpp's chatglm uses RMSNorm)")
    if cfg.activation != "swiglu":
        problems.append(f"activation={cfg.activation}")
    if cfg.qkv_layout != "grouped":
        problems.append(f"qkv_layout={cfg.qkv_layout}")
    if not cfg.rope_interleaved:
        problems.append("non-interleaved rotary")
    if cfg.out_bias or cfg.mlp_bias:
        problems.append("biases on the attention output / MLP (add_bias_linear=true)")
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        problems.append(f"num_heads * head_dim = {cfg.num_heads * cfg.head_dim} != hidden_size {cfg.hidden_size}")
    if cfg.rope_dim > cfg.head_dim:
        problems.append(f"rope_dim {cfg.rope_dim} > head_dim {cfg.head_dim}")
    if problems:
        raise GGUFExportError(f"this {fam} variant cannot be written for llama.cpp's chatglm architecture: "
                              + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------------
# Tokenizer metadata
# ------------------------------------------------------------------------------------------------------------

CHAT_TEMPLATES = {
    # as glmkit.chat_format renders them for plain user/assistant/system turns (tools are not covered)
    "chatglm2": ("[gMASK]sop{% for m in messages %}{% if m['role'] == 'user' %}"
                 "[Round {{ loop.index0 // 2 + 1 }}]\n\n问：{{ m['content'] }}\n\n答："
                 "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}"),
    # ChatGLM3: <|role|> then "\n" and the content, each SentencePiece-encoded (hence "\n " in text form)
    "chatglm3": ("[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>\n {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
    "glm4": ("[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}


def _bytes_to_unicode() -> dict[int, str]:
    from .tokenizer import _bytes_to_unicode as b2u
    return b2u()


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The pieces byte-level BPE (tiktoken's rule: lowest rank first) reaches before merges of rank >= max_rank."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def _add_tokenizer(w, gguf, tok, cfg):
    from .tokenizer import ChatGLM2Tokenizer, GLM4Tokenizer

    TT = gguf.TokenType
    V = cfg.vocab_size
    if isinstance(tok, ChatGLM2Tokenizer):
        sp = tok.sp
        n = sp.vocab_size()
        tokens, scores, types = [], [], []
        for i in range(n):
            tokens.append(sp.id_to_piece(i).encode("utf-8"))
            scores.append(float(sp.get_score(i)))
            types.append(TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i)
                         else TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL)
        by_id = {v: k for k, v in tok.special.items()}
        for i in range(n, V):
            if i in by_id:
                tokens.append(by_id[i].encode("utf-8"))
                types.append(TT.CONTROL)
            else:
                tokens.append(f"[PAD{i}]".encode("utf-8"))
                types.append(TT.UNUSED)
            scores.append(0.0)
        if max(tok.special.values()) >= V:
            raise GGUFExportError(f"the tokenizer has ids up to {max(tok.special.values())} but the model only "
                                  f"{V} embedding rows")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("chatglm-spm")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        # llama.cpp's SentencePiece emulation: reproduce this model's normaliser settings (measured, so no
        # protobuf is needed): ChatGLM's tokenizer.model adds the dummy "▁" and keeps repeated spaces
        w.add_add_space_prefix(sp.encode_as_pieces("a")[0].startswith("\u2581"))
        w.add_remove_extra_whitespaces(sp.encode("a  b") == sp.encode("a b"))
        w.add_bos_token_id(tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else 1)
        w.add_eos_token_id(tok.eos_id)
        w.add_unk_token_id(sp.unk_id())
        w.add_pad_token_id(tok.pad_id if tok.pad_id is not None and tok.pad_id >= 0 else sp.unk_id())
    elif isinstance(tok, GLM4Tokenizer):
        b2u = _bytes_to_unicode()
        n = tok.n_ranks
        ranks = {}
        for i in range(n):
            ranks[tok.enc.decode_single_token_bytes(i)] = i
        tokens, types, merges = [], [], []
        for b, i in sorted(ranks.items(), key=lambda kv: kv[1]):
            tokens.append("".join(b2u[c] for c in b))
            types.append(TT.NORMAL)
            if len(b) > 1:
                parts = _bpe_parts(ranks, b, max_rank=i)
                if len(parts) != 2:
                    raise GGUFExportError(f"token {b!r} (rank {i}) is not the merge of two lower-ranked tokens; "
                                          "the tokenizer file is not a byte-level BPE")
                merges.append(" ".join("".join(b2u[c] for c in p) for p in parts))
        by_id = {v: k for k, v in tok.special.items()}
        if max(by_id) >= V:
            raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {V} embedding rows")
        for i in range(n, V):
            if i in by_id:
                tokens.append(by_id[i])
                types.append(TT.CONTROL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(TT.UNUSED)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("chatglm-bpe")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_eos_token_id(tok.eos_id)
        w.add_unk_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
    else:
        raise GGUFExportError(f"no GGUF tokenizer mapping for {type(tok).__name__}")
    if "<|user|>" in tok.special:
        w.add_eot_token_id(tok.special["<|user|>"])
    if "<|observation|>" in tok.special and hasattr(w, "add_eom_token_id"):    # gguf >= 0.10 has it
        w.add_eom_token_id(tok.special["<|observation|>"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if cfg.family in CHAT_TEMPLATES:
        w.add_chat_template(CHAT_TEMPLATES[cfg.family])


# ------------------------------------------------------------------------------------------------------------
# The plan: every tensor's GGUF name, our name, shape and type, known before any data is read
# ------------------------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    gguf_name: str
    ours: str                  # our parameter name (e.g. layers.0.attn.qkv.weight)
    module: str                # its module (layers.0.attn.qkv)
    shape: tuple               # numpy order: [N out, K in] or [N]
    gtype: object = None       # gguf.GGMLQuantizationType
    repack: bool = False       # copy glmkit int4/int8 blocks as they are
    fallback: bool = False


def _plan(cfg, source: _Source, gguf, qtype: str) -> list[_Entry]:
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    H, V, F = cfg.hidden_size, cfg.vocab_size, cfg.ffn_hidden_size
    E = []

    def add(kind, ours, shape, bid=None):
        name = N[kind].format(bid=bid) + "." + ours.rpartition(".")[2]
        E.append(_Entry(name, ours, ours.rpartition(".")[0], tuple(shape)))

    add(T.TOKEN_EMBD, "tok_embeddings.weight", (V, H))
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        add(T.ATTN_NORM, p + "attn_norm.weight", (H,), i)
        add(T.ATTN_QKV, p + "attn.qkv.weight", (cfg.qkv_size, H), i)
        if cfg.qkv_bias:
            add(T.ATTN_QKV, p + "attn.qkv.bias", (cfg.qkv_size,), i)
        add(T.ATTN_OUT, p + "attn.out.weight", (H, cfg.num_heads * cfg.head_dim), i)
        add(T.FFN_NORM, p + "ffn_norm.weight", (H,), i)
        add(T.FFN_UP, p + "mlp.up.weight", (2 * F, H), i)
        add(T.FFN_DOWN, p + "mlp.down.weight", (H, F), i)
    add(T.OUTPUT_NORM, "norm.weight", (H,))
    if not cfg.tie_word_embeddings:
        add(T.OUTPUT, "output.weight", (V, H))

    Q = gguf.GGMLQuantizationType
    want = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[qtype]
    for e in E:
        if len(e.shape) == 1:
            e.gtype = Q.F32
            continue
        e.gtype = want
        if want in (Q.Q8_0, Q.Q4_0) and e.shape[1] % QK:
            e.gtype, e.fallback = Q.F16, True
            continue
        kind = source.module_kind(e.module)
        e.repack = (kind == "int4" and want == Q.Q4_0) or (kind == "int8" and want == Q.Q8_0)
    return E


def _nbytes(e: _Entry, gguf) -> int:
    Q = gguf.GGMLQuantizationType
    n = int(np.prod(e.shape))
    if e.gtype == Q.F32:
        return 4 * n
    if e.gtype == Q.F16:
        return 2 * n
    bs = Q4_0_BLOCK_BYTES if e.gtype == Q.Q4_0 else Q8_0_BLOCK_BYTES
    return e.shape[0] * (e.shape[1] // QK) * bs


def _byte_shape(e: _Entry, gguf) -> tuple:
    Q = gguf.GGMLQuantizationType
    if e.gtype in (Q.F32, Q.F16):
        return e.shape
    bs = Q4_0_BLOCK_BYTES if e.gtype == Q.Q4_0 else Q8_0_BLOCK_BYTES
    return (e.shape[0], e.shape[1] // QK * bs)


def _convert(e: _Entry, source: _Source, gguf) -> np.ndarray:
    """The data of one planned tensor, ready for write_tensor_data."""
    Q = gguf.GGMLQuantizationType
    if e.repack:
        q, s, bits, group = source.quantized(e.module)
        out = q4_0_blocks(q, s, group) if bits == 4 else q8_0_blocks(q, s, group)
    else:
        t = source.float_tensor(e.ours)
        if tuple(t.shape) != e.shape:
            raise GGUFExportError(f"{e.ours} has shape {tuple(t.shape)}, expected {e.shape} from config.json")
        if e.gtype == Q.F32:
            out = t.to(torch.float32).cpu().numpy()
        elif e.gtype == Q.F16:
            out = t.to(torch.float16).cpu().numpy()
        else:
            Nr, K = e.shape
            bs = Q4_0_BLOCK_BYTES if e.gtype == Q.Q4_0 else Q8_0_BLOCK_BYTES
            out = np.empty((Nr, K // QK * bs), dtype=np.uint8)
            step = max(1, CHUNK_ELEMS // K)
            for r in range(0, Nr, step):              # fp32 in row chunks: the 65024 x 4096 embedding stays small
                x = t[r:r + step].to(torch.float32).cpu().numpy()
                out[r:r + step] = gguf.quants.quantize(x, e.gtype)
    out = np.ascontiguousarray(out)
    if out.nbytes != _nbytes(e, gguf):
        raise GGUFExportError(f"{e.gguf_name}: {out.nbytes} bytes produced, {_nbytes(e, gguf)} planned")
    return out


# ------------------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------------------

def _import_gguf():
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install 'glmkit[gguf]' "
                              "(or pip install gguf)") from None
    return gguf


def export_gguf(src: Union[str, os.PathLike, object], out_path, qtype: str = "f16", progress: bool = True,
                name: Optional[str] = None, log: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Write `src` as a GGUF file llama.cpp loads as architecture "chatglm".

    src: a model folder (official ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B download in either layout, or one written
         by glmkit, quantized or not), a glmkit Pipeline (glmkit.load(...)), or a (GLM model, Tokenizer) pair.
    qtype: "f32" | "f16" | "q8_0" | "q4_0" for the 2D weights (norms and biases are always F32).
    Returns an ExportResult (types written, F16 fallbacks, size, time). Raises GGUFExportError for models
    llama.cpp cannot run (ChatGLM-6B v1) and CheckpointError for unreadable folders.
    """
    qtype = str(qtype).lower().replace("-", "_")
    if qtype not in QTYPES:
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; use one of {', '.join(QTYPES)}")
    gguf = _import_gguf()
    t0 = time.perf_counter()
    out_path = Path(out_path).expanduser()

    if isinstance(src, (str, os.PathLike)):
        source = _FolderSource(Path(src).expanduser())
    elif isinstance(src, tuple) and len(src) == 2:
        source = _ModelSource(src[0], src[1])
    elif hasattr(src, "model") and hasattr(src, "tokenizer"):
        source = _ModelSource(src.model, src.tokenizer, name=(src.path.name if getattr(src, "path", None) else ""))
    else:
        raise TypeError("export_gguf(src, ...): src must be a model folder, a glmkit Pipeline or (model, tokenizer)")

    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        cfg = source.cfg
        _check_supported(cfg)
        entries = _plan(cfg, source, gguf, qtype)

        arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.CHATGLM]
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or source.name or "glm")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.ffn_hidden_size)
        w.add_block_count(cfg.num_layers)
        w.add_head_count(cfg.num_heads)
        w.add_head_count_kv(cfg.num_kv_heads)
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_rope_dimension_count(cfg.rope_dim)
        w.add_rope_freq_base(float(cfg.rope_base))
        FT = gguf.LlamaFileType
        w.add_file_type({"f32": FT.ALL_F32, "f16": FT.MOSTLY_F16, "q8_0": FT.MOSTLY_Q8_0,
                         "q4_0": FT.MOSTLY_Q4_0}[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, gguf, source.tokenizer, cfg)

        for e in entries:
            bshape = _byte_shape(e, gguf)
            is_q = e.gtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            npdt = np.uint8 if is_q else (np.float32 if e.gtype == gguf.GGMLQuantizationType.F32 else np.float16)
            w.add_tensor_info(e.gguf_name, bshape, np.dtype(npdt), _nbytes(e, gguf),
                              raw_dtype=e.gtype if is_q else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(entries), unit="tensor", desc=f"gguf {qtype}", leave=False, file=sys.stderr)
        res = ExportResult(path=out_path, qtype=qtype)
        with torch.no_grad():
            for e in entries:
                data = _convert(e, source, gguf)
                w.write_tensor_data(data)
                del data
                source.done(e.ours)
                tname = e.gtype.name
                res.types[tname] = res.types.get(tname, 0) + 1
                if e.fallback:
                    res.fallbacks.append(e.gguf_name)
                if e.repack:
                    res.repacked.append(e.gguf_name)
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        w.close()
        os.replace(tmp, out_path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    finally:
        source.close()
    res.n_tensors = len(entries)
    res.nbytes = out_path.stat().st_size
    res.seconds = time.perf_counter() - t0
    if log:
        log(res.summary())
    return res
