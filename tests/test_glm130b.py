"""GLM-130B from its SwissArmyTransformer checkpoints: parity with SAT's GLM130B class on ../shared/glm/
glm-130b-tiny (whole and split 2-way by tools/convert_tp.py), GLM-130B's own INT8/INT4 shards (written here
with the published scheme), the icetk ids, convert_tp.py's rules, and GLM-130B's beam search."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from conftest import GLM, OFFICIAL

G130 = GLM / "glm-130b-tiny"
ICE = OFFICIAL / "chatglm-6b" / "ice_text.model"
needs_130b = pytest.mark.skipif(not G130.is_dir() or not ICE.is_file(),
                                reason=f"{G130} (GLM-130B tiny reference) is absent")
CASES = json.loads((G130 / "expected.json").read_text()) if G130.is_dir() else []


def _sat_dir(tmp, src):
    """A SAT folder as published (latest, <iteration>/, model_args.json) with icetk's text model beside it."""
    tmp.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (tmp / f.name).symlink_to(f)
    (tmp / "ice_text.model").symlink_to(ICE)
    return tmp


_PIPES: dict = {}


def _pipe(factory, mp):
    import glmkit
    if mp not in _PIPES:
        _PIPES[mp] = glmkit.load(_sat_dir(factory.mktemp(mp) / "ckpt", G130 / mp), dtype="float32")
    return _PIPES[mp]


@pytest.fixture(scope="module", params=["mp1", "mp2"])
def pipe(request, tmp_path_factory):
    """Both shardings: the whole checkpoint and its 2-way split."""
    return _pipe(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def pipe1(tmp_path_factory):
    return _pipe(tmp_path_factory, "mp1")


@needs_130b
@pytest.mark.parametrize("case", range(3))
def test_logits_and_greedy_span_match_sat(pipe, case):
    c = CASES[case]
    ids = torch.tensor([c["input_ids"]])
    with torch.no_grad():
        logits = pipe.model(ids)[0]                  # positions and mask derived from the ids
    ref = torch.load(G130 / c["logits_file"])
    assert (logits[-3:] - ref).abs().max().item() < 1e-4
    assert logits.argmax(-1).tolist() == c["argmax_per_position"]
    cached = list(pipe.start_generate(c["input_ids"], max_new_tokens=12, temperature=0).tokens)
    assert cached == c["greedy_12"]
    seq = list(c["input_ids"])                       # full recomputation of the whole sequence every step
    for _ in range(12):
        with torch.no_grad():
            seq.append(int(pipe.model(torch.tensor([seq]), last_only=True)[0, -1].argmax()))
    assert seq[len(c["input_ids"]):] == c["greedy_12"]


@needs_130b
def test_explicit_official_positions_and_mask_give_the_same_logits(pipe1):
    pipe = pipe1
    c = CASES[0]
    n = c["context_length"]
    pos = torch.tensor([c["position_ids"]])
    see = torch.ones(n, n).tril()
    see[:, :n - 1] = 1                               # generate.py: context before sop bidirectional
    with torch.no_grad():
        a = pipe.model(torch.tensor([c["input_ids"]]), position_ids=pos, attention_mask=see.bool()[None, None])
        b = pipe.model(torch.tensor([c["input_ids"]]))
    assert torch.equal(a, b)


@needs_130b
def test_tokenizer_is_icetk_on_chatglm6b_pieces(pipe1):
    pipe = pipe1
    import sentencepiece as spm

    tok = pipe.tokenizer
    sp = spm.SentencePieceProcessor(model_file=str(ICE))
    published = json.loads((G130 / "checks.json").read_text())["special_ids"]["sat_icetk_glm_130B"]
    assert {k: tok.special[k] for k in published} == published
    for c in CASES:                                  # generate.py's inputs, as the fixture recorded them
        assert tok.encode(c["text"]) == c["input_ids"]
    text = "清华大学 is in Beijing."
    assert tok.encode_plain(text) == [i + 20000 for i in sp.encode(text)]
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert pipe.chat_format.stop_ids == [published["eop"], published["eos"]]


@needs_130b
def test_convert_tp_rules_reproduce_the_published_split():
    from glmkit.sat_checkpoint import merge_tp, split_tp

    one = torch.load(G130 / "mp1/49300/mp_rank_00_model_states.pt", weights_only=True)["module"]
    two = [torch.load(G130 / f"mp2/49300/mp_rank_0{r}_model_states.pt", weights_only=True)["module"]
           for r in range(2)]
    for mine, theirs in zip(split_tp(one, 2), two):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    merged = merge_tp(two)
    assert all(torch.equal(merged[k], one[k]) for k in one if "inv_freq" not in k)


# --- GLM-130B's own quantized shards ---------------------------------------------------------------------------

def _published_quantize(w, bits):
    """tools/convert_tp.py / quantization/layers.py: per-row absmax scale (fp16), round, int8; INT4 packs two
    per byte, the even column in the high nibble (cuda/quantization.cu's int4WeightCompression)."""
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w.float() / scale.float()[:, None]).to(torch.int8)
    if bits == 4:
        q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0b1111)).to(torch.int8)
    return q, scale


