"""The original GLM (2021: glm-large-chinese, glm-10b-chinese, glm-2b, glm-10b) against what THUDM's own remote
code computed on the tiny checkpoints of ../shared/glm/glm-original-tiny (see its README): logits of the last 3
prompt positions and the 12-token greedy span, with the KV cache and with full recomputation, through
glmkit.load(dir).model(ids); the tokenizers in both published formats; blank infilling end to end; and
multiple-choice scoring against the official GLMForMultipleChoice and against one-choice-at-a-time scoring."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import glmkit
import glmkit.pipeline
from glmkit.engine.cache import KVCache

from conftest import GLM

ORIG = GLM / "glm-original-tiny"
pytestmark = pytest.mark.skipif(not ORIG.is_dir(), reason=f"{ORIG} (original GLM fixtures) is absent")
FOLDERS = ("glm-large-chinese", "glm-10b")


def expected():
    return json.loads((ORIG / "expected.json").read_text())


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models of 64 hidden units: one thread is faster, and on a loaded machine much faster (no OpenMP waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- a GPT-2-format tokenizer (vocab.json + merges.txt) the test builds: the fixtures ship none ----------------

def write_gpt2_tokenizer(folder, corpus: str, n_vocab: int = 50257):
    """Byte-level BPE trained on `corpus` by the tokenizers package, saved in GPT-2's file format, its vocabulary
    padded with unreachable entries to GPT-2's 50257 so that <|endoftext|> is 50256 and GLM's command tokens
    land at the published ids (sop 50257 ... [sMASK] 50264)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus], trainer)
    tok.model.save(str(folder))                       # vocab.json + merges.txt
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    filler = len(vocab)
    while len(vocab) < n_vocab - 1:
        vocab[f"<unused_{filler}>"] = len(vocab)
        filler += 1
    vocab["<|endoftext|>"] = n_vocab - 1
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")


