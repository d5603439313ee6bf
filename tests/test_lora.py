"""LoRA (glmkit/adapters): the PEFT folders of ../shared/glm/adapters-tiny reproduced (logits of the last two
positions, argmax per position, 12 greedy tokens with the KV cache and by full recomputation, and the same after
merging); adapters glmkit trains and saves load in peft + transformers with the same logits; QLoRA gradients
through a frozen INT4 base equal those on its dequantized float twin; a few AdamW steps lower a loss; per-row
adapters in one batch; and every bad input refused with a message that names it."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import GLM as GLM_DIR, needs_kernels, needs_shared
from glmkit.adapters import lora as L
from glmkit.adapters.lora import LoRAError, LoRALinear, apply_lora, merge_lora
from glmkit.adapters.peft_format import is_peft_folder, load_peft_lora, save_peft_lora
from glmkit.checkpoint import load_model
from glmkit.config import ModelConfig
from glmkit.engine import Engine
from glmkit.model import GLM
from glmkit.quant import QuantLinear, prepare_model, quantize_model
from glmkit.sampling import SamplingParams

AT = GLM_DIR / "adapters-tiny"
LORA_CASES = ["chatglm-6b-lora", "chatglm3-6b-lora", "glm4-hf-lora"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
needs_adapters = pytest.mark.skipif(not (AT / "expected.json").is_file(), reason=f"{AT} is absent")


def expected_cases():
    return json.loads((AT / "expected.json").read_text())


def load_case(case: str):
    e = expected_cases()[case]
    model, info = load_model(AT / e["base"], dtype="float32")
    return model, info, e


def greedy_full(model, ids, n=12):
    """The no-cache loop: re-run the whole sequence, append the argmax."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(t)
            out.append(t)
    return out


def greedy_cached(model, ids):
    return list(Engine(model, 128, cache_mb=0).generate(list(ids), GREEDY))


def check_case(model, c, tol=1e-4):
    ids = torch.tensor([c["input_ids"]])
    with torch.no_grad():
        logits = model(ids)[0]
    want = torch.load(AT / c["logits_file"])
    assert want.shape[0] == 2
    err = (logits[-2:] - want).abs().max().item()
    assert err <= tol, err
    assert logits.argmax(-1).tolist() == c["argmax_per_position"]
    assert greedy_cached(model, c["input_ids"]) == c["greedy_12"]
    assert greedy_full(model, c["input_ids"]) == c["greedy_12"]


# ------------------------------------------------------------------------------------------------------------
# the reference adapters
# ------------------------------------------------------------------------------------------------------------

@needs_shared
@needs_adapters
@pytest.mark.parametrize("case", LORA_CASES)
def test_reference_adapter_reproduced_then_merged(case):
    model, info, e = load_case(case)
    assert is_peft_folder(AT / e["adapter"])
    got = load_peft_lora(model, AT / e["adapter"], info.layout)
    assert got.r == 4 and got.alpha == 8 and got.layout == info.layout
    cfg = json.loads((AT / e["adapter"] / "adapter_config.json").read_text())
    n_official = sum(1 for t in cfg["target_modules"]) * model.config.num_layers
    assert len(got.modules) == n_official           # one part per official module (q/k/v are parts of our qkv)
    for c in e["cases"]:
        check_case(model, c)
    with L.lora_disabled(model), torch.no_grad():   # the adapter really changes the model
        bare = model(torch.tensor([e["cases"][0]["input_ids"]]))[0, -2:]
    assert (bare - torch.load(AT / e["cases"][0]["logits_file"])).abs().max() > 0.01
    merge_lora(model)
    assert not L.lora_modules(model) and all(type(m) is not LoRALinear for m in model.modules())
    for c in e["cases"]:
        check_case(model, c)


@needs_shared
@needs_adapters
def test_chatglm6b_dense_is_only_the_attention_output():
    model, info, e = load_case("chatglm-6b-lora")
    got = load_peft_lora(model, AT / e["adapter"], info.layout)
    assert sorted({m.split(".", 2)[2] for m in got.modules}) == ["attn.out", "attn.qkv"]
    # and by name: "dense" in the chatglm layout is attn.out, never the MLP's dense_h_to_4h / dense_4h_to_h
    fresh, _ = load_model(AT / e["base"], dtype="float32")
    done = apply_lora(fresh, 2, 4, targets="dense", layout="chatglm")
    assert done == [f"layers.{i}.attn.out" for i in range(fresh.config.num_layers)]


