"""GGUF export (glmkit.gguf_export, `glmkit export-gguf`).

(a) glmkit's canonical int4/int8 storage -> Q4_0/Q8_0 blocks, against gguf.quants on random data;
(b) the file's metadata and tensor types, read back with gguf's reader;
(c) llama.cpp (llama-cpp-python) loads the exports of the tiny reference ChatGLM2/ChatGLM3 checkpoints and of a
    tiny GLM-4 built here, and its greedy continuation of the exact prompt ids (argmax over its logits) equals
    glmkit's; its tokenizer and the chat template written into the file give glmkit's ids.
Skips: everything without `gguf`; (c) without llama_cpp; the reference checkpoints without ../shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REF, expected, needs_shared

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'glmkit[gguf]')")
from gguf.quants import dequantize, quantize  # noqa: E402

from glmkit.gguf_export import GGUFExportError, export_gguf, q4_0_blocks, q8_0_blocks  # noqa: E402

try:
    import llama_cpp
except ImportError:          # not installed (pip install 'glmkit[bench]' builds it)
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable")

Q = gguf.GGMLQuantizationType
GENS = ("chatglm3-6b", "chatglm2-6b")
N_NEW = 12


# ------------------------------------------------------------------------------------------------------------
# (a) canonical storage -> blocks
# ------------------------------------------------------------------------------------------------------------

def canon_int4(w: np.ndarray, group: int):
    """glmkit's INT4 rule, written out here: per group d = (signed max-abs element) / -8,
    u = clamp(trunc(w * (1/d) + 8.5), 0, 15) (ggml multiplies by the reciprocal; so does glmkit.quant), scale
    stored fp16; nibbles in ggml order inside each 32-block. -> (qweight uint8 [N, K/2], scales fp16)."""
    N, K = w.shape
    x = w.astype(np.float32).reshape(N, K // group, group)
    i = np.abs(x).argmax(-1)[..., None]
    d = np.take_along_axis(x, i, -1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    u = np.clip(np.trunc(x * inv + np.float32(8.5)), 0, 15).astype(np.uint8).reshape(N, K // 32, 2, 16)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, K // 2), d[..., 0].astype(np.float16)


def canon_int8(w: np.ndarray, group: int):
    """glmkit's INT8 rule: d = amax / 127, q = round half away from zero (w * (1/d)), scale fp16."""
    N, K = w.shape
    x = w.astype(np.float32).reshape(N, K // group, group)
    d = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    v = x * inv
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)), -127, 127).astype(np.int8)
    return q.reshape(N, K), d[..., 0].astype(np.float16)


