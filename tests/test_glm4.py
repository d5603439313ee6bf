"""GLM-4: parity with transformers' GlmForCausalLM on a random tiny config (test dependency only), the same
weights in the chatglm-style layout of glm-4-9b-chat, and the GLM-4 tokenizer / chat and tools prompts on a
tiktoken file built here (no GLM-4 tokenizer file can be had offline)."""
from __future__ import annotations

import base64
import collections
import json
import re
from pathlib import Path

import pytest
import torch

from glmkit.checkpoint import load_model
from glmkit.sampling import SamplingParams

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")

DATA = Path(__file__).parent / "data"
SPECIAL_IDS = {"<|endoftext|>": 151329, "[MASK]": 151330, "[gMASK]": 151331, "[sMASK]": 151332, "<sop>": 151333,
               "<eop>": 151334, "<|system|>": 151335, "<|user|>": 151336, "<|assistant|>": 151337,
               "<|observation|>": 151338, "<|begin_of_image|>": 151339, "<|end_of_image|>": 151340,
               "<|begin_of_video|>": 151341, "<|end_of_video|>": 151342}


# ------------------------------------------------------------------------------------------------------------
# model parity
# ------------------------------------------------------------------------------------------------------------

def tiny_glm_hf(tmp: Path, vocab=320, seed=0):
    from transformers import GlmConfig, GlmForCausalLM

    cfg = GlmConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    rope_theta=5e6, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
                    pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(seed)
    m = GlmForCausalLM(cfg).eval()
    with torch.no_grad():                       # make biases and norms non-trivial so they are tested too
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    m.save_pretrained(tmp)
    return m