def _published_dequantize(q, scale, bits):
    if bits == 4:                                    # int4WeightExtraction: high = b >> 4, low = (b << 4) >> 4
        hi, lo = q >> 4, (q << 4) >> 4
        q = torch.stack((hi, lo), dim=-1).view(q.shape[0], -1)
    return q.float() * scale.float()[:, None]


QKEYS = ("attention.query_key_value.weight", "attention.dense.weight", "mlp.dense_h_to_4h.weight",
         "mlp.dense_4h_to_h.weight")


def _write_quantized(src_shards, out, bits, args):
    """Each rank's float shard quantized as convert_tp.py --quantization-bit-width writes it."""
    (out / "7").mkdir(parents=True)
    (out / "latest").write_text("7")
    (out / "model_args.json").write_text(json.dumps({**args, "quantization-bit-width": bits}))
    for r, sd in enumerate(src_shards):
        sd = dict(sd)
        for k in list(sd):
            if k.endswith(QKEYS):
                sd[k], sd[k + "_scale"] = _published_quantize(sd[k], bits)
        torch.save({"module": sd}, out / "7" / f"mp_rank_{r:02d}_model_states.pt")
    return out


def _float_with(model_float, shards, bits):
    """The float model with every quantized weight replaced by GLM-130B's dequantized values (joined)."""
    from glmkit.sat_checkpoint import merge_tp
    deq = [{k: _published_dequantize(*_published_quantize(v, bits), bits) if k.endswith(QKEYS) else v
            for k, v in sd.items()} for sd in shards]
    if len(deq) > 1:                                 # per-rank dequantized columns, joined by convert_tp rules
        deq = [merge_tp(deq)]
    m = model_float
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            p = f"transformer.layers.{i}."
            layer.attn.qkv.weight.copy_(deq[0][p + QKEYS[0]])
            layer.attn.out.weight.copy_(deq[0][p + QKEYS[1]])
            layer.mlp.up.weight.copy_(deq[0][p + QKEYS[2]])
            layer.mlp.down.weight.copy_(deq[0][p + QKEYS[3]])
    return m


def _reference_path(model):
    from glmkit.quant import QuantLinear
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.use_fast, n = False, n + 1
    return n