@needs_shared
@needs_adapters
def test_reference_adapters_resaved_in_other_namings_give_the_same_logits(tmp_path):
    # glm4-hf-lora: q_proj / k_proj / v_proj parts -> one query_key_value of rank 12 (chatglm2 naming)
    model, info, e = load_case("glm4-hf-lora")
    load_peft_lora(model, AT / e["adapter"], info.layout)
    ids = torch.tensor([e["cases"][1]["input_ids"]])
    with torch.no_grad():
        want = model(ids)
    save_peft_lora(model, tmp_path / "as-chatglm2", "chatglm2", base_name="THUDM/glm-4-9b-chat")
    cfg = json.loads((tmp_path / "as-chatglm2" / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {12} and cfg["r"] == 4
    L.remove_lora(model)
    got = load_peft_lora(model, tmp_path / "as-chatglm2", "glm_hf")      # the other naming of these modules
    assert got.layout == "chatglm2"
    with torch.no_grad():
        assert (model(ids) - want).abs().max() < 1e-4
    # chatglm3-6b-lora: a full-width query_key_value -> q_proj / k_proj / v_proj with the same A (glm_hf naming),
    # which loads back on the chatglm2-layout model (the two namings are the same modules)
    model, info, e = load_case("chatglm3-6b-lora")
    load_peft_lora(model, AT / e["adapter"], info.layout)
    save_peft_lora(model, tmp_path / "as-hf", "glm_hf")
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "as-hf" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in sd
    assert torch.equal(sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       sd["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"])
    L.remove_lora(model)
    load_peft_lora(model, tmp_path / "as-hf", info.layout)
    for c in e["cases"]:
        check_case(model, c)


@needs_shared
@needs_adapters
def test_reference_adapter_on_a_quantized_glmkit_folder(tmp_path):
    """A base that `glmkit quantize` wrote (our own layout, INT8) takes the official adapter as it is."""
    from glmkit.checkpoint import save_model
    e = expected_cases()["chatglm3-6b-lora"]
    q, _ = load_model(AT / e["base"], dtype="float32", quantize="int8")
    save_model(q, tmp_path / "q8", source_dir=AT / e["base"])
    q, info = load_model(tmp_path / "q8")
    assert info.layout == "glmkit" and isinstance(q.layers[0].attn.qkv, QuantLinear)
    got = load_peft_lora(q, AT / e["adapter"], info.layout)
    assert got.layout == "chatglm2" and isinstance(q.layers[0].attn.qkv.base, QuantLinear)
    for c in e["cases"]:
        want = torch.load(AT / c["logits_file"])
        x = torch.tensor([c["input_ids"]])
        with torch.no_grad():
            err = (q(x)[0, -2:] - want).abs().max().item()
            with L.lora_disabled(q):
                bare = (q(x)[0, -2:] - want).abs().max().item()
        assert err < 0.1 and err < bare / 4, (err, bare)    # INT8 weights: ~0.05 off, the adapter ~10x that


def official_skeleton(model, layout):
    """nn.Linear layers at the official module paths of `layout` (what the official modeling code has), for
    PEFT to match target_modules and keys against without the remote code."""
    root = nn.Module()
    for path, slot in L.official_modules(model, layout).items():
        parent = root
        *heads, leaf = path.split(".")
        for h in heads:
            if not hasattr(parent, h):
                parent.add_module(h, nn.Module())
            parent = getattr(parent, h)
        parent.add_module(leaf, nn.Linear(model.get_submodule(slot.module).in_features, slot.hi - slot.lo))
    return root


@needs_shared
@needs_adapters
@pytest.mark.parametrize("case", ["chatglm-6b-lora", "chatglm3-6b-lora"])
def test_resaved_reference_adapter_is_the_official_folder(tmp_path, case):
    """Saved again by glmkit, the ChatGLM-6B / ChatGLM3 adapters have the keys, values and config PEFT wrote on
    the official code, and PEFT (on the official module tree) adapts exactly the modules our keys name."""
    peft = pytest.importorskip("peft", reason="peft (a test dependency) is not installed")
    from safetensors.torch import load_file

    from glmkit.adapters.peft_format import read_weights
    model, info, e = load_case(case)
    src = AT / e["adapter"]
    load_peft_lora(model, src, info.layout)
    save_peft_lora(model, tmp_path / "ours", info.layout, base_name="THUDM/" + case.rsplit("-", 1)[0])
    theirs = read_weights(next(p for p in src.iterdir() if p.name.startswith("adapter_model")))
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k].float()) for k in ours)
    a = json.loads((src / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert {k: b[k] for k in a if k in b} == a | {"target_modules": b["target_modules"]}
    assert sorted(a["target_modules"]) == sorted(b["target_modules"])
    sk = official_skeleton(model, info.layout)
    sk = peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(tmp_path / "ours"), sk)
    adapted = {n for n, m in sk.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in ours}
    res = peft.set_peft_model_state_dict(sk, {k[len("base_model.model."):]: v for k, v in ours.items()})
    assert not res.unexpected_keys


# ------------------------------------------------------------------------------------------------------------
# ours, loaded by peft + transformers
# ------------------------------------------------------------------------------------------------------------

def randomize_b(model, std=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in L.lora_modules(model).values():
            for ad in mod.adapters.values():
                for p in ad.B.values():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


@needs_shared
@needs_adapters
def test_trained_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft", reason="peft (a test dependency) is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
    base = AT / "bases" / "glm4-hf"
    prompts = json.loads((base / "expected.json").read_text())
    model, info = load_model(base, dtype="float32")
    assert info.layout == "glm_hf"
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=["all", "lm_head"], seed=0)
    # a few real training steps, then B made clearly non-zero (so the adapter is far from a no-op)
    ids = torch.tensor([prompts[1]["input_ids"]])
    opt = torch.optim.AdamW(L.lora_parameters(model), lr=1e-2)
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    randomize_b(model)
    save_peft_lora(model, tmp_path / "ours", "glm_hf", base_name="THUDM/glm-4-9b-chat-hf")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_up_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                             "v_proj"]
    hf = transformers.GlmForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    for p in prompts:
        x = torch.tensor([p["input_ids"]])
        with torch.no_grad():
            ours = model(x)[0]
            theirs = pm(input_ids=x).logits[0].float()
            with L.lora_disabled(model):
                bare = model(x)[0]
        assert (ours - theirs).abs().max() < 1e-4
        assert (ours - bare).abs().max() > 0.05               # not a no-op
    # the reference glm4-hf-lora, loaded by us and saved again, is what peft makes of the original folder
    m2, _ = load_model(base, dtype="float32")
    load_peft_lora(m2, AT / "glm4-hf-lora", "glm_hf")
    save_peft_lora(m2, tmp_path / "again", "glm_hf", base_name="THUDM/glm-4-9b-chat-hf")
    hf = transformers.GlmForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "again").eval()
    e = expected_cases()["glm4-hf-lora"]
    for c in e["cases"]:
        with torch.no_grad():
            theirs = pm(input_ids=torch.tensor([c["input_ids"]])).logits[0, -2:].float()
        assert (theirs - torch.load(AT / c["logits_file"])).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------------------
