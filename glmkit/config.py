"""ModelConfig: one dataclass describes every GLM generation; variants are fields, not subclasses.

`from_hf(config_json)` is the only place that knows the official key names:
  - ChatGLM-6B           model_type "chatglm" with position_encoding_2d / inner_hidden_size / max_sequence_length
  - ChatGLM2/3-6B, GLM-4 model_type "chatglm" with multi_query_attention / padded_vocab_size / seq_length
  - GLM-4 (transformers) model_type "glm", architectures ["GlmForCausalLM"] (e.g. glm-4-9b-chat-hf)
  - original GLM (2021)  model_type "glm" with block_position_encoding (glm-large-chinese, glm-10b[-chinese],
                         glm-2b: THUDM's remote-code GLMModel)
  - our own layout       model_type "glmkit" (written by checkpoint.save)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

FAMILIES = ("chatglm", "chatglm2", "chatglm3", "glm4", "glm")
# family -> human name, used in messages
FAMILY_NAMES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B", "chatglm3": "ChatGLM3-6B", "glm4": "GLM-4",
                "glm": "GLM (2021)"}


class ConfigError(ValueError):
    """config.json is missing, unreadable, or not a GLM-family model we can run."""


@dataclass
class ModelConfig:
    family: str                      # chat format + tokenizer generation: chatglm | chatglm2 | chatglm3 | glm4
    vocab_size: int                  # rows of the embedding / output layer (padded vocab)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int                # = num_heads for ChatGLM-6B; multi_query_group_num for GLM2+
    head_dim: int
    ffn_hidden_size: int             # width of the MLP's inner layer (per branch for SwiGLU)
    max_seq_len: int                 # positions the model was trained for (rotary table size)
    norm: str = "rmsnorm"            # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"       # "gelu_tanh" (ChatGLM-6B) | "gelu_erf" (GLM) | "swiglu" | "geglu" (GLM-130B)
    qkv_layout: str = "grouped"      # "per_head": [heads, (q,k,v), head_dim] (ChatGLM-6B) | "grouped": [q | k | v]
    qkv_bias: bool = True
    out_bias: bool = False           # bias of the attention output projection
    mlp_bias: bool = False
    glm_residual: bool = False       # ChatGLM-6B: x = LN(x) * alpha + f(LN(x))
    alpha_layers: int = 0            # alpha = sqrt(2 * alpha_layers); 0 -> num_layers
    prefix_lm: bool = False          # ChatGLM-6B: bidirectional attention over everything before <sop>
    rope_2d: bool = False            # ChatGLM-6B: 2D positions (position, block position) on the two head halves
    rope_dim: int = 0                # head dims rotated per position stream (0 -> head_dim // 2)
    rope_interleaved: bool = True    # rotate (x0,x1),(x2,x3).. pairs (GLM2+) vs first/second half (ChatGLM-6B)
    rope_base: float = 10000.0       # already multiplied by rope_ratio
    rope_fp16_freqs: bool = False    # ChatGLM-6B rounds its inverse frequencies to fp16 (kept for parity)
    tie_word_embeddings: bool = False
    # "rope" (every ChatGLM/GLM-4) | "learned_2d": original GLM's learned position + block-position embedding
    # tables ([max_seq_len, hidden] each) added to the token embeddings; no rotary then (rope_dim unused)
    pos_embedding: str = "rope"
    first_mask_any: bool = False     # original GLM: the mask position is the first [MASK]/[sMASK]/[gMASK] of any
    #                                  kind (ChatGLM-6B: the first [gMASK], else the first [MASK])
    mask_positions_1d: bool = False  # GLM-130B: 1D positions, <sop> and the span at the [MASK]/[sMASK]'s
    attn_fp32_softmax: bool = False  # GLM-130B: attention scores and softmax in fp32 whatever the dtype
    # token ids the model itself needs (positions and masks of ChatGLM-6B) and generation defaults
    mask_token_id: Optional[int] = None
    gmask_token_id: Optional[int] = None
    smask_token_id: Optional[int] = None
    sop_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    torch_dtype: str = "float16"     # dtype the checkpoint was published in
    name: str = ""                   # free text, e.g. "THUDM/chatglm3-6b"
    quantization: Optional[dict] = None  # weight-only quantization metadata (glmkit quantize)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
        if self.rope_dim == 0:
            self.rope_dim = self.head_dim // 2
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.pos_embedding not in ("rope", "learned_2d"):
            raise ConfigError(f"unknown pos_embedding {self.pos_embedding!r}; expected 'rope' or 'learned_2d'")
        if self.activation not in ("swiglu", "geglu", "gelu_tanh", "gelu_erf"):
            raise ConfigError(f"unknown activation {self.activation!r}; expected swiglu, geglu, gelu_tanh or gelu_erf")
        if self.rope_dim % 2 or self.rope_dim * (2 if self.rope_2d else 1) > self.head_dim:
            raise ConfigError(f"rope_dim={self.rope_dim} does not fit head_dim={self.head_dim}")

    # --- derived sizes -------------------------------------------------------------------------------
    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def residual_alpha(self) -> float:
        return math.sqrt(2 * (self.alpha_layers or self.num_layers)) if self.glm_residual else 1.0

    def num_params(self) -> int:
        h, L = self.hidden_size, self.num_layers
        attn = h * self.qkv_size + self.num_heads * self.head_dim * h
        ffn_in = self.ffn_hidden_size * (2 if self.activation in ("swiglu", "geglu") else 1)
        mlp = h * ffn_in + self.ffn_hidden_size * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp) + emb

    # --- (de)serialisation of our own layout ----------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d = {"model_type": "glmkit", **d}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k != "model_type")
        kwargs = {k: v for k, v in d.items() if k in known}
        cfg = cls(**kwargs)
        if unknown:
            cfg.extra = {**cfg.extra, **{k: d[k] for k in unknown}}
        return cfg

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------------------
# Official config.json -> ModelConfig
# ------------------------------------------------------------------------------------------------------

def _first(d: dict, *keys, default=None):
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _eos(d: dict) -> Optional[int]:
    e = d.get("eos_token_id")
    if isinstance(e, list):
        return e[0] if e else None
    return e


def guess_family(d: dict) -> Optional[str]:
    """Best guess of the generation from config.json alone (the tokenizer files decide when present)."""
    mt = d.get("model_type")
    if mt == "glmkit":
        return d.get("family")
    if is_original_glm(d):
        return "glm"
    if mt == "glm":
        return "glm4"
    if mt != "chatglm":
        return None
    if "position_encoding_2d" in d or "inner_hidden_size" in d or "max_sequence_length" in d:
        return "chatglm"
    name = str(d.get("_name_or_path", "")).lower()
    vocab = _first(d, "padded_vocab_size", "vocab_size", default=0)
    if vocab >= 150000 or "glm-4" in name or "glm4" in name:
        return "glm4"
    if "chatglm3" in name:
        return "chatglm3"
    if "chatglm2" in name:
        return "chatglm2"
    return None


def from_hf(d: dict, family: Optional[str] = None) -> ModelConfig:
    """Build a ModelConfig from an official config.json (as a dict).

    `family` (chatglm2 / chatglm3 / glm4) disambiguates GLM2-style configs, which are identical across those
    generations; the tokenizer files normally decide it (see checkpoint.detect_family).
    """
    if not isinstance(d, dict):
        raise ConfigError("config.json does not hold a JSON object")
    mt = d.get("model_type")
    if mt == "glmkit":
        return ModelConfig.from_dict(d)
    if mt == "chatglm":
        if "position_encoding_2d" in d or "inner_hidden_size" in d or "max_sequence_length" in d:
            return _from_chatglm_v1(d)
        return _from_chatglm_v2(d, family or guess_family(d) or "chatglm3")
    if is_original_glm(d):
        return _from_glm_original(d)
    if mt == "glm":
        arch = d.get("architectures") or []
        if arch and not any(a in ("GlmForCausalLM", "GlmModel") for a in arch):
            raise ConfigError(
                f"config.json has model_type 'glm' with architectures {arch} but no block_position_encoding: "
                "a 2021 THUDM/GLM config (glm-10b, glm-large-chinese, ...) as published carries it, and "
                "transformers' GlmForCausalLM (glm-4-9b-chat-hf) names that architecture")
        return _from_glm_hf(d)
    raise ConfigError(
        f"config.json has model_type {mt!r}, which is not a GLM-family model; glmkit loads "
        "model_type 'chatglm' (ChatGLM-6B, ChatGLM2/3-6B, GLM-4-9B), 'glm' (GlmForCausalLM) and 'glmkit'")


def is_original_glm(d: dict) -> bool:
    """The 2021 GLM's remote-code config (model_type "glm" like transformers' native GLM-4 port, but with
    block_position_encoding, num_layers and max_sequence_length)."""
    return d.get("model_type") == "glm" and "block_position_encoding" in d


def _from_glm_original(d: dict) -> ModelConfig:
    """THUDM's configuration_glm.GLMConfig (glm-large-chinese, glm-10b-chinese, glm-2b, glm-10b).

    The remote code: x = E[ids] + P[pos] + B[block_pos] (tables of max_sequence_length + 1 rows), pre-LN blocks
    with biased LayerNorm (eps 1e-5), fused [q | k | v] with bias, exact-erf GELU MLP of 4h, final LayerNorm,
    logits against the word embeddings; bidirectional over the context, causal from <|startofpiece|> on."""
    if not d.get("block_position_encoding"):
        raise ConfigError("block_position_encoding=false (GLM without block positions) is not supported")
    if d.get("relative_encoding"):
        raise ConfigError("relative_encoding=true (Transformer-XL style GLM) is not supported")
    if float(d.get("attention_scale", 1.0) or 1.0) != 1.0:
        raise ConfigError(f"attention_scale={d['attention_scale']} is not supported (the released models use 1.0)")
    h, nh = d["hidden_size"], d["num_attention_heads"]
    if h % nh:
        raise ConfigError(f"hidden_size={h} is not a multiple of num_attention_heads={nh}")
    vocab = d["vocab_size"]
    english = vocab > 50200               # GPT-2 BPE (glm-10b, glm-2b) vs cog-pretrain SentencePiece (Chinese)
    ids = GLM_ENGLISH_IDS if english else GLM_CHINESE_IDS
    return ModelConfig(
        family="glm", vocab_size=vocab, hidden_size=h, num_layers=d["num_layers"], num_heads=nh, num_kv_heads=nh,
        head_dim=h // nh, ffn_hidden_size=4 * h, max_seq_len=d["max_sequence_length"] + 1,
        norm="layernorm", norm_eps=float(d.get("layernorm_epsilon", 1e-5)), activation="gelu_erf",
        qkv_layout="grouped", qkv_bias=True, out_bias=True, mlp_bias=True, prefix_lm=True,
        pos_embedding="learned_2d", first_mask_any=True, tie_word_embeddings=True,
        mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"], smask_token_id=ids["[sMASK]"],
        sop_token_id=ids["<|startofpiece|>"], eos_token_id=ids["<|endofpiece|>"], pad_token_id=ids["<|endoftext|>"],
        torch_dtype=d.get("torch_dtype", "float16"), name=d.get("_name_or_path", ""),
        extra={k: d[k] for k in ("bad_words_id",) if k in d},
    )


# the original GLM's command tokens (the tokenizer files decide; these are the published ids)
GLM_CHINESE_IDS = {"<|endoftext|>": 50000, "[SEP]": 50001, "[CLS]": 50002, "[MASK]": 50003, "[UNUSED1]": 50004,
                   "[UNUSED2]": 50005, "<|startofpiece|>": 50006, "<|endofpiece|>": 50007, "[sMASK]": 50008,
                   "[gMASK]": 50009}
GLM_ENGLISH_IDS = {"<|endoftext|>": 50256, "<|startofpiece|>": 50257, "<|endofpiece|>": 50258, "[CLS]": 50259,
                   "[MASK]": 50260, "[SEP]": 50261, "[UNK]": 50262, "[gMASK]": 50263, "[sMASK]": 50264}


def _check_unsupported(d: dict):
    qb = d.get("quantization_bit") or 0
    if qb:
        raise ConfigError(
            f"config.json has quantization_bit={qb}: official pre-quantized checkpoints (…-int4/-int8) keep "
            "weights in the official CUDA kernel's packed format, which glmkit does not read; load the fp16 "
            "checkpoint instead")
    if d.get("pre_seq_len"):
        raise ConfigError(
            f"config.json has pre_seq_len={d['pre_seq_len']} (a P-tuning v2 checkpoint); load the base model's "
            "folder instead")


def _from_chatglm_v1(d: dict) -> ModelConfig:
    _check_unsupported(d)
    if d.get("position_encoding_2d") is False:
        raise ConfigError("ChatGLM-6B configs with position_encoding_2d=false are not supported")
    h, nh = d["hidden_size"], d["num_attention_heads"]
    gmask = d.get("gmask_token_id", 130001)
    return ModelConfig(
        family="chatglm",
        vocab_size=d["vocab_size"],
        hidden_size=h,
        num_layers=d["num_layers"],
        num_heads=nh,
        num_kv_heads=nh,
        head_dim=h // nh,
        ffn_hidden_size=_first(d, "inner_hidden_size", default=4 * h),
        max_seq_len=_first(d, "max_sequence_length", default=2048),
        norm="layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5),
        activation="gelu_tanh",
        qkv_layout="per_head",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        glm_residual=True,
        # The official ChatGLMModel builds GLMBlock without passing num_layers, so every block uses the
        # default of 28 whatever the config says: alpha = sqrt(56) (the same thing for the real 28-layer model).
        alpha_layers=28,
        prefix_lm=True,
        rope_2d=True,
        rope_dim=(h // nh) // 2,
        rope_interleaved=False,
        rope_base=10000.0,
        rope_fp16_freqs=True,
        mask_token_id=d.get("mask_token_id", 130000),
        gmask_token_id=gmask,
        # [sMASK] follows [gMASK] in ice_text.model; the official config does not name it
        smask_token_id=d.get("smask_token_id", gmask + 1 if gmask == 130001 else None),
        sop_token_id=d.get("bos_token_id", 130004),
        eos_token_id=_eos(d) if _eos(d) is not None else 130005,
        pad_token_id=d.get("pad_token_id", 3),
        torch_dtype=d.get("torch_dtype", "float16"),
        name=d.get("_name_or_path", ""),
    )


def _from_chatglm_v2(d: dict, family: str) -> ModelConfig:
    _check_unsupported(d)
    if family not in ("chatglm2", "chatglm3", "glm4"):
        raise ConfigError(f"a GLM2-style config cannot be family {family!r}")
    h, nh = d["hidden_size"], d["num_attention_heads"]
    head_dim = _first(d, "kv_channels", default=h // nh)
    kv = d.get("multi_query_group_num", nh) if d.get("multi_query_attention", False) else nh
    if d.get("apply_residual_connection_post_layernorm"):
        raise ConfigError("apply_residual_connection_post_layernorm=true is not supported")
    if d.get("rmsnorm", True) is False:
        norm = "layernorm"
    else:
        norm = "rmsnorm"
    if d.get("post_layer_norm", True) is False:
        raise ConfigError("post_layer_norm=false is not supported")
    if d.get("original_rope", True) is False:
        raise ConfigError("original_rope=false is not supported")
    vocab = _first(d, "padded_vocab_size", "vocab_size")
    gmask_default = {"chatglm2": 64790, "chatglm3": 64790, "glm4": 151331}[family]
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=h,
        num_layers=d["num_layers"],
        num_heads=nh,
        num_kv_heads=kv,
        head_dim=head_dim,
        ffn_hidden_size=d["ffn_hidden_size"],
        max_seq_len=_first(d, "seq_length", default=2048),
        norm=norm,
        norm_eps=d.get("layernorm_epsilon", 1e-5),
        activation="swiglu",
        qkv_layout="grouped",
        qkv_bias=bool(d.get("add_qkv_bias", False) or d.get("add_bias_linear", False)),
        out_bias=bool(d.get("add_bias_linear", False)),
        mlp_bias=bool(d.get("add_bias_linear", False)),
        glm_residual=False,
        prefix_lm=False,
        rope_2d=False,
        rope_dim=head_dim // 2,
        rope_interleaved=True,
        rope_base=10000.0 * float(d.get("rope_ratio", 1) or 1),
        rope_fp16_freqs=False,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        gmask_token_id=gmask_default,
        sop_token_id=gmask_default + 2,
        mask_token_id=gmask_default - 1,
        smask_token_id=gmask_default + 1,
        eos_token_id=_eos(d),
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=d.get("torch_dtype", "float16"),
        name=d.get("_name_or_path", ""),
    )


def _from_glm_hf(d: dict) -> ModelConfig:
    """transformers' GlmConfig (glm-4-9b-chat-hf); both the 4.x keys and the 5.x rope_parameters form."""
    h, nh = d["hidden_size"], d["num_attention_heads"]
    head_dim = _first(d, "head_dim", default=h // nh)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"rope type {rope.get('rope_type')!r} is not supported")
    theta = _first(rope, "rope_theta", default=None) or d.get("rope_theta", 10000.0)
    factor = _first(rope, "partial_rotary_factor", default=None) or d.get("partial_rotary_factor", 0.5)
    rot = int(head_dim * factor)
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {d.get('hidden_act')!r} is not supported (GLM uses silu)")
    return ModelConfig(
        family="glm4",
        vocab_size=d["vocab_size"],
        hidden_size=h,
        num_layers=d["num_hidden_layers"],
        num_heads=nh,
        num_kv_heads=_first(d, "num_key_value_heads", default=nh),
        head_dim=head_dim,
        ffn_hidden_size=d["intermediate_size"],
        max_seq_len=_first(d, "max_position_embeddings", default=131072),
        norm="rmsnorm",
        norm_eps=_first(d, "rms_norm_eps", default=1.5625e-07),
        activation="swiglu",
        qkv_layout="grouped",
        qkv_bias=bool(d.get("attention_bias", True)),
        out_bias=False,
        mlp_bias=False,
        rope_dim=rot,
        rope_interleaved=True,
        rope_base=float(theta),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        mask_token_id=151330,
        gmask_token_id=151331,
        smask_token_id=151332,
        sop_token_id=151333,
        eos_token_id=_eos(d) if _eos(d) is not None else 151329,
        pad_token_id=d.get("pad_token_id", 151329),
        torch_dtype=_first(d, "torch_dtype", "dtype", default="bfloat16"),
        name=d.get("_name_or_path", ""),
    )


# ------------------------------------------------------------------------------------------------------
# Presets: the published config.json of each generation (official key names), turned into ModelConfig.
# ------------------------------------------------------------------------------------------------------

_V2_COMMON = dict(
    model_type="chatglm", add_bias_linear=False, add_qkv_bias=True, ffn_hidden_size=13696, hidden_size=4096,
    kv_channels=128, layernorm_epsilon=1e-5, multi_query_attention=True, multi_query_group_num=2,
    num_attention_heads=32, num_layers=28, original_rope=True, padded_vocab_size=65024, post_layer_norm=True,
    rmsnorm=True, torch_dtype="float16", eos_token_id=2, pad_token_id=0,
)

PRESETS_HF: dict[str, tuple[dict, str]] = {
    "chatglm-6b": (dict(model_type="chatglm", vocab_size=130528, hidden_size=4096, num_layers=28,
                        num_attention_heads=32, inner_hidden_size=16384, max_sequence_length=2048,
                        layernorm_epsilon=1e-5, position_encoding_2d=True, bos_token_id=130004,
                        eos_token_id=130005, mask_token_id=130000, gmask_token_id=130001, pad_token_id=3,
                        torch_dtype="float16", _name_or_path="THUDM/chatglm-6b"), "chatglm"),
    "chatglm2-6b": ({**_V2_COMMON, "seq_length": 32768, "_name_or_path": "THUDM/chatglm2-6b"}, "chatglm2"),
    "chatglm3-6b": ({**_V2_COMMON, "seq_length": 8192, "_name_or_path": "THUDM/chatglm3-6b"}, "chatglm3"),
    # CodeGeeX2-6B: the ChatGLM2-6B architecture and tokenizer, further trained on code (8192 positions); a code
    # completion model, prompted with "# language: Python\n..." comments rather than a chat format
    "codegeex2-6b": ({**_V2_COMMON, "seq_length": 8192, "_name_or_path": "THUDM/codegeex2-6b"}, "chatglm2"),
    "chatglm3-6b-32k": ({**_V2_COMMON, "seq_length": 32768, "rope_ratio": 50,
                         "_name_or_path": "THUDM/chatglm3-6b-32k"}, "chatglm3"),
    "glm-4-9b": ({**_V2_COMMON, "ffn_hidden_size": 13696, "num_layers": 40, "padded_vocab_size": 151552,
                  "seq_length": 131072, "rope_ratio": 500, "layernorm_epsilon": 1.5625e-07,
                  "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16",
                  "_name_or_path": "THUDM/glm-4-9b-chat"}, "glm4"),
}


def preset(name: str) -> ModelConfig:
    if name == "glm-130b":                      # SAT arguments, no config.json (see from_sat_args below)
        return from_sat_args(GLM130B_SAT_ARGS)
    if name not in PRESETS_HF:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS_HF))}")
    d, fam = PRESETS_HF[name]
    return from_hf(dict(d), family=fam)


