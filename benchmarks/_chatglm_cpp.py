"""ChatGLM-6B model files for chatglm.cpp (the `chatglm-cpp` package), written from glmkit folders.

chatglm.cpp's own converter (chatglm_cpp/convert.py) loads the model with transformers and the official
modeling_chatglm.py (trust_remote_code), which cannot be had offline; this writes the same file format from the
benchmark's folders instead, so chatglm.cpp runs the very numbers glmkit runs:
  f16    from the float folder (official layout, random bf16), every matrix as F16;
  q4_0 / q8_0  from glmkit's INT4 / INT8 folders, the blocks repacked exactly (glmkit.gguf_export.q4_0_blocks /
         q8_0_blocks: ggml's Q4_0 / Q8_0 block layout is the same in chatglm.cpp's ggml).
chatglm.cpp ties ChatGLM-6B's output layer to the word embeddings (its converter asserts they are equal), so
the file's word_embeddings tensor is glmkit's output layer: decode reads the same output matrix in both.

File layout (chatglm.cpp 0.4, model type 1 = ChatGLM): b"ggml", int32 model type, int32 config version 2, the
config (int32 x 7, float eps, int32 pre_seq_len, float rope_theta, int32 max_length, eos, pad), int32 length +
the SentencePiece model (ice_text.model), then per tensor: int32 name length, name, int32 ndim, the shape (as
torch gives it), int32 ggml type, the data at the next 16-byte boundary.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
GGML_TYPES = {"f16": F16, "q4_0": Q4_0, "q8_0": Q8_0}
ALIGN = 16


def _tensor(f, name: str, shape: tuple, ggml_type: int, data: np.ndarray):
    nb = name.encode()
    f.write(struct.pack("i", len(nb)))
    f.write(nb)
    f.write(struct.pack("i" * (2 + len(shape)), len(shape), *shape, ggml_type))
    f.seek((f.tell() + ALIGN - 1) // ALIGN * ALIGN)
    np.ascontiguousarray(data).tofile(f)


def write_chatglm6b(folder: Path, out: Path, qtype: str) -> int:
    """A chatglm.cpp file of the ChatGLM-6B-shaped model in `folder` (float for f16, glmkit INT4 for q4_0,
    INT8 for q8_0) -> its size in bytes."""
    import torch

    import glmkit.gguf_export as ge
    from glmkit.gguf_export import q4_0_blocks, q8_0_blocks
    if qtype not in GGML_TYPES:
        raise ValueError(f"qtype {qtype!r}: choose from {', '.join(GGML_TYPES)}")
    # the GGUF exporter's folder reader, without its check that llama.cpp can run the model (it cannot run
    # ChatGLM-6B; chatglm.cpp can)
    check, ge._check_supported = ge._check_supported, lambda cfg: None
    try:
        src = ge._FolderSource(Path(folder))
    finally:
        ge._check_supported = check
    cfg = src.cfg
    if cfg.family != "chatglm":
        raise ValueError(f"{folder} is {cfg.family}, not ChatGLM-6B")
    if cfg.ffn_hidden_size != 4 * cfg.hidden_size:
        raise ValueError("chatglm.cpp needs inner_hidden_size = 4 x hidden_size")
    gtype = GGML_TYPES[qtype]

    def matrix(mod: str):
        kind = src.module_kind(mod)
        if qtype == "f16":
            return F16, src.float_tensor(f"{mod}.weight").to(torch.float16).numpy()
        want = {Q4_0: "int4", Q8_0: "int8"}[gtype]
        if kind != want:
            raise ValueError(f"{mod} is {kind} in {folder}; {qtype} needs glmkit's {want} folder")
        q, s, _, group = src.quantized(mod)
        return gtype, (q4_0_blocks if gtype == Q4_0 else q8_0_blocks)(q, s, group)

    def vec(name: str):
        return F32, src.float_tensor(name).float().numpy()

    tok = (Path(folder) / "ice_text.model").read_bytes()
    with open(out, "wb") as f:
        f.write(b"ggml")
        f.write(struct.pack("i", 1))                              # ModelType.CHATGLM
        f.write(struct.pack("iiiiiiiififiii", 2, gtype, cfg.vocab_size, cfg.hidden_size, cfg.num_heads,
                            cfg.num_heads, cfg.num_layers, cfg.ffn_hidden_size, cfg.norm_eps, 0, 10000.0,
                            cfg.max_seq_len, cfg.eos_token_id, cfg.pad_token_id))
        f.write(struct.pack("i", len(tok)))
        f.write(tok)
        t, d = matrix("output")                                   # tied: the output layer is the embedding table
        _tensor(f, "transformer.word_embeddings.weight", (cfg.vocab_size, cfg.hidden_size), t, d)
        for i in range(cfg.num_layers):
            p, o = f"layers.{i}.", f"transformer.layers.{i}."
            for ours, theirs, shape in (
                    ("attn_norm", "input_layernorm", None), ("attn.qkv", "attention.query_key_value", 3),
                    ("attn.out", "attention.dense", 1), ("ffn_norm", "post_attention_layernorm", None),
                    ("mlp.up", "mlp.dense_h_to_4h", 4), ("mlp.down", "mlp.dense_4h_to_h", 0)):
                if shape is None:                                 # a LayerNorm: weight and bias
                    for leaf in ("weight", "bias"):
                        t, d = vec(p + ours + "." + leaf)
                        _tensor(f, o + theirs + "." + leaf, (cfg.hidden_size,), t, d)
                    continue
                n_out = {3: 3 * cfg.hidden_size, 1: cfg.hidden_size, 4: cfg.ffn_hidden_size,
                         0: cfg.hidden_size}[shape]
                n_in = cfg.ffn_hidden_size if ours == "mlp.down" else cfg.hidden_size
                t, d = matrix(p + ours)
                _tensor(f, o + theirs + ".weight", (n_out, n_in), t, d)
                t, d = vec(p + ours + ".bias")
                _tensor(f, o + theirs + ".bias", (n_out,), t, d)
                src.done(p + ours + ".weight")
        for leaf in ("weight", "bias"):
            t, d = vec(f"norm.{leaf}")
            _tensor(f, f"transformer.final_layernorm.{leaf}", (cfg.hidden_size,), t, d)
    src.close()
    return out.stat().st_size