# a small random model (no fixtures)
# ------------------------------------------------------------------------------------------------------------

def small(seed=0, family="chatglm3", hidden=64, layers=2) -> GLM:
    cfg = ModelConfig(family=family, vocab_size=96, hidden_size=hidden, num_layers=layers, num_heads=4,
                      num_kv_heads=2, head_dim=16, ffn_hidden_size=96, max_seq_len=64)
    m = GLM(cfg).init_weights(std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def batch(seed=0, B=2, T=12, vocab=96):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_fresh_adapter_is_a_no_op_and_only_lora_trains():
    m = small()
    ids = batch()
    with torch.no_grad():
        want = m(ids)
    done = apply_lora(m, rank=4, alpha=8, targets="all", seed=0)
    assert len(done) == 4 * m.config.num_layers
    with torch.no_grad():
        assert torch.equal(m(ids), want)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    a = m.layers[0].attn.qkv.adapters["default"]
    assert a.A["full"].abs().max() > 0 and a.B["full"].abs().max() == 0     # PEFT's init: A random, B zero
    bound = 1 / (m.config.hidden_size ** 0.5)                             # kaiming_uniform(a=sqrt(5))
    assert a.A["full"].abs().max() <= bound


def test_targets_by_our_names_official_names_and_parts():
    m = small()
    assert apply_lora(m, 2, 4, targets="qkv,down", name="a") == [
        "layers.0.attn.qkv", "layers.0.mlp.down", "layers.1.attn.qkv", "layers.1.mlp.down"]
    assert apply_lora(m, 2, 4, targets=["query_key_value", "dense_h_to_4h"], name="b", layout="chatglm2") == [
        "layers.0.attn.qkv", "layers.0.mlp.up", "layers.1.attn.qkv", "layers.1.mlp.up"]
    H, G, D = 4, 2, 16
    got = apply_lora(m, 2, 4, targets="k_proj,o_proj,gate_up_proj", name="c", layout="glm_hf")
    assert got == ["layers.0.attn.qkv:k", "layers.0.attn.out", "layers.0.mlp.up",
                   "layers.1.attn.qkv:k", "layers.1.attn.out", "layers.1.mlp.up"]
    assert m.layers[0].attn.qkv.adapters["c"].rows == {"k": (H * D, H * D + G * D)}
    assert apply_lora(m, 2, 4, targets="layers.1.mlp.down", name="d") == ["layers.1.mlp.down"]
    assert apply_lora(m, 2, 4, targets="output", name="e") == ["output"]
    assert L.adapter_names(m) == ["a", "b", "c", "d", "e"]


def test_unknown_target_names_it_and_lists_the_valid_ones():
    m = small()
    with pytest.raises(LoRAError, match=r"unknown LoRA target module 'qkv_proj'.*valid targets: qkv, out, up, "
                                        r"down.*q_proj.*query_key_value.*or all"):
        apply_lora(m, 4, 8, targets="qkv,qkv_proj")
    with pytest.raises(LoRAError, match=r"'q_proj' is a module of the glm_hf layout, not of chatglm2"):
        apply_lora(m, 4, 8, targets="q_proj", layout="chatglm2")
    with pytest.raises(LoRAError, match="targets overlap on layers.0.attn.qkv"):
        apply_lora(m, 4, 8, targets="qkv,q_proj")
    assert not L.lora_modules(m)                      # nothing was applied by the failed calls
    with pytest.raises(LoRAError, match="rank must be a positive integer"):
        apply_lora(m, 0, 8)
    apply_lora(m, 4, 8)
    with pytest.raises(LoRAError, match="already has an adapter named 'default'"):
        apply_lora(m, 4, 8)


def test_state_roundtrip_disable_and_per_row_adapters():
    m = small()
    ids = batch(B=3)
    with torch.no_grad():
        bare = m(ids)
    apply_lora(m, 4, 8, targets="all", name="a", seed=1)
    apply_lora(m, 2, 4, targets="q_proj,v_proj,output", name="b", seed=2)
    randomize_b(m)
    with torch.no_grad():
        L.set_active(m, "a")
        ya = m(ids)
        L.set_active(m, "b")
        yb = m(ids)
        assert (ya - bare).abs().max() > 0.01 and (yb - bare).abs().max() > 0.01
        with L.row_adapters(m, ["b", None, "a"]):
            mixed = m(ids)
        assert (mixed[0] - yb[0]).abs().max() < 1e-5
        assert (mixed[1] - bare[1]).abs().max() < 1e-5
        assert (mixed[2] - ya[2]).abs().max() < 1e-5
        with L.lora_disabled(m):
            assert (m(ids) - bare).abs().max() < 1e-6
        assert (m(ids) - yb).abs().max() == 0          # back to "b"
    with pytest.raises(LoRAError, match="no adapter named 'z'"):
        L.set_row_adapters(m, ["a", "z"])
    st = L.lora_state(m, "a")
    assert "layers.0.attn.qkv.A.full" in st and "layers.1.mlp.down.B.full" in st
    m2 = small()
    apply_lora(m2, 4, 8, targets="all", name="a")
    L.load_lora_state(m2, st, "a")
    with torch.no_grad():
        assert (m2(ids) - ya).abs().max() < 1e-6


def trained_lora():
    """-> (a small model with a rank-4 LoRA on every layer, non-zero B; a batch; its logits)."""
    m = small()
    apply_lora(m, 4, 8, targets="all", seed=0)
    randomize_b(m)
    ids = batch()
    with torch.no_grad():
        return m, ids, m(ids)


def test_merge_float_then_quantize_and_refuse_a_quantized_base(tmp_path):
    m, ids, want = trained_lora()
    merge_lora(m)
    with torch.no_grad():
        assert (m(ids) - want).abs().max() < 1e-4
    quantize_model(m, "int8")                          # a merged model is a plain one: quantizable
    q = quantize_model(small(), "int4")
    apply_lora(q, 4, 8, targets="qkv")
    randomize_b(q)
    with pytest.raises(LoRAError, match=r"layers.0.attn.qkv is quantized \(int4\): merging needs the float base"):
        merge_lora(q)
    assert L.lora_modules(q)                           # untouched


def test_merge_into_a_tied_output_unties_it():
    m = small()
    m.config.tie_word_embeddings = True
    m.output.weight = m.tok_embeddings.weight
    apply_lora(m, 4, 8, targets="output", seed=0)
    randomize_b(m)
    emb = m.tok_embeddings.weight.detach().clone()
    ids = batch()
    with torch.no_grad():
        want = m(ids)
    merge_lora(m)
    assert torch.equal(m.tok_embeddings.weight, emb) and m.output.weight is not m.tok_embeddings.weight
    assert not m.config.tie_word_embeddings
    with torch.no_grad():
        assert (m(ids) - want).abs().max() < 1e-4


def test_our_folder_roundtrip_and_peft_key_spellings(tmp_path):
    m, ids, want = trained_lora()
    for layout in ("chatglm2", "glm_hf"):
        save_peft_lora(m, tmp_path / layout, layout, base_name="x")
        assert is_peft_folder(tmp_path / layout)
        m2 = copy.deepcopy(m)
        L.remove_lora(m2)
        load_peft_lora(m2, tmp_path / layout, layout)
        with torch.no_grad():
            assert (m2(ids) - want).abs().max() < 1e-5
    # adapter name kept in the keys (".lora_A.default.weight") and no base_model.model. prefix: both accepted
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "chatglm2" / "adapter_model.safetensors"))
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "adapter_config.json").write_text((tmp_path / "chatglm2" / "adapter_config.json").read_text())
    save_file({k.replace("base_model.model.", "").replace(".weight", ".default.weight"): v for k, v in sd.items()},
              str(alt / "adapter_model.safetensors"))
    m3 = copy.deepcopy(m)
    L.remove_lora(m3)
    load_peft_lora(m3, alt, "chatglm2")
    with torch.no_grad():
        assert (m3(ids) - want).abs().max() < 1e-5
    # .bin (torch.save) like ChatGLM-6B's PEFT 0.11 folder
    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "adapter_config.json").write_text((tmp_path / "chatglm2" / "adapter_config.json").read_text())
    torch.save({k: v.half() for k, v in sd.items()}, binf / "adapter_model.bin")
    m4 = copy.deepcopy(m)
    L.remove_lora(m4)
    load_peft_lora(m4, binf, "chatglm2")
    with torch.no_grad():
        assert (m4(ids) - want).abs().max() < 1e-2    # fp16 weights