def to_chatglm_layout(hf_dir: Path, out: Path):
    """Write the same weights as glm-4-9b-chat publishes them (transformer.encoder..., fused q/k/v)."""
    from safetensors.torch import load_file, save_file

    hc = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(hf_dir / "model.safetensors")
    o = {"transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
         "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
         "transformer.output_layer.weight": sd["lm_head.weight"],
         "transformer.rotary_pos_emb.inv_freq": torch.zeros(8)}
    for i in range(hc["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        o[b + "input_layernorm.weight"] = sd[a + "input_layernorm.weight"]
        o[b + "post_attention_layernorm.weight"] = sd[a + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            o[b + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd[a + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        o[b + "self_attention.dense.weight"] = sd[a + "self_attn.o_proj.weight"]
        o[b + "mlp.dense_h_to_4h.weight"] = sd[a + "mlp.gate_up_proj.weight"]
        o[b + "mlp.dense_4h_to_h.weight"] = sd[a + "mlp.down_proj.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in o.items()}, str(out / "model.safetensors"))
    theta = hc["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps({
        "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "add_bias_linear": False,
        "add_qkv_bias": True, "ffn_hidden_size": hc["intermediate_size"], "hidden_size": hc["hidden_size"],
        "kv_channels": hc["head_dim"], "layernorm_epsilon": hc["rms_norm_eps"], "multi_query_attention": True,
        "multi_query_group_num": hc["num_key_value_heads"], "num_attention_heads": hc["num_attention_heads"],
        "num_layers": hc["num_hidden_layers"], "original_rope": True, "padded_vocab_size": hc["vocab_size"],
        "post_layer_norm": True, "rmsnorm": True, "rope_ratio": theta / 10000, "seq_length": 256,
        "tie_word_embeddings": False, "torch_dtype": "float32", "eos_token_id": [1], "pad_token_id": 0}))


@pytest.fixture(scope="module")
def glm_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("glm4")
    hf = tiny_glm_hf(tmp / "hf")
    to_chatglm_layout(tmp / "hf", tmp / "chatglm")
    return hf, tmp / "hf", tmp / "chatglm"


PROMPTS = [[3, 17, 200, 5, 9, 12, 301, 44], [7] * 5 + list(range(20, 60))]


@pytest.mark.parametrize("layout", ["hf", "chatglm"])
def test_glm4_logits_match_transformers(glm_pair, layout):
    ref, hf_dir, cg_dir = glm_pair
    model, info = load_model(hf_dir if layout == "hf" else cg_dir, dtype="float32")
    assert info.layout == ("glm_hf" if layout == "hf" else "chatglm2")
    assert model.config.family == "glm4" and model.config.rope_dim == 8
    for ids in PROMPTS:
        x = torch.tensor([ids])
        with torch.inference_mode():
            want = ref(x).logits[0]
            got = model(x)[0]
        assert (got - want).abs().max().item() <= 1e-4
        # greedy continuation with the KV cache equals transformers' own generate
        from glmkit.engine import Engine

        g = Engine(model, max_seq=128)
        ours = list(g.generate(ids, SamplingParams(temperature=0, max_new_tokens=10)))
        with torch.inference_mode():
            theirs = ref.generate(x, max_new_tokens=10, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert ours == theirs


def test_glm4_both_layouts_give_identical_weights(glm_pair):
    _, hf_dir, cg_dir = glm_pair
    a, _ = load_model(hf_dir, dtype="float32")
    b, _ = load_model(cg_dir, dtype="float32")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


# ------------------------------------------------------------------------------------------------------------
# tokenizer and chat format on a tiktoken file built here
# ------------------------------------------------------------------------------------------------------------

CORPUS = ("你好！我是人工智能助手。今天北京的天气怎么样？北京今天晴，气温二十五度。请帮我查询一下上海的天气。"
          "Hello, how are you today? The weather in Beijing is sunny. Please call the function get_weather. "
          '{"city": "Beijing", "unit": "celsius"} def f(x):\n    return x * 2\n\n\n') * 3


def build_tiktoken(path: Path, corpus: str = CORPUS, merges: int = 400):
    """A small byte-level BPE in tiktoken's file format (base64 token, rank): 256 bytes, then merges."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [list(bytes([b]) for b in w.encode()) for w in re.findall(r"\w+|[^\w\s]+|\s+", corpus)]
    for _ in range(merges):
        pairs = collections.Counter()
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[a, b] += 1
        if not pairs:
            break
        (a, b), n = pairs.most_common(1)[0]
        if n < 2:
            break
        ranks.setdefault(a + b, len(ranks))
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


@pytest.fixture(scope="module")
def glm4_tok(tmp_path_factory):
    from glmkit.tokenizer import load_tokenizer

    d = tmp_path_factory.mktemp("glm4tok")
    build_tiktoken(d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for c, i in SPECIAL_IDS.items()}}))
    return load_tokenizer(d, "glm4")


def render_published(messages, tools=None):
    """The published template, rendered as transformers' apply_chat_template does (trim_blocks, lstrip_blocks,
    a tojson that keeps non-ASCII), then tokenised the way its tokenizer does:
    special tokens split out, the text between them encoded as one piece."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **k: json.dumps(x, ensure_ascii=False, indent=indent)
    tmpl = env.from_string((DATA / "glm4_chat_template.jinja").read_text(encoding="utf-8"))
    items = [dict(m) for m in messages]
    if tools:
        items.insert(0, {"role": "system", "content": "", "tools": tools})
    return tmpl.render(messages=items, add_generation_prompt=True)


def tokenize_rendered(tok, text: str) -> list[int]:
    pat = "(" + "|".join(re.escape(s) for s in SPECIAL_IDS) + ")"
    out = []
    for k, part in enumerate(re.split(pat, text)):
        out += [SPECIAL_IDS[part]] if k % 2 else tok.encode_plain(part)
    return out


def test_glm4_special_ids_and_encode(glm4_tok):
    tok = glm4_tok
    for name, i in SPECIAL_IDS.items():
        assert tok.token_id(name) == i
    ids = tok.encode("你好")
    assert ids[:2] == [151331, 151333]
    assert tok.decode(ids) == "你好"
    assert tok.encode("a<|user|>b", add_special_tokens=False)[1] == 151336     # recognised, as officially
    assert 151336 not in tok.encode_plain("a<|user|>b")                         # but never in message contents
    for text in ["你好，世界 hello\n\n\tworld  👋😀", "  lead and trail  ", "def f(x):\n    return x\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.chat_format.stop_ids == [151329, 151336, 151338]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询某个城市的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}

CHATS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "天气\n怎么样？"}],
    [{"role": "user", "content": "\n\n leading newlines and spaces  "}],
]


@pytest.mark.parametrize("messages", CHATS)
def test_glm4_chat_prompt_as_published(glm4_tok, messages):
    want = tokenize_rendered(glm4_tok, render_published(messages))
    assert glm4_tok.apply_chat_template(messages) == want


def test_glm4_tools_prompt_as_published(glm4_tok):
    tok = glm4_tok
    messages = [{"role": "user", "content": "北京今天天气怎么样？"}]
    want = tokenize_rendered(tok, render_published(messages, tools=[WEATHER]))
    assert tok.apply_chat_template(messages, tools=[WEATHER]) == want
    # a full tool round: the assistant's call and the tool's result, as the official OpenAI server maps them
    convo = messages + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"weather": "晴", "temperature": 25}'}]
    published = messages + [{"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'},
                            {"role": "observation", "content": '{"weather": "晴", "temperature": 25}'}]
    want = tokenize_rendered(tok, render_published(published, tools=[WEATHER]))
    assert tok.apply_chat_template(convo, tools=[WEATHER]) == want


def test_glm4_tool_call_parsed_from_answer(glm4_tok):
    tok = glm4_tok
    fmt = tok.chat_format
    prompt = fmt.render([{"role": "user", "content": "北京天气"}], tools=[WEATHER])
    parser = fmt.parser(prompt)
    streamed = "".join(parser.feed(i) for i in tok.encode_plain('get_weather\n{"city": "北京"}'))
    streamed += parser.finish()
    assert streamed == ""
    assert [(c.name, json.loads(c.arguments)) for c in parser.tool_calls] == [("get_weather", {"city": "北京"})]
    # a plain answer: empty metadata line, then text
    parser = fmt.parser(prompt)
    text = "".join(parser.feed(i) for i in tok.encode_plain("\n北京今天晴。")) + parser.finish()
    assert text == "北京今天晴。" and parser.tool_calls == []
    # a call to a function that was not offered stays text
    parser = fmt.parser(prompt)
    text = "".join(parser.feed(i) for i in tok.encode_plain('rm_rf\n{"path": "/"}')) + parser.finish()
    assert parser.tool_calls == [] and text == 'rm_rf\n{"path": "/"}'


def test_glm4_chat_end_to_end_with_tiny_model(glm_pair, glm4_tok, tmp_path):
    """A chatglm-layout GLM-4 folder with the built tokenizer loads and chats through Pipeline."""
    import shutil

    import glmkit
    from glmkit.config import ModelConfig  # noqa: F401

    _, hf_dir, _ = glm_pair
    # a model whose vocabulary covers the special ids
    tiny_glm_hf(tmp_path / "hf", vocab=151552, seed=1)
    to_chatglm_layout(tmp_path / "hf", tmp_path / "m")
    shutil.copy(glm4_tok.path, tmp_path / "m" / "tokenizer.model")
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for c, i in SPECIAL_IDS.items()}}))
    pipe = glmkit.load(tmp_path / "m")
    assert pipe.config.family == "glm4"
    r = pipe.chat("你好", max_new_tokens=8, seed=3)
    assert isinstance(r, str) and r.usage["completion_tokens"] <= 8
    assert "".join(pipe.stream_chat("你好", max_new_tokens=8, seed=3)) == r
