"""Parity with the official modeling code on the tiny reference checkpoints it wrote (../shared/glm/reference-tiny):
fp32 logits of the last 3 positions within 1e-4, argmax at every position, 12-token greedy continuation, both
with the KV cache and with full recomputation; the same after converting to safetensors; bf16 within a stated
tolerance."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import REF, needs_shared, ref_cases, ref_pipeline
from glmkit.sampling import SamplingParams

pytestmark = needs_shared
CASES = ref_cases()
IDS = [f"{g}-{i}" for g, i, _ in CASES]


def greedy_cached(pipe, ids, n=12):
    pipe.engine.reset()
    return list(pipe.engine.generate(ids, SamplingParams(temperature=0, max_new_tokens=n), stop_ids=()))


def greedy_full(model, ids, n=12):
    seq, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            out.append(t)
            seq.append(t)
    return out


def check_against_reference(pipe, gen, i, case, atol=1e-4):
    ids = torch.tensor([case["input_ids"]])
    with torch.inference_mode():
        logits = pipe.model(ids)[0].float()
    ref = torch.load(REF / gen / f"expected_logits_{i}.pt", weights_only=True)
    assert ref.shape == logits[-3:].shape
    err = (logits[-3:] - ref).abs().max().item()
    assert err <= atol, f"max |logit - official| = {err:.3g}"
    assert logits.argmax(-1).tolist() == case["argmax_per_position"]
    assert logits[-1].topk(5).indices.tolist() == case["last_logits_top5"]
    assert torch.allclose(logits[-1, :16], torch.tensor(case["last_logits_first16"]), atol=1e-4)
    assert torch.allclose(logits.sum(-1), torch.tensor(case["logits_sum_per_position"]), atol=1e-2)


@pytest.mark.parametrize("gen,i,case", CASES, ids=IDS)
def test_fp32_logits_and_greedy_match_official(gen, i, case):
    pipe = ref_pipeline(gen)
    check_against_reference(pipe, gen, i, case)
    assert greedy_cached(pipe, case["input_ids"]) == case["greedy_12"]
    assert greedy_full(pipe.model, case["input_ids"]) == case["greedy_12"]


@pytest.mark.parametrize("gen", sorted({g for g, _, _ in CASES}))
def test_same_after_converting_to_safetensors(gen, tmp_path):
    """Official fp16 .bin shards -> official layout in safetensors (index + shards) -> same results."""
    from safetensors.torch import save_file

    from glmkit.checkpoint import load_pickled_shard

    out = tmp_path / gen
    out.mkdir()
    for f in (REF / gen).iterdir():
        if f.suffix != ".bin" and not f.name.endswith(".bin.index.json"):
            shutil.copy(f, out / f.name)
    import json
    idx = json.loads((REF / gen / "pytorch_model.bin.index.json").read_text())
    wm = {}
    for shard in sorted(set(idx["weight_map"].values())):
        sd = {k: v.contiguous() for k, v in load_pickled_shard(REF / gen / shard).items()}
        name = shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        save_file(sd, str(out / name), metadata={"format": "pt"})
        wm.update({k: name for k in sd})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    import glmkit

    pipe = glmkit.load(out, dtype="float32")
    from glmkit.checkpoint import weight_files
    assert all(f.suffix == ".safetensors" for f in weight_files(out))
    for g, i, case in CASES:
        if g == gen:
            check_against_reference(pipe, gen, i, case)
            assert greedy_cached(pipe, case["input_ids"]) == case["greedy_12"]


@pytest.mark.parametrize("gen", sorted({g for g, _, _ in CASES}))
def test_glmkit_layout_round_trip(gen, tmp_path):
    """save in our layout (safetensors + config) and load back: bit-identical weights and outputs."""
    import glmkit
    from glmkit.checkpoint import save_model

    pipe = ref_pipeline(gen)
    save_model(pipe.model, tmp_path / "ours", source_dir=REF / gen)
    back = glmkit.load(tmp_path / "ours", dtype="float32")
    assert back.config.family == pipe.config.family
    for (k, a), (_, b) in zip(pipe.model.state_dict().items(), back.model.state_dict().items()):
        assert torch.equal(a, b), k
    for g, i, case in CASES:
        if g == gen:
            check_against_reference(back, gen, i, case)


# bf16 tolerance, per position: 2^-3 x the standard deviation of that position's fp32 logits. Every logit is a
# dot product of the final hidden state with a row of the output layer, so what bf16 does to the hidden state
# (unit roundoff 2^-8 at each of the ~15 places a tensor is rounded: embedding, norms, projections, residual
# adds, in 2 layers) shows up as a relative error of the whole logit vector, i.e. on the scale of its spread,
# not of its largest entry. 2^-3 = 32 unit roundoffs of that scale; measured worst case 0.087 x std (ChatGLM3).
BF16_STD_TOL = 2 ** -3


@pytest.mark.parametrize("gen,i,case", CASES, ids=IDS)
def test_fp16_checkpoint_loaded_as_bf16(gen, i, case):
    p32, p16 = ref_pipeline(gen), ref_pipeline(gen, "bfloat16")
    assert p16.model.output.weight.dtype == torch.bfloat16
    ids = torch.tensor([case["input_ids"]])
    with torch.inference_mode():
        a = p32.model(ids)[0].float()
        b = p16.model(ids)[0].float()
    tol = BF16_STD_TOL * a.std(-1)                              # [T]
    err = (a - b).abs().amax(-1)
    assert (err <= tol).all(), f"bf16 deviation {err.tolist()} exceeds {tol.tolist()}"
    top2 = a.topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > tol
    assert clear.any()
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