# ------------------------------------------------------------------------------------------------------------
# QLoRA: gradients through a frozen INT4 base
# ------------------------------------------------------------------------------------------------------------

def quantized_and_twin(bits=4, fast=False):
    """(quantized model, float model whose weights are the dequantized quantized ones)."""
    f = small(seed=3)
    q = quantize_model(copy.deepcopy(f), f"int{bits}")
    twin = copy.deepcopy(f)
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, QuantLinear):
                twin.get_submodule(name).weight.copy_(mod.weight)
            elif hasattr(mod, "qweight"):                                    # QuantEmbedding
                twin.get_submodule(name).weight.copy_(mod.weight)
    for mod in q.modules():
        if isinstance(mod, QuantLinear):
            mod.use_fast = fast
    if fast:
        assert prepare_model(q, own_threads=False) > 0
    return q, twin


def lora_grads(m, ids, x0):
    """Loss through the blocks from the given input hidden states -> (loss, {lora param: grad}, grad of x)."""
    x = x0.clone().requires_grad_(True)
    rope, mask, _ = m.attention_inputs(ids)
    logits = m.head(m.blocks(x, rope, mask))
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    return loss.item(), grads, x.grad.detach().clone()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=needs_kernels)], ids=["reference", "kernels"])
def test_qlora_gradients_equal_the_dequantized_float_base(fast):
    q, twin = quantized_and_twin(4, fast)
    # adapters on qkv and down only: the gradient must also cross the bare INT4 out / up / output layers
    for m in (q, twin):
        apply_lora(m, 4, 8, targets="qkv,down", seed=0)
        randomize_b(m)
    assert type(q.output) is QuantLinear                        # a bare quantized layer: gradients cross it
    ids = batch(seed=5)
    with torch.no_grad():
        x0 = twin.embed(ids)
        assert (q.embed(ids) - x0).abs().max() < 1e-6
    lq, gq, xq = lora_grads(q, ids, x0)
    lf, gf, xf = lora_grads(twin, ids, x0)
    assert gq.keys() == gf.keys() and len(gq) == 2 * 2 * 2       # 2 targets x 2 layers x (A, B)
    # Reference path: the quantized forward is the twin's matmul on the same dequantized weights (row slices)
    # and the backward is grad_y @ W on them too, so they agree to fp32 summation order (measured: exactly).
    # Kernels: the forward rounds every GEMM input to int8 per 32-block (up to 1/254 of the block's largest
    # magnitude per element, ~0.3% relative per GEMM; the loss agrees to ~5e-4), and a gradient, a sum over 22
    # tokens of products of such activations and of softmax differences, amplifies that: measured 1.5-2.5%
    # relative over seeds for every LoRA tensor and 1.2-1.6% for the input; 5% bounds it with room while a
    # missing or wrong backward term (an O(1) error) fails.
    tol = 5e-2 if fast else 1e-5
    assert abs(lq - lf) <= tol * abs(lf)
    for n in gf:
        assert rel(gq[n], gf[n]) <= tol, (n, rel(gq[n], gf[n]))
    assert rel(xq, xf) <= tol
    assert all(g.abs().max() > 0 for g in gq.values())     # layer 0's adapters got a gradient too


