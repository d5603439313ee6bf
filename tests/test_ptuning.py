"""P-tuning v2 (glmkit/adapters/ptuning.py) against the official stack: every P-tuning case of
../shared/glm/adapters-tiny -- logits of the last two positions within 1e-4, the argmax at every position and the
12 greedy tokens, through the engine's KV cache (the prefix in front of every row) and by full recomputation."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import GLM, needs_shared
from glmkit.adapters.ptuning import AdapterError, PrefixEncoder, load_ptuning, save_ptuning
from glmkit.checkpoint import load_model
from glmkit.engine import Engine
from glmkit.sampling import SamplingParams

AD = GLM / "adapters-tiny"


def _cases():
    if not (AD / "expected.json").is_file():
        return []
    exp = json.loads((AD / "expected.json").read_text())
    return [(name, i, c, case) for name, case in exp.items() if case["method"] == "ptuning"
            for i, c in enumerate(case["cases"])]


CASES = _cases()


def _full(model, enc, ids):
    """Logits [T, V] of a full forward with the prefix (no cache)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        return model(x, enc.prefix_kv(1), cache_pos=torch.arange(len(ids))[None])[0].float()


@needs_shared
@pytest.mark.parametrize("name,i,c,case", CASES, ids=[f"{n}-{i}" for n, i, _, _ in CASES])
def test_official_ptuning_adapters(name, i, c, case):
    model, _ = load_model(AD / case["base"], dtype="float32")
    enc = load_ptuning(AD / case["adapter"], model.config)
    ids = c["input_ids"]
    logits = _full(model, enc, ids)
    want = torch.load(AD / c["logits_file"], weights_only=True)
    assert (logits[-2:] - want).abs().max().item() <= 1e-4
    assert logits.argmax(-1).tolist() == c["argmax_per_position"]
    params = SamplingParams(temperature=0, max_new_tokens=12)
    eng = Engine(model, 128, ptuning=enc.kv(), prefill_chunk=3)          # chunks, then the cache
    assert list(eng.generate(ids, params)) == c["greedy_12"]
    seq = list(ids)
    for _ in range(12):                                                 # full recomputation
        seq.append(int(_full(model, enc, seq)[-1].argmax()))
    assert seq[len(ids):] == c["greedy_12"]
    # without the adapter the base answers differently (the case is not a no-op)
    with torch.inference_mode():
        bare = model(torch.tensor([ids]))[0, -2:].float()
    assert (bare - want).abs().max().item() > 1e-2


@needs_shared
def test_save_then_load_round_trip_and_errors(tmp_path):
    case = json.loads((AD / "expected.json").read_text())["chatglm2-6b-ptuning-proj"]
    model, _ = load_model(AD / case["base"], dtype="float32")
    enc = load_ptuning(AD / case["adapter"], model.config)
    base_conf = json.loads((AD / case["base"] / "config.json").read_text())
    save_ptuning(enc, tmp_path / "out", base_conf)
    again = load_ptuning(tmp_path / "out", model.config)
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["pre_seq_len"] == 4 and conf["prefix_projection"] is True and conf["num_layers"] == 2
    # another base: the error names the tensor and both shapes
    other, _ = load_model(GLM / "reference-tiny" / "chatglm-6b", dtype="float32")
    with pytest.raises(AdapterError, match=r"prefix_encoder\.embedding\.weight has shape \(4, 64\).*needs"):
        load_ptuning(AD / case["adapter"], other.config)
    # prefix_projection in config.json that the weights contradict
    conf["prefix_projection"] = False
    (tmp_path / "out" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(AdapterError, match="trans"):
        load_ptuning(tmp_path / "out", model.config)


def test_prefix_encoder_layouts():
    from glmkit.config import preset
    cfg = preset("chatglm3-6b").replace(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                        ffn_hidden_size=64, vocab_size=100, rope_dim=0)
    enc = PrefixEncoder(cfg, 5, projection=True)
    assert enc.embedding.weight.shape == (5, 2 * 2 * 2 * 8) and enc.trans[0].out_features == 32
    assert enc.kv().shape == (2, 2, 2, 5, 8)
    c6 = preset("chatglm-6b").replace(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=4, head_dim=8,
                                      ffn_hidden_size=64, vocab_size=100, rope_dim=0)
    e6 = PrefixEncoder(c6, 3, projection=True)
    assert e6.embedding.weight.shape == (3, 32) and e6.trans[2].out_features == 2 * 2 * 32


def test_prefix_on_the_fused_path_and_in_batches(monkeypatch):
    """A quantized GLM2+ model with a prefix: the fused step (rows attending to the prefix slots before their own
    positions) gives the tokens of model.forward, alone and eight at a time."""
    from conftest import needs_kernels
    if needs_kernels.args[0]:
        pytest.skip(needs_kernels.kwargs["reason"])
    from glmkit.quant import QuantSpec, prepare_model, quantize_model
    from test_model import tiny
    m = tiny("chatglm3-6b")
    quantize_model(m, QuantSpec.parse("int4"))
    prepare_model(m)
    torch.manual_seed(0)
    enc = PrefixEncoder(m.config, 6, projection=False)
    with torch.no_grad():
        enc.embedding.weight.normal_(0, 1.0)
    kv = enc.kv().detach()
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 17, 30)]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    fused = Engine(m, 96, slots=8, ptuning=kv, prefill_chunk=4)
    assert fused.decode_path == "fused"
    from test_engine import run_all
    got, _ = run_all(fused, prompts, params)
    monkeypatch.setenv("GLMKIT_FAST_DECODE", "0")
    eager = Engine(m, 96, slots=1, ptuning=kv, prefill_chunk=1000, cache_mb=0)
    assert eager.decode_path.startswith("model.forward")
    want = [list(eager.generate(p, params)) for p in prompts]
    assert got == want