def canon_dequant(q, s, bits, group):
    N = q.shape[0]
    if bits == 4:
        b = q.reshape(N, -1, 16)
        u = np.concatenate([b & 15, b >> 4], axis=-1).reshape(N, -1).astype(np.float32) - 8
    else:
        u = q.astype(np.float32)
    K = u.shape[1]
    return (u.reshape(N, K // group, group) * s.astype(np.float32)[..., None]).reshape(N, K)


def random_weight(N=12, K=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((N, K)).astype(np.float32) * rng.uniform(0.01, 3, (N, 1)).astype(np.float32)
    w[0, :32] = 0                    # an all-zero block (scale 0)
    w[1, 5] = -40                    # a negative extreme
    w[2, 40] = 40
    w[3, 64:96] = 0.5                # all equal
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_0_blocks_equal_gguf_quants_at_group_32(seed):
    w = random_weight(seed=seed)
    q, s = canon_int4(w, 32)
    blocks = q4_0_blocks(q, s, 32)
    ref = quantize(w, Q.Q4_0)
    assert blocks.dtype == np.uint8 and blocks.shape == ref.shape
    assert np.array_equal(blocks, ref)                                 # byte for byte
    assert np.array_equal(dequantize(blocks, Q.Q4_0), canon_dequant(q, s, 4, 32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q8_0_blocks_equal_gguf_quants_at_group_32(seed):
    w = random_weight(seed=seed)
    q, s = canon_int8(w, 32)
    blocks = q8_0_blocks(q, s, 32)
    ref = quantize(w, Q.Q8_0)
    assert blocks.shape == ref.shape and np.array_equal(blocks, ref)
    assert np.array_equal(dequantize(blocks, Q.Q8_0), canon_dequant(q, s, 8, 32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [64, 128, 256])
def test_larger_groups_repeat_the_scale_per_block(bits, group):
    w = random_weight(N=6, K=512, seed=group)
    q, s = (canon_int4 if bits == 4 else canon_int8)(w, group)
    blocks = (q4_0_blocks if bits == 4 else q8_0_blocks)(torch.from_numpy(q), torch.from_numpy(s), group)
    got = dequantize(blocks, Q.Q4_0 if bits == 4 else Q.Q8_0)
    assert np.array_equal(got, canon_dequant(q, s, bits, group))       # exact: no rounding in the repack


@pytest.mark.parametrize("bits", [4, 8])
def test_glmkit_quantizer_is_ggml_bit_for_bit(bits):
    """glmkit.quant's own quantizer (what `glmkit quantize` stores) repacks to exactly what gguf.quants makes."""
    quant = pytest.importorskip("glmkit.quant")
    w = random_weight(N=16, K=512, seed=7)
    q, s = quant.quantize_tensor(torch.from_numpy(w), bits, 32)
    blocks = (q4_0_blocks if bits == 4 else q8_0_blocks)(q, s, 32)
    assert np.array_equal(blocks, quantize(w, Q.Q4_0 if bits == 4 else Q.Q8_0))


def test_blocks_reject_bad_input():
    with pytest.raises(GGUFExportError):
        q4_0_blocks(np.zeros((2, 20), np.uint8), np.zeros((2, 1), np.float16), 32)      # K = 40
    with pytest.raises(GGUFExportError):
        q8_0_blocks(np.zeros((2, 64), np.uint8), np.zeros((2, 2), np.float16), 32)      # not int8
    with pytest.raises(GGUFExportError):
        q8_0_blocks(np.zeros((2, 64), np.int8), np.zeros((2, 2), np.float16), 48)       # group not /32


# ------------------------------------------------------------------------------------------------------------
# (b) the file
# ------------------------------------------------------------------------------------------------------------

def _field(r, key):
    f = r.fields[key]
    if len(f.types) == 1 and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.parts[i] for i in f.data]
    return f.parts[f.data[0]][0]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(generation, qtype) -> exported file; written once per module."""
    d = tmp_path_factory.mktemp("gguf")
    cache = {}

    def get(gen, qtype):
        if (gen, qtype) not in cache:
            cache[gen, qtype] = export_gguf(REF / gen, d / f"{gen}-{qtype}.gguf", qtype, progress=False).path
        return cache[gen, qtype]
    return get


@needs_shared
def test_metadata_and_tensor_types(exports):
    r = gguf.GGUFReader(exports("chatglm3-6b", "f16"))
    cfg = json.loads((REF / "chatglm3-6b" / "config.json").read_text())
    assert _field(r, "general.architecture") == "chatglm"
    assert _field(r, "chatglm.block_count") == cfg["num_layers"]
    assert _field(r, "chatglm.embedding_length") == cfg["hidden_size"]
    assert _field(r, "chatglm.feed_forward_length") == cfg["ffn_hidden_size"]
    assert _field(r, "chatglm.attention.head_count") == cfg["num_attention_heads"]
    assert _field(r, "chatglm.attention.head_count_kv") == cfg["multi_query_group_num"]
    assert _field(r, "chatglm.rope.dimension_count") == cfg["kv_channels"] // 2
    assert _field(r, "chatglm.rope.freq_base") == 10000.0
    assert _field(r, "chatglm.context_length") == cfg["seq_length"]
    assert abs(_field(r, "chatglm.attention.layer_norm_rms_epsilon") - cfg["layernorm_epsilon"]) < 1e-12
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert len(r.fields["tokenizer.ggml.tokens"].data) == cfg["padded_vocab_size"]
    types = _field(r, "tokenizer.ggml.token_type")
    assert [int(types[i][0]) for i in range(64789, 64798)] == [gguf.TokenType.CONTROL] * 9
    assert int(types[64798][0]) == gguf.TokenType.UNUSED
    assert not _field(r, "tokenizer.ggml.add_bos_token")
    assert (_field(r, "tokenizer.ggml.eos_token_id"), _field(r, "tokenizer.ggml.eot_token_id")) == (2, 64795)
    t = {x.name: x for x in r.tensors}
    assert set(t) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(2) for n in ("attn_norm.weight", "attn_qkv.weight", "attn_qkv.bias",
                                                   "attn_output.weight", "ffn_norm.weight", "ffn_up.weight",
                                                   "ffn_down.weight")}
    for name, x in t.items():
        assert x.tensor_type == (Q.F32 if len(x.shape) == 1 else Q.F16), name
    assert list(t["blk.0.attn_qkv.weight"].shape) == [32, (4 + 2 * 2) * 8]          # ggml order: [K, N]


@needs_shared
def test_q4_0_types_and_f16_fallback(exports):
    t = {x.name: x for x in gguf.GGUFReader(exports("chatglm3-6b", "q4_0")).tensors}
    for name, x in t.items():
        if len(x.shape) == 1:
            assert x.tensor_type == Q.F32, name
        elif "ffn_down" in name:                   # input size 80 (tiny model) is not a multiple of 32
            assert x.tensor_type == Q.F16, name
        else:                                      # embedding and output included
            assert x.tensor_type == Q.Q4_0, name


@needs_shared
@pytest.mark.parametrize("bits,qtype", [(4, "q4_0"), (8, "q8_0")])
def test_quantized_model_repacks_to_the_same_bytes(exports, tmp_path, bits, qtype):
    """A glmkit int4/int8 model (group 32) exports, without re-rounding, to the very bytes gguf.quants makes
    from the float checkpoint."""
    import glmkit

    pipe = glmkit.load(REF / "chatglm3-6b", quantize=f"int{bits}")
    res = export_gguf(pipe, tmp_path / "q.gguf", qtype, progress=False)
    assert len(res.repacked) == 8          # embedding, output, 2 x (qkv, out, up); ffn_down stays float
    a = {x.name: x for x in gguf.GGUFReader(exports("chatglm3-6b", qtype)).tensors}
    for x in gguf.GGUFReader(tmp_path / "q.gguf").tensors:
        assert x.tensor_type == a[x.name].tensor_type and np.array_equal(x.data, a[x.name].data), x.name


@needs_shared
def test_chatglm6b_is_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="llama.cpp has no architecture"):
        export_gguf(REF / "chatglm-6b", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_type(tmp_path):
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "q5_k")


@needs_shared
def test_cli(tmp_path):
    from glmkit.cli.main import main

    out = tmp_path / "m.gguf"
    assert main(["export-gguf", "--model", str(REF / "chatglm2-6b"), "--type", "q8_0", "--out", str(out)]) == 0
    assert gguf.GGUFReader(out).tensors
    assert main(["export-gguf", "-m", str(REF / "chatglm-6b"), "-o", str(tmp_path / "v1.gguf")]) == 1


# ------------------------------------------------------------------------------------------------------------
# (c) llama.cpp runs the exports
# ------------------------------------------------------------------------------------------------------------

def llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=False, verbose=False, n_threads=2,
                           n_threads_batch=2, **kw)


def last_logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def llama_greedy(llm, ids, n=N_NEW):
    """Feed the exact prompt ids (no tokenization), then argmax over llama.cpp's logits; EOS is not special."""
    llm.reset()
    llm.eval(list(ids))
    out = []
    for _ in range(n):
        t = int(np.argmax(last_logits(llm)))
        out.append(t)
        llm.eval([t])
    return out


def glmkit_greedy(pipe, ids, n=N_NEW):
    from glmkit.sampling import SamplingParams

    return list(pipe.engine.generate(list(ids), SamplingParams(temperature=0, max_new_tokens=n), stop_ids=()))


_PIPES = {}


def pipe_of(gen, **kw):
    import glmkit

    key = (gen, tuple(sorted(kw.items())))
    if key not in _PIPES:
        _PIPES[key] = glmkit.load(REF / gen, **({"dtype": "float32"} | kw))
    return _PIPES[key]


@needs_llama
@needs_shared
@pytest.mark.parametrize("qtype", ["f32", "f16"])
@pytest.mark.parametrize("gen", GENS)
def test_llama_cpp_greedy_equals_glmkit(exports, gen, qtype):
    llm = llama(exports(gen, qtype))
    pipe = pipe_of(gen)
    for case in expected()[gen]:
        ours = glmkit_greedy(pipe, case["input_ids"])
        assert ours == case["greedy_12"]
        assert llama_greedy(llm, case["input_ids"]) == ours


@needs_llama
@needs_shared
@pytest.mark.parametrize("gen", GENS)
def test_llama_cpp_f32_logits_equal_glmkit(exports, gen):
    """With an f32 file and an f32 KV cache the two implementations agree to float rounding: the layout
    (fused QKV, grouped KV heads, half-head interleaved rotary, SwiGLU order, RMSNorm eps) is llama.cpp's."""
    llm = llama(exports(gen, "f32"), type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    pipe = pipe_of(gen)
    for case in expected()[gen]:
        ids = case["input_ids"]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ref = pipe.model(torch.tensor([ids]))[0, -1].numpy()
        assert np.abs(last_logits(llm) - ref).max() < 1e-4


@needs_llama
@needs_shared
@pytest.mark.parametrize("gen", GENS)
def test_llama_cpp_q8_0_and_q4_0_run(exports, gen):
    """Quantized exports load and generate. Against glmkit with the same quantization (identical weights;
    llama.cpp also rounds activations to 8 bits) the teacher-forced next-token argmax mostly agrees — the tiny
    random reference models have top-1/top-2 logit gaps under 0.01 at some positions, so not always."""
    for qtype, q in (("q8_0", "int8"), ("q4_0", "int4")):
        llm = llama(exports(gen, qtype))
        pipe = pipe_of(gen, quantize=q)
        agree = total = 0
        for case in expected()[gen]:
            ids = case["input_ids"]
            out = llama_greedy(llm, ids)
            assert len(out) == N_NEW and all(0 <= t < llm.n_vocab() for t in out)
            ours = glmkit_greedy(pipe, ids)
            with torch.no_grad():
                ref = pipe.model(torch.tensor([ids + ours]))[0, len(ids) - 1:-1].numpy()
            llm.reset()
            llm.eval(ids)
            for j in range(N_NEW):
                lg = last_logits(llm)
                assert np.abs(lg - ref[j]).max() < 0.25
                agree += int(np.argmax(lg) == np.argmax(ref[j]))
                total += 1
                llm.eval([ours[j]])
        print(f"{gen} {qtype}: teacher-forced argmax agreement with glmkit {q}: {agree}/{total}")
        assert agree >= 0.75 * total


TOKENIZE_STRINGS = ["你好", "Hello world", "  leading spaces and  double  spaces", "line1\nline2\n\n\ttab",
                    "床前明月光，疑是地上霜。", "emoji 👋😀 and ü ß", "def f(x):\n    return x * 2\n",
                    "1234567890 3.14159", "a", " ", "\n", "sopa soprano eop"]
CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "写一首诗\n关于月亮"}],
]


def render_template(llm, messages):
    jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"]).render(
        messages=messages, add_generation_prompt=True)


def check_tokenizer(llm, tok, family):
    for s in TOKENIZE_STRINGS:
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == tok.encode_plain(s), s
    for conv in CONVERSATIONS:
        if family == "chatglm2":
            conv = [m for m in conv if m["role"] != "system"]
        text = render_template(llm, conv)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.apply_chat_template(conv)


@needs_llama
@needs_shared
@pytest.mark.parametrize("gen", GENS)
def test_llama_cpp_tokenizer_equals_glmkit(exports, gen):
    """llama.cpp's SentencePiece emulation gives glmkit's (= the official) ids, and the chat template in the
    file renders, once tokenized by llama.cpp, to glmkit's chat prompt ids.
    Known difference, not tested: llama-cpp-python's detokenize() keeps SentencePiece's leading space."""
    from glmkit.tokenizer import load_tokenizer

    family = gen.split("-")[0]
    check_tokenizer(llama(exports(gen, "f16"), vocab_only=True), load_tokenizer(REF / gen, family), family)


# ------------------------------------------------------------------------------------------------------------
# GLM-4: a tiny random model in glmkit's layout with a small tiktoken tokenizer built here
# ------------------------------------------------------------------------------------------------------------

CORPUS = ("你好！我是人工智能助手。今天北京的天气怎么样？北京今天晴，气温二十五度。"
          "Hello, how are you today? The weather in Beijing is sunny. It's   spaced\tout.\n"
          "def f(x):\n    return x * 2\n\n\n 12345 3.14 ") * 3


def build_tiktoken(path: Path, merges: int = 300) -> int:
    """A byte-level BPE in tiktoken's file format learnt on CORPUS (test_glm4's builder) -> its size."""
    from test_glm4 import build_tiktoken as build
    return len(build(path, CORPUS, merges))


@pytest.fixture(scope="module")
def glm4_tiny(tmp_path_factory):
    import glmkit
    from glmkit.checkpoint import save_model
    from glmkit.config import ModelConfig
    from glmkit.model import GLM

    d = tmp_path_factory.mktemp("glm4tiny")
    n = build_tiktoken(d / "tokenizer.tmp")
    cfg = ModelConfig(family="glm4", vocab_size=(n + 14 + 63) // 64 * 64, hidden_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, ffn_hidden_size=128, max_seq_len=256,
                      rope_base=50000.0, norm_eps=1e-5, qkv_bias=True)
    torch.manual_seed(0)
    m = GLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    save_model(m, d)
    (d / "tokenizer.tmp").rename(d / "tokenizer.model")
    return d, glmkit.load(d, dtype="float32")


def test_glm4_metadata(glm4_tiny, tmp_path):
    d, pipe = glm4_tiny
    r = gguf.GGUFReader(export_gguf(d, tmp_path / "g.gguf", "q8_0", progress=False).path)
    assert _field(r, "general.architecture") == "chatglm"
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "chatglm-bpe"
    sp = pipe.tokenizer.special
    assert _field(r, "tokenizer.ggml.eos_token_id") == sp["<|endoftext|>"]
    assert _field(r, "tokenizer.ggml.eot_token_id") == sp["<|user|>"]
    assert _field(r, "tokenizer.ggml.eom_token_id") == sp["<|observation|>"]
    assert _field(r, "chatglm.rope.freq_base") == 50000.0 and _field(r, "chatglm.rope.dimension_count") == 8
    assert all(x.tensor_type == (Q.F32 if len(x.shape) == 1 else Q.Q8_0) for x in r.tensors)


def test_glm4_int4_group_64_repacks_exactly(glm4_tiny, tmp_path):
    """group 64 > 32: each Q4_0 block takes its group's scale; dequantized GGUF == glmkit's dequantized weight."""
    import glmkit

    d, _ = glm4_tiny
    pipe = glmkit.load(d, quantize="int4:g64")
    res = export_gguf(pipe, tmp_path / "g.gguf", "q4_0", progress=False)
    assert len(res.repacked) == 10 and not res.fallbacks
    t = {x.name: x for x in gguf.GGUFReader(res.path).tensors}
    mods = {"token_embd.weight": pipe.model.tok_embeddings, "output.weight": pipe.model.output,
            "blk.1.attn_qkv.weight": pipe.model.layers[1].attn.qkv, "blk.0.ffn_down.weight": pipe.model.layers[0].mlp.down}
    for name, mod in mods.items():
        got = dequantize(np.asarray(t[name].data), Q.Q4_0)
        assert np.array_equal(got, mod.weight.numpy()), name


@needs_llama
@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_glm4_llama_cpp_greedy_equals_glmkit(glm4_tiny, tmp_path, qtype):
    d, pipe = glm4_tiny
    llm = llama(export_gguf(d, tmp_path / "g.gguf", qtype, progress=False).path)
    tok = pipe.tokenizer
    prompts = [tok.encode("你好"), tok.apply_chat_template([{"role": "user", "content": "今天北京的天气怎么样？"}]),
               tok.encode("def f(x):\n    return")]
    for ids in prompts:
        assert llama_greedy(llm, ids) == glmkit_greedy(pipe, ids)


@needs_llama
def test_glm4_llama_cpp_tokenizer_equals_glmkit(glm4_tiny, tmp_path):
    """The BPE merges rebuilt from tiktoken ranks + llama.cpp's chatglm-bpe pre-tokenizer give tiktoken's ids."""
    d, pipe = glm4_tiny
    llm = llama(export_gguf(d, tmp_path / "g.gguf", "f16", progress=False).path, vocab_only=True)
    check_tokenizer(llm, pipe.tokenizer, "glm4")