# ------------------------------------------------------------------------------------------------------
# GLM-130B (SwissArmyTransformer checkpoints; read by sat_checkpoint.py). The release ships no config file:
# the architecture is SAT's GLM130B class with the arguments of configs/model_glm_130b.sh.
# ------------------------------------------------------------------------------------------------------

FAMILIES = FAMILIES + ("glm130b",)
FAMILY_NAMES["glm130b"] = "GLM-130B"

# SAT argument names (as in configs/model_glm_130b.sh / a model_args.json), published GLM-130B values
GLM130B_SAT_ARGS = {"num-layers": 70, "hidden-size": 12288, "inner-hidden-size": 32768, "vocab-size": 150528,
                    "num-attention-heads": 96, "max-sequence-length": 2048, "tokenizer-type": "icetk-glm-130B",
                    "layernorm-order": "post", "model-parallel-size": 8}
# icetk-glm-130B ids: 20000 image tokens, then ice_text.model's text pieces; SAT's specials from 150000
GLM130B_IDS = {"[MASK]": 150000, "[gMASK]": 150001, "[sMASK]": 150002, "eod": 150003, "sop": 150004,
               "eop": 150005, "ENC": 150006, "dBLOCK": 150007, "eos": 20002}


def from_sat_args(a: dict) -> ModelConfig:
    """SAT arguments of a GLM-130B checkpoint (dashes or underscores) -> ModelConfig of SAT's GLM130B class:
    DeepNorm post-LN (x = LN(x) * sqrt(2L) + f(LN(x)), glm_residual), GeGLU, rotary over the whole head dim
    (rotate-half, fp16 inverse frequencies) on 1D positions, per-head [q, k, v] rows, every linear with a
    bias, LayerNorm eps 1e-5 (SAT's default), output tied to the word embeddings, fp32 softmax."""
    a = {str(k).replace("_", "-"): v for k, v in a.items()}
    missing = [k for k in ("num-layers", "hidden-size", "num-attention-heads", "vocab-size") if k not in a]
    if missing:
        raise ConfigError(f"SAT arguments lack {', '.join(missing)}")
    order = a.get("layernorm-order", "post")
    if order != "post":
        raise ConfigError(f"layernorm-order {order!r}: GLM-130B is DeepNorm post-LN ('post'); other SAT "
                          "models are not supported")
    h, nh = int(a["hidden-size"]), int(a["num-attention-heads"])
    if h % nh:
        raise ConfigError(f"hidden-size {h} is not a multiple of num-attention-heads {nh}")
    ids = GLM130B_IDS
    return ModelConfig(
        family="glm130b", vocab_size=int(a["vocab-size"]), hidden_size=h, num_layers=int(a["num-layers"]),
        num_heads=nh, num_kv_heads=nh, head_dim=h // nh,
        ffn_hidden_size=int(a.get("inner-hidden-size") or 4 * h),
        max_seq_len=int(a.get("max-sequence-length", 2048)), norm="layernorm", norm_eps=1e-5,
        activation="geglu", qkv_layout="per_head", qkv_bias=True, out_bias=True, mlp_bias=True,
        glm_residual=True, alpha_layers=0, prefix_lm=True, rope_2d=False, rope_dim=h // nh,
        rope_interleaved=False, rope_base=10000.0, rope_fp16_freqs=True, tie_word_embeddings=True,
        mask_positions_1d=True, attn_fp32_softmax=True,
        mask_token_id=ids["[MASK]"], gmask_token_id=ids["[gMASK]"], smask_token_id=ids["[sMASK]"],
        sop_token_id=ids["sop"], eos_token_id=ids["eop"], pad_token_id=None,
        torch_dtype="float16", name="THUDM/GLM-130B", extra={"sat_args": a})