def _wide_sat(tmp, tp=2):
    """A random GLM-130B-style model wide enough that every rank's columns hold whole 32-blocks (the tiny
    fixture's row-parallel ranks have 16 and 40 columns), split by convert_tp.py's rules."""
    from glmkit.model import GLM
    from glmkit.config import from_sat_args
    from glmkit.sat_checkpoint import split_tp
    args = {"num-layers": 2, "hidden-size": 64, "inner-hidden-size": 128, "vocab-size": 512,
            "num-attention-heads": 4, "max-sequence-length": 256, "layernorm-order": "post",
            "model-parallel-size": tp}
    g = torch.Generator().manual_seed(5)
    m = GLM(from_sat_args(args))
    sd = {}
    for name, p in m.named_parameters():
        sd[name] = (torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 0.02)).half()
    names = {"tok_embeddings.weight": "transformer.word_embeddings.weight", "norm.weight":
             "transformer.final_layernorm.weight", "norm.bias": "transformer.final_layernorm.bias"}
    ours = {"attn_norm": "input_layernorm", "attn.qkv": "attention.query_key_value", "attn.out": "attention.dense",
            "ffn_norm": "post_attention_layernorm", "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}
    sat = {}
    for k, v in sd.items():
        if k in names:
            sat[names[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        mod, leaf = rest.rsplit(".", 1)
        sat[f"transformer.layers.{i}.{ours[mod]}.{leaf}"] = v
    return args, sat, split_tp(sat, tp)


@needs_130b
@pytest.mark.parametrize("bits", [8, 4])
def test_glm130b_quantized_shards_load_as_quantized_layers(tmp_path, tmp_path_factory, bits):
    import copy

    from glmkit.checkpoint import load_model
    from glmkit.quant import QuantLinear, quantize_model

    args = json.loads((G130 / "mp1/model_args.json").read_text())
    one = [torch.load(G130 / "mp1/49300/mp_rank_00_model_states.pt", weights_only=True)["module"]]
    model, info = load_model(_write_quantized(one, tmp_path / "q", bits, args))
    assert info.layout == "sat" and model.config.quantization["bits"] == bits
    assert isinstance(model.layers[0].attn.qkv, QuantLinear) and model.layers[0].attn.qkv.bits == bits
    assert not isinstance(model.layers[0].mlp.down, QuantLinear)      # 80 inputs: no 32-block; exact in float
    assert _reference_path(model) == 6
    float_model = _pipe(tmp_path_factory, "mp1").model
    theirs = _float_with(copy.deepcopy(float_model), one, bits)
    ids = torch.tensor([CASES[1]["input_ids"]])
    with torch.no_grad():
        got, want = model(ids)[0], theirs(ids)[0]
    assert (got - want).abs().max().item() < 1e-4                  # the very values GLM-130B computes with
    float_logits = torch.load(G130 / CASES[1]["logits_file"])
    ours = quantize_model(copy.deepcopy(float_model), f"int{bits}")  # glmkit's own block quantization
    _reference_path(ours)
    with torch.no_grad():
        own = ours(ids)[0]
    err_sat = (got[-3:] - float_logits).abs().mean().item()
    err_own = (own[-3:] - float_logits).abs().mean().item()
    print(f"INT{bits} mean |logit error| vs fp32: GLM-130B's per-row scheme {err_sat:.4f}, glmkit's blocks "
          f"{err_own:.4f} (mean |logit| {float_logits.abs().mean().item():.4f})")
    assert 0 < err_sat < 3 * err_own and 0 < err_own < 3 * err_sat          # the same order of error


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_ranks_keep_their_own_scales_when_joined(tmp_path, bits):
    from glmkit.checkpoint import load_model, save_model
    from glmkit.quant import QuantLinear

    args, full, shards = _wide_sat(tmp_path)
    model, _ = load_model(_write_quantized(shards, tmp_path / "q", bits, args))
    down = model.layers[1].mlp.down
    assert isinstance(down, QuantLinear) and isinstance(model.layers[1].attn.out, QuantLinear)
    assert _reference_path(model) == 8
    # each rank scaled its own half of the row-parallel columns: two scales per row, as GLM-130B holds them
    assert not torch.equal(down.scales[:, 0], down.scales[:, -1])
    float_dir = tmp_path / "f"
    (float_dir / "7").mkdir(parents=True)
    (float_dir / "latest").write_text("7")
    (float_dir / "model_args.json").write_text(json.dumps(args))
    for r, sd in enumerate(shards):
        torch.save({"module": sd}, float_dir / "7" / f"mp_rank_{r:02d}_model_states.pt")
    ref, _ = load_model(float_dir, dtype="float32")
    theirs = _float_with(ref, shards, bits)
    ids = torch.tensor([[5, 9, 200, 3, 17, 150, 151, 40]])
    with torch.no_grad():
        assert (model(ids) - theirs(ids)).abs().max().item() < 1e-4
    save_model(model, tmp_path / "saved")                # glmkit's own layout keeps the blocks as they are
    again, info = load_model(tmp_path / "saved")
    assert info.layout == "glmkit" and again.config.family == "glm130b"
    _reference_path(again)
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    # and the fast kernels run them
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.use_fast = True
    with torch.no_grad():
        fast = model(ids)
    assert torch.isfinite(fast).all() and (fast - theirs(ids)).abs().max().item() < 0.1 * theirs(ids).abs().max()


def test_a_wrong_checkpoint_is_named(tmp_path):
    from glmkit.checkpoint import CheckpointError, load_model

    args, full, shards = _wide_sat(tmp_path)
    d = tmp_path / "c"
    (d / "3").mkdir(parents=True)
    (d / "latest").write_text("3\n")
    (d / "model_args.json").write_text(json.dumps(args))
    torch.save({"module": shards[0]}, d / "3" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="lacks mp_rank_00"):
        load_model(d)
    torch.save({"module": shards[1]}, d / "3" / "mp_rank_00_model_states.pt")
    (d / "model_args.json").write_text(json.dumps({**args, "model-parallel-size": 4}))
    with pytest.raises(CheckpointError, match="model-parallel-size 4"):
        load_model(d)
    (d / "model_args.json").write_text(json.dumps({**args, "hidden-size": 128}))
    with pytest.raises(CheckpointError, match="word_embeddings.weight.*expected"):
        load_model(d)


def test_preset_has_the_published_sizes_and_the_fused_step_declines():
    from glmkit.config import preset
    from glmkit.engine.fast_decode import why_not
    from glmkit.model import GLM
    from glmkit.quant import quantize_model

    cfg = preset("glm-130b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_hidden_size) == (70, 12288, 96, 32768)
    assert cfg.residual_alpha == math.sqrt(140) and cfg.rope_dim == cfg.head_dim == 128
    small = GLM(cfg.replace(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=2, head_dim=32, rope_dim=32,
                            ffn_hidden_size=64, vocab_size=256)).init_weights(seed=0)
    quantize_model(small, "int4")
    assert why_not(small) is not None


# --- beam search -------------------------------------------------------------------------------------------

def _table_step(table):
    """A 'model' whose next-token logits depend on the last token only (table [V, V]) and the first step."""
    state = {"last": None}

    def step(parents, tokens):
        if parents is None:
            state["last"] = [0]
            return table[0][None]
        state["last"] = tokens
        return table[torch.tensor(tokens)]
    return step


def test_beam_search_with_enough_beams_is_exhaustive():
    from glmkit.engine.beam import BeamParams, beam_search

    g = torch.Generator().manual_seed(3)
    V, T = 4, 3
    table = torch.randn(V, V, generator=g) * 2
    lp = torch.log_softmax(table, -1)
    best = max(itertools.product(range(V), repeat=T),
               key=lambda s: sum(lp[a, b] for a, b in zip((0,) + s[:-1], s)).item())
    beams = beam_search(_table_step(table), [0], T, BeamParams(num_beams=V ** (T - 1)))
    assert tuple(beams[0].tokens) == best
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    one = beam_search(_table_step(table), [0], T, BeamParams(num_beams=1))      # one beam = greedy
    greedy, last = [], 0
    for _ in range(T):
        last = int(table[last].argmax())
        greedy.append(last)
    assert one[0].tokens == greedy


def test_beam_search_end_tokens_min_length_and_ngram_bans():
    from glmkit.engine.beam import BeamParams, beam_search

    V, END = 5, 4
    table = torch.full((V, V), -5.0)
    table[:, END] = 5.0                                  # the end token is always most likely
    table[:, 1] = 4.0
    ended = beam_search(_table_step(table), [0], 6, BeamParams(num_beams=2, end_tokens=(END,)))
    assert ended[0].ended and ended[0].tokens == []
    held = beam_search(_table_step(table), [0], 6, BeamParams(num_beams=2, end_tokens=(END,), min_gen_length=3))
    assert all(len(b.tokens) >= 3 for b in held) and held[0].ended
    rep = beam_search(_table_step(table), [0], 6, BeamParams(num_beams=2, no_repeat_ngram_size=2))
    for b in rep:
        seq = [0] + b.tokens
        grams = [tuple(seq[i:i + 2]) for i in range(len(seq) - 1)]
        assert len(grams) == len(set(grams))
    plain = beam_search(_table_step(table), [0], 6, BeamParams(num_beams=2))
    assert plain[0].tokens[:3] == [END, END, END]        # nothing bans it without the options


@needs_130b
def test_beam_search_on_the_model_uses_the_cache_correctly(pipe1):
    pipe = pipe1
    from glmkit.engine.beam import BeamParams, beam_search

    c = CASES[0]
    one = pipe.beam_search(c["input_ids"], 1, max_new_tokens=12)
    assert one[0].tokens == c["greedy_12"]
    prompt = c["input_ids"]

    def recompute(parents, tokens, seqs=[list(prompt)]):      # whole sequences every step, no cache
        if parents is not None:
            seqs[:] = [seqs[p] + [t] for p, t in zip(parents, tokens)]
        with torch.no_grad():
            return torch.cat([pipe.model(torch.tensor([s]), last_only=True)[:, -1] for s in seqs])
    params = BeamParams(num_beams=3, no_repeat_ngram_size=2, end_tokens=tuple(pipe.chat_format.stop_ids))
    want = beam_search(recompute, prompt, 5, params)
    got = pipe.beam_search(prompt, 3, max_new_tokens=5, no_repeat_ngram_size=2)
    assert [b.tokens for b in got] == [b.tokens for b in want]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(got, want))


@needs_130b
def test_fill_blanks_as_generate_py(pipe1):
    pipe = pipe1
    out = pipe.infill(CASES[0]["text"], max_new_tokens=12, temperature=0)
    tok = pipe.tokenizer
    assert out.spans == [tok.decode(CASES[0]["greedy_12"])]
    assert out == CASES[0]["text"].replace("[MASK]", out.spans[0])
    two = pipe.infill("A [MASK] B [sMASK] C [MASK].", max_new_tokens=3, temperature=0)
    assert len(two.spans) == 2 and "[sMASK]" in two          # only the generation mask ([MASK]) is filled
    cont = pipe.infill(CASES[2]["text"], max_new_tokens=4, temperature=0)
    assert cont == CASES[2]["text"] + cont.spans[0] and cont.spans[0] == tok.decode(CASES[2]["greedy_12"][:4])


@needs_130b
def test_generate_and_infill_commands_take_beams(pipe1, monkeypatch, capsys):
    from glmkit.cli.main import main

    # the model loaded once for the module; patched where the two commands bound it (patching cli.common
    # itself would leave the lambda in every command module main() imports meanwhile)
    monkeypatch.setattr("glmkit.cli.generate.load_pipeline", lambda args: pipe1)
    monkeypatch.setattr("glmkit.cli.infill.load_pipeline", lambda args: pipe1)
    text = CASES[2]["text"]
    assert main(["generate", "--model", str(pipe1.path), "--prompt", text, "--beams", "2", "-n", "3",
                 "--no-repeat-ngram-size", "2"]) == 0
    want = pipe1.beam_search(text, 2, max_new_tokens=3, no_repeat_ngram_size=2)[0]
    assert capsys.readouterr().out == want + "\n"
    assert main(["infill", "--model", str(pipe1.path), text, "-n", "3", "-t", "0", "--show-spans"]) == 0
    out = capsys.readouterr().out.splitlines()          # no mask in the text: GLM-130B appends [gMASK]
    assert out[0] == text + pipe1.tokenizer.decode(CASES[2]["greedy_12"][:3]) and out[1].startswith("[gMASK] #1")