def test_qlora_under_gradient_checkpointing_and_dropout_gives_the_same_gradients():
    runs = []
    for ckpt in (False, True):
        q, twin = quantized_and_twin(4, False)
        apply_lora(q, 4, 8, targets="qkv,down", dropout=0.1, seed=0)
        randomize_b(q)
        q.grad_checkpointing = ckpt
        q.train()
        ids = batch(seed=5)
        with torch.no_grad():
            x0 = twin.embed(ids)
        torch.manual_seed(0)                               # the same dropout masks (checkpoint replays the RNG)
        runs.append(lora_grads(q, ids, x0))
    (l0, g0, x0), (l1, g1, x1) = runs
    assert l0 == l1 and all(torch.allclose(g1[n], g0[n], rtol=1e-5, atol=1e-8) for n in g0)
    assert torch.allclose(x1, x0, rtol=1e-5, atol=1e-8)


def test_grad_input_through_a_quantized_layer_slices_rows(monkeypatch):
    from glmkit import quant
    lin = nn.Linear(64, 200, bias=True)
    ql = QuantLinear.from_linear(lin, 4, 32)
    ql.use_fast = False
    monkeypatch.setattr(quant, "CHUNK_BYTES", 64 * 4 * 7)     # 7 rows per slice: 29 slices, a ragged last one
    gy = torch.randn(3, 5, 200)
    want = gy @ quant.dequantize_tensor(ql.qweight, ql.scales, 4, 32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    ql(x).backward(gy)
    assert (x.grad - want).abs().max() < 1e-4


@pytest.mark.parametrize("base", ["float", "int4"])
def test_a_few_adamw_steps_lower_the_loss(base):
    m = small(seed=4)
    if base == "int4":
        quantize_model(m, "int4")
        prepare_model(m, own_threads=False)
    frozen = {n: t.detach().clone() for n, t in list(m.state_dict().items()) if ".adapters." not in n}
    apply_lora(m, rank=4, alpha=8, dropout=0.05, targets="all", seed=0)
    params = L.lora_parameters(m)
    assert all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=2e-2)
    ids = batch(seed=6, B=2, T=16)
    m.train()
    losses = []
    for _ in range(12):
        logits = m(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    assert losses[-1] < 0.8 * losses[0], losses
    after = {n.replace(".base.", "."): t for n, t in m.state_dict().items() if ".adapters." not in n}
    assert all(torch.equal(after[n], t) for n, t in frozen.items())      # the base did not move


@pytest.mark.parametrize("fast", [False, pytest.param(True, marks=needs_kernels)], ids=["reference", "kernels"])
def test_engine_applies_the_adapter_on_a_quantized_base(fast):
    q, _ = quantized_and_twin(4, fast)
    prompt = batch(seed=7, B=1, T=9)[0].tolist()
    bare = greedy_cached(q, prompt)
    apply_lora(q, 4, 8, targets="all", seed=0, trainable=False)
    randomize_b(q, std=0.3)
    eng = Engine(q, 128, cache_mb=0)
    assert eng.decode_path.startswith("model.forward")        # never the fused path, which has no LoRA
    got = list(eng.generate(prompt, GREEDY))
    assert got != bare
    # a quantized model's cache is fp16 (eng.cache.dtype), so the engine is held to a model.forward loop over
    # such a cache, and the same loop over an fp32 cache to the full recomputation (on the kernels' path this
    # random model meets a near-tie that fp16 keys/values tip after 6 tokens)
    assert eng.cache.dtype == torch.float16
    assert got == cached_loop(q, prompt, torch.float16)
    assert cached_loop(q, prompt, torch.float32) == greedy_full(q, prompt)


def cached_loop(model, prompt, dtype, n=12):
    from glmkit.engine import KVCache
    cache = KVCache.for_model(model, 1, model.config.max_seq_len, dtype=dtype)
    ids, out = list(prompt), []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache, cache_pos=torch.arange(len(ids))[None])
        for _ in range(n):
            t = int(logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            logits = model(torch.tensor([[t]]), cache=cache, cache_pos=torch.tensor([[len(ids) - 1]]))
    return out


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------

def write_folder(path: Path, tensors: dict, **cfg_over) -> Path:
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query_key_value"],
           "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
           "task_type": "CAUSAL_LM"}
    cfg.update(cfg_over)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