CORPUS = ("Tsinghua University is located in Beijing. Peking University is in Beijing too. The dark side of the "
          "moon is never seen from the earth. Shanghai is a city in China. ") * 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> a loadable folder: the Chinese fixture as it is, the English one copied with a built tokenizer."""
    en = tmp_path_factory.mktemp("glm-10b")
    for f in (ORIG / "glm-10b").iterdir():
        if not f.name.startswith("expected_"):
            shutil.copy(f, en / f.name)
    write_gpt2_tokenizer(en, CORPUS)
    return {"glm-large-chinese": ORIG / "glm-large-chinese", "glm-10b": en}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: glmkit.load(d, dtype="float32") for name, d in folders.items()}


def cases():
    if not ORIG.is_dir():
        return []
    e = expected()
    return [(name, i) for name in FOLDERS for i in range(len(e[name]))]


# --- model parity -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,i", cases())
def test_logits_and_positions_match_official(pipes, name, i):
    c = expected()[name][i]
    model = pipes[name].model
    ids = torch.tensor([c["input_ids"]])
    rope, mask, _ = model.attention_inputs(ids)
    assert torch.stack((rope.pos[0], rope.block[0])).tolist() == c["position_ids"]
    with torch.no_grad():
        logits = model(ids)[0]
    ref = torch.load(ORIG / c["logits_file"])
    torch.testing.assert_close(logits[c["logits_positions"]], ref, atol=1e-4, rtol=0)
    assert logits.argmax(-1).tolist() == c["argmax_per_position"]


def greedy_full(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]), last_only=True)[0, -1].argmax()))
    return ids[-n:]


def greedy_cached(model, ids, n):
    cache = KVCache.for_model(model, 1, 64)
    x = torch.tensor([ids])
    state = model.sequence_state(x)
    out = []
    with torch.no_grad():
        logits = model(x, cache, cache_pos=torch.arange(len(ids))[None], state=state)[0, -1]
        for t in range(n):
            out.append(int(logits.argmax()))
            pos = torch.tensor([[len(ids) + t]])
            logits = model(torch.tensor([[out[-1]]]), cache, cache_pos=pos, state=state)[0, -1]
    return out


@pytest.mark.parametrize("name,i", cases())
def test_greedy_span_matches_official_cached_and_recomputed(pipes, name, i):
    c = expected()[name][i]
    model = pipes[name].model
    assert greedy_full(model, c["input_ids"], 12) == c["greedy_12"]
    assert greedy_cached(model, c["input_ids"], 12) == c["greedy_12"]


def test_glm_prefix_and_config_detection(tmp_path):
    """Keys under "glm." (GLMForConditionalGeneration's state dict) load the same; transformers' native GLM-4
    config (model_type "glm" without block_position_encoding) is still GLM-4."""
    from glmkit.config import from_hf

    src = ORIG / "glm-large-chinese"
    for f in src.iterdir():
        if f.name != "pytorch_model.bin" and not f.name.startswith("expected_"):
            shutil.copy(f, tmp_path / f.name)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({"glm." + k: v for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    c = expected()["glm-large-chinese"][0]
    with torch.no_grad():
        a = glmkit.load(tmp_path, dtype="float32").model(torch.tensor([c["input_ids"]]))[0, -3:]
    torch.testing.assert_close(a, torch.load(ORIG / c["logits_file"]), atol=1e-4, rtol=0)
    cfg = json.loads((src / "config.json").read_text())
    assert from_hf(cfg).family == "glm"
    native = {"model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 100, "intermediate_size": 128}
    assert from_hf(native).family == "glm4"


# --- tokenizers -----------------------------------------------------------------------------------------------

def test_chinese_tokenizer_matches_official(pipes):
    tok = pipes["glm-large-chinese"].tokenizer
    e = expected()
    ex = e["tokenizer_examples"]["glm-large-chinese"]
    assert tok.encode(ex["text"]) == ex["input_ids"]
    assert tok.encode_for_generation(ex["text"]) == ex["generation_input_ids"]
    ids = e["special_ids"]["glm-large-chinese"]
    assert tok.special["[gMASK]"] == ids["[gMASK]"] == 50009 and tok.special["<|endofpiece|>"] == 50007
    assert tok.vocab_size == e["tokenizer_len"]["glm-large-chinese"]


def test_gpt2_tokenizer_ids_and_wrapping_match_transformers(pipes, folders):
    """The built GPT-2-format folder: command tokens at the published ids, and text encoded as transformers'
    GPT2Tokenizer (GLMGPT2Tokenizer's base) encodes it with GLM's tokens added (whitespace next to them
    stripped), wrapped as [CLS] ... <|endoftext|>."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken

    tok = pipes["glm-10b"].tokenizer
    want = expected()["special_ids"]["glm-10b"]
    for name in ("[MASK]", "[sMASK]", "[gMASK]", "[SEP]"):
        assert tok.special[name] == want[name]
    assert tok.special["<|startofpiece|>"] == 50257 and tok.special["<|endofpiece|>"] == 50258
    assert tok.special["[CLS]"] == 50259 and tok.special["<|endoftext|>"] == 50256
    ref = transformers.GPT2Tokenizer(str(folders["glm-10b"] / "vocab.json"), str(folders["glm-10b"] / "merges.txt"))
    ref.add_tokens([AddedToken(t, lstrip=True, rstrip=True, special=True)
                    for t in ("<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNK]", "[gMASK]",
                              "[sMASK]")], special_tokens=True)
    for text in ("Tsinghua University is located in [MASK].", "The dark side of the [MASK] is never seen.",
                 "Peking University [sMASK] Shanghai [gMASK]"):
        assert tok.encode(text) == [50259] + ref.encode(text) + [50256]
    assert tok.decode(tok.encode("Shanghai is a city in China.")) == "Shanghai is a city in China."


# --- blank infilling ------------------------------------------------------------------------------------------

def reference_infill(model, tok, text, n):
    """GLM's blank infilling by hand: [CLS] text <eos> <sop>, positions as build_inputs_for_generation (context
    0..L-1, then the first mask's index with block positions 1, 2, ...), each step a full recomputation with an
    explicit mask; the span's tokens replace the mask token, then the next mask."""
    ids = tok.encode(text)
    masks = {tok.special[m] for m in ("[MASK]", "[sMASK]", "[gMASK]")}
    spans = []
    while any(t in masks for t in ids):
        m = next(i for i, t in enumerate(ids) if t in masks)
        L, seq, new = len(ids), ids + [tok.special["<|startofpiece|>"]], []
        for _ in range(n):
            T = len(seq)
            pos = [[i if i < L else m for i in range(T)], [0 if i < L else i - L + 1 for i in range(T)]]
            q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
            with torch.no_grad():
                logits = model(torch.tensor([seq]), position_ids=torch.tensor([pos]),
                               attention_mask=((k <= q) | (k < L))[None, None], last_only=True)
            t = int(logits[0, -1].argmax())
            if t in (tok.special["<|endofpiece|>"], tok.special["<|endoftext|>"]):
                break
            new.append(t)
            seq.append(t)
        spans.append(new)
        ids = ids[:m] + new + ids[m + 1:]
    return spans


@pytest.mark.parametrize("name,text", [
    ("glm-large-chinese", "清华大学位于[MASK]。它的校园[sMASK]中国的首都是[gMASK]"),
    ("glm-10b", "Tsinghua University is located in [MASK]. The dark side of the [sMASK] Shanghai is [gMASK]"),
    # a context longer than the engine's 32-token prefill chunk: read a layer range at a time (engine/step.py)
    ("glm-large-chinese", "清华大学是中国著名的高等学府，坐落于[MASK]西北郊风景秀丽的清华园，是中国高层次人才培养和科学技术"
                          "研究的基地，被誉为红色工程师的摇篮。它的前身是清华学堂，始建于[sMASK]那一年[gMASK]"),
])
def test_infill_every_mask_left_to_right(pipes, name, text):
    pipe = pipes[name]
    tok = pipe.tokenizer
    out = pipe.infill(text, max_new_tokens=5)
    ref = reference_infill(pipe.model, tok, text, 5)
    assert len(out.spans) == 3
    assert out.spans == [tok.decode(s) for s in ref]
    at = 0
    for piece in glmkit.pipeline.MASK_TEXT.split(text)[::2]:     # the text around the masks is kept, in order
        at = out.index(piece.strip(), at)


def test_infill_cli_and_choose_cli(pipes, folders, capsys):
    from glmkit.cli.main import main

    d = str(folders["glm-large-chinese"])
    assert main(["infill", "--model", d, "清华大学位于[MASK]。", "-n", "4", "--show-spans"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == pipes["glm-large-chinese"].infill("清华大学位于[MASK]。", max_new_tokens=4)
    assert main(["choose", "--model", d, "清华大学位于[MASK]。", "--choice", "北京", "--choice", "上海", "--json"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    scores = pipes["glm-large-chinese"].score_choices("清华大学位于[MASK]。", ["北京", "上海"])
    assert [r["choice"] for r in ranked] == sorted(["北京", "上海"], key=lambda c: -scores[["北京", "上海"].index(c)])


# --- multiple choice ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FOLDERS)
def test_score_choices_match_official_multiple_choice(pipes, name):
    mc = expected()["multiple_choice"][name]
    from glmkit import choices

    pipe = pipes[name]
    n = len(mc["context_ids"])
    choice_ids = mc["choice_ids"]
    packed = choices.pack(mc["context_ids"], choice_ids, pipe.config.sop_token_id, mc["position_ids"][0][n], True)
    assert packed.ids[0].tolist() == mc["input_ids"]
    assert packed.position_ids[0].tolist() == mc["position_ids"]
    assert packed.mask[0, 0].long().tolist() == mc["attention_mask"]
    got = pipe.score_choice_ids(mc["context_ids"], choice_ids)
    assert got == pytest.approx(mc["scores"], abs=1e-4)
    if name == "glm-large-chinese":                  # the real tokenizer: the same from the strings
        assert [pipe.tokenizer.encode_span(c) for c in mc["choices"]] == choice_ids


def brute_force(pipe, context, choices):
    """One forward per choice, positions and mask derived by the model itself from the ids."""
    tok, cfg, out = pipe.tokenizer, pipe.config, []
    for c in choices:
        ch = tok.encode_span(c)
        if cfg.prefix_lm:
            ids = tok.encode_for_generation(context) + ch[:-1]
            first = len(ids) - len(ch)
        else:
            prompt = pipe.chat_format.render([{"role": "user", "content": context}]).ids
            ids, first = prompt + ch[:-1], len(prompt) - 1
        with torch.no_grad():
            lp = torch.log_softmax(pipe.model(torch.tensor([ids]))[0].float(), -1)
        out.append(sum(float(lp[first + j, t]) for j, t in enumerate(ch)))
    return out


@pytest.mark.parametrize("name", ["glm-large-chinese", "glm-10b", "chatglm-6b", "chatglm3-6b"])
def test_score_choices_equal_one_at_a_time(pipes, name):
    from conftest import REF, ref_pipeline
    if name in pipes:
        pipe = pipes[name]
        context, cands = ("清华大学位于[MASK]。", ["北京", "上海交通大学", "广州"]) if "chinese" in name else \
            ("Tsinghua University is located in [MASK].", [" Beijing", " Shanghai", " the dark side of the moon"])
    else:
        if not REF.is_dir():
            pytest.skip("reference checkpoints absent")
        pipe = ref_pipeline(name)
        context, cands = "清华大学位于[MASK]。", ["北京", "上海交通大学", "广州"]
    got = pipe.score_choices(context, cands)
    assert got == pytest.approx(brute_force(pipe, context, cands), abs=1e-4)
    norm = pipe.score_choices(context, cands, length_normalize=True)
    assert norm == pytest.approx([g / len(pipe.tokenizer.encode_span(c)) for g, c in zip(got, cands)], abs=1e-5)


FACTS = [("法国", "巴黎"), ("日本", "东京"), ("英国", "伦敦"), ("德国", "柏林"), ("俄罗斯", "莫斯科"), ("埃及", "开罗")]


def test_trained_tiny_glm_ranks_the_right_choice_first():
    """A 1-layer original GLM trained here in a few seconds on six cloze facts (its positions, masks and loss
    built by hand as GLM trains; the facts' cog-pretrain ids renumbered into a 64-token vocabulary) ranks each
    fact's own answer first among all six, in one packed forward equal to one forward per choice."""
    from glmkit.config import ModelConfig
    from glmkit.model import GLM as Model
    from glmkit.pipeline import Pipeline
    from glmkit.tokenizer import load_tokenizer

    tok = load_tokenizer(ORIG / "glm-large-chinese", "glm")
    sp = tok.special
    facts = [(tok.encode(f"{country}的首都是[MASK]。"), tok.encode_span(city)) for country, city in FACTS]
    used = sorted({t for c, a in facts for t in c + a} | {sp["<|startofpiece|>"], sp["<|endofpiece|>"]})
    small = {t: i for i, t in enumerate(used)}
    S = small.__getitem__
    cfg = ModelConfig(family="glm", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=16, ffn_hidden_size=64, max_seq_len=64, norm="layernorm", activation="gelu_erf",
                      out_bias=True, mlp_bias=True, prefix_lm=True, pos_embedding="learned_2d", first_mask_any=True,
                      tie_word_embeddings=True, mask_token_id=S(sp["[MASK]"]), sop_token_id=S(sp["<|startofpiece|>"]),
                      eos_token_id=S(sp["<|endofpiece|>"]), pad_token_id=S(sp["<|endoftext|>"]))
    facts = [([S(t) for t in c], [S(t) for t in a]) for c, a in facts]
    torch.manual_seed(0)
    model = Model(cfg).init_weights(std=0.05, seed=0)
    rows = []
    for ctx, ans in facts:
        ans = ans + [cfg.eos_token_id]
        ids = ctx + [cfg.sop_token_id] + ans[:-1]
        L, m, T = len(ctx), ctx.index(cfg.mask_token_id), len(ctx) + len(ans)
        pos = [[i if i < L else m for i in range(T)], [0 if i < L else i - L + 1 for i in range(T)]]
        q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        rows.append((torch.tensor([ids]), torch.tensor([pos]), ((k <= q) | (k < L))[None, None],
                     torch.tensor([[-100] * L + ans])))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        opt.zero_grad()
        sum(model(i, position_ids=p, attention_mask=a, targets=t) for i, p, a, t in rows).backward()
        opt.step()
    model.eval()
    pipe = Pipeline(model, tok)
    answers = [a for _, a in facts]
    for j, (ctx, ans) in enumerate(facts):
        scores = pipe.score_choice_ids(ctx, answers)
        assert max(range(len(answers)), key=scores.__getitem__) == j
        one_by_one = []
        for a in answers:
            ids = ctx + [cfg.sop_token_id] + a[:-1]
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
            one_by_one.append(sum(float(lp[len(ctx) + i, t]) for i, t in enumerate(a)))
        assert scores == pytest.approx(one_by_one, abs=1e-4)


def test_chat_is_refused_and_fused_decode_declines(pipes):
    from glmkit.chat_format import ChatFormatError
    from glmkit.engine.fast_decode import why_not

    with pytest.raises(ChatFormatError, match="no chat format"):
        pipes["glm-10b"].chat("hello")
    from glmkit import kernels
    reason = why_not(pipes["glm-10b"].model)
    assert reason is not None and ("layout" in reason or not kernels.available())


def test_server_completions_fill_every_mask(pipes):
    """glmkit serve over real HTTP, the openai client: one mask -> its span (as ChatGLM-6B's prompts get), several
    -> the completed text and "spans", the same as Pipeline.infill."""
    openai = pytest.importorskip("openai")
    from _server_util import running_server

    pipe = pipes["glm-large-chinese"]
    one, several = "清华大学位于[MASK]。", "清华大学位于[MASK]。它的校园[sMASK]中国的首都是[gMASK]"
    with running_server(pipe=pipe) as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        r1 = client.completions.create(model="glm-large-chinese", prompt=one, max_tokens=4, temperature=0)
        r2 = client.completions.create(model="glm-large-chinese", prompt=several, max_tokens=4, temperature=0)
    want1, want2 = pipe.infill(one, max_new_tokens=4), pipe.infill(several, max_new_tokens=4)
    assert r1.choices[0].text == want1.spans[0]
    assert r2.choices[0].text == str(want2)
    assert r2.choices[0].model_extra["spans"] == want2.spans


def test_generate_save_and_quantized_load(pipes, tmp_path):
    """generate() is infilling of a trailing [gMASK]; a glmkit-saved copy (tokenizer files carried over) gives the
    official logits; an INT8 load runs and stays near them."""
    from glmkit.checkpoint import save_model

    pipe = pipes["glm-large-chinese"]
    assert pipe.generate("清华大学", max_new_tokens=4, temperature=0) == \
        pipe.infill("清华大学[gMASK]", max_new_tokens=4).spans[0]
    c = expected()["glm-large-chinese"][0]
    ref = torch.load(ORIG / c["logits_file"])
    save_model(pipe.model, tmp_path / "saved", source_dir=ORIG / "glm-large-chinese")
    for kw, tol in (({}, 1e-4), ({"quantize": "int8"}, 0.5)):
        src = tmp_path / "saved" if not kw else ORIG / "glm-large-chinese"
        p = glmkit.load(src, **kw)
        with torch.no_grad():
            got = p.model(torch.tensor([c["input_ids"]]))[0, -3:]
        assert (got - ref).abs().max() < tol
        assert p.tokenizer.encode("清华大学") == pipe.tokenizer.encode("清华大学")