QKV = "base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value.lora_{ab}.weight"


def qkv_pair(i=0, K=64, N=128, r=4):
    return {QKV.format(i=i, ab="A"): torch.randn(r, K), QKV.format(i=i, ab="B"): torch.randn(N, r)}


def test_adapter_for_another_base_names_the_tensor_and_both_shapes(tmp_path):
    big = small(hidden=128)
    apply_lora(big, 4, 8, targets="qkv", seed=0)
    save_peft_lora(big, tmp_path / "big", "chatglm2")
    m = small()
    with pytest.raises(LoRAError, match=r"tensor base_model\.model\.transformer\.encoder\.layers\.0\.self_attention"
                                        r"\.query_key_value\.lora_A\.weight has shape \[4, 128\], expected \[4, 64\].*"
                                        r"made for another base"):
        load_peft_lora(m, tmp_path / "big", "chatglm2")
    assert not L.lora_modules(m)


@needs_shared
@needs_adapters
def test_reference_adapter_on_another_base(tmp_path):
    m = small(hidden=64)                         # chatglm2 layout, hidden 64: chatglm3-6b-lora wants hidden 32
    with pytest.raises(LoRAError, match=r"tensor \S+layers\.0\.\S+lora_A\.weight has shape \[4, 32\], expected "
                                        r"\[4, 64\]"):
        load_peft_lora(m, AT / "chatglm3-6b-lora", "chatglm2")
    with pytest.raises(LoRAError, match=r"key base_model\.model\.transformer\.layers\.0\.attention\.query_key_value"
                                        r"\.lora_\w\.weight matches no module of the model: it is a module of the "
                                        r"chatglm layout, and this base is chatglm2"):
        load_peft_lora(m, AT / "chatglm-6b-lora", "chatglm2")


def test_key_that_matches_no_module(tmp_path):
    m = small()                                  # 2 layers
    t = qkv_pair(0) | qkv_pair(7)
    with pytest.raises(LoRAError, match=r"key \S+layers\.7\.self_attention\.query_key_value\.lora_\w\.weight matches "
                                        r"no module of the model: this chatglm2 base has no such module \(layers 0\.\.1\)"):
        load_peft_lora(m, write_folder(tmp_path / "a", t), "chatglm2")
    t = qkv_pair(0) | {"base_model.model.transformer.encoder.layers.0.mlp.fancy.lora_A.weight": torch.randn(4, 64)}
    with pytest.raises(LoRAError, match=r"key \S+mlp\.fancy\.lora_A\.weight matches no module"):
        load_peft_lora(m, write_folder(tmp_path / "b", t), "chatglm2")
    t = qkv_pair(0) | {"base_model.model.transformer.embedding.word_embeddings.lora_embedding_A": torch.randn(4, 96)}
    with pytest.raises(LoRAError, match="LoRA on the embedding is not supported"):
        load_peft_lora(m, write_folder(tmp_path / "c", t), "chatglm2")
    t = {QKV.format(i=0, ab="A"): torch.randn(4, 64)}
    with pytest.raises(LoRAError, match=r"query_key_value\.lora_A\.weight has no matching lora_B tensor"):
        load_peft_lora(m, write_folder(tmp_path / "d", t), "chatglm2")
    with pytest.raises(LoRAError, match=r"has shape \[128, 8\], expected \[128, 4\]"):
        load_peft_lora(m, write_folder(tmp_path / "e", {QKV.format(i=0, ab="A"): torch.randn(4, 64),
                                                        QKV.format(i=0, ab="B"): torch.randn(128, 8)}), "chatglm2")
    assert not L.lora_modules(m)


@pytest.mark.parametrize("option,value,message", [
    ("use_rslora", True, "use_rslora=true is not supported"),
    ("use_dora", True, "use_dora=true is not supported"),
    ("fan_in_fan_out", True, "fan_in_fan_out=true is not supported"),
    ("modules_to_save", ["output_layer"], r'modules_to_save=\["output_layer"\] is not supported'),
    ("bias", "lora_only", "bias='lora_only' is not supported"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa' changes the base weights"),
    ("peft_type", "PREFIX_TUNING", "peft_type is 'PREFIX_TUNING', not 'LORA'"),
])
def test_unsupported_peft_options_are_refused_by_name(tmp_path, option, value, message):
    folder = write_folder(tmp_path / option, qkv_pair(0), **{option: value})
    with pytest.raises(LoRAError, match=message):
        load_peft_lora(small(), folder, "chatglm2")


def test_not_a_peft_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert not is_peft_folder(tmp_path / "empty") and not is_peft_folder(tmp_path / "nope")
    with pytest.raises(LoRAError, match="has no adapter_config.json: not a PEFT adapter folder"):
        load_peft_lora(small(), tmp_path / "empty", "chatglm2")
    with pytest.raises(LoRAError, match="does not exist"):
        load_peft_lora(small(), tmp_path / "nope", "chatglm2")
    f = tmp_path / "cfg-only"
    f.mkdir()
    (f / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    assert not is_peft_folder(f)
    with pytest.raises(LoRAError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load_peft_lora(small(), f, "chatglm2")
    (f / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAError, match="adapter_config.json is not valid JSON"):
        load_peft_lora(small(), f, "chatglm2")
